"""A model that returns the same preallocated tensor on every call (TensorRT / ONNX Runtime io-binding, a
CUDA-graph-replayed network, an ``out=`` buffer) must give the same samples as one returning fresh tensors.

The wrapper below computes the model's output, writes it into one buffer per (shape, dtype) and returns that
buffer, so the next call overwrites what the previous one returned. A solver that kept a raw output across a
later model call without owning a copy would read the newer output in its place. Every registered solver
(``fs.solvers()``: new ones join automatically) and a few non-default configurations are run twice, fresh
and reused, from the same seed on the same backend: results must be bitwise equal (same inputs to the same
deterministic kernels; the buffer's values are those of the fresh tensor, bit for bit), on the torch twin
(the tests' default) and, for the solvers that were restructured for this, on the Triton kernels. ``fs.odeint``
and ``fs.log_likelihood`` get the same check, and so does classifier-free guidance with two separate calls
(``fs.guidance.CFG(..., uncond=None)``, which owns its first output before the second call).
"""
import pytest
import torch

import flowsolve as fs
from flowsolve.solvers import DEIS, DPMSolverPP3M, GottaGoFast, PredictorCorrector, Restart, UniPC

MU = torch.tensor([0.7, -1.5], dtype=torch.float64)
STD = torch.tensor([0.4, 1.3], dtype=torch.float64)
SHAPE = (6, 2)


class ReusedOutput:
    """``fn``'s result written into one buffer per (shape, dtype, device) and that buffer returned."""

    def __init__(self, fn):
        self.fn, self.bufs, self.calls = fn, {}, 0

    def __call__(self, x, t):
        out = self.fn(x, t)
        key = (tuple(out.shape), out.dtype, out.device)
        buf = self.bufs.get(key)
        if buf is None:
            buf = self.bufs[key] = torch.empty_like(out)
        self.calls += 1
        return buf.copy_(out)


def _problem():
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(MU, STD, path)
    return path, prob


def _kwargs(info):
    # adaptive solvers choose their own steps (ggf loosely: ~100 evaluations, with rejections, so that F is reused
    # across attempts); fixed-step ones take few steps (restart's default interval attaches to a point of this
    # grid; heun-like solvers correct on every step: t_min > 0)
    if info.name == "ggf":
        return {"rtol": 5e-2, "atol": 5e-2}
    return {"rtol": 1e-3, "atol": 1e-3} if info.adaptive else {"steps": 5}


SOLVERS = [pytest.param(s.name, _kwargs(s), id=s.name) for s in fs.solvers()]
# configurations whose code paths the registered defaults do not take
EXTRA = [
    pytest.param(PredictorCorrector(predictor="heun"), {"steps": 4}, id="pc-heun"),
    pytest.param(PredictorCorrector(predictor="dpm3", step_size="sigma"), {"steps": 4}, id="pc-dpm3-sigma"),
    pytest.param(Restart(intervals=((0.06, 0.3, 2, 2), (1.0, 3.0, 1, 3))), {"steps": 6}, id="restart-2-intervals"),
    pytest.param(DPMSolverPP3M(warmup="multistep"), {"steps": 5}, id="dpm++3m-multistep"),
    pytest.param(GottaGoFast(denoise=True), {"rtol": 1e-2, "atol": 1e-2}, id="ggf-denoise"),
    pytest.param(DEIS(warmup="singlestep"), {"steps": 5}, id="deis-singlestep"),
    pytest.param(UniPC(corrector=False), {"steps": 5}, id="unipc-no-corrector"),
    # a last step to sigma = 0: the Euler / DDIM / lower-order fallbacks of the multi-evaluation solvers
    *[pytest.param(name, {"steps": 4, "t_min": 0.0, "grid": "uniform"}, id=f"{name}-to-sigma0")
      for name in ("heun", "edm-sde", "restart", "dpm2", "dpm3", "rk4", "midpoint", "dpm++3m")],
]


@pytest.mark.parametrize("solver,kwargs", SOLVERS + EXTRA)
def test_model_returning_one_reused_buffer_gives_the_fresh_output_result(solver, kwargs):
    path, prob = _problem()
    reused = ReusedOutput(prob.eps)
    fresh = fs.sample(fs.Model(prob.eps, path, predicts="eps"), SHAPE, solver=solver, seed=3, **kwargs)
    got = fs.sample(fs.Model(reused, path, predicts="eps"), SHAPE, solver=solver, seed=3, **kwargs)
    assert reused.calls >= 2
    assert torch.isfinite(fresh).all()
    assert torch.equal(got, fresh), f"max |reused - fresh| = {(got - fresh).abs().max():.3g}"


