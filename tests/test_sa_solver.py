"""SA-Solver (Xue et al. 2023) against the exact Gaussian law of its own scheme, written independently here.

For Gaussian data x0(x, t) = p(t) x + q(t) per dimension, so SA-Predictor / SA-Corrector (the paper's eqs. 14
and 16) are an affine recursion in (x_i, and the points where the last three x0-predictions were made) plus
one shared Gaussian xi per step. ``sa_law`` below propagates its mean vector and covariance in float64, with
the Lagrange weights integrated by scipy's adaptive quadrature (the solver uses Gauss-Legendre) and the
warm-up rules of the solver's docstring. Three checks use it: tau = 0 pathwise (deterministic: to rounding),
tau > 0 in law (10000 samples, 5 standard errors: FORMULAS.md §7), and the weak order of the exact law
against the true marginal (no Monte-Carlo noise at all).
"""
import math

import pytest
import torch
from scipy import integrate

import flowsolve as fs
from flowsolve.solvers import SASolver
from helpers import PATH_MODELS, Counting, fitted_order, gaussian_problem, Law, F64, alpha_sigma

C = 5.0  # standard errors: two-sided false-alarm rate 6e-7 per check (FORMULAS.md §7)
MU, STD = torch.tensor([0.7, -1.5], dtype=torch.float64), torch.tensor([0.4, 1.3], dtype=torch.float64)



def _x0_affine(path, t):
    al, si = alpha_sigma(path, t)
    c = al**2 * STD**2 + si**2
    return al * STD**2 / c, MU * si**2 / c


def _weights(lam_i, lam_next, nodes, tau):
    """(1 + tau^2) int_{lam_i}^{lam_next} e^{-(1 + tau^2)(lam_next - l)} l_j(l) dl for each Lagrange node j."""
    k = 1.0 + tau * tau

    def ell(j, x):
        return math.prod((x - nm) / (nodes[j] - nm) for m, nm in enumerate(nodes) if m != j)

    return [k * integrate.quad(lambda x: math.exp(-k * (lam_next - x)) * ell(j, x), lam_i, lam_next,
                               epsabs=0.0, epsrel=1e-13, limit=200)[0] for j in range(len(nodes))]


def sa_law(path, grid, mean, var, p=3, c=3, tau=1.0):
    """Exact (mean, var) of SA-Solver's output: slot 0 the state, slots 1..3 the points of the last x0-evaluations."""
    g = [float(v) for v in grid]
    n = len(g) - 1
    lam = [math.log(a / s) for a, s in (alpha_sigma(path, t) for t in g)]
    law = Law(mean, var, 4)
    law.update([law.slot(0), law.slot(0), law.slot(2), law.slot(3)])  # m_0 is evaluated at x_0 itself
    times = [g[0]]
    for i in range(n):
        k = min(p, i + 1, n - i) if n < 15 else min(p, i + 1)
        kc = 0 if (c == 0 or i == n - 1) else (min(c, i + 2, n - i + 1) if n < 15 else min(c, i + 2))
        a1, s1 = alpha_sigma(path, g[i + 1])
        s0 = alpha_sigma(path, g[i])[1]
        h = lam[i + 1] - lam[i]
        noise = s1 * math.sqrt(-math.expm1(-2 * tau * tau * h))
        start = law.slot(0) * (s1 / s0 * math.exp(-tau * tau * h)) + law.z() * noise
        ms = []
        for j, tj in enumerate(times):
            pj, qj = _x0_affine(path, tj)
            ms.append(law.slot(1 + j) * pj[:, None] + law.const(qj))
        x_pred = start
        for j, b in enumerate(_weights(lam[i], lam[i + 1], [lam[i - j] for j in range(k)], tau)):
            x_pred = x_pred + ms[j] * (a1 * b)
        x_new = x_pred
        if kc:
            pt, qt = _x0_affine(path, g[i + 1])
            pts = [x_pred * pt[:, None] + law.const(qt)] + ms[: kc - 1]
            x_new = start
            for mj, w in zip(pts, _weights(lam[i], lam[i + 1], [lam[i + 1]] + [lam[i - j] for j in range(kc - 1)], tau)):
                x_new = x_new + mj * (a1 * w)
        law.update([x_new, x_pred, law.slot(1), law.slot(2)])
        times = [g[i + 1]] + times[:2]
    return law.result()


def _problem(name):
    path = fs.paths.VP() if name == "vp" else fs.paths.EDM()
    prob = fs.analytic.Gaussian(MU, STD, path)
    model = fs.Model(prob.eps if name == "vp" else prob.x0, path, predicts="eps" if name == "vp" else "x0")
    return path, prob, model


