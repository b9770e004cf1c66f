"""Nothing silently wrong at the entry points (issue 15): fresh samples by default, seeds and counts given as numpy
integers or 0-d tensors, refused seed and grid types, the FLOWSOLVE_BACKEND variable, internal tensors under
``torch.set_default_device``, models that change x in place, and errors raised by the model mid-run."""
import re

import numpy as np
import pytest
import torch

import flowsolve as fs
from flowsolve.cuda_graph import EagerReplay, GraphedSampler

VP = fs.paths.VP()


def _model(fn=None):
    return fs.Model(fn or (lambda x, t: 0.5 * x), VP, predicts="eps")


# ------------------------------------------------------------------------------------------- fresh samples
def _likelihood(**kw):
    mixing = _model(lambda x, t: 0.5 * x + 0.3 * x.flip(-1))  # off-diagonal Jacobian: the estimate depends on the probe
    out = fs.log_likelihood(mixing, torch.ones(4, 2), steps=2, divergence="hutchinson", **kw)
    return (out[0], out[2]) if kw.get("return_info") else out[0]


def _graphed(**kw):
    sampler = fs.Sampler(_model(), "euler_maruyama", steps=3)
    return GraphedSampler(sampler, (4, 2), device="cpu", capture=EagerReplay).sample(**kw)


