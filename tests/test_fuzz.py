"""Fuzzing the entry points (issue 8): random grids, shapes, dtypes, solver names, steps, time ranges and
parameterizations against ``fs.sample`` and ``fs.log_likelihood`` with analytic Gaussian models.

Contract: every call either raises ValueError / TypeError with a message that names something (never a
RuntimeError / IndexError / ZeroDivisionError from deep inside torch, never a RecursionError), or returns a
finite tensor of the right shape (the analytic model is finite wherever it may be evaluated, so a NaN would be
the library's). Tiny shapes, at most 6 steps, loose adaptive tolerances: each example costs milliseconds."""
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowsolve as fs
from flowsolve.likelihood import TABLEAUS

PATHS = [fs.paths.VP, fs.paths.VPCosine, fs.paths.SubVP, fs.paths.VE, fs.paths.EDM, fs.paths.RectifiedFlow]
SOLVERS = [s.name for s in fs.solvers()]
ADAPTIVE = {s.name for s in fs.solvers() if s.adaptive}
TYPOS = ["huen", "dpm++2n", "Euler", "", "rk 4", "dopri"]
GRID_NAMES = ["uniform", "logsnr", "edm", "quadratic", "logsrn", "linear"]
ANY_TIME = st.one_of(st.none(), st.floats(-0.5, 2.0), st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e-9]))

times = st.floats(-0.2, 1.5, allow_nan=False)
user_grid = st.one_of(
    st.lists(times, min_size=0, max_size=6),  # arbitrary: non-monotone, repeated, out of range, too short
    st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=6, unique=True).map(lambda v: sorted(v, reverse=True)),
    st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=6).map(lambda v: v + [float("nan")]),
)
grid_arg = st.one_of(st.none(), st.sampled_from(GRID_NAMES), user_grid)
steps_arg = st.one_of(st.none(), st.integers(-2, 6), st.sampled_from([2.0, "3", True]))
shape_arg = st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.just(()), st.just((2,)),
                      st.sampled_from([(2.5, 2), "ab", 7]))
dtype_arg = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32])
ALLOWED = (ValueError, TypeError)
# examples per test: bounded for CI (each costs milliseconds); raise it locally to fuzz harder
N_SAMPLE = int(os.environ.get("FLOWSOLVE_FUZZ_EXAMPLES", "60"))


def _problem(path_cls, kind, d):
    path = path_cls()
    mu = torch.linspace(-1.0, 1.0, max(d, 1), dtype=torch.float64)
    prob = fs.analytic.Gaussian(mu, torch.full((max(d, 1),), 0.8, dtype=torch.float64), path)
    return path, fs.Model(getattr(prob, kind), path, predicts=kind)


def _check_error(e):
    assert isinstance(e, ALLOWED), f"{type(e).__name__}: {e}"
    assert len(str(e)) > 15, f"uninformative message: {e!r}"


CORRUPT = ["none"] * 6 + ["solver", "steps", "grid", "range", "shape", "dtype"]  # half the examples fully valid


def _valid_range(data, path):
    lo, hi = path.t_min, (path.t_max if math.isfinite(path.t_max) else 80.0)
    a, b = sorted(data.draw(st.lists(st.floats(lo, hi), min_size=2, max_size=2, unique=True)))
    return b, a  # t_max > t_min inside the path's sampling range


def _args(data, path):
    """A valid configuration of fs.sample / log_likelihood arguments with at most one argument corrupted."""
    corrupt = data.draw(st.sampled_from(CORRUPT))
    kw = {"steps": data.draw(st.one_of(st.none(), st.integers(1, 6)))}
    how = data.draw(st.sampled_from(["default", "named", "named+range", "user"]))
    if how == "named":
        kw["grid"] = data.draw(st.sampled_from(GRID_NAMES[:4]))
    elif how == "named+range":
        kw["grid"] = data.draw(st.sampled_from(GRID_NAMES[:4]))
        kw["t_max"], kw["t_min"] = _valid_range(data, path)
    elif how == "user":
        hi, lo = _valid_range(data, path)
        n = data.draw(st.integers(2, 6))
        kw["grid"] = [hi + (lo - hi) * i / (n - 1) for i in range(n)]
        kw["steps"] = None
    if corrupt == "steps":
        kw["steps"] = data.draw(steps_arg)
    elif corrupt == "grid":
        kw["grid"] = data.draw(grid_arg)
    elif corrupt == "range":
        kw["t_max"], kw["t_min"] = data.draw(ANY_TIME), data.draw(ANY_TIME)
    return corrupt, kw