@pytest.mark.parametrize("path_name", ["vp", "edm"])
@pytest.mark.parametrize("p,c", [(3, 3), (2, 2), (3, 0), (1, 2), (2, 1)])
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
def test_tau_zero_is_the_deterministic_adams_method(path_name, p, c, steps):
    """tau = 0: a deterministic variable-step Adams exponential integrator, pathwise equal to the independent
    recursion (float64; quad's relative accuracy 1e-13 and rounding give ~1e-12 on values of size 1-100)."""
    path, prob, model = _problem(path_name)
    x_T = torch.tensor([0.3, -0.4], dtype=torch.float64) * float(path.sigma(F64(path.t_max)))
    grid = fs.grids.make_grid(None, path, steps)
    ref, var = sa_law(path, grid, x_T, torch.zeros(2, dtype=torch.float64), p, c, tau=0.0)
    assert float(var.abs().max()) == 0.0
    x = fs.sample(model, x_T[None], solver=SASolver(p, c, tau=0.0), steps=steps)
    torch.testing.assert_close(x[0], ref, rtol=1e-10, atol=1e-10)


def test_tau_zero_converges_to_the_exact_flow_map_at_third_order():
    """Against the closed-form flow map (FORMULAS.md §3): SA(3, 3) with tau = 0 is Adams-Bashforth-Moulton of
    order min(s_c, s_p + 1) = 3; least-squares slope over 40..320 logsnr steps >= 3 - 0.15 (measured 3.5-3.7: the
    warm-up's early errors are damped, as for UniPC-3)."""
    path, prob, model = gaussian_problem("vp-eps", MU, STD)
    x_T = prob.sample(32, path.t_max, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = prob.flow(x_T, path.t_max, path.t_min)
    steps = [40, 80, 160, 320]
    errs = [float((fs.sample(model, x_T, solver=SASolver(tau=0.0), steps=s) - exact).abs().max()) for s in steps]
    assert fitted_order(steps, errs) >= 3 - 0.15, errs


@pytest.mark.parametrize("p,c,tau,steps,path_name", [(3, 3, 1.0, 4, "vp"), (3, 3, 1.0, 12, "vp"), (3, 3, 1.0, 12, "edm"),
                                                    (2, 2, 0.5, 12, "vp"), (1, 2, 1.0, 4, "edm"), (3, 0, 1.0, 5, "vp")])
def test_matches_exact_law_of_its_scheme(p, c, tau, steps, path_name):
    path, prob, model = _problem(path_name)
    n = 10000
    x_T = torch.tensor([0.3, -0.4], dtype=torch.float64) * float(path.sigma(F64(path.t_max)))
    x = fs.sample(model, x_T.expand(n, 2), solver=SASolver(p, c, tau=tau), steps=steps, seed=11)
    mean, var = sa_law(path, fs.grids.make_grid(None, path, steps), x_T, torch.zeros(2, dtype=torch.float64), p, c, tau)
    # mean: 5 standard errors sqrt(var/n); variance: 5 sd of a Gaussian sample variance, var sqrt(2/(n-1))
    assert bool(((x.mean(0) - mean).abs() <= C * (var / n).sqrt()).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() <= C * var * math.sqrt(2.0 / (n - 1))).all()), (x.var(0), var)


