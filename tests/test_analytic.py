"""flowsolve.analytic against independent computations (FORMULAS.md §2-5, §7), float64 unless stated.

Truth used here: autograd of log_prob, scipy.stats / numpy densities, the parameterization identities of
§2, RK4 integration of the velocity field with a step-halving error estimate, autograd Jacobians,
quadrature of exp(log_prob), Monte Carlo with 5-sigma bounds from the standard errors of §7 (about 6e-7
false alarms per check, fixed seeds), and the scalar Euler-Maruyama recursion for OU.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp

import flowsolve.analytic as A
from flowsolve.paths import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine

EPS = torch.finfo(torch.float64).eps
C = 5.0  # Monte-Carlo bounds: 5 standard errors (FORMULAS.md §7)
PATHS = {"vp": VP(), "subvp": SubVP(), "vp_cosine": VPCosine(), "ve": VE(), "edm": EDM(), "rf": RectifiedFlow()}
NAMES = sorted(PATHS)
F64 = torch.float64


def _t(path, frac):
    return path.t_min + frac * (path.t_max - path.t_min)


def _coef(path, t):
    tt = torch.tensor(t, dtype=F64)
    return tuple(float(fn(tt)) for fn in (path.alpha, path.sigma, path.f, path.g2))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- problems
@st.composite
def problems(draw, kinds=("gaussian", "mixture")):
    """(name, kind, params): a Gaussian or a mixture with hypothesis-drawn means, stds and weights."""
    name = draw(st.sampled_from(NAMES))
    kind = draw(st.sampled_from(kinds))
    d = draw(st.integers(1, 3))
    k = 1 if kind == "gaussian" else draw(st.integers(1, 3))
    vec = lambda lo, hi: st.lists(st.floats(lo, hi), min_size=d, max_size=d)  # noqa: E731
    means = draw(st.lists(vec(-3.0, 3.0), min_size=k, max_size=k))
    stds = draw(st.lists(vec(0.05, 3.0), min_size=k, max_size=k))
    weights = draw(st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k))
    return name, kind, (means, stds, weights)


def _build(name, kind, params):
    means, stds, weights = params
    path = PATHS[name]
    if kind == "gaussian":
        return A.Gaussian(torch.tensor(means[0], dtype=F64), torch.tensor(stds[0], dtype=F64), path)
    return A.GaussianMixture(torch.tensor(means, dtype=F64), torch.tensor(stds, dtype=F64), torch.tensor(weights, dtype=F64), path)


def _gmm(path):
    means = torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]], dtype=F64)
    stds = torch.tensor([[0.3, 0.6], [0.8, 0.2], [0.5, 0.5]], dtype=F64)
    return A.GaussianMixture(means, stds, torch.tensor([0.2, 0.5, 0.3], dtype=F64), path)


def _gauss(path, d=3):
    return A.Gaussian(torch.tensor([0.3, -1.0, 2.0][:d], dtype=F64), torch.tensor([0.7, 1.4, 0.2][:d], dtype=F64), path)


def _assert_small(err, scale, rtol, what):
    """|err| <= rtol * scale elementwise (scale: the magnitude of the largest term that was rounded)."""
    bad = err.abs() > rtol * scale
    assert not bool(bad.any()), f"{what}: max |err|/scale = {float((err.abs() / scale).max()):.3g} > {rtol}"


# ------------------------------------------------------------------------------------------- score, parameterizations
@given(prob=problems(), frac=st.floats(0.02, 0.98))
def test_score_is_the_autograd_gradient_of_log_prob(prob, frac):
    """score == d/dx log_prob by autograd. Both are float64 evaluations of the same closed forms, so they
    differ by rounding only: a few ulps of the largest per-component term |x - alpha mu_k| / C_k; 1e-12 of
    that (~4500 ulps) cannot be reached by any real discrepancy slipping through."""
    name, kind, params = prob
    p = _build(name, kind, params)
    t = _t(p.path, frac)
    x = p.sample(16, t, generator=_gen(0), dtype=F64).requires_grad_(True)
    (grad,) = torch.autograd.grad(p.log_prob(x, t).sum(), x)
    score = p.score(x.detach(), t)
    al, si, _, _ = _coef(p.path, t)
    cmin = al * al * float(p.stds.min() if kind == "mixture" else p.std.min()) ** 2 + si * si
    scale = (x.detach().abs() + al * 3.0 + 1.0) / cmin
    _assert_small(score - grad, scale, 1e-12, f"{name} {kind} score vs autograd")


def _magnitudes(p, x, t):
    """Magnitudes of the terms summed inside score and x0 (rounding scales; a mixture's sum over components can
    cancel): S = sum_k gamma_k |x - alpha mu_k| / C_k and X = sum_k gamma_k (|mu_k| + alpha std_k^2 |x - alpha mu_k| / C_k),
    gamma_k = softmax_k(log w_k + log N(x; alpha mu_k, C_k)) computed here (gamma = 1 for a Gaussian)."""
    al, si, _, _ = _coef(p.path, t)
    if isinstance(p, A.Gaussian):
        means, var0, logw = p.mu[None], (p.std**2)[None], torch.zeros(1, dtype=F64)
    else:
        means, var0, logw = p.means, p.stds**2, torch.log(p.weights)
    c = al**2 * var0 + si**2  # [K, D]
    diff = x[:, None] - al * means  # [B, K, D]
    logn = (-0.5 * (torch.log(2 * math.pi * c) + diff**2 / c)).sum(-1)
    gamma = torch.softmax(logw + logn, dim=1)[..., None]
    s_abs = (gamma * diff.abs() / c).sum(1)
    x_abs = (gamma * (means.abs() + al * var0 * diff.abs() / c)).sum(1)
    return s_abs, x_abs


@given(prob=problems(), frac=st.floats(0.02, 0.98))
def test_parameterizations_are_consistent(prob, frac):
    """FORMULAS.md §2 pointwise: velocity == f x - g^2/2 score; eps == -sigma score; v == alpha eps - sigma x0;
    x0 == (x + sigma^2 score) / alpha (alpha > 0 inside (t_min, t_max)). Tolerance 1e-12 (~4500 ulps) of the
    magnitudes of every term rounded on either side, including the per-component terms of a mixture's sums
    (see _magnitudes): float64 rounding of cancelling terms is all that may separate the two sides."""
    name, kind, params = prob
    p = _build(name, kind, params)
    t = _t(p.path, frac)
    al, si, f, g2 = _coef(p.path, t)
    tt = torch.tensor(t, dtype=F64)
    da, ss = abs(float(p.path.d_alpha(tt))), abs(float(p.path.sigma(tt) * p.path.d_sigma(tt)))
    x = p.sample(16, t, generator=_gen(1), dtype=F64)
    sc, eps, x0, v, u = p.score(x, t), p.eps(x, t), p.x0(x, t), p.v(x, t), p.velocity(x, t)
    for out in (sc, eps, x0, v, u):
        assert out.shape == x.shape and out.dtype == F64
    s_abs, x_abs = _magnitudes(p, x, t)
    tol, tiny = 1e-12, 1e-300
    _assert_small(u - (f * x - g2 / 2 * sc), (f * x).abs() + g2 / 2 * s_abs + da * x_abs + ss * s_abs + tiny, tol,
                  f"{name} velocity")
    _assert_small(eps - (-si * sc), si * s_abs + tiny, tol, f"{name} eps")
    _assert_small(v - (al * eps - si * x0), al * si * s_abs + si * x_abs + tiny, tol, f"{name} v")
    _assert_small(x0 - (x + si**2 * sc) / al, (x.abs() + si**2 * s_abs) / al + x_abs, tol, f"{name} x0")


@pytest.mark.parametrize("mixture", [False, True], ids=["gaussian", "mixture"])
def test_per_sample_times_match_scalar_times(mixture):
    """A [B] time tensor gives, row by row, what the scalar time gives (same closed forms; 1e-14 relative)."""
    path = PATHS["vp"]
    p = _gmm(path) if mixture else _gauss(path, 2)
    ts = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=F64)
    x = p.sample(4, 0.5, generator=_gen(2), dtype=F64)
    for m in ("score", "eps", "x0", "v", "velocity", "log_prob"):
        per = getattr(p, m)(x, ts)
        for i, t in enumerate(ts.tolist()):
            torch.testing.assert_close(per[i], getattr(p, m)(x[i : i + 1], t)[0], rtol=1e-14, atol=1e-14, msg=m)
    for m in ("mean", "var"):
        per = getattr(p, m)(ts)
        assert per.shape == (4, 2)
        for i, t in enumerate(ts.tolist()):
            torch.testing.assert_close(per[i], getattr(p, m)(t), rtol=1e-14, atol=1e-14, msg=m)
    if not mixture:
        div = p.divergence(ts)
        assert div.shape == (4,)
        for i, t in enumerate(ts.tolist()):
            torch.testing.assert_close(div[i], p.divergence(t), rtol=1e-14, atol=0.0)
        fl = p.flow(x, ts, ts.flip(0))
        for i, (a, b) in enumerate(zip(ts.tolist(), ts.flip(0).tolist())):
            torch.testing.assert_close(fl[i], p.flow(x[i : i + 1], a, b)[0], rtol=1e-14, atol=1e-14)
    # sampling with a [n] time equal to a scalar time: the same draws, bitwise
    assert torch.equal(p.sample(5, torch.full((5,), 0.3, dtype=F64), generator=_gen(3), dtype=F64),
                       p.sample(5, 0.3, generator=_gen(3), dtype=F64))


@pytest.mark.parametrize("mixture", [False, True], ids=["gaussian", "mixture"])
def test_image_shaped_events(mixture):
    """event_shape [C, H, W]: every method equals the flattened [D] problem's (same numbers, other layout)."""
    path = PATHS["ve"]
    g = _gen(4)
    if mixture:
        means, stds = torch.randn(2, 2, 3, 2, generator=g, dtype=F64), 0.2 + torch.rand(2, 2, 3, 2, generator=g, dtype=F64)
        w = torch.tensor([0.3, 0.7], dtype=F64)
        p, flat = A.GaussianMixture(means, stds, w, path), A.GaussianMixture(means.reshape(2, -1), stds.reshape(2, -1), w, path)
    else:
        mu, std = torch.randn(2, 3, 2, generator=g, dtype=F64), 0.2 + torch.rand(2, 3, 2, generator=g, dtype=F64)
        p, flat = A.Gaussian(mu, std, path), A.Gaussian(mu.reshape(-1), std.reshape(-1), path)
    assert p.event_shape == (2, 3, 2) and p.dim == 12
    t = torch.tensor([0.2, 0.5, 0.7], dtype=F64)
    x = p.sample(3, t, generator=_gen(5), dtype=F64)
    assert x.shape == (3, 2, 3, 2)
    for m in ("score", "eps", "x0", "v", "velocity"):
        torch.testing.assert_close(getattr(p, m)(x, t).reshape(3, -1), getattr(flat, m)(x.reshape(3, -1), t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(p.log_prob(x, t), flat.log_prob(x.reshape(3, -1), t), rtol=1e-14, atol=1e-14)
    if not mixture:
        torch.testing.assert_close(p.divergence(t), flat.divergence(t), rtol=1e-14, atol=0.0)


# ------------------------------------------------------------------------------------------- log_prob
@given(prob=problems(), frac=st.floats(0.02, 0.98))
def test_log_prob_matches_scipy(prob, frac):
    """Gaussian: scipy.stats.multivariate_normal with mean alpha mu and cov diag(alpha^2 std^2 + sigma^2) built
    here in numpy; mixture: scipy logsumexp over components of log w_k + logpdf_k. Same formula, other code:
    1e-12 relative plus 1e-12 absolute (rounding of a sum of O(D) logs)."""
    name, kind, params = prob
    p = _build(name, kind, params)
    t = _t(p.path, frac)
    al, si, _, _ = _coef(p.path, t)
    x = p.sample(8, t, generator=_gen(6), dtype=F64)
    means, stds, weights = (np.asarray(a, dtype=np.float64) for a in params)
    if kind == "gaussian":
        means, stds, weights = means[:1], stds[:1], np.ones(1)
    w = weights / weights.sum()
    comps = [np.log(wk) + stats.multivariate_normal(mean=al * m, cov=np.diag(al**2 * s**2 + si**2)).logpdf(x.numpy())
             for wk, m, s in zip(w, means, stds)]
    ref = logsumexp(np.stack(comps, 0).reshape(len(w), -1), axis=0)
    np.testing.assert_allclose(p.log_prob(x, t).numpy(), ref, rtol=1e-12, atol=1e-12)
    if kind == "gaussian":  # the marginal moments, built here from alpha, sigma: a few ulps apart
        np.testing.assert_allclose(p.mean(t).numpy(), al * means[0], rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(p.var(t).numpy(), al**2 * stds[0] ** 2 + si**2, rtol=1e-14)


def test_mixture_density_integrates_to_one_with_the_stated_moments():
    """1-D mixture: trapezoid quadrature of exp(log_prob) on [-40, 40] (spectrally accurate for smooth,
    Gaussian-decaying integrands; tails beyond 8 std are < 1e-14) gives mass 1, and mean/var equal to
    .mean(t) / .var(t), to 1e-10."""
    path = PATHS["rf"]
    p = A.GaussianMixture(torch.tensor([[-2.0], [1.0], [3.0]], dtype=F64), torch.tensor([0.3, 0.8, 0.5], dtype=F64),
                          torch.tensor([2.0, 5.0, 3.0], dtype=F64), path)
    xs = torch.linspace(-40.0, 40.0, 160001, dtype=F64)
    dx = float(xs[1] - xs[0])
    for t in (0.1, 0.5, 0.9):
        dens = p.log_prob(xs[:, None], t).exp()
        mass = float(dens.sum() * dx)
        mean = float((xs * dens).sum() * dx)
        var = float(((xs - mean) ** 2 * dens).sum() * dx)
        assert abs(mass - 1.0) < 1e-10, (t, mass)
        assert abs(mean - float(p.mean(t))) < 1e-10, (t, mean)
        assert abs(var - float(p.var(t))) < 1e-10, (t, var)


# ------------------------------------------------------------------------------------------- flow map, divergence
def _rk4(fn, x, grid):
    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        k1 = fn(x, a)
        k2 = fn(x + h / 2 * k1, a + h / 2)
        k3 = fn(x + h / 2 * k2, a + h / 2)
        k4 = fn(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_flow_map_matches_rk4(name):
    """flow(x, a, b) against RK4 on the velocity field, float64, from 0.95 to 0.02 of (t_min, t_max), on a
    grid uniform in lambda (any smooth grid keeps RK4's order). Error of the 2n-step solve, by step halving:
    |y_2n - y| ~ |y_n - y_2n| / 15 (order 4); asserted within 3x that, plus a rounding floor of 16 eps per
    step on max(1, |y|). The halving estimate itself must be small (< 1e-8): the check then has teeth."""
    path = PATHS[name]
    g = _gauss(path)
    a, b = _t(path, 0.95), _t(path, 0.02)
    x = g.sample(6, a, generator=_gen(7), dtype=F64)
    lam = path.lam(torch.tensor([a, b], dtype=F64))
    n = 200
    grids = [path.t_of_lambda(torch.linspace(float(lam[0]), float(lam[1]), m + 1, dtype=F64)).tolist() for m in (n, 2 * n)]
    for grid in grids:
        grid[0], grid[-1] = a, b
    y_n, y_2n = (_rk4(g.velocity, x, grid) for grid in grids)
    exact = g.flow(x, a, b)
    est = float((y_n - y_2n).abs().max()) / 15
    floor = 16 * EPS * 2 * n * max(1.0, float(y_2n.abs().max()))
    assert est < 1e-8, (name, est)
    err = float((exact - y_2n).abs().max())
    assert err <= 3 * est + floor, (name, err, est, floor)


@given(name=st.sampled_from(NAMES), fa=st.floats(0.0, 1.0), fb=st.floats(0.0, 1.0), fc=st.floats(0.0, 1.0))
def test_gaussian_flow_map_identity_and_composition(name, fa, fb, fc):
    """flow(x, t, t) == x exactly; flow(flow(x, a, b), b, c) == flow(x, a, c) to rounding (each map is
    r x + (alpha_to - r alpha_from) mu with r = sqrt(C_to / C_from): a few ulps of |x| + |mu| per map, and
    the ratio r of the second map amplifies the first's error by at most its own size)."""
    path = PATHS[name]
    g = _gauss(path)
    a, b, c = (_t(path, f) for f in (fa, fb, fc))
    x = g.sample(8, a, generator=_gen(8), dtype=F64)
    assert torch.equal(g.flow(x, a, a), x)
    two, one = g.flow(g.flow(x, a, b), b, c), g.flow(x, a, c)
    scale = (one.abs() + g.mu.abs() + 1.0) * (1.0 + float((g.var(c) / g.var(b)).sqrt().max()))
    _assert_small(two - one, scale, 64 * EPS, f"{name} composition")


@given(name=st.sampled_from(NAMES), frac=st.floats(0.02, 0.98))
def test_divergence_is_the_trace_of_the_jacobian(name, frac):
    """divergence(t) == trace of the autograd Jacobian of velocity (at any x: it is x-independent; checked at
    two points). Same closed form differentiated two ways: 1e-12 relative to D |f| + g^2/2 sum 1/C."""
    path = PATHS[name]
    g = _gauss(path)
    t = _t(path, frac)
    _, _, f, g2 = _coef(path, t)
    scale = 3 * abs(f) + g2 / 2 * float((1 / g.var(t)).sum())
    for seed in (9, 10):
        x = g.sample(1, t, generator=_gen(seed), dtype=F64)[0]
        jac = torch.autograd.functional.jacobian(lambda v: g.velocity(v[None], t)[0], x)
        assert abs(float(g.divergence(t)) - float(torch.trace(jac))) <= 1e-12 * scale, (name, t)


def test_finite_where_the_formula_is_finite():
    """Ends of the paths and point masses: no silent NaN where the closed form is finite.

    * rectified flow at t = 1 (alpha = 0, f = -inf, g^2 = +inf): x0 = E[x0] and velocity = x - E[x0]
      (= alpha' x0 + sigma' eps with alpha' = -1, sigma' = 1, eps = x); divergence = D.
    * VP at t = 0 (sigma = 0, sigma' = +inf): velocity = f x - g^2/2 score with f = -beta_min/2, g^2 = beta_min,
      score = -(x - mu)/std^2; divergence = D f + g^2/2 sum 1/std^2.
    * std = 0 (a point mass): x0 = mu exactly at every t, including sigma = 0.
    """
    rf, vp = PATHS["rf"], PATHS["vp"]
    x = torch.randn(5, 3, generator=_gen(11), dtype=F64)
    g = _gauss(rf)
    torch.testing.assert_close(g.x0(x, 1.0), g.mu.expand(5, 3), rtol=0, atol=0)
    torch.testing.assert_close(g.velocity(x, 1.0), x - g.mu, rtol=1e-15, atol=1e-15)
    assert float(g.divergence(1.0)) == 3.0
    m = _gmm(rf)
    xm = x[:, :2]
    mix_mean = (m.weights[:, None] * m.means).sum(0)
    torch.testing.assert_close(m.x0(xm, 1.0), mix_mean.expand(5, 2), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(m.velocity(xm, 1.0), xm - mix_mean, rtol=1e-15, atol=1e-15)

    g = _gauss(vp)
    want = -0.05 * x + 0.05 * (x - g.mu) / g.std**2
    torch.testing.assert_close(g.velocity(x, 0.0), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g.velocity(x, torch.zeros(5, dtype=F64)), want, rtol=1e-14, atol=1e-14)
    assert float(g.divergence(0.0)) == pytest.approx(3 * -0.05 + 0.05 * float((1 / g.std**2).sum()), rel=1e-14)
    m = _gmm(vp)
    assert bool(torch.isfinite(m.velocity(xm, 0.0)).all()) and bool(torch.isfinite(m.x0(xm, 0.0)).all())

    point = A.Gaussian(torch.tensor([0.5, -1.0], dtype=F64), 0.0, vp)
    for t in (0.0, vp.t_min, 0.5, vp.t_max):
        assert torch.equal(point.x0(xm, t), point.mu.expand(5, 2)), t
    assert bool(torch.isfinite(point.score(xm, 0.5)).all())
    # far from every component: logsumexp / softmax keep log_prob and score finite
    far = torch.full((2, 2), 1e3, dtype=F64)
    for t in (0.0, 0.5):
        assert bool(torch.isfinite(m.log_prob(far, t)).all()) and bool(torch.isfinite(m.score(far, t)).all())


def test_float32_inputs_stay_float32():
    """float32 x (and [B] float32 t) in: float32 out, equal to the float64 evaluation to float32 rounding.
    Bound: 1e-5 of the largest term's magnitude (~100 float32 ulps over the handful of operations)."""
    for name in ("vp", "rf"):
        path = PATHS[name]
        for p in (_gauss(path, 2), _gmm(path)):
            x64 = p.sample(8, 0.4, generator=_gen(12), dtype=F64)
            t64 = torch.linspace(0.2, 0.8, 8, dtype=F64)
            x32, t32 = x64.float(), t64.float()
            for m in ("score", "eps", "x0", "v", "velocity"):
                a32, a64 = getattr(p, m)(x32, t32), getattr(p, m)(x32.double(), t32.double())
                assert a32.dtype == torch.float32 and a32.shape == x32.shape, (name, m)
                torch.testing.assert_close(a32.double(), a64, rtol=1e-5, atol=1e-5 * float(a64.abs().max()), msg=f"{name} {m}")
            assert p.log_prob(x32, t32).dtype == torch.float32
            assert p.sample(4, 0.3, generator=_gen(13)).dtype == torch.float32  # the default dtype
            assert p.mean(t32).dtype == torch.float32 and p.var(t32).dtype == torch.float32
            if isinstance(p, A.Gaussian):
                assert p.flow(x32, 0.7, 0.3).dtype == torch.float32 and p.divergence(t32).dtype == torch.float32


# ------------------------------------------------------------------------------------------- sampling
def check_moments_within_bounds(x, mean, var, m4=None):
    """Per-dimension sample mean within C sqrt(v/n); sample variance within C times its standard error:
    Gaussian v sqrt(2/(n-1)); in general sqrt((m4 - v^2 (n-3)/(n-1)) / n) with m4 the 4th central moment."""
    n = x.shape[0]
    x = x.reshape(n, -1)
    mean, var = mean.reshape(-1), var.reshape(-1)
    se_mean = (var / n).sqrt()
    se_var = var * math.sqrt(2.0 / (n - 1)) if m4 is None else ((m4.reshape(-1) - var**2 * (n - 3) / (n - 1)) / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() <= C * se_mean).all()), (x.mean(0), mean, se_mean)
    assert bool(((x.var(0) - var).abs() <= C * se_var).all()), (x.var(0), var, se_var)


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_sampler_moments(name):
    path = PATHS[name]
    g = _gauss(path)
    t = _t(path, 0.3)
    x = g.sample(20000, t, generator=_gen(14), dtype=F64)
    assert x.shape == (20000, 3)
    check_moments_within_bounds(x, g.mean(t), g.var(t))


def test_gaussian_sampler_moments_per_sample_times():
    """A [n] time tensor: rows at different times; standardized (x - mean_i)/sqrt(var_i) is N(0, 1)."""
    path = PATHS["vp"]
    g = _gauss(path)
    t = torch.rand(20000, generator=_gen(15), dtype=F64) * 0.9 + 0.05
    x = g.sample(20000, t, generator=_gen(16), dtype=F64)
    z = (x - g.mean(t)) / g.var(t).sqrt()
    check_moments_within_bounds(z, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("name", ["vp", "edm", "rf"])
def test_mixture_sampler_moments(name):
    """Mixture marginal p_t: mean / var against .mean(t) / .var(t); the bound for the sample variance uses the
    mixture's exact 4th central moment, sum_k w_k (a_k^4 + 6 a_k^2 C_k + 3 C_k^2), a_k = alpha mu_k - mean."""
    path = PATHS[name]
    m = _gmm(path)
    t, n = _t(path, 0.4), 20000
    x = m.sample(n, t, generator=_gen(17), dtype=F64)
    mean, var = m.mean(t), m.var(t)
    al, si, _, _ = _coef(path, t)
    a = al * m.means - mean
    ck = al**2 * m.stds**2 + si**2
    m4 = (m.weights[:, None] * (a**4 + 6 * a**2 * ck + 3 * ck**2)).sum(0)
    check_moments_within_bounds(x, mean, var, m4)


# ------------------------------------------------------------------------------------------- OU
@given(theta=st.floats(0.05, 5.0), m=st.floats(-3.0, 3.0), s=st.floats(0.1, 3.0), x0=st.floats(-5.0, 5.0),
       t=st.floats(1e-6, 10.0))
def test_ou_transition_law(theta, m, s, x0, t):
    """Transition mean / var against FORMULAS.md §5 typed with math (8 ulps; the var's expm1 is matched by
    1 - e^(-2 theta t) only to eps / (2 theta t) relative, so that is in the bound)."""
    ou = A.OU(theta, m, s)
    mean = m + (x0 - m) * math.exp(-theta * t)
    var = s**2 / (2 * theta) * (1 - math.exp(-2 * theta * t))
    assert abs(float(ou.transition_mean(x0, t)) - mean) <= 8 * EPS * (abs(m) + abs(x0 - m))
    assert abs(float(ou.transition_var(t)) - var) <= 8 * EPS * var * (1 + 1 / (2 * theta * t))
    assert ou.stationary_mean() == m and abs(ou.stationary_var() - s**2 / (2 * theta)) <= 4 * EPS * ou.stationary_var()
    assert float(ou.drift(torch.tensor(x0, dtype=F64), 0.0)) == pytest.approx(theta * (m - x0), rel=1e-15, abs=1e-15)
    assert ou.diffusion(0.0) == s


@given(theta=st.floats(0.1, 5.0), m=st.floats(-3.0, 3.0), s=st.floats(0.1, 3.0), x0=st.floats(-5.0, 5.0),
       theta_h=st.floats(1e-6, 2.5), n=st.integers(0, 60))
def test_ou_euler_maruyama_law_matches_the_recursion(theta, m, s, x0, theta_h, n):
    """euler_maruyama_law against running m <- (1 - theta h) m + theta h m*, v <- (1 - theta h)^2 v + s^2 h in
    float64 (independent: no closed form). theta h ranges over stable (< 2) and unstable (> 2) steps.
    Rounding: each recursion step adds <= 4 eps of its terms' magnitude, and later steps multiply that by
    |a| = |1 - theta h| (> 1 when unstable): <= 16 eps (n + 1) (|m| (1 + theta h) + |x0 - m|) max(1, |a|)^n for
    the mean; the variance's terms are all positive (no cancellation): 16 eps (n + 1) relative."""
    ou = A.OU(theta, m, s)
    h = theta_h / theta
    mean, var = x0, 0.0
    for _ in range(n):
        mean = (1 - theta * h) * mean + theta * h * m
        var = (1 - theta * h) ** 2 * var + s * s * h
    lm, lv = ou.euler_maruyama_law(x0, h, n)
    tol_m = 16 * EPS * (n + 1) * (abs(m) * (1 + theta_h) + abs(x0 - m)) * max(1.0, abs(1 - theta_h)) ** n
    assert abs(float(lm) - mean) <= tol_m, (float(lm), mean, tol_m)
    assert abs(float(lv) - var) <= 16 * EPS * (n + 1) * var, (float(lv), var)


def test_ou_euler_maruyama_stationary_variance():
    """n -> infinity: the scheme's variance tends to s^2 / (theta (2 - theta h)) (FORMULAS.md §5), not s^2/(2 theta)."""
    ou = A.OU(1.3, 0.4, 0.9)
    for h in (0.01, 0.1, 1.0):
        _, lv = ou.euler_maruyama_law(2.0, h, 100000)
        assert float(lv) == pytest.approx(0.81 / (1.3 * (2 - 1.3 * h)), rel=1e-13)


def test_ou_sample_transition_moments():
    ou = A.OU(theta=1.3, m=0.4, s=0.9)
    x0, t, n = 2.0, 0.7, 20000
    x = ou.sample_transition(torch.full((n,), x0, dtype=F64), t, generator=_gen(18))
    assert x.shape == (n,) and x.dtype == F64
    check_moments_within_bounds(x[:, None], ou.transition_mean(x0, t).reshape(1), ou.transition_var(t).reshape(1))


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_argument():
    vp = PATHS["vp"]
    cases = [
        (lambda: A.Gaussian([0.0], [-1.0], vp), "std must be >= 0"),
        (lambda: A.Gaussian([0.0, 1.0], [1.0, 1.0, 1.0], vp), "std has shape"),
        (lambda: A.Gaussian([float("nan")], [1.0], vp), "mu must be finite"),
        (lambda: A.Gaussian([0.0], [float("inf")], vp), "std must be finite"),
        (lambda: A.Gaussian("abc", [1.0], vp), "mu must be a real"),
        (lambda: A.GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [1.0, -1.0], vp), "weights must be 2 positive"),
        (lambda: A.GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [1.0, 1.0, 1.0], vp), "weights must have shape"),
        (lambda: A.GaussianMixture([0.0, 1.0], [1.0, 1.0], [1.0, 1.0], vp), "means must have shape"),
        (lambda: A.GaussianMixture([[0.0, 1.0]], [[1.0, 1.0, 1.0]], [1.0], vp), "stds has shape"),
        (lambda: A.GaussianMixture([[0.0], [1.0]], [1.0, -0.5], [1.0, 1.0], vp), "stds must be >= 0"),
        (lambda: A.GaussianMixture([[0.0], [float("inf")]], 1.0, [1.0, 1.0], vp), "means must be finite"),
        (lambda: A.OU(theta=-1.0, m=0.0, s=1.0), "theta must be"),
        (lambda: A.OU(theta=1.0, m=float("nan"), s=1.0), "m must be"),
        (lambda: A.OU(theta=1.0, m=0.0, s=-1.0), "s must be"),
        (lambda: A.OU(1.0, 0.0, 1.0).euler_maruyama_law(0.0, -0.1, 3), "h must be"),
        (lambda: A.OU(1.0, 0.0, 1.0).euler_maruyama_law(0.0, 0.1, -3), "n must be"),
        (lambda: _gauss(vp).score(torch.zeros(4, 2, dtype=F64), 0.5), "x has shape"),
        (lambda: _gauss(vp).score(torch.zeros(4, 3, dtype=F64), torch.ones(3, dtype=F64)), "t has 3 times"),
        (lambda: _gauss(vp).score(torch.zeros(4, 3, dtype=F64), torch.ones(4, 1, dtype=F64)), "t must be a number"),
        (lambda: _gmm(vp).sample(4, torch.ones(3, dtype=F64)), "t has 3 times"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    with pytest.raises(TypeError, match="path must be"):
        A.Gaussian([0.0], [1.0], "vp")
    with pytest.raises(NotImplementedError, match="no closed-form flow map.*float64"):
        _gmm(vp).flow(torch.zeros(1, 2, dtype=F64), 0.5, 0.1)


def test_valid_shorthand_inputs():
    """Documented shorthands: scalar std; a float mu (event shape (1,)); mixture stds as [K] or a float; weights
    normalised."""
    vp = PATHS["vp"]
    g = A.Gaussian([0.0, 1.0, 2.0], 0.5, vp)
    assert g.std.shape == (3,) and bool((g.std == 0.5).all())
    g = A.Gaussian(1.5, 2.0, vp)
    assert g.event_shape == (1,) and g.dim == 1
    m = A.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.5, 2.0], [1.0, 3.0], vp)
    assert m.stds.tolist() == [[0.5, 0.5], [2.0, 2.0]] and m.weights.tolist() == [0.25, 0.75]
    m = A.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], 0.7, [1.0, 1.0], vp)
    assert bool((m.stds == 0.7).all()) and m.stds.shape == (2, 2)


# ------------------------------------------------------------------------------------------- full covariance
def _rotated(path, d=4, seed=0):
    g = _gen(seed)
    mu = torch.randn(d, generator=g, dtype=F64)
    std = 0.2 + 1.3 * torch.rand(d, generator=g, dtype=F64)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q
    return A.Gaussian(mu, std, path, rotation=rot), rot @ torch.diag(std**2) @ rot.T


@given(name=st.sampled_from(NAMES), frac=st.floats(0.02, 0.98))
def test_rotated_gaussian_log_prob_and_score_match_scipy_and_autograd(name, frac):
    """p_t = N(alpha mu, alpha^2 Sigma + sigma^2 I) with a full Sigma: scipy's logpdf; score = autograd of log_prob;
    the §2 identities between the parameterizations hold."""
    path = PATHS[name]
    prob, sigma0 = _rotated(path)
    t = _t(path, frac)
    al, si, f, g2 = _coef(path, t)
    cov = al**2 * sigma0 + si**2 * torch.eye(4, dtype=F64)
    torch.testing.assert_close(prob.cov(t), cov, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prob.var(t), torch.diagonal(cov), rtol=1e-12, atol=1e-12)
    x = prob.sample(16, t, generator=_gen(1), dtype=F64)
    ref = stats.multivariate_normal(mean=(al * prob.mu).numpy(), cov=cov.numpy()).logpdf(x.numpy())
    np.testing.assert_allclose(prob.log_prob(x, t).numpy(), ref, rtol=1e-10)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prob.log_prob(xg, t).sum(), xg)
    sc = prob.score(x, t)
    torch.testing.assert_close(sc, grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sc, -(x - al * prob.mu) @ torch.linalg.inv(cov), rtol=1e-9, atol=1e-9)
    kw = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(prob.eps(x, t), -si * sc, **kw)
    if al > 1e-3:
        torch.testing.assert_close(prob.x0(x, t), (x + si**2 * sc) / al, **kw)
    torch.testing.assert_close(prob.v(x, t), al * prob.eps(x, t) - si * prob.x0(x, t), **kw)
    if math.isfinite(f) and math.isfinite(g2):
        torch.testing.assert_close(prob.velocity(x, t), f * x - g2 / 2 * sc, **kw)


