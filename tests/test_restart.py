"""Restart sampling (Xu et al. 2023, Alg. 1) against the exact Gaussian law of the algorithm, written independently.

For Gaussian data the PF-ODE velocity is affine in x per dimension, u = a(t) x + b(t) (FORMULAS.md §2-3:
u = f x - g^2/2 score), so every Heun step is an affine map, and a restart forward jump is the path's exact
transition x_b = (alpha_b/alpha_a) x_a + alpha_b sqrt(s_b^2 - s_a^2) z with fresh z for every repetition.
``restart_law`` propagates mean and variance through Alg. 1 as the paper writes it (main Heun steps, the
interval attached at the main point nearest s_min in log s among those below s_max, K jumps each followed by
an EDM rho = 7 Heun pass, times found by bisection on sigma/alpha rather than the path's t_of_lambda).
Checks: K = 0 is Heun; NFE counted = planned = the formula; 10000 samples match the law within 5 standard
errors (FORMULAS.md §7); the exact law's weak error shrinks at order 2 when the restart passes are refined too.
"""
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.solvers import Restart
from helpers import PATH_MODELS, Counting, fitted_order, gaussian_problem, Law, F64, alpha_sigma

C = 5.0  # standard errors: two-sided false-alarm rate 6e-7 per check (FORMULAS.md §7)
MU, STD = torch.tensor([0.7, -1.5], dtype=torch.float64), torch.tensor([0.4, 1.3], dtype=torch.float64)



def _velocity_affine(path, t):
    al, si = alpha_sigma(path, t)
    c = al**2 * STD**2 + si**2
    f, g2 = float(path.f(F64(t))), float(path.g2(F64(t)))
    return f + g2 / (2 * c), -g2 * al * MU / (2 * c)  # u = f x + g^2/2 (x - alpha mu) / C


def _level(path, t):
    al, si = alpha_sigma(path, t)
    return si / al


def _time_of_level(path, s_target, lo, hi):
    """t in [lo, hi] with sigma/alpha = s_target, by bisection (sigma/alpha increases with t)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _level(path, mid) < s_target else (lo, mid)
    return (lo + hi) / 2


def restart_law(path, grid, mean, var, intervals, rho=7.0):
    g = [float(v) for v in grid]
    s = [_level(path, t) for t in g]
    law = Law(mean, var, 1)

    def heun(t0, t1):
        a0, b0 = _velocity_affine(path, t0)
        a1, b1 = _velocity_affine(path, t1)
        h = t1 - t0
        x = law.slot(0)
        x_euler = x * (1 + h * a0)[:, None] + law.const(h * b0)
        law.update([x + (x * a0[:, None] + law.const(b0) + x_euler * a1[:, None] + law.const(b1)) * (h / 2)])

    attach = {}
    for s_min, s_max, k, n in intervals:
        cand = [j for j in range(1, len(g)) if s[j] < s_max]
        j = min(cand, key=lambda q: abs(math.log(s[q]) - math.log(s_min)) if s[q] > 0 else math.inf)
        attach[j] = (s_max, k, n)
    for i in range(len(g) - 1):
        heun(g[i], g[i + 1])
        if i + 1 not in attach:
            continue
        s_max, k, n = attach[i + 1]
        t_a, s_a = g[i + 1], s[i + 1]
        t_b = min(_time_of_level(path, s_max, t_a, g[0]), g[0])
        s_b = _level(path, t_b)
        levels = [(s_b ** (1 / rho) + q / n * (s_a ** (1 / rho) - s_b ** (1 / rho))) ** rho for q in range(n + 1)]
        times = [t_b] + [_time_of_level(path, lv, t_a, t_b) for lv in levels[1:-1]] + [t_a]
        a_a, a_b = alpha_sigma(path, t_a)[0], alpha_sigma(path, t_b)[0]
        for _ in range(k):
            law.update([law.slot(0) * (a_b / a_a) + law.z() * (a_b * math.sqrt(s_b**2 - s_a**2))])
            for q in range(n):
                heun(times[q], times[q + 1])
    return law.result()


def _problem(name):
    path = fs.paths.VP() if name == "vp" else fs.paths.EDM()
    prob = fs.analytic.Gaussian(MU, STD, path)
    model = fs.Model(prob.eps if name == "vp" else prob.x0, path, predicts="eps" if name == "vp" else "x0")
    return path, prob, model


def _x_T(path):
    return torch.tensor([0.3, -0.4], dtype=torch.float64) * float(path.sigma(F64(path.t_max)))


def test_without_restarts_it_is_heun():
    path, prob, model = _problem("vp")
    x_T = prob.sample(16, path.t_max, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = fs.sample(model, x_T, solver=Restart(((0.06, 0.3, 0, 2),)), steps=7, seed=1)
    b = fs.sample(model, x_T, solver="heun", steps=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("intervals,steps", [(((0.06, 0.30, 2, 2),), 18), (((0.06, 0.30, 2, 2),), 3),
                                             (((0.05, 0.3, 3, 2), (1.0, 2.0, 2, 4)), 12)])
def test_nfe_counts_every_evaluation(intervals, steps):
    """NFE = 2 per main Heun step (VP with t_min > 0: every step corrects) + K * 2 * steps per restart pass;
    the counting wrapper also fails on any t outside the path's range."""
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(MU, STD, path)
    counting = Counting(prob.eps, path.t_lo, path.t_hi)
    sampler = fs.Sampler(fs.Model(counting, path, predicts="eps"), Restart(intervals), steps=steps)
    x, info = sampler.sample((8, 2), seed=0, return_info=True)
    expected = 2 * steps + sum(2 * k * n for _, _, k, n in intervals)
    assert sampler.nfe == info["nfe"] == info["planned_nfe"] == counting.calls == expected
    assert sampler.plan.flags["restart_nfe"] == expected - 2 * steps
    assert bool(torch.isfinite(x).all())


