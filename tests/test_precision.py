"""Precision at the ends of the paths: float32 state (the default) must not produce NaN/inf."""
import pytest
import torch

import flowsolve as fs

FIXED_STEP = [s.name for s in fs.solvers() if not s.adaptive]


@pytest.mark.parametrize("solver", FIXED_STEP)
def test_float32_sampling_from_vpcosine_t_max_1_is_finite(solver):
    """VPCosine at t = 1 has alpha = 0; in float32 its log-alpha used to round to NaN there, so a float32
    model evaluated at t = 1 returned NaN and every sample was NaN. Every fixed-step solver that can start at
    t = 1 must give finite float32 samples (those written in eps/rho refuse t_max = 1 with a ValueError)."""
    path = fs.paths.VPCosine()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.2]), path)
    model = fs.Model(prob.eps, path, predicts="eps")
    try:
        x = fs.sample(model, (8, 2), solver=solver, steps=10, t_max=1.0, grid="uniform", seed=0)
    except ValueError as e:  # a solver that cannot start where alpha = 0 says so
        assert "t=1" in str(e) or "alpha" in str(e), str(e)
        return
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())


# ------------------------------------------------------------------------------------------------------------
# Half-precision models under an fp32 state (issue 8, item 4). A network run in fp16/bf16 returns a half tensor;
# Model.__call__ casts it to the state's dtype, so the update, the coefficients and the state stay in fp32.
# ------------------------------------------------------------------------------------------------------------
HALF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff u: 8 and 11 significand bits
MU = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
SD = torch.tensor([0.7, 1.2, 0.4, 0.1], dtype=torch.float64)
ALL_PATHS = [fs.paths.VP, fs.paths.VPCosine, fs.paths.SubVP, fs.paths.VE, fs.paths.EDM, fs.paths.RectifiedFlow]


def _half_model(fn, half):
    """What a half-precision network does: round its input to half, compute in half, return a half tensor."""
    def f(x, t):
        out = fn(x.to(half), t.to(half))
        assert out.dtype == half
        return out
    return f


def _half_io_model(fn, half):
    """A half network seen from outside: half input, half output (the closed form evaluated in fp32 between).
    The closed forms build intermediates a network does not have (VE's velocity at t = 1 goes through
    sigma^2 sigma' ~ 1e6 > fp16's 65504 although the result, ~ -480, is representable), so the sweep over every
    path and kind rounds at the boundary, where a real half network's overflow would show (as inf)."""
    def f(x, t):
        return fn(x.to(half).float(), t.float()).to(half)
    return f


@pytest.mark.parametrize("half", list(HALF), ids=["bf16", "fp16"])
@pytest.mark.parametrize("nfe", [10, 50])
@pytest.mark.parametrize("key, solver", [(("vp", "eps"), "dpm++2m"), (("rf", "velocity"), "heun"),
                                         (("edm", "x0"), "dpm++2m")], ids=["vp-eps", "rf-velocity", "edm-x0"])
def test_half_model_with_fp32_state_is_within_half_roundoff_of_float64(half, nfe, key, solver):
    """Same solver and grid in float64 (state and model) is the reference, so discretization error cancels and
    the difference is the model's half rounding alone. Bound: 8 u max|x_ref|. The last evaluations dominate
    (the PF-ODE contracts earlier errors towards the data): the output rounding of the final prediction
    contributes u |x0|, the input rounding u |x| through a Jacobian of order one, and the few half-precision
    operations inside the model (each <= u relative) a few u more: 8 is that small factor. Measured:
    err / (u max|x_ref|) <= 2.8 over these 12 cases (256 samples each); a model output left in half inside the
    update, or a state cast to half, would add errors of order u |x| per step, times the steps."""
    path = {"vp": fs.paths.VP, "rf": fs.paths.RectifiedFlow, "edm": fs.paths.EDM}[key[0]]()
    prob = fs.analytic.Gaussian(MU, SD, path)
    fn = getattr(prob, key[1])
    steps = nfe // (2 if solver == "heun" else 1)
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = x_T * float(path.sigma(torch.tensor(path.t_max, dtype=torch.float64)))
    ref = fs.sample(fs.Model(fn, path, predicts=key[1]), x_T, solver=solver, steps=steps)
    model = fs.Model(_half_model(fn, half), path, predicts=key[1])
    x, info = fs.sample(model, x_T.float(), solver=solver, steps=steps, return_info=True)
    assert info["nfe"] == nfe and x.dtype == torch.float32
    err = float((x.double() - ref).abs().max())
    assert err <= 8 * HALF[half] * float(ref.abs().max()), err


@pytest.mark.parametrize("half", list(HALF), ids=["bf16", "fp16"])
@pytest.mark.parametrize("path_cls", ALL_PATHS, ids=lambda c: c.__name__)
def test_half_model_no_overflow_at_t_min_on_every_path(half, path_cls):
    """Every parameterization a path can evaluate at its t_min (score/eps need sigma > 0, x0 needs alpha > 0),
    computed in half with an fp32 state: finite outputs at t_min (score ~ 1/sigma(t_min) = 500 on EDM, far below
    fp16's 65504) and finite samples with a first-order and a multistep solver."""
    path = path_cls()
    prob = fs.analytic.Gaussian(MU, SD, path)
    t_min = torch.full((8,), path.t_min, dtype=torch.float32)
    for kind in fs.PREDICTS:
        model = fs.Model(_half_io_model(getattr(prob, kind), half), path, predicts=kind)
        x0 = prob.sample(8, path.t_min, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
        if bool(model.evaluable(torch.tensor([path.t_min], dtype=torch.float64))):
            assert bool(torch.isfinite(model(x0, t_min)).all()), (kind, path)
        for solver in ("euler", "dpm++2m"):
            try:
                x = fs.sample(model, (8, 4), solver=solver, steps=6, seed=0)
            except ValueError as e:  # a kind that cannot be evaluated on this grid says where and why
                assert "cannot be turned into" in str(e) or "not finite" in str(e), str(e)
                continue
            assert x.dtype == torch.float32 and bool(torch.isfinite(x).all()), (kind, solver, path)


@pytest.mark.parametrize("half", list(HALF), ids=["bf16", "fp16"])
def test_half_output_is_cast_to_the_state_dtype_before_the_update(half):
    """Model.__call__ (what Run.evaluate and the adaptive solvers call) hands the solver the state's dtype,
    so history buffers and kernel inputs never hold half values; the value is the half value, exactly."""
    path = fs.paths.VP()
    raw = torch.tensor([[1.0 + 2**-12, -3.0]], dtype=torch.float32)
    m = fs.Model(lambda x, t: raw.to(half), path, predicts="eps")
    out = m(torch.zeros(1, 2), torch.full((1,), 0.5))
    assert out.dtype == torch.float32 and torch.equal(out, raw.to(half).float())
    out64 = m(torch.zeros(1, 2, dtype=torch.float64), torch.full((1,), 0.5, dtype=torch.float64))
    assert out64.dtype == torch.float64
