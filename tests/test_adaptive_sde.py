"""Gotta Go Fast (solver "ggf"): the adaptive reverse-SDE sampler against independent truth.

* Gaussian data (FORMULAS.md §3): the reverse SDE is linear, so the scheme's output on any grid is exactly
  Gaussian. ``ggf_law`` below runs the paper's two stages (K1, K2 with a shared z, x'' = x + (K1 + K2)/2) on the
  mean and variance per dimension, in float64, from the exact score; the sampler's moments must match the law
  of its own scheme on the grid it chose (5 standard errors, FORMULAS.md §7), and that law must approach the
  exact marginal p(t_min) as the tolerance tightens.
* ``ggf_reference`` is an independent float64 implementation of Algorithm 1 as documented (batch-shared step,
  keyed noise per attempt, new noise after a rejection), driven by the same keyed noise: the solver's every
  model call, accept/reject decision, grid and output must agree with it.
"""
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.kernels.philox import STREAM_STEP, keyed_normal_like_torch
from flowsolve.solvers.adaptive_sde import GottaGoFast

C = 5.0
MU = torch.tensor([0.7, -1.5], dtype=torch.float64)
STD = torch.tensor([0.4, 1.3], dtype=torch.float64)


def _problem(path_name):
    path = {"vp": fs.paths.VP, "ve": fs.paths.VE, "subvp": fs.paths.SubVP, "edm": fs.paths.EDM,
            "rf": fs.paths.RectifiedFlow}[path_name]()
    prob = fs.analytic.Gaussian(MU, STD, path)
    predicts = {"vp": "eps", "ve": "eps", "subvp": "score", "edm": "x0", "rf": "velocity"}[path_name]
    t_range = (0.999, 1e-3) if path_name == "rf" else (path.t_max, path.t_min)  # RF's reverse SDE: singular at 1
    return path, prob, fs.Model(getattr(prob, predicts), path, predicts=predicts), t_range


def _sde_terms(prob, path, t):
    """Reverse drift f x - g^2 score = P x + Q per dimension (score = -(x - alpha mu) / C), and g."""
    tt = torch.tensor(t, dtype=torch.float64)
    al, si = path.alpha(tt), path.sigma(tt)
    c = al**2 * STD**2 + si**2
    g2 = path.g2(tt)
    return path.f(tt) + g2 / c, -g2 * al * MU / c, float(g2.sqrt())


def ggf_law(prob, path, grid, mean, var, extrapolate=True):
    """Exact (mean, var) of the scheme on ``grid`` (decreasing, accepted times), from N(mean, var).

    x' = x + K1, K1 = -h (P x + Q) + g sqrt(h) z;  K2 = -h (P' x' + Q') + g' sqrt(h) z;  x'' = x + (K1 + K2)/2,
    written as x_next = A x + B + S z."""
    g = [float(v) for v in grid]
    for t0, t1 in zip(g[:-1], g[1:]):
        h = t0 - t1
        p0, q0, g0 = _sde_terms(prob, path, t0)
        p1, q1, g1 = _sde_terms(prob, path, t1)
        a1, b1, s1 = 1 - h * p0, -h * q0, g0 * math.sqrt(h)  # x' = a1 x + b1 + s1 z
        if extrapolate:
            a = 1 + (a1 - 1) / 2 - h * p1 * a1 / 2
            b = b1 / 2 - h * (p1 * b1 + q1) / 2
            s = (s1 + g1 * math.sqrt(h) - h * p1 * s1) / 2
        else:
            a, b, s = a1, b1, s1
        mean, var = a * mean + b, a * a * var + s * s
    return mean, var


def _rejection_allowance(var, info, n):
    """Derived estimate of the bias of drawing new noise after a rejection (module docstring of adaptive_sde):
    each accepted increment loses the tail of probability q ~ (rejection rate) / B where its E_b > 1, which cuts
    its variance by about q (2 log B + 2) relative: at most that fraction of the output variance."""
    rate = info["rejected"] / max(1, info["steps"] + info["rejected"])
    return var * rate * (2 * math.log(n) + 2) / n


