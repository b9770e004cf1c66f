"""fs.analytic against independent computations: autograd, scipy, RK4, Monte Carlo (FORMULAS.md §3-5, §7)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import flowsolve as fs

PATHS = {"vp": fs.paths.VP(), "vp_cosine": fs.paths.VPCosine(), "subvp": fs.paths.SubVP(), "ve": fs.paths.VE(),
         "edm": fs.paths.EDM(), "rf": fs.paths.RectifiedFlow()}
C = 5.0


def _t(path, frac):
    return path.t_min + frac * (path.t_max - path.t_min)


def _gmm(path):
    means = torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
    stds = torch.tensor([[0.3, 0.6], [0.8, 0.2], [0.5, 0.5]], dtype=torch.float64)
    return fs.analytic.GaussianMixture(means, stds, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), path)


@given(name=st.sampled_from(sorted(PATHS)), frac=st.floats(0.02, 0.98), mixture=st.booleans())
def test_score_is_the_gradient_of_log_prob(name, frac, mixture):
    path = PATHS[name]
    prob = _gmm(path) if mixture else fs.analytic.Gaussian(torch.tensor([0.3, -1.0], dtype=torch.float64),
                                                           torch.tensor([0.7, 1.4], dtype=torch.float64), path)
    t = _t(path, frac)
    x = prob.sample(16, t, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(prob.log_prob(x, t).sum(), x)
    torch.testing.assert_close(prob.score(x.detach(), t), grad, rtol=1e-10, atol=1e-10)


@given(name=st.sampled_from(sorted(PATHS)), frac=st.floats(0.02, 0.98), mixture=st.booleans())
def test_parameterizations_are_consistent(name, frac, mixture):
    """velocity = f x - g^2/2 score; v = alpha eps - sigma x0; eps = -sigma score; x0 = (x + sigma^2 score)/alpha."""
    path = PATHS[name]
    prob = _gmm(path) if mixture else fs.analytic.Gaussian(torch.tensor([0.3, -1.0], dtype=torch.float64),
                                                           torch.tensor([0.7, 1.4], dtype=torch.float64), path)
    t = _t(path, frac)
    tt = torch.tensor(t, dtype=torch.float64)
    x = prob.sample(16, t, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    al, si, f, g2 = path.alpha(tt), path.sigma(tt), path.f(tt), path.g2(tt)
    sc = prob.score(x, t)
    kw = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(prob.velocity(x, t), f * x - g2 / 2 * sc, **kw)
    torch.testing.assert_close(prob.eps(x, t), -si * sc, **kw)
    torch.testing.assert_close(prob.x0(x, t), (x + si**2 * sc) / al, **kw)
    torch.testing.assert_close(prob.v(x, t), al * prob.eps(x, t) - si * prob.x0(x, t), **kw)


def test_per_sample_times_match_scalar_times():
    path = PATHS["vp"]
    prob = _gmm(path)
    x = prob.sample(4, 0.5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    per = prob.eps(x, ts)
    for i, t in enumerate(ts.tolist()):
        torch.testing.assert_close(per[i], prob.eps(x[i : i + 1], t)[0], rtol=1e-12, atol=1e-12)


def test_log_prob_matches_scipy():
    path = PATHS["vp"]
    t = 0.4
    g = fs.analytic.Gaussian(torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.7, 1.4], dtype=torch.float64), path)
    x = g.sample(8, t, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = stats.multivariate_normal(mean=g.mean(t).numpy(), cov=np.diag(g.var(t).numpy())).logpdf(x.numpy())
    np.testing.assert_allclose(g.log_prob(x, t).numpy(), ref, rtol=1e-12)
    m = _gmm(path)
    tt = torch.tensor(t, dtype=torch.float64)
    al, si = float(path.alpha(tt)), float(path.sigma(tt))
    dens = sum(
        w * stats.multivariate_normal(mean=al * mu.numpy(), cov=np.diag(al**2 * s.numpy() ** 2 + si**2)).pdf(x.numpy())
        for w, mu, s in zip(m.weights.tolist(), m.means, m.stds)
    )
    np.testing.assert_allclose(m.log_prob(x, t).numpy(), np.log(dens), rtol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "rf", "edm"])
def test_gaussian_flow_map_matches_rk4(name):
    """RK4 with 4000 steps: global error ~ h^4 * |u''''| ~ 1e-12 here; flow(x, t, t) = x; composition."""
    path = PATHS[name]
    g = fs.analytic.Gaussian(torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.7, 1.4], dtype=torch.float64), path)
    a, b = path.t_max * 0.9 if name != "edm" else 10.0, path.t_min + 0.05
    x = g.sample(8, a, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = 4000
    y, h = x.clone(), (b - a) / n
    for i in range(n):
        t = a + i * h
        k1 = g.velocity(y, t)
        k2 = g.velocity(y + h / 2 * k1, t + h / 2)
        k3 = g.velocity(y + h / 2 * k2, t + h / 2)
        k4 = g.velocity(y + h * k3, t + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(g.flow(x, a, b), y, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(g.flow(x, a, a), x, rtol=0, atol=1e-14)
    mid = (a + b) / 2
    torch.testing.assert_close(g.flow(g.flow(x, a, mid), mid, b), g.flow(x, a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "rf"])
def test_divergence_is_the_trace_of_the_jacobian(name):
    path = PATHS[name]
    g = fs.analytic.Gaussian(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64),
                             torch.tensor([0.7, 1.4, 0.2], dtype=torch.float64), path)
    t = _t(path, 0.4)
    x = g.sample(1, t, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    jac = torch.autograd.functional.jacobian(lambda v: g.velocity(v[None], t)[0], x)
    assert float(g.divergence(t)) == pytest.approx(float(torch.trace(jac)), rel=1e-10)


def _moments_within_bounds(x, mean, var):
    n = x.shape[0]
    assert bool(((x.mean(0) - mean).abs() <= C * (var / n).sqrt()).all())
    assert bool(((x.var(0) - var).abs() <= C * var * math.sqrt(2.0 / (n - 1))).all())


def test_gaussian_sampler_moments():
    path = PATHS["vp"]
    g = fs.analytic.Gaussian(torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.7, 1.4], dtype=torch.float64), path)
    x = g.sample(20000, 0.3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _moments_within_bounds(x, g.mean(0.3), g.var(0.3))


def test_mixture_sampler_moments():
    """Mixture moments: the variance of a sample variance needs the 4th central moment, so compare the
    mean within 5 sigma and the variance with the general bound sqrt((m4 - v^2)/n) (FORMULAS.md §7)."""
    path = PATHS["rf"]
    m = _gmm(path)
    t, n = 0.3, 40000
    x = m.sample(n, t, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mean, var = m.mean(t), m.var(t)
    assert bool(((x.mean(0) - mean).abs() <= C * (var / n).sqrt()).all())
    ref = m.sample(400000, t, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    m4 = ((ref - mean) ** 4).mean(0)  # estimate of the 4th central moment for the bound only
    assert bool(((x.var(0) - var).abs() <= C * ((m4 - var**2) / n).sqrt()).all())


def test_ou_laws():
    ou = fs.analytic.OU(theta=1.3, m=0.4, s=0.9)
    x0, t = 2.0, 0.7
    assert float(ou.transition_mean(x0, t)) == pytest.approx(0.4 + 1.6 * math.exp(-1.3 * 0.7), rel=1e-14)
    assert ou.transition_var(t) == pytest.approx(0.81 / 2.6 * (1 - math.exp(-2.6 * 0.7)), rel=1e-14)
    assert ou.stationary_var() == pytest.approx(0.81 / 2.6)
    x = ou.sample_transition(torch.full((40000,), x0, dtype=torch.float64), t, generator=torch.Generator().manual_seed(9))
    _moments_within_bounds(x[:, None], ou.transition_mean(x0, t).reshape(1), torch.tensor([ou.transition_var(t)]))
    # EM law vs the scalar recursion m <- (1 - theta h) m + theta h m*, v <- (1 - theta h)^2 v + s^2 h
    h, n = 0.05, 30
    mean, var = x0, 0.0
    for _ in range(n):
        mean = (1 - 1.3 * h) * mean + 1.3 * h * 0.4
        var = (1 - 1.3 * h) ** 2 * var + 0.81 * h
    lm, lv = ou.euler_maruyama_law(x0, h, n)
    assert float(lm) == pytest.approx(mean, rel=1e-13) and float(lv) == pytest.approx(var, rel=1e-13)


def test_bad_input_names_the_argument():
    vp = PATHS["vp"]
    with pytest.raises(ValueError, match="std must be >= 0"):
        fs.analytic.Gaussian([0.0], [-1.0], vp)
    with pytest.raises(ValueError, match="std has shape"):
        fs.analytic.Gaussian([0.0, 1.0], [1.0, 1.0, 1.0], vp)
    with pytest.raises(ValueError, match="mu must be finite"):
        fs.analytic.Gaussian([float("nan")], [1.0], vp)
    with pytest.raises(ValueError, match="weights must be 2 positive"):
        fs.analytic.GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [1.0, -1.0], vp)
    with pytest.raises(ValueError, match="means must be"):
        fs.analytic.GaussianMixture([0.0, 1.0], [1.0, 1.0], [1.0, 1.0], vp)
    with pytest.raises(ValueError, match="theta > 0"):
        fs.analytic.OU(theta=-1.0, m=0.0, s=1.0)
    with pytest.raises(NotImplementedError, match="no closed-form flow map"):
        _gmm(vp).flow(torch.zeros(1, 2), 0.5, 0.1)