def test_paper_default_configuration():
    """Xu et al. 2023's CIFAR-10 VP setting: 18 main steps, [0.06, 0.30], K = 2, 3 restart points: NFE 44 here."""
    path, prob, model = _problem("vp")
    sampler = fs.Sampler(model, "restart", steps=Restart.paper_steps)
    assert sampler.nfe == 44
    (m, t_a), = sampler.plan.flags["attach"].items()
    s = [_level(path, t) for t in sampler.times]
    assert t_a == sampler.times[m + 1]
    assert min(range(1, len(s)), key=lambda j: abs(math.log(s[j] / 0.06))) == m + 1


@pytest.mark.parametrize("intervals,steps,path_name", [(((0.06, 0.30, 2, 2),), 18, "vp"),
                                                       (((0.06, 0.30, 3, 3),), 5, "vp"),
                                                       (((0.1, 1.0, 2, 3), (2.0, 10.0, 1, 2)), 10, "edm")])
def test_matches_exact_law_of_the_algorithm(intervals, steps, path_name):
    path, prob, model = _problem(path_name)
    n = 10000
    x_T = _x_T(path)
    x = fs.sample(model, x_T.expand(n, 2), solver=Restart(intervals), steps=steps, seed=11)
    mean, var = restart_law(path, fs.grids.make_grid(None, path, steps), x_T, torch.zeros(2, dtype=torch.float64),
                            intervals)
    # mean: 5 standard errors sqrt(var/n); variance: 5 sd of a Gaussian sample variance, var sqrt(2/(n-1))
    assert bool(((x.mean(0) - mean).abs() <= C * (var / n).sqrt()).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() <= C * var * math.sqrt(2.0 / (n - 1))).all()), (x.var(0), var)