def _assert_moments(x, mean, var, allowance_mean=0.0, allowance_var=0.0):
    n = x.shape[0]
    d_mean, d_var = (x.mean(0) - mean).abs(), (x.var(0) - var).abs()
    ok_mean = d_mean <= C * (var / n).sqrt() + allowance_mean
    ok_var = d_var <= C * var * math.sqrt(2.0 / (n - 1)) + allowance_var
    assert bool(ok_mean.all()), (x.mean(0), mean, d_mean / (var / n).sqrt())
    assert bool(ok_var.all()), (x.var(0), var, d_var / (var * math.sqrt(2.0 / (n - 1))))


# ------------------------------------------------------------------------------------------------ exact laws
@pytest.mark.parametrize("path_name", ["vp", "ve", "subvp", "edm", "rf"])
def test_ggf_matches_the_exact_law_of_its_scheme_on_its_grid(path_name):
    path, prob, model, (t_max, t_min) = _problem(path_name)
    n = 20000
    x_T = prob.sample(n, t_max, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, info = fs.sample(model, x_T, solver="ggf", rtol=0.2, atol=0.2, seed=2, t_max=t_max, t_min=t_min,
                        return_info=True)
    assert info["rejected"] > 0
    grid = info["grid"]
    assert grid[0] == t_max and grid[-1] == t_min and bool((grid[1:] < grid[:-1]).all())
    assert info["steps"] == grid.numel() - 1 and info["nfe"] == 2 * info["steps"] + info["rejected"]
    mean, var = ggf_law(prob, path, grid, prob.mean(t_max), prob.var(t_max))
    _assert_moments(x, mean, var, allowance_var=_rejection_allowance(var, info, n))


@pytest.mark.parametrize("path_name", ["vp", "ve"])
def test_ggf_approaches_the_exact_marginal_as_the_tolerance_tightens(path_name):
    """The scheme's exact law on the grid it chose, against p(t_min): the weak error shrinks by more than
    4^(2/3) = 2.5 per 4x tighter tolerance (the rate of a weak-order-1 scheme with h ~ tol^(2/3), the step an
    O(h^(3/2)) error estimate gives; weak order 2 gives 4^(4/3) = 6.3; measured VP 20, 7.5; VE 4.0, 4.8), NFE grows,
    and at the tightest tolerance the samples match p(t_min) within 5 sigma plus that (exact) discretization
    error and the rejection allowance."""
    path, prob, model, (t_max, t_min) = _problem(path_name)
    n = 4000
    x_T = prob.sample(n, t_max, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m_true, v_true = prob.mean(t_min), prob.var(t_min)
    errs, nfes = [], []
    for tol in (0.2, 0.05, 0.0125):
        x, info = fs.sample(model, x_T, solver="ggf", rtol=tol, atol=tol, seed=4, return_info=True)
        mean, var = ggf_law(prob, path, info["grid"], prob.mean(t_max), prob.var(t_max))
        errs.append(float(torch.cat([(mean - m_true).abs() / v_true.sqrt(), (var / v_true - 1).abs()]).max()))
        nfes.append(info["nfe"])
    assert nfes[0] < nfes[1] < nfes[2], nfes
    assert errs[0] > 4 ** (2 / 3) * errs[1] and errs[1] > 4 ** (2 / 3) * errs[2], errs
    _assert_moments(x, m_true, v_true, allowance_mean=(mean - m_true).abs(),
                    allowance_var=(var - v_true).abs() + _rejection_allowance(var, info, n))


@pytest.mark.parametrize("path_name", ["vp", "ve", "subvp"])
def test_the_accepted_scheme_is_weak_order_two_on_fixed_grids(path_name):
    """The law of the two stages on the path's default grid of N steps (no Monte Carlo), against p(t_min): the
    extrapolated x'' is weak order 2 (slope over N = 64..512 within 0.15; measured 2.09 VP, 2.11 VE, 2.15 subVP),
    the EM proposal x' order 1 (VP: 1.04). Together with the tests that the sampler follows this law on its own
    grid, this is what ``info.order = 2`` states."""
    import numpy as np

    path, prob, _, (t_max, t_min) = _problem(path_name)
    steps = [64, 128, 256, 512]
    for extrapolate, order in ((True, 2.0), (False, 1.0)):
        if not extrapolate and path_name != "vp":
            continue
        errs = []
        for n in steps:
            mean, var = ggf_law(prob, path, fs.grids.make_grid(None, path, n), prob.mean(t_max), prob.var(t_max),
                                extrapolate)
            m_true, v_true = prob.mean(t_min), prob.var(t_min)
            errs.append(float(torch.cat([(mean - m_true).abs() / v_true.sqrt(), (var / v_true - 1).abs()]).max()))
        slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
        assert abs(slope - order) <= 0.15, (extrapolate, errs, slope)
    assert GottaGoFast.info.order == 2


def test_ggf_without_extrapolation_is_the_em_law_on_its_grid():
    path, prob, model, (t_max, t_min) = _problem("vp")
    n = 20000
    x_T = prob.sample(n, t_max, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x, info = fs.sample(model, x_T, solver=GottaGoFast(0.2, 0.2, extrapolate=False), seed=6, return_info=True)
    mean, var = ggf_law(prob, path, info["grid"], prob.mean(t_max), prob.var(t_max), extrapolate=False)
    _assert_moments(x, mean, var, allowance_var=_rejection_allowance(var, info, n))


# ------------------------------------------------------------------------------------------------ Algorithm 1
def ggf_reference(prob, path, x, t_max, t_min, rtol, atol, h0, seed, extrapolate=True, theta=0.9, r=0.9):
    """Algorithm 1 with one step for the batch (accept iff max_b E_b <= 1), float64, exact score; the noise of
    attempt k is the keyed normal of step k (as documented). Returns the output and every attempt."""
    span = t_max - t_min
    seed_t = torch.tensor([seed])
    t, h, k = t_max, h0, 0
    xp_prev = x.clone()
    attempts, grid = [], [t_max]

    def drift(y, s):
        ss = torch.tensor(s, dtype=torch.float64)
        return path.f(ss) * y - path.g2(ss) * prob.score(y, ss)

    while t > t_min:
        t1 = t_min if (t - h) - t_min <= 1e-10 * span else t - h
        h = t - t1
        z = keyed_normal_like_torch(x, seed_t, torch.tensor([k]), 0, STREAM_STEP).to(torch.float64)
        g0, g1 = (float(path.g2(torch.tensor(s, dtype=torch.float64)).sqrt()) for s in (t, t1))
        k1 = -h * drift(x, t) + g0 * math.sqrt(h) * z
        xp = x + k1
        k2 = -h * drift(xp, t1) + g1 * math.sqrt(h) * z
        xpp = x + 0.5 * (k1 + k2)
        new = xpp if extrapolate else xp
        delta = atol + rtol * torch.maximum(xp_prev.abs(), new.abs())
        e = float(((xpp - xp) / delta).pow(2).mean(1).sqrt().max())
        ok = e <= 1.0
        attempts.append({"t": t, "t1": t1, "h": h, "xp": xp, "x": x, "accepted": ok, "z": z})
        k += 1
        if ok:
            x, xp_prev, t = new, xp, t1
            grid.append(t)
        if t > t_min:
            h = t - t_min if e == 0.0 else min(t - t_min, theta * h * e ** (-r))
    return x, attempts, grid


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        assert bool((t == t[0]).all())  # one time for the batch
        self.calls.append((x.clone(), float(t[0])))
        return self.fn(x, t)


@pytest.mark.parametrize("extrapolate", [True, False])
def test_ggf_follows_algorithm_1_attempt_by_attempt(extrapolate):
    """Every model call (state and time), every accept/reject, the grid and the output agree with the independent
    implementation. A large first step forces rejections: after each one the retry starts from the unchanged
    state (no model call in between: F(x, t) is reused) with the next noise key."""
    path, prob, _, _ = _problem("vp")
    rtol = atol = 2.0**-5  # exact in fp32 (the kernel rounds the tolerances to fp32)
    x_T = prob.sample(6, path.t_max, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rec = Recorder(prob.eps)
    model = fs.Model(rec, path, predicts="eps")
    solver = GottaGoFast(rtol, atol, h0=0.4, extrapolate=extrapolate)
    x, info = fs.sample(model, x_T, solver=solver, seed=9, return_info=True)
    ref, attempts, grid = ggf_reference(prob, path, x_T, path.t_max, path.t_min, rtol, atol, 0.4, 9, extrapolate)
    n_rej = sum(not a["accepted"] for a in attempts)
    assert n_rej >= 3 and info["rejected"] == n_rej and info["steps"] == len(grid) - 1
    torch.testing.assert_close(info["grid"], torch.tensor(grid, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    # the call sequence: F(x_T, t_max); per attempt F'(x', t'); after an acceptance F(x_new, t') unless t' = t_min
    expected = [(x_T, path.t_max)]
    for a in attempts:
        expected.append((a["xp"], a["t1"]))
        if a["accepted"] and a["t1"] > path.t_min:
            expected.append((None, a["t1"]))
    assert len(rec.calls) == len(expected) == info["nfe"] == 1 + 2 * info["steps"] + info["rejected"] - 1
    for (xc, tc), (xe, te) in zip(rec.calls, expected):
        assert tc == pytest.approx(te, rel=1e-12, abs=0)
        if xe is not None:
            torch.testing.assert_close(xc, xe, rtol=1e-10, atol=1e-10)
    # a rejection: same state, next key. Recover the noise of the retry from its recorded proposal
    k = next(i for i, a in enumerate(attempts) if not a["accepted"])
    retry = attempts[k + 1]
    torch.testing.assert_close(retry["x"], attempts[k]["x"], rtol=0, atol=0)
    p0, q0, g0 = _sde_terms(prob, path, retry["t"])
    z = (retry["xp"] - (1 - retry["h"] * p0) * retry["x"] + retry["h"] * q0) / (g0 * math.sqrt(retry["h"]))
    torch.testing.assert_close(z, attempts[k + 1]["z"], rtol=1e-8, atol=1e-8)
    assert (z - attempts[k]["z"]).abs().max() > 0.1  # new noise, not the rejected attempt's


def test_first_attempt_noise_is_keyed_per_sample_but_the_path_depends_on_the_batch():
    """Sample 0 alone and in a batch of 40: the same first proposal (same key, same t and h0), different
    outputs afterwards (the batch shares its steps: not batch-invariant, as documented)."""
    path, prob, _, _ = _problem("vp")
    x_T = prob.sample(40, path.t_max, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    outs, firsts = [], []
    for xb in (x_T[:1], x_T):
        rec = Recorder(prob.eps)
        x = fs.sample(fs.Model(rec, path, predicts="eps"), xb, solver="ggf", rtol=0.05, atol=0.05, seed=1)
        outs.append(x[0])
        firsts.append(rec.calls[1][0][0])  # the first proposal x' of sample 0
    torch.testing.assert_close(firsts[0], firsts[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ options
def test_denoise_returns_tweedies_estimate_at_t_min():
    path, prob, model, _ = _problem("vp")
    x_T = prob.sample(64, path.t_max, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, info = fs.sample(model, x_T, solver=GottaGoFast(0.05, 0.05), seed=3, return_info=True)
    xd, info_d = fs.sample(model, x_T, solver=GottaGoFast(0.05, 0.05, denoise=True), seed=3, return_info=True)
    torch.testing.assert_close(xd, prob.x0(x, torch.tensor(path.t_min, dtype=torch.float64)), rtol=1e-12, atol=1e-12)
    assert info_d["nfe"] == info["nfe"] + 1 and info_d["denoised"] and not info["denoised"]


def test_trajectory_callback_and_float32():
    path, prob, model, _ = _problem("edm")
    seen = []
    x, traj, info = fs.sample(model, (32, 2), solver="ggf", rtol=0.1, atol=0.1, seed=0, return_trajectory=True,
                              return_info=True, callback=lambda step, t, x: seen.append((step, t)))
    assert x.dtype == torch.float32 and len(traj) == info["steps"] + 1 and len(seen) == info["steps"]
    torch.testing.assert_close(traj[-1], x, rtol=0, atol=0)
    assert [s for s, _ in seen] == list(range(info["steps"]))
    assert [t for _, t in seen] == info["grid"][1:].tolist()
    assert info["solver"] == "ggf" and info["rtol"] == 0.1 and info["planned_nfe"] is None


def test_triton_kernels_match_the_torch_twins():
    """The same run on the Triton kernels (TRITON_INTERPRET=1 on CPU) and on the twins, float32."""
    pytest.importorskip("triton")
    if not fs.kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    path, prob, model, _ = _problem("vp")
    x_T = prob.sample(3, path.t_max, generator=torch.Generator().manual_seed(4))
    a, ia = fs.sample(model, x_T, solver="ggf", rtol=0.3, atol=0.3, seed=5, backend="triton", return_info=True)
    b, ib = fs.sample(model, x_T, solver="ggf", rtol=0.3, atol=0.3, seed=5, backend="torch", return_info=True)
    assert (ia["steps"], ia["rejected"]) == (ib["steps"], ib["rejected"])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_device_read_per_attempted_step():
    """The state is float32 and the host-side planning float64 (its checks read bool/float64 CPU scalars): every
    read of a float32 scalar is the accept/reject decision, exactly one per attempt."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "aten._local_scalar_dense":
                self.counts[args[0].dtype] += 1
            return func(*args, **(kwargs or {}))

    path = fs.paths.VP()
    model = fs.Model(lambda x, t: x * path.sigma(t).to(x.dtype)[:, None], path, predicts="eps")  # tensor ops only
    with Reads() as mode:
        x, info = fs.sample(model, (8, 3), solver="ggf", rtol=0.05, atol=0.05, seed=1, return_info=True)
    assert info["rejected"] > 0 and mode.counts[torch.float32] == info["steps"] + info["rejected"]


def test_registered_with_its_properties():
    info = next(s for s in fs.solvers() if s.name == "ggf")
    assert (info.stochastic, info.adaptive, info.needs, info.nfe_per_step) == (True, True, "score", 2)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_and_failures_name_the_fix():
    path, prob, model, _ = _problem("vp")
    with pytest.raises(ValueError, match="theta=0"):
        GottaGoFast(theta=0)
    with pytest.raises(ValueError, match="theta=1.5"):
        GottaGoFast(theta=1.5)
    with pytest.raises(ValueError, match="r=-1"):
        GottaGoFast(r=-1)
    with pytest.raises(TypeError, match="extrapolate='yes'"):
        GottaGoFast(extrapolate="yes")
    with pytest.raises(TypeError, match="denoise=1"):
        GottaGoFast(denoise=1)
    with pytest.raises(ValueError, match="rtol=0"):
        GottaGoFast(rtol=0)
    with pytest.raises(ValueError, match="h0=-0.1"):
        GottaGoFast(h0=-0.1)
    with pytest.raises(ValueError, match="adaptive"):
        fs.sample(model, (4, 2), solver=GottaGoFast(), steps=10)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        fs.sample(model, (4, 2), solver=GottaGoFast(1e-3, 1e-3, max_steps=3))
    rf = fs.paths.RectifiedFlow()
    rf_model = fs.Model(fs.analytic.Gaussian(MU, STD, rf).velocity, rf, predicts="velocity")
    with pytest.raises(ValueError, match="singular at t=1.*t_max < 1"):
        fs.sample(rf_model, (4, 2), solver="ggf", t_min=1e-3)
    with pytest.raises(ValueError, match="t=0.*velocity"):  # the score at sigma = 0: t_min > 0 for rectified flow
        fs.sample(rf_model, (4, 2), solver="ggf", t_max=0.999)
    nan_model = fs.Model(lambda x, t: x * float("nan"), path, predicts="eps")
    with pytest.raises(FloatingPointError, match="not finite"):
        fs.sample(nan_model, (4, 2), solver="ggf")
    with pytest.raises(FloatingPointError, match="NaN/inf at t=1"):
        fs.sample(nan_model, (4, 2), solver="ggf", check_finite=True)