@settings(max_examples=N_SAMPLE)
@given(data=st.data(), path_cls=st.sampled_from(PATHS), kind=st.sampled_from(fs.PREDICTS), seed=st.integers(0, 2**40))
def test_fuzz_sample(data, path_cls, kind, seed):
    path = path_cls()
    corrupt, kw = _args(data, path)
    solver = data.draw(st.sampled_from(SOLVERS + TYPOS if corrupt == "solver" else SOLVERS))
    shape = data.draw(shape_arg if corrupt == "shape" else st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dtype = data.draw(dtype_arg if corrupt == "dtype" else st.sampled_from([torch.float32, torch.float64]))
    if solver in ADAPTIVE and corrupt != "steps":
        kw.pop("steps", None)
        if isinstance(kw.get("grid"), list) or corrupt != "grid":
            kw.pop("grid", None)
        kw.update(rtol=1e-2, atol=1e-2)  # cheap: a handful of steps
    d = shape[1] if isinstance(shape, tuple) and len(shape) == 2 and isinstance(shape[1], int) else 2
    _, model = _problem(path_cls, kind, d)
    noise = shape
    if data.draw(st.booleans()) and isinstance(shape, tuple) and len(shape) > 0 and all(isinstance(s, int) for s in shape):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed % 1000)).to(dtype)
        noise = noise * float(path.sigma(torch.tensor(kw.get("t_max") or path.t_max, dtype=torch.float64)))
    try:
        x = fs.sample(model, noise, solver=solver, dtype=dtype, seed=seed, **kw)
    except ALLOWED as e:
        _check_error(e)
        return
    expect = tuple(noise.shape) if isinstance(noise, torch.Tensor) else tuple(shape)
    assert tuple(x.shape) == expect and x.dtype in (torch.float32, torch.float64)
    assert bool(torch.isfinite(x).all()), (path, kind, solver, kw)
    _record("sample", corrupt)


_OUTCOMES = []


def _record(what, corrupt):
    _OUTCOMES.append((what, corrupt))


LL_SOLVERS = list(TABLEAUS) + ["hen", "rk45"]


@settings(max_examples=max(1, 2 * N_SAMPLE // 3))
@given(data=st.data(), path_cls=st.sampled_from(PATHS), kind=st.sampled_from(fs.PREDICTS),
       divergence=st.sampled_from(["auto", "exact", "hutchinson"]), probes=st.integers(1, 3))
def test_fuzz_log_likelihood(data, path_cls, kind, divergence, probes):
    path = path_cls()
    corrupt, kw = _args(data, path)
    solver = data.draw(st.sampled_from(LL_SOLVERS if corrupt == "solver" else list(TABLEAUS)))
    if corrupt == "shape":
        b, d = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
        divergence = data.draw(st.sampled_from(["auto", "exakt", "hutchinson"]))
        probes = data.draw(st.integers(-1, 3))
    else:
        b, d = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    dtype = data.draw(dtype_arg if corrupt == "dtype" else st.sampled_from([torch.float32, torch.float64]))
    if TABLEAUS.get(solver) is not None and TABLEAUS[solver].adaptive and corrupt != "steps":
        kw.pop("steps", None)
        if isinstance(kw.get("grid"), list) or corrupt != "grid":
            kw.pop("grid", None)
        kw.update(rtol=1e-2, atol=1e-2)
    if isinstance(kw.get("grid"), list):
        kw["grid"] = kw["grid"][::-1]  # likelihood integrates upward: either direction is accepted
    _, model = _problem(path_cls, kind, d)
    x = (torch.randn(b, d, generator=torch.Generator().manual_seed(0)) * 0.5).to(dtype)
    try:
        logp, stderr = fs.log_likelihood(model, x, solver=solver, divergence=divergence, probes=probes, **kw)
    except ALLOWED as e:
        _check_error(e)
        return
    except FloatingPointError as e:  # the documented refusal to return NaN (stiff field near t = 0 / 1)
        assert "log_likelihood gave NaN/inf" in str(e) and "Raise t_min" in str(e), str(e)
        return
    assert logp.shape == (b,) and bool(torch.isfinite(logp).all()), (path, kind, solver, kw)
    assert stderr.shape == (b,)
    _record("likelihood", corrupt)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s not in ADAPTIVE])
def test_every_fixed_solver_survives_one_two_three_steps(solver):
    """Deterministic corner the fuzzer may not hit: steps 1, 2, 3 on the path's default grid, each finite."""
    path, model = _problem(fs.paths.VP, "eps", 2)
    for steps in (1, 2, 3):
        x = fs.sample(model, (2, 2), solver=solver, steps=steps, seed=0)
        assert bool(torch.isfinite(x).all()), (solver, steps)
    assert not math.isnan(float(x.sum()))