def test_tau_window_switches_the_noise_off_outside():
    """tau applied only where sigma/alpha is in [tau_s_min, tau_s_max]: with an empty window the sampler is the
    tau = 0 method exactly (no noise drawn into the state)."""
    path, prob, model = _problem("vp")
    x_T = prob.sample(8, path.t_max, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = fs.sample(model, x_T, solver=SASolver(tau=1.0, tau_s_min=1e6, tau_s_max=2e6), steps=9, seed=3)
    b = fs.sample(model, x_T, solver=SASolver(tau=0.0), steps=9, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_weak_error_of_the_exact_law_shrinks_at_the_stated_order():
    """Exact law started from the exact marginal at t_max against the true p(t_min), no Monte-Carlo noise:
    the max of |mean error| and |var error| shrinks with slope >= order - 0.15 over 50..400 steps (measured:
    SA(3, 3) 1.98, SA(2, 2) 2.97 (cancellation), SA(1, 2) 1.97, SA(1, 1) 0.7-0.9, tau = 1)."""
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(MU, STD, path)
    for p, c in [(3, 3), (1, 2)]:
        steps, errs = [50, 100, 200, 400], []
        for s in steps:
            m, v = sa_law(path, fs.grids.make_grid(None, path, s), prob.mean(path.t_max), prob.var(path.t_max), p, c)
            errs.append(float(torch.cat([(m - prob.mean(path.t_min)).abs(), (v - prob.var(path.t_min)).abs()]).max()))
        assert fitted_order(steps, errs) >= SASolver(p, c).info.order - 0.15, (p, c, errs)


@pytest.mark.parametrize("key", ["vp-eps", "ve-eps", "edm-x0", "rf-velocity", "subvp-score"])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_nfe_is_steps_and_model_stays_in_range(key, steps):
    """NFE = steps (one evaluation per step, none at t_min), counted by a wrapper that also fails on any t
    outside the path's range; the output is finite on every path, to sigma = 0 on rectified flow."""
    path_cls, predicts = PATH_MODELS[key]
    path = path_cls()
    prob = fs.analytic.Gaussian(MU, STD, path)
    counting = Counting(getattr(prob, predicts), path.t_lo, path.t_hi)
    sampler = fs.Sampler(fs.Model(counting, path, predicts=predicts), "sa-solver", steps=steps)
    x, info = sampler.sample((16, 2), seed=0, return_info=True)
    assert sampler.nfe == info["nfe"] == counting.calls == steps
    assert bool(torch.isfinite(x).all())


def test_step_to_sigma_zero_returns_the_data_prediction():
    """Rectified flow down to t = 0 (sigma = 0): the last step is alpha m_i with no noise, so a point-mass data
    distribution (std 0) is recovered exactly whatever the noise (x0-prediction constant = mu)."""
    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(torch.tensor([0.25, -2.0], dtype=torch.float64), 0.0, path)
    model = fs.Model(prob.velocity, path, predicts="velocity")
    x = fs.sample(model, (64, 2), solver="sa-solver", steps=6, grid="uniform", t_max=0.99, t_min=0.0, seed=2,
                  dtype=torch.float64)
    torch.testing.assert_close(x, prob.mu.expand(64, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,needle", [({"predictor_order": 4}, "predictor_order"),
                                           ({"corrector_order": 5}, "corrector_order"),
                                           ({"tau": -1.0}, "tau"), ({"tau": float("nan")}, "tau"),
                                           ({"tau_s_min": 2.0, "tau_s_max": 1.0}, "tau_s_min")])
def test_bad_arguments_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SASolver(**kwargs)


def test_registry_entry():
    info = {s.name: s for s in fs.solvers()}["sa-solver"]
    assert (info.order, info.nfe_per_step, info.stochastic, info.needs, info.multistep) == (2, 1, True, "x0", True)
    assert "Xue et al. 2023" in info.paper
    assert torch.isfinite(SASolver(2, 2, tau=0.3).plan(gaussian_problem("vp-eps", MU, STD)[2],
                                                    fs.grids.make_grid(None, fs.paths.VP(), 5)).tables["p2"]).all()



@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_lagrange_weights_match_diffusers_closed_forms(tau, k):
    """The (S3) weights (Gauss-Legendre, scaled variable) against diffusers' SASolverScheduler.get_coefficients_fn
    (closed-form exp-polynomial integrals in lambda), for uneven nodes: b_j = alpha (1+tau^2) e^{-(1+tau^2) lam_t}
    times diffusers' integral of e^{(1+tau^2) l} l_j(l). float64 both; measured agreement 1e-15 relative (h = 0.75
    is far from the small-h cancellation of the closed forms); rtol 1e-12 leaves room for other BLAS/libm."""
    diffusers = pytest.importorskip("diffusers")
    from flowsolve.solvers.sa_solver import exp_lagrange_weights

    sched = diffusers.SASolverScheduler()
    lam_s, lam_t = -0.3, 0.45  # step lambda_i -> lambda_{i+1}
    nodes = [lam_s, -0.9, -1.7, -2.2][:k]  # lambda_i, lambda_{i-1}, ...
    ref = sched.get_coefficients_fn(k, F64(lam_s), F64(lam_t), [F64(v) for v in nodes], F64(tau))
    kk = 1 + tau * tau
    ref = [kk * math.exp(-kk * lam_t) * float(r) for r in ref]  # alpha = 1
    h = lam_t - lam_s
    ours = [w * kk * h for w in exp_lagrange_weights([(v - lam_s) / h for v in nodes], kk * h)]
    torch.testing.assert_close(F64(ours), F64(ref), rtol=1e-12, atol=0.0)