@pytest.mark.parametrize("solver", ["heun", "edm-sde", "restart", "dpm2", "dpm3", "ggf"])
def test_reused_buffer_on_the_triton_kernels(solver):
    """The solvers restructured for this (and dpm2, restructured with dpm3) on the Triton kernels (the interpreter
    in CI): same bitwise check, the kernels' own aliasing rules in play."""
    path, prob = _problem()
    kwargs = {"rtol": 5e-2, "atol": 5e-2} if solver == "ggf" else {"steps": 4}
    fresh = fs.sample(fs.Model(prob.eps, path, predicts="eps"), SHAPE, solver=solver, seed=3, backend="triton",
                      **kwargs)
    got = fs.sample(fs.Model(ReusedOutput(prob.eps), path, predicts="eps"), SHAPE, solver=solver, seed=3,
                    backend="triton", **kwargs)
    assert torch.isfinite(fresh).all()
    assert torch.equal(got, fresh), f"max |reused - fresh| = {(got - fresh).abs().max():.3g}"


def test_reused_buffer_wrapper_is_seen_by_a_solver_that_keeps_an_output():
    """The wrapper does what it claims: an output kept across the next call is overwritten (so the test above
    can fail)."""
    path, prob = _problem()
    reused = ReusedOutput(prob.eps)
    x = torch.randn(SHAPE)
    a = reused(x, torch.full((SHAPE[0],), 0.5))
    a_val = a.clone()
    b = reused(x * 2, torch.full((SHAPE[0],), 0.3))
    assert a is b and not torch.equal(a, a_val)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4", "bosh3", "dopri5", "tsit5"])
def test_odeint_with_f_returning_one_reused_buffer(solver):
    path, prob = _problem()
    model = fs.Model(prob.eps, path, predicts="eps")

    def u(x, t):  # the PF-ODE velocity of the Gaussian problem
        a, b = model.conversion("velocity", t.double().reshape(1))
        return x * float(a) + prob.eps(x, t.expand(x.shape[0])) * float(b)

    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    kw = {"rtol": 1e-4, "atol": 1e-4} if solver in ("bosh3", "dopri5", "tsit5") else {}
    fresh = fs.odeint(u, x0, grid, solver=solver, **kw)
    reused = ReusedOutput(u)
    got = fs.odeint(reused, x0, grid, solver=solver, **kw)
    assert reused.calls >= 4
    assert torch.equal(got, fresh)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4", "bosh3", "dopri5"])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_log_likelihood_with_a_model_returning_one_reused_buffer(solver, divergence):
    path, prob = _problem()
    x = prob.sample(SHAPE[0], 1e-3, generator=torch.Generator().manual_seed(2)).float()
    kw = {"rtol": 1e-3, "atol": 1e-3} if solver in ("bosh3", "dopri5") else {"steps": 4}
    fresh = fs.log_likelihood(fs.Model(prob.eps, path, predicts="eps"), x, solver=solver, divergence=divergence,
                              seed=5, **kw)
    reused = ReusedOutput(prob.eps)
    got = fs.log_likelihood(fs.Model(reused, path, predicts="eps"), x, solver=solver, divergence=divergence,
                            seed=5, **kw)
    assert reused.calls >= 4
    for g, f in zip(got, fresh):  # (log p, stderr): one Hutchinson probe gives a NaN stderr, in both
        torch.testing.assert_close(g, f, rtol=0.0, atol=0.0, equal_nan=True)


def test_cfg_with_a_network_returning_one_reused_buffer():
    def net(x, t, cond):  # a conditional network: the condition scales its output
        return x * (2.0 if cond is not None else 0.5)

    buf = torch.empty(SHAPE)

    def net_reused(x, t, cond):
        return buf.copy_(net(x, t, cond))

    x, t = torch.ones(SHAPE), torch.full((SHAPE[0],), 0.5)
    fresh = fs.guidance.CFG(net, 3.0, cond=1, uncond=None)(x, t)
    got = fs.guidance.CFG(net_reused, 3.0, cond=1, uncond=None)(x, t)
    assert torch.equal(fresh, torch.full(SHAPE, 5.0))  # 0.5 + 3 (2 - 0.5)
    assert torch.equal(got, fresh)