# every entry point that draws noise, called with the keyword arguments of the test (seed= given or not)
ENTRY_POINTS = {
    "sample": lambda **kw: fs.sample(_model(), (4, 2), solver="euler_maruyama", steps=3, **kw),
    "sample_adaptive": lambda **kw: fs.sample(_model(), (4, 2), solver="ggf", rtol=1e-2, atol=1e-2, **kw),
    "Sampler.sample_ddim": lambda **kw: fs.Sampler(_model(), "ddim", steps=2).sample((4, 2), **kw),  # initial noise
    "sdeint": lambda **kw: fs.sdeint(lambda x, t: -x, lambda x, t: 1.0, torch.zeros(4, 2), [1.0, 0.5, 0.0], **kw),
    "langevin": lambda **kw: fs.langevin(lambda x: -x, torch.zeros(4, 2), 0.1, 3, **kw),
    "annealed_langevin": lambda **kw: fs.annealed_langevin(_model(), torch.zeros(4, 2), [0.9, 0.5],
                                                           steps_per_level=2, **kw),
    "log_likelihood": _likelihood,
    "GraphedSampler": _graphed,
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_default_seed_is_fresh_repeatable_under_manual_seed_and_reported(name):
    run = ENTRY_POINTS[name]
    a, b = run(), run()
    assert not torch.equal(a, b), "two calls without a seed must draw new noise, as torch.randn does"
    torch.manual_seed(123)
    c = run()
    torch.manual_seed(123)
    d, info = run(return_info=True)
    assert torch.equal(c, d), "torch.manual_seed must make a run without a seed repeatable"
    assert isinstance(info["seed"], int)
    assert torch.equal(run(seed=info["seed"]), d), "the reported seed, passed explicitly, must reproduce the run"
    # an explicit seed keeps the keyed behaviour: the global generator neither matters nor moves
    torch.manual_seed(1)
    before = torch.get_rng_state()
    e = run(seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    assert torch.equal(run(seed=5), e)
    _, info = run(seed=5, return_info=True)
    assert info["seed"] == 5


def test_default_seed_is_the_key_drawn_from_the_global_generator():
    """seed=None is seed=torch.default_generator: the same 64-bit key a Generator seed gives."""
    torch.manual_seed(77)
    x, info = fs.sample(_model(), (3, 2), solver="euler_maruyama", steps=2, return_info=True)
    g = torch.Generator().manual_seed(77)
    y, info_g = fs.sample(_model(), (3, 2), solver="euler_maruyama", steps=2, seed=g, return_info=True)
    assert torch.equal(x, y) and info["seed"] == info_g["seed"]


def test_seed_none_draws_nothing_for_a_run_without_noise():
    """A deterministic solver from a given x(t_max) draws no noise: seed=None takes no key, leaves the global
    generator alone and reports info["seed"] = None (the samples are those of any explicit seed)."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for run in (lambda **kw: fs.sample(_model(), x, solver="heun", steps=3, **kw),
                lambda **kw: GraphedSampler(fs.Sampler(_model(), "heun", steps=3), (3, 2), device="cpu",
                                            capture=EagerReplay).sample(x, **kw)):
        torch.manual_seed(4)
        before = torch.get_rng_state()
        y, info = run(return_info=True)
        assert torch.equal(torch.get_rng_state(), before) and info["seed"] is None
        assert torch.equal(y, run(seed=5))


def test_seed_none_under_torch_compile():
    """Dynamo traces a run without noise in one graph with no seed (backend="eager": the tracing is what is tested,
    not inductor's code); a run that draws noise says to pass a seed instead of failing inside Dynamo."""
    sampler = fs.Sampler(_model(), "euler", steps=1)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(lambda v: sampler.sample(v), fullgraph=True, backend="eager")(x)
    eager = sampler.sample(x)  # the host-coefficient path: the same sums in another order (float32 rounding)
    assert float((compiled - eager).abs().max()) <= 1e-6 * float(eager.abs().max())
    with pytest.raises(Exception, match=r"seed=None draws a fresh key .* pass seed= as a one-element tensor"):
        torch.compile(lambda: sampler.sample((3, 2)), fullgraph=True, backend="eager")()


def test_sampler_generator_and_seed_together_refused():
    with pytest.raises(ValueError, match="either seed= or generator="):
        fs.sample(_model(), (2, 2), steps=2, seed=0, generator=torch.Generator())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(fs.sample(_model(), (2, 2), solver="euler_maruyama", steps=2, generator=g1),
                       fs.sample(_model(), (2, 2), solver="euler_maruyama", steps=2, seed=g2))


# ------------------------------------------------------------------------ numpy integers and 0-d tensors
@pytest.mark.parametrize("as_", [np.int64, np.int32, lambda v: torch.tensor(v), lambda v: torch.tensor([v])])
def test_seed_steps_and_sample_offset_as_numpy_integers_or_tensors(as_):
    ref = fs.sample(_model(), (3, 2), solver="euler_maruyama", steps=4, seed=7, sample_offset=2)
    got = fs.sample(_model(), (3, 2), solver="euler_maruyama", steps=as_(4), seed=as_(7), sample_offset=as_(2))
    assert torch.equal(got, ref)
    s_ref = fs.sdeint(lambda x, t: -x, lambda x, t: 1.0, torch.zeros(2, 2), [1.0, 0.5], seed=7, sample_offset=2)
    s_got = fs.sdeint(lambda x, t: -x, lambda x, t: 1.0, torch.zeros(2, 2), [1.0, 0.5], seed=as_(7),
                      sample_offset=as_(2))
    assert torch.equal(s_got, s_ref)
    lp_ref = fs.log_likelihood(_model(), torch.ones(2, 2), steps=2, divergence="hutchinson", seed=7, sample_offset=2)
    lp_got = fs.log_likelihood(_model(), torch.ones(2, 2), steps=as_(2), divergence="hutchinson", seed=as_(7),
                               sample_offset=as_(2))
    assert torch.equal(lp_got[0], lp_ref[0])
    assert torch.equal(fs.langevin(lambda x: -x, torch.zeros(2, 2), 0.1, as_(3), seed=as_(7), sample_offset=as_(2)),
                       fs.langevin(lambda x: -x, torch.zeros(2, 2), 0.1, 3, seed=7, sample_offset=2))


@pytest.mark.parametrize("as_", [np.float32, np.float64, lambda v: torch.tensor(v), lambda v: torch.tensor(v).double()])
def test_t_min_and_t_max_as_numpy_floats_or_tensors(as_):
    t_max, t_min = 0.875, 0.0625  # exact in float32: the same times whatever the container
    ref = fs.sample(_model(), (3, 2), solver="heun", steps=3, seed=0, t_max=t_max, t_min=t_min)
    got = fs.sample(_model(), (3, 2), solver="heun", steps=3, seed=0, t_max=as_(t_max), t_min=as_(t_min))
    assert torch.equal(got, ref)
    assert torch.equal(fs.grids.make_grid("logsnr", VP, 4, t_max=as_(t_max), t_min=as_(t_min)),
                       fs.grids.make_grid("logsnr", VP, 4, t_max=t_max, t_min=t_min))
    lp = fs.log_likelihood(_model(), torch.ones(2, 2), steps=2, t_max=as_(t_max), t_min=as_(t_min))[0]
    assert torch.equal(lp, fs.log_likelihood(_model(), torch.ones(2, 2), steps=2, t_max=t_max, t_min=t_min)[0])


@pytest.mark.parametrize("value, given", [("0.5", "str '0.5'"), (1j, "complex 1j"), ([0.5], "list [0.5]"),
                                          (torch.tensor([0.5, 0.1]), "tensor of shape (2,)"),
                                          (torch.tensor(True), "dtype torch.bool"), (True, "bool True")])
def test_a_time_that_is_not_a_real_number_names_the_argument_and_what_was_given(value, given):
    with pytest.raises(TypeError, match=rf"t_min must be a finite real number .*; got .*{re.escape(given)}"):
        fs.sample(_model(), (2, 2), steps=2, t_min=value)
    with pytest.raises(TypeError, match=rf"t_max must be a finite real number .*; got .*{re.escape(given)}"):
        fs.grids.make_grid("uniform", VP, 2, t_max=value)


def test_a_non_finite_time_says_so():
    with pytest.raises(ValueError, match=r"t_max=inf must be a finite number"):
        fs.grids.time_range(VP, t_max=float("inf"))
    with pytest.raises(ValueError, match=r"t_min=nan must be a finite number"):
        fs.sample(_model(), (2, 2), steps=2, t_min=np.float32("nan"))


@pytest.mark.parametrize("value, given", [(2.0, "float 2.0"), (np.float64(2.0), "float64"),
                                          (torch.tensor(2.0), "dtype torch.float32"), (np.True_, "bool"),
                                          (torch.tensor(True), "dtype torch.bool")])
def test_steps_that_are_not_integers_are_refused(value, given):
    with pytest.raises(TypeError, match=rf"steps must be a positive int; got .*{re.escape(given)}"):
        fs.sample(_model(), (2, 2), steps=value)


# ------------------------------------------------------------------------------ refused seed and grid types
@pytest.mark.parametrize("seed", [torch.tensor(True), torch.tensor([1 + 0j]), np.True_, torch.tensor(1.0)])
def test_bool_complex_and_float_seeds_refused(seed):
    with pytest.raises(TypeError, match=r"seed"):
        fs.sample(_model(), (2, 2), steps=2, seed=seed)
    with pytest.raises(TypeError, match=r"seed"):
        fs.sdeint(lambda x, t: -x, lambda x, t: 1.0, torch.zeros(2, 2), [1.0, 0.5], seed=seed)


def test_complex_grids_refused():
    grid = torch.tensor([0.9, 0.5, 0.1], dtype=torch.complex128)
    with pytest.raises(TypeError, match=r"grid .*complex"):
        fs.sample(_model(), (2, 2), grid=grid)
    with pytest.raises(TypeError, match=r"grid .*complex"):
        fs.sample(_model(), (2, 2), grid=[0.9 + 0j, 0.5, 0.1])
    with pytest.raises(TypeError, match=r"t .*complex"):
        fs.odeint(lambda x, t: -x, torch.ones(2), grid.flip(0))
    with pytest.raises(TypeError, match=r"t .*complex"):
        fs.sdeint(lambda x, t: -x, lambda x, t: 1.0, torch.zeros(2, 2), grid)
    with pytest.raises(TypeError, match=r"levels .*complex"):
        fs.annealed_langevin(_model(), torch.zeros(2, 2), grid)


def test_garbage_flowsolve_backend_names_the_environment_variable(monkeypatch):
    monkeypatch.setenv("FLOWSOLVE_BACKEND", "garbage")
    with pytest.raises(ValueError, match=r"environment variable FLOWSOLVE_BACKEND='garbage' is not one of"):
        fs.sample(_model(), (2, 2), steps=2, seed=0)
    assert fs.sample(_model(), (2, 2), steps=2, seed=0, backend="torch").shape == (2, 2)  # the argument wins


# ---------------------------------------------------------------------------------- torch.set_default_device
CPU = "cpu"
DEFAULT_DEVICE_RUNS = {
    "sample": lambda: fs.sample(_model(), (3, 2), solver="dpm++2m-sde", steps=3, seed=1, device=CPU),
    "sample_tensor": lambda: fs.sample(_model(), torch.ones(3, 2, device=CPU), solver="heun", steps=3, seed=1),
    "sample_adaptive": lambda: fs.sample(_model(), (3, 2), solver="dopri5", seed=1, device=CPU),
    "sample_ggf": lambda: fs.sample(_model(), (3, 2), solver="ggf", rtol=1e-2, atol=1e-2, seed=1, device=CPU),
    "sdeint": lambda: fs.sdeint(lambda x, t: -x, lambda x, t: 1.0, torch.zeros(3, 2, device=CPU),
                                     [1.0, 0.5, 0.0], seed=1),
    "odeint": lambda: fs.odeint(lambda x, t: -x, torch.ones(3, 2, device=CPU), [0.0, 0.5, 1.0]),
    "odeint_adaptive": lambda: fs.odeint(lambda x, t: -x, torch.ones(3, 2, device=CPU), [0.0, 0.5, 1.0],
                                         solver="dopri5"),
    "log_likelihood_adaptive": lambda: fs.log_likelihood(_model(), torch.ones(3, 2, device=CPU), solver="dopri5")[0],
    "langevin": lambda: fs.langevin(lambda x: -x, torch.zeros(3, 2, device=CPU), 0.1, 3, seed=1),
    "annealed_langevin": lambda: fs.annealed_langevin(_model(), torch.zeros(3, 2, device=CPU), [0.9, 0.5],
                                                           steps_per_level=2, seed=1),
    "log_likelihood": lambda: fs.log_likelihood(_model(), torch.ones(3, 2, device=CPU), steps=2,
                                                     divergence="hutchinson", seed=1)[0],
    "grid": lambda: fs.grids.make_grid("edm", VP, 4),
    "sdeint_device": lambda: fs.sdeint(lambda x, t: -x, lambda x, t: torch.ones_like(x), torch.zeros(3, 2, device=CPU),
                                       torch.tensor([1.0, 0.5, 0.0], device=CPU), seed=1),
}


@pytest.mark.parametrize("name", DEFAULT_DEVICE_RUNS)
def test_internal_tensors_follow_the_state_not_the_default_device(name):
    """Under ``torch.set_default_device('meta')`` (a device that holds no data: any internal tensor that followed it
    would fail or come back empty), a run whose state is on the CPU gives exactly the result it gives without it."""
    run = DEFAULT_DEVICE_RUNS[name]
    expected = run()
    with torch.device("meta"):
        got = run()
    assert got.device.type == "cpu" and torch.equal(got, expected)


class _Seen(Exception):
    pass


@pytest.mark.parametrize("solver, kw", [("euler_maruyama", {"steps": 2}), ("dopri5", {})])
def test_state_follows_the_default_device_when_device_is_not_given(solver, kw):
    """device=None puts the state where torch.randn(shape) would: on torch's default device (here meta, which
    holds no data, so the model stops the run at its first call and reports what it was given)."""
    seen = {}

    def fn(x, t):
        seen.update(x=x.device, t=t.device, default=torch.get_default_device())
        raise _Seen

    with torch.device("meta"), pytest.raises(_Seen):
        fs.sample(_model(fn), (3, 2), solver=solver, **kw)  # seed=None: drawn from the CPU generator
    assert seen == {"x": torch.device("meta"), "t": torch.device("meta"), "default": torch.device("meta")}


# --------------------------------------------------------------------------------- models that change x
def _inplace(x, t):
    x.mul_(0.5)  # the bug: the solver's live state is changed
    return x.clone()


def test_a_model_that_changes_x_in_place_is_detected_by_check_inplace():
    with pytest.raises(ValueError, match=r"changed its input x in place.*clone x"):
        fs.sample(_model(_inplace), (3, 2), solver="heun", steps=3, seed=0, check_inplace=True)
    with pytest.raises(ValueError, match=r"changed its input x in place.*clone x"):
        fs.sample(_model(_inplace), (3, 2), solver="dopri5", seed=0, check_inplace=True)
    # the well-behaved twin passes the check and gives the unchecked result
    ok = _model(lambda x, t: (x.clone().mul_(0.5)))
    assert torch.equal(fs.sample(ok, (3, 2), solver="heun", steps=3, seed=0, check_inplace=True),
                       fs.sample(ok, (3, 2), solver="heun", steps=3, seed=0))


def test_a_model_that_changes_x_only_later_in_the_run_is_detected_at_that_step():
    calls = {"n": 0}

    def late(x, t):
        calls["n"] += 1
        if calls["n"] == 4:
            x.add_(1.0)
        return 0.5 * x

    with pytest.raises(ValueError, match=r"changed its input x in place") as info:
        fs.sample(_model(late), (3, 2), solver="heun", steps=3, seed=0, check_inplace=True)
    assert "step 1" in "\n".join(getattr(info.value, "__notes__", [])) + str(info.value)


def test_a_model_that_changes_x_in_place_is_detected_by_check_independence():
    with pytest.raises(ValueError, match=r"changed its input x in place.*clone x"):
        fs.sample(_model(_inplace), (3, 2), solver="heun", steps=3, seed=0, check_independence=True)
    with pytest.raises(ValueError, match=r"changed its input x in place"):
        fs.check_model(_model(_inplace), torch.ones(3, 2))


def test_check_inplace_is_a_bool_and_refused_with_cuda_graph():
    with pytest.raises(TypeError, match=r"check_inplace=1 must be True or False"):
        fs.sample(_model(), (2, 2), steps=2, check_inplace=1)
    with pytest.raises(ValueError, match=r"cuda_graph=True .*check_inplace"):
        fs.Sampler(_model(), "heun", steps=2).sample((2, 2), device="cpu", cuda_graph=True, check_inplace=True)


# ----------------------------------------------------------------------------------- model errors mid-run
class Boom(KeyError):
    pass


def _raises_on_call(k, exc=Boom("weights missing")):
    calls = {"n": 0}

    def fn(x, t):
        calls["n"] += 1
        if calls["n"] == k:
            raise exc
        return 0.5 * x

    return fn


def _text(e):
    return str(e) + "\n" + "\n".join(getattr(e, "__notes__", []))


def test_a_model_error_mid_run_keeps_its_type_and_says_the_step_and_time():
    # heun: 2 evaluations per step, 4 steps on the uniform grid from 1 to 0.25 (t_n = 1 - 0.1875 n);
    # call 5 is the first evaluation of step 2, at t = 0.625
    with pytest.raises(Boom) as info:
        fs.sample(_model(_raises_on_call(5)), (2, 2), solver="heun", steps=4, grid="uniform", t_max=1.0, t_min=0.25,
                  seed=0)
    assert info.value.args == ("weights missing",)  # the original exception, unchanged
    text = _text(info.value)
    assert "step 2 of 4" in text and "t=0.625" in text, text


def test_a_model_error_in_an_adaptive_run_says_the_time():
    with pytest.raises(Boom) as info:
        fs.sample(_model(_raises_on_call(3)), (2, 2), solver="dopri5", seed=0, t_max=1.0, t_min=0.25)
    text = _text(info.value)
    assert "model evaluation 3" in text and "t=" in text, text


def test_a_model_shape_error_also_says_where():
    calls = {"n": 0}

    def fn(x, t):
        calls["n"] += 1
        return x[:, :1] if calls["n"] == 3 else 0.5 * x

    with pytest.raises(ValueError, match=r"output has shape \(2, 1\)") as info:
        fs.sample(_model(fn), (2, 2), solver="euler", steps=4, seed=0)
    assert "step 2 of 4" in _text(info.value)
