"""Adaptive embedded RK solvers (bosh3, dopri5, tsit5): tableau order conditions, endpoint error against the
exact Gaussian flow map (FORMULAS.md §3) within a bound derived from the tolerance, the error estimate against
its closed form on a linear ODE, host syncs counted, rejections that leave the state untouched, end points."""
import itertools
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.kernels import HAS_TRITON, interpreting
from flowsolve.odeint import odeint
from flowsolve.solvers import Bosh3, Dopri5, Tsit5
from flowsolve.tableaus import TABLEAUS

from helpers import CountOps, Counting, gaussian_problem

ADAPTIVE = {"bosh3": Bosh3, "dopri5": Dopri5, "tsit5": Tsit5}
TOLS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
needs_triton = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs triton + TRITON_INTERPRET=1")


# ------------------------------------------------------------------ order conditions (rooted trees)
def _trees(n):
    """Rooted trees with n nodes, each a sorted tuple of its subtrees (Butcher 1963; HNW Sec. II.2)."""
    if n == 1:
        return [()]

    def partitions(m, largest):
        if m == 0:
            yield []
            return
        for k in range(min(m, largest), 0, -1):
            for rest in partitions(m - k, k):
                yield [k] + rest

    out = set()
    for p in partitions(n - 1, n - 1):
        for kids in itertools.product(*[_trees(k) for k in p]):
            out.add(tuple(sorted(kids)))
    return sorted(out)


def _size(t):
    return 1 + sum(_size(c) for c in t)


def _density(t):  # gamma(t): the condition is sum_i b_i Phi_i(t) = 1 / gamma(t)
    g = _size(t)
    for c in t:
        g *= _density(c)
    return g


def _stage_weights(tab, t):
    """Phi_i(t): 1 for the one-node tree; prod over subtrees u of sum_j a_ij Phi_j(u)."""
    s = tab.stages
    a = [[tab.a[i][j] if j < i else 0.0 for j in range(s)] for i in range(s)]
    w = [1.0] * s
    for kid in t:
        v = _stage_weights(tab, kid)
        w = [w[i] * sum(a[i][j] * v[j] for j in range(s)) for i in range(s)]
    return w


def _residuals(tab, weights, order):
    return {t: sum(b * p for b, p in zip(weights, _stage_weights(tab, t))) - 1.0 / _density(t)
            for n in range(1, order + 1) for t in _trees(n)}