@pytest.mark.parametrize("name", ["vp", "rf", "edm"])
def test_rotated_gaussian_flow_map_matches_rk4_and_jacobians_match_autograd(name):
    """Flow map vs RK4 (4000 steps); jacobian(t) vs the autograd Jacobian of velocity; divergence = its trace;
    integrated_jacobian vs composite Simpson quadrature of jacobian(t) (2000 panels) and its trace = the
    log-determinant of the flow map's Jacobian (FORMULAS.md §6)."""
    path = PATHS[name]
    prob, _ = _rotated(path, seed=3)
    a, b = (path.t_max * 0.9 if name != "edm" else 10.0), path.t_min + 0.05
    x = prob.sample(6, a, generator=_gen(4), dtype=F64)
    n, y = 4000, x.clone()
    h = (b - a) / n
    for i in range(n):
        t = a + i * h
        k1 = prob.velocity(y, t)
        k2 = prob.velocity(y + h / 2 * k1, t + h / 2)
        k3 = prob.velocity(y + h / 2 * k2, t + h / 2)
        k4 = prob.velocity(y + h * k3, t + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(prob.flow(x, a, b), y, rtol=1e-8, atol=1e-8)
    t = 0.5 * (a + b)
    jac = torch.autograd.functional.jacobian(lambda v: prob.velocity(v[None], t)[0], x[0])
    torch.testing.assert_close(prob.jacobian(t), jac, rtol=1e-10, atol=1e-10)
    assert float(prob.divergence(t)) == pytest.approx(float(torch.trace(jac)), rel=1e-10)
    m = 2000
    ts = torch.linspace(b, a, 2 * m + 1, dtype=F64)
    w = torch.ones(2 * m + 1, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    quad = sum(wi * prob.jacobian(ti) for wi, ti in zip(w, ts)) * (a - b) / (6 * m)
    big = prob.integrated_jacobian(b, a)
    torch.testing.assert_close(big, quad, rtol=1e-8, atol=1e-8)
    flow_jac = torch.autograd.functional.jacobian(lambda v: prob.flow(v[None], b, a)[0], x[0])
    assert float(torch.trace(big)) == pytest.approx(float(torch.linalg.slogdet(flow_jac)[1]), rel=1e-12)


def test_rotated_gaussian_sampler_covariance_within_5_sigma():
    """Sample covariance entries vs cov(t): Var of a sample covariance entry is (C_ii C_jj + C_ij^2) / n."""
    prob, _ = _rotated(PATHS["vp"], seed=5)
    t, n = 0.2, 40000
    x = prob.sample(n, t, generator=_gen(6), dtype=F64)
    cov = prob.cov(t)
    d = torch.diagonal(cov)
    assert bool(((x.mean(0) - prob.mean(t)).abs() <= C * (d / n).sqrt()).all())
    emp = torch.cov(x.T)
    bound = C * ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert bool(((emp - cov).abs() <= bound).all())


def test_from_covariance_and_identity_rotation():
    vp = PATHS["vp"]
    prob, sigma0 = _rotated(vp, seed=7)
    again = A.Gaussian.from_covariance(prob.mu, sigma0, vp)
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(again.cov(t), prob.cov(t), rtol=1e-12, atol=1e-12)
    x = prob.sample(5, 0.3, generator=_gen(8), dtype=F64)
    torch.testing.assert_close(again.log_prob(x, 0.3), prob.log_prob(x, 0.3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again.velocity(x, 0.3), prob.velocity(x, 0.3), rtol=1e-10, atol=1e-10)
    plain = _gauss(vp)
    ident = A.Gaussian(plain.mu, plain.std, vp, rotation=torch.eye(3, dtype=F64))
    x = plain.sample(5, 0.4, generator=_gen(9), dtype=F64)
    for fn in ("score", "eps", "x0", "v", "velocity"):
        torch.testing.assert_close(getattr(ident, fn)(x, 0.4), getattr(plain, fn)(x, 0.4), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ident.flow(x, 0.4, 0.1), plain.flow(x, 0.4, 0.1), rtol=1e-14, atol=1e-14)
    # image-shaped events: the rotation acts on the flattened event
    img = A.Gaussian(torch.zeros(2, 2, dtype=F64), torch.tensor([[0.5, 1.0], [1.5, 2.0]], dtype=F64), vp,
                     rotation=torch.linalg.qr(torch.randn(4, 4, generator=_gen(10), dtype=F64)).Q)
    xi = img.sample(3, 0.5, generator=_gen(11), dtype=F64)
    assert xi.shape == (3, 2, 2) and img.velocity(xi, 0.5).shape == (3, 2, 2) and img.log_prob(xi, 0.5).shape == (3,)


def test_rotation_and_covariance_bad_input():
    vp = PATHS["vp"]
    with pytest.raises(ValueError, match="rotation has shape"):
        A.Gaussian([0.0, 1.0], [1.0, 1.0], vp, rotation=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="rotation is not orthogonal"):
        A.Gaussian([0.0, 1.0], [1.0, 1.0], vp, rotation=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="cov must be symmetric"):
        A.Gaussian.from_covariance([0.0, 1.0], torch.tensor([[1.0, 0.5], [0.0, 1.0]]), vp)
    with pytest.raises(ValueError, match="positive semi-definite"):
        A.Gaussian.from_covariance([0.0, 1.0], torch.tensor([[1.0, 2.0], [2.0, 1.0]]), vp)
    with pytest.raises(ValueError, match="cov has shape"):
        A.Gaussian.from_covariance([0.0, 1.0], torch.eye(3), vp)