def test_weak_error_of_the_exact_law_shrinks_at_second_order():
    """Exact law from the exact marginal at t_max against the true p(t_min), no Monte-Carlo noise; one interval
    [0.06, 0.30], K = 1, restart passes of 2/3 the main steps (NFE = 10/3 main steps): slope >= 2 - 0.15 over
    12..96 main steps (measured 2.0)."""
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(MU, STD, path)
    nfes, errs = [], []
    for steps in (12, 24, 48, 96):
        iv = ((0.06, 0.30, 1, 2 * steps // 3),)
        m, v = restart_law(path, fs.grids.make_grid(None, path, steps), prob.mean(path.t_max), prob.var(path.t_max), iv)
        nfes.append(2 * steps + 2 * (2 * steps // 3))
        errs.append(float(torch.cat([(m - prob.mean(path.t_min)).abs(), (v - prob.var(path.t_min)).abs()]).max()))
    assert fitted_order(nfes, errs) >= Restart().info.order - 0.15, errs


def test_batch_invariance_and_distinct_noise_per_repetition():
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0, 0.2], [0.7, 1.2, 0.3])
    big = fs.sample(model, (8, 3), solver="restart", steps=9, seed=5)
    for b in (0, 3, 7):
        one = fs.sample(model, (1, 3), solver="restart", steps=9, seed=5, sample_offset=b)
        assert torch.equal(one[0], big[b])
    assert not torch.equal(fs.sample(model, (8, 3), solver="restart", steps=9, seed=6), big)


@pytest.mark.parametrize("key", ["ve-eps", "edm-x0", "rf-velocity", "subvp-score", "vp_cosine-eps"])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_every_path_and_short_grids(key, steps):
    """Finite output on every path, the interval attached below s_max even on 1-3 step grids (to sigma = 0 on
    rectified flow), NFE counted = planned, no evaluation outside the path's range."""
    path_cls, predicts = PATH_MODELS[key]
    path = path_cls()
    prob = fs.analytic.Gaussian(MU, STD, path)
    counting = Counting(getattr(prob, predicts), path.t_lo, path.t_hi)
    sampler = fs.Sampler(fs.Model(counting, path, predicts=predicts), "restart", steps=steps)
    x, info = sampler.sample((8, 2), seed=0, return_info=True)
    assert sampler.nfe == info["nfe"] == counting.calls
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("intervals,needle", [([(0.3, 0.06, 2, 2)], "s_min"), ([(0.06, 0.3, -1, 2)], "K"),
                                              ([(0.06, 0.3, 2, 0)], "steps"), ([(0.06, 0.3)], "intervals"),
                                              ([(0.0, 0.3, 2, 2)], "s_min")])
def test_bad_intervals_are_named(intervals, needle):
    with pytest.raises(ValueError, match=needle):
        Restart(intervals)


def test_intervals_that_cannot_attach_are_refused():
    path, prob, model = _problem("vp")
    with pytest.raises(ValueError, match="same main grid point"):
        fs.Sampler(model, Restart(((0.06, 0.3, 1, 2), (0.061, 0.2, 1, 2))), steps=10)
    with pytest.raises(ValueError, match="below s_max"):
        fs.Sampler(model, Restart(((1e-5, 2e-5, 1, 2),)), steps=10)


def test_registry_entry():
    info = {s.name: s for s in fs.solvers()}["restart"]
    assert (info.order, info.nfe_per_step, info.stochastic, info.needs) == (2, 2, True, "velocity")
    assert "Xu et al. 2023" in info.paper



def test_pathwise_against_k_diffusion_heun_with_the_same_keyed_noise():
    """EDM path (sigma = t): Restart = k-diffusion's ``sample_heun`` on the main sigmas up to the attach point, then
    K times (jump x + sqrt(s_b^2 - s_a^2) z with z the keyed noise of stream 8, key n K_max + k; ``sample_heun`` on
    the restart sigmas), then ``sample_heun`` on the rest. float64 both: agreement to rounding (1e-10)."""
    from bench.peers import import_k_diffusion_sampling

    K = import_k_diffusion_sampling()
    if K is None:
        pytest.skip("k-diffusion is not installed")
    path, prob, model = _problem("edm")
    x_T = prob.sample(6, path.t_max, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = Restart(((0.5, 3.0, 3, 3),))
    sampler = fs.Sampler(model, solver, steps=10)
    ours = sampler.sample(x_T, seed=9)
    (m, t_a), = sampler.plan.flags["attach"].items()
    sig = torch.tensor(sampler.times, dtype=torch.float64)
    t_b = 3.0  # s_max on EDM (alpha = 1, sigma = t)
    inner = fs.grids.make_grid("edm", path, 3, t_max=t_b, t_min=t_a)

    def denoiser(x, s):
        return prob.x0(x, s)

    x = K.sample_heun(denoiser, x_T.clone(), sig[: m + 2], disable=True)
    seed = fs.kernels.seed_tensor(9, x.device)
    for k in range(3):
        key = torch.tensor([m * solver.k_max + k], dtype=torch.int64)
        z = fs.kernels.normal_(torch.empty(x.shape), seed, key, stream=fs.kernels.STREAM_STEP + 8, backend="torch")
        z = z.to(torch.float64)  # the keyed noise is generated in fp32, then scaled in the state's dtype
        x = x + math.sqrt(t_b**2 - t_a**2) * z
        x = K.sample_heun(denoiser, x, inner, disable=True)
    x = K.sample_heun(denoiser, x, sig[m + 1:], disable=True)
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