def test_tree_enumeration_counts():
    assert [len(_trees(n)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]  # OEIS A000081


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_tableau_satisfies_exactly_its_order_conditions(name):
    """Every order condition up to the stated order holds (to 1e-13: tsit5's coefficients are 20-digit decimals),
    and one of the next order fails by far more (so the stated order is the exact order); likewise for the
    embedded weights of an adaptive pair at its lower order."""
    tab = TABLEAUS[name]
    pairs = [(tab.b, tab.order)] + ([(tab.b_low, tab.order_low)] if tab.adaptive else [])
    for weights, p in pairs:
        res = _residuals(tab, weights, p + 1)
        low = [abs(r) for t, r in res.items() if _size(t) <= p]
        high = [abs(r) for t, r in res.items() if _size(t) == p + 1]
        assert max(low) < 1e-13, (name, p, max(low))
        assert max(high) > 1e-4, (name, p, max(high))


def test_error_weights_and_nfe_per_step():
    for name, cls in ADAPTIVE.items():
        tab = TABLEAUS[name]
        assert tab.fsal and cls.info.nfe_per_step == tab.stages - 1 == tab.evals_per_step
        assert cls.info.order == tab.order and cls.info.adaptive and not cls.info.stochastic
        assert abs(sum(tab.err)) < 1e-15  # b and b_low both sum to 1


# ------------------------------------------------------------------ the error estimate against its closed form
def _stability(tab, weights, z, absolute=False):
    """R(z) = 1 + z w^T (I - z A)^-1 1: one RK step of x' = lam x multiplies x by R(h lam) (HNW IV.2). With
    ``absolute`` the same recursion on |z|, |A|, |w|: the magnitude that bounds the step's rounding error."""
    s = tab.stages
    a = torch.tensor([[tab.a[i][j] if j < i else 0.0 for j in range(s)] for i in range(s)], dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    if absolute:
        a, w, z = a.abs(), w.abs(), abs(z)
    g = torch.linalg.solve(torch.eye(s, dtype=torch.float64) - z * a, torch.ones(s, dtype=torch.float64))
    return 1.0 + z * float(w @ g)


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_one_step_and_its_error_estimate_match_the_stability_function(name):
    """x' = lam x, one step h = span (h0 = span): the new state is R(h lam) x0 and the error estimate
    (R - R_low)(h lam) x0; with atol set so that this estimate's scaled norm is 0.9 the step is accepted,
    with 1.1 it is rejected and retried. The state matches to the rounding bound (s + 1)^2 u R_abs |x0| (each
    of the s nested stage sums of <= s + 1 terms rounds by (s + 1) u of its absolute-value magnitude)."""
    tab = TABLEAUS[name]
    lam, h = -1.3, 0.7
    z = h * lam
    x0 = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    r, r_low = _stability(tab, tab.b, z), _stability(tab, tab.b_low, z)
    e = (r - r_low) * x0
    target = float(e.pow(2).mean().sqrt())  # RMS of e / atol (rtol negligible)
    f = lambda x, t: lam * x  # noqa: E731
    for ratio, rejected in ((0.9, False), (1.1, True)):
        xs, info = odeint(f, x0, [0.0, h], name, rtol=1e-30, atol=target / ratio, h0=h, return_info=True)
        assert (info["rejected"] > 0) == rejected, (ratio, info)
        if not rejected:
            assert info["steps"] == 1 and info["nfe"] == tab.stages
            bound = (tab.stages + 1) ** 2 * 2.0**-53 * _stability(tab, tab.b, z, absolute=True) * x0.abs()
            assert bool(((xs[1] - r * x0).abs() <= bound).all()), (xs[1] - r * x0, bound)


# ------------------------------------------------------------------ endpoint error vs the exact flow map
MU, STD = [0.5, -1.0, 2.0, 0.0], [0.05, 0.1, 0.4, 0.8]


def _propagation_bound(prob, x_T, grid, tol):
    """sum_n M_n with M_n = max_{b,d} |J_{n+1 -> end, d}| sc_n[b, d] / sc_end[b, d]: the local error of step n
    (scaled by sc_n = tol (1 + max(|x_n|, |x_{n+1}|)), so of RMS <= 1 per sample when the estimate is honest) is
    carried to t_min by the flow's Jacobian J (diagonal here: J_d = flow(1) - flow(0), the flow is affine),
    and measured in the end's scale sc_end = tol (1 + |x(t_min)|). Their sum bounds the global error's
    scaled RMS to first order (the propagated 5th/3rd-order solution's local error is asymptotically below
    the 4th/2nd-order estimate). States are the exact ones at the accepted times."""
    times = [float(t) for t in grid]
    xs = [x_T] + [prob.flow(x_T, times[0], t) for t in times[1:]]
    sc_end = tol * (1 + xs[-1].abs())
    ones = torch.ones(1, x_T.shape[1], dtype=torch.float64)
    total = 0.0
    for n in range(len(times) - 1):
        jac = (prob.flow(ones, times[n + 1], times[-1]) - prob.flow(0 * ones, times[n + 1], times[-1])).abs()
        sc = tol * (1 + torch.maximum(xs[n].abs(), xs[n + 1].abs()))
        total += float((jac * sc / sc_end).max())
    return total


@pytest.mark.parametrize("key", ["vp-eps", "rf-velocity"])
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_endpoint_error_within_the_propagated_tolerance(name, key):
    """rtol = atol = tol in 1e-2 .. 1e-6, float64, 64 paths of anisotropic Gaussian data: the scaled RMS endpoint
    error max_b RMS_d (x - exact) / (tol (1 + |exact|)) is at most the propagation bound sum_n M_n (above;
    measured 4.2 .. 128). Measured error / tol: bosh3 0.14-0.59, dopri5 0.10-2.42, tsit5 0.18-5.54 (tsit5, VP,
    1e-3, bound 6.2: the tightest case). NFE is exact (a counting wrapper), 1 + 1 (the initial-step probe) +
    (s - 1) per attempted step, and does not grow as the tolerance loosens; the grid runs from t_max to t_min
    exactly, strictly decreasing, and the model is never evaluated outside it."""
    path, prob, model = gaussian_problem(key, MU, STD)
    counting = Counting(model.fn, path.t_min, path.t_max)
    m = fs.Model(counting, path, predicts=model.predicts)
    x_T = prob.sample(64, path.t_max, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = prob.flow(x_T, path.t_max, path.t_min)
    nfes, ratios = [], []
    for tol in TOLS:
        counting.calls = 0
        x, info = fs.sample(m, x_T, solver=name, rtol=tol, atol=tol, return_info=True)
        err = float(((x - exact) / (tol * (1 + exact.abs()))).pow(2).mean(1).sqrt().max())
        bound = _propagation_bound(prob, x_T, info["grid"], tol)
        assert err <= bound, (tol, err, bound)
        ratios.append(err)
        assert info["nfe"] == counting.calls == 2 + TABLEAUS[name].evals_per_step * (info["steps"] + info["rejected"])
        grid = info["grid"]
        assert float(grid[0]) == path.t_max and float(grid[-1]) == path.t_min and len(grid) == info["steps"] + 1
        assert bool((grid[1:] < grid[:-1]).all())
        nfes.append(info["nfe"])
    assert all(a <= b for a, b in zip(nfes, nfes[1:])) and nfes[0] < nfes[-1], nfes  # TOLS: loose -> tight


def test_float32_state_and_default_tolerance():
    """The default fs.sample state is float32: at rtol = atol = 1e-4 dopri5 stays within the same bound."""
    path, prob, model = gaussian_problem("rf-velocity", MU, STD)
    x_T = prob.sample(32, 1.0, generator=torch.Generator().manual_seed(1))
    exact = prob.flow(x_T.double(), 1.0, 0.0)
    x, info = fs.sample(model, x_T, solver="dopri5", rtol=1e-4, atol=1e-4, return_info=True)
    assert x.dtype == torch.float32 and info["rtol"] == 1e-4
    err = float(((x.double() - exact) / (1e-4 * (1 + exact.abs()))).pow(2).mean(1).sqrt().max())
    assert err <= _propagation_bound(prob, x_T.double(), info["grid"], 1e-4)
    _, info_default = fs.sample(model, x_T, solver="dopri5", return_info=True)
    assert info_default["rtol"] == info_default["atol"] == 1e-5 and info_default["nfe"] > info["nfe"]


# ------------------------------------------------------------------ host syncs


@pytest.mark.parametrize("h0", [None, 0.01])
def test_one_host_sync_per_attempted_step(h0):
    """aten._local_scalar_dense (a device read from the host) happens exactly once per attempted step (the
    batch max of the error norm), plus 2 for Hairer's initial-step heuristic when h0 is not given."""
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0], [0.1, 0.8])
    sampler = fs.Sampler(model, Dopri5(h0=h0), rtol=1e-4, atol=1e-4)
    x_T = prob.sample(16, path.t_max, generator=torch.Generator().manual_seed(0))
    with CountOps() as mode:
        x, info = sampler.sample(x_T, return_info=True)
    attempts = info["steps"] + info["rejected"]
    assert info["rejected"] > 0 and attempts > 5
    assert mode.counts["aten._local_scalar_dense"] == attempts + (2 if h0 is None else 0)


# ------------------------------------------------------------------ rejections
def test_rejected_step_leaves_the_state_untouched():
    """A first step over the whole interval (h0 = 1) is rejected and retried smaller. The first accepted state
    then equals, bit for bit, that of a run started directly with the accepted step size: the rejected attempts
    changed neither the state nor the FSAL stage."""
    path, prob, model = gaussian_problem("vp-eps", MU, STD)
    x_T = prob.sample(8, 1.0, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x1, traj1, info1 = fs.sample(model, x_T, solver=Dopri5(h0=1.0), rtol=1e-5, atol=1e-5, return_trajectory=True,
                                 return_info=True)
    assert info1["rejected"] >= 1
    h_accepted = 1.0 - float(info1["grid"][1])
    assert 1.0 - h_accepted == float(info1["grid"][1])  # exact (Sterbenz): the second run takes the same step
    x2, traj2, info2 = fs.sample(model, x_T, solver=Dopri5(h0=h_accepted), rtol=1e-5, atol=1e-5,
                                 return_trajectory=True, return_info=True)
    assert float(info2["grid"][1]) == float(info1["grid"][1])
    assert torch.equal(traj1[0], x_T) and torch.equal(traj1[1], traj2[1])
    exact = prob.flow(x_T, 1.0, float(info1["grid"][1]))
    assert float((traj1[1] - exact).abs().max()) < 1e-4


def test_tiny_data_std_forces_rejections_and_stays_within_tolerance():
    """Data with std 1e-3 (VP, down to t_min = 1e-3): the velocity varies on the scale of sigma(t), the controller
    rejects and retries, and the endpoint still meets the propagation bound."""
    path, prob, model = gaussian_problem("vp-eps", [0.3, -0.4], [1e-3, 2e-3])
    x_T = prob.sample(32, path.t_max, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = prob.flow(x_T, path.t_max, path.t_min)
    for name in ADAPTIVE:
        x, info = fs.sample(model, x_T, solver=name, rtol=1e-5, atol=1e-5, return_info=True)
        assert info["rejected"] > 0, (name, info)
        err = float(((x - exact) / (1e-5 * (1 + exact.abs()))).pow(2).mean(1).sqrt().max())
        assert err <= _propagation_bound(prob, x_T, info["grid"], 1e-5), (name, err)


# ------------------------------------------------------------------ ends of the interval, info, errors
def test_custom_range_lands_exactly_and_never_leaves_it():
    path, prob, model = gaussian_problem("edm-x0", MU, STD)
    counting = Counting(model.fn, 0.05, 7.0)
    m = fs.Model(counting, path, predicts="x0")
    x_T = prob.sample(16, 7.0, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = []
    x, traj, info = fs.sample(m, x_T, solver="tsit5", t_max=7.0, t_min=0.05, rtol=1e-6, atol=1e-6, return_trajectory=True,
                              return_info=True, callback=lambda step, t, x: calls.append((step, t)))
    assert float(info["grid"][0]) == 7.0 and float(info["grid"][-1]) == 0.05
    assert len(traj) == info["steps"] + 1 and torch.equal(traj[-1], x)
    assert [c[0] for c in calls] == list(range(info["steps"])) and calls[-1][1] == 0.05
    assert info["nfe"] == counting.calls and info["solver"] == "tsit5"
    exact = prob.flow(x_T, 7.0, 0.05)
    assert float(((x - exact) / (1e-6 * (1 + exact.abs()))).pow(2).mean(1).sqrt().max()) <= \
        _propagation_bound(prob, x_T, info["grid"], 1e-6)


def test_singular_end_points_are_refused_before_evaluating():
    """An eps model has no velocity at sigma = 0 (VP, t_min = 0) nor at alpha = 0 (rectified flow, t_max = 1):
    refused, naming the fix, with no model call. A velocity model on rectified flow is evaluated at both ends
    (t = 0 and t = 1) and lands on t = 0 exactly."""
    path, prob, model = gaussian_problem("vp-eps", [0.5], [0.7])
    counting = Counting(model.fn)
    m = fs.Model(counting, path, predicts="eps")
    with pytest.raises(ValueError, match="t_min > 0"):
        fs.sample(m, (4, 1), solver="dopri5", t_min=0.0)
    rf = fs.paths.RectifiedFlow()
    prob_rf = fs.analytic.Gaussian(torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64), rf)
    with pytest.raises(ValueError, match="t_max < 1"):
        fs.sample(fs.Model(counting, rf, predicts="eps"), (4, 1), solver="bosh3")
    assert counting.calls == 0
    x_T = prob_rf.sample(8, 1.0, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x, info = fs.sample(fs.Model(prob_rf.velocity, rf, predicts="velocity"), x_T, solver="bosh3", t_min=0.0,
                        rtol=1e-6, atol=1e-6, return_info=True)
    assert float(info["grid"][-1]) == 0.0
    torch.testing.assert_close(x, prob_rf.flow(x_T, 1.0, 0.0), rtol=0, atol=1e-4)


def test_max_steps_and_nonfinite_fields_raise_with_the_fix():
    path, prob, model = gaussian_problem("vp-eps", [0.5], [0.7])
    with pytest.raises(RuntimeError, match="raise max_steps.*Dopri5\\(max_steps=...\\)"):
        fs.sample(model, (4, 1), solver=Dopri5(max_steps=3), rtol=1e-8, atol=1e-8)
    nan_model = fs.Model(lambda x, t: x * float("nan"), path, predicts="eps")
    with pytest.raises(FloatingPointError, match="NaN/inf at the initial state"):
        fs.sample(nan_model, (4, 1), solver="bosh3")  # the initial-step heuristic reads f(x0) first
    with pytest.raises(FloatingPointError, match="NaN/inf on 9 attempts in a row"):
        fs.sample(nan_model, (4, 1), solver=Bosh3(h0=0.1))
    with pytest.raises(FloatingPointError, match="the model returned NaN/inf"):
        fs.sample(nan_model, (4, 1), solver="bosh3", check_finite=True)
    with pytest.raises(ValueError, match="is adaptive"):
        fs.sample(model, (4, 1), solver="tsit5", steps=10)
    with pytest.raises(ValueError, match="rtol=0"):
        Tsit5(rtol=0)


def test_registry_lists_the_adaptive_solvers():
    infos = {s.name: s for s in fs.solvers()}
    for name, cls in ADAPTIVE.items():
        assert infos[name] == cls.info and infos[name].adaptive and infos[name].needs == "velocity"
    model = gaussian_problem("vp-eps", [0.1], [0.5])[2]
    assert fs.Sampler(model, "bosh3").nfe is None  # known only after the run (return_info)
    assert isinstance(fs.get_solver("dopri5"), Dopri5)


@needs_triton
def test_triton_backend_end_to_end():
    """The same run through the Triton kernels (interpreter): the same number of accepted and rejected steps,
    and times and states equal to the twin's to float64 rounding (the error norms differ in their last bits, so
    do the controller's step sizes)."""
    path, prob, model = gaussian_problem("rf-velocity", [0.5, -1.0], [0.3, 0.8])
    x_T = prob.sample(3, 1.0, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a, ia = fs.sample(model, x_T, solver="bosh3", rtol=1e-3, atol=1e-3, backend="triton", return_info=True)
    b, ib = fs.sample(model, x_T, solver="bosh3", rtol=1e-3, atol=1e-3, backend="torch", return_info=True)
    assert ia["nfe"] == ib["nfe"] and ia["rejected"] == ib["rejected"] and len(ia["grid"]) == len(ib["grid"])
    torch.testing.assert_close(ia["grid"], ib["grid"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert math.isfinite(float(a.abs().max()))
