"""Gaussian paths against independent truth (FORMULAS.md §1), float64.

Truth used here: finite differences of the path's own alpha / sigma / log alpha (never its
derivative methods), autograd of the same, the closed forms of FORMULAS.md §1 re-typed with the
``math`` module, and the defining identities. Times are hypothesis-drawn inside (t_min, t_max)
(the 'ci' profile of conftest.py), the ends are checked separately.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowsolve.paths import EDM, VE, VP, RectifiedFlow, SubVP, VPCosine

EPS = torch.finfo(torch.float64).eps

PATHS = {"vp": VP(), "subvp": SubVP(), "vp_cosine": VPCosine(), "ve": VE(), "edm": EDM(), "rf": RectifiedFlow()}
NAMES = sorted(PATHS)

# Time scale over which each path's functions vary (beyond the distance to a singular end, below):
# VP / sub-VP: alpha^2 = exp(-int beta) changes at rate beta <= beta_max = 20; VE: sigma = e^(t log(smax/smin));
# cosine, rectified flow: O(1) away from their singular ends; EDM: linear (no scale of its own).
TAU = {"vp": 1 / 20.0, "subvp": 1 / 20.0, "vp_cosine": 1.0, "ve": 1 / math.log(50 / 0.01), "edm": math.inf, "rf": 1.0}


def _t(path, frac):
    return path.t_min + frac * (path.t_max - path.t_min)


def _scale(name, t):
    """Distance to the nearest end of [t_lo, t_hi] (sigma ~ sqrt(t) at 0, log alpha -> -inf at 1), capped by TAU."""
    p = PATHS[name]
    return min(t - p.t_lo, p.t_hi - t, TAU[name])


def _fd(fn, t, scale):
    """4th-order central difference (F(t-2h) - 8F(t-h) + 8F(t+h) - F(t+2h)) / 12h, and its rounding bound.

    h is a power of two in [2e-3, 4e-3] * scale and t is rounded to a multiple of h, so every node is exact.
    Returns (t, derivative, rounding bound). Error budget:
      truncation  h^4/30 |F^(5)| <= (4e-3)^4/30 * K |F'| ~ 8.5e-12 K |F'|, with K = scale^4 |F^(5)| / |F'|
                  at most ~100 for these closed forms (sqrt(t): 6.6; log(1-t): 24; exp: 1)  ->  < 1e-9 |F'|;
      rounding    each F is a few float64 ops on O(1) intermediates (exp, log, cos, expm1), so its absolute
                  error is u <= 8 eps max(|F|, 1); the stencil weights sum to 18/12: 1.5 u / h.
    The test asserts |FD - F'| <= 1e-8 |F'| + 1.5 u / h (10x over the truncation estimate).
    """
    h = 2.0 ** math.floor(math.log2(4e-3 * scale))
    t = round(t / h) * h
    nodes = torch.tensor([t - 2 * h, t - h, t + h, t + 2 * h], dtype=torch.float64)
    v = fn(nodes)
    d = (v[0] - 8 * v[1] + 8 * v[2] - v[3]) / (12 * h)
    u = 8 * EPS * max(float(v.abs().max()), 1.0)
    return t, float(d), 1.5 * u / h


def _check_fd(name, fn, dfn, t0, what):
    t, fd, rnd = _fd(fn, t0, _scale(name, t0))
    exact = float(dfn(torch.tensor(t, dtype=torch.float64)))
    tol = 1e-8 * abs(exact) + rnd
    assert abs(fd - exact) <= tol, f"{name} {what} at t={t}: method {exact!r}, finite difference {fd!r} (tol {tol:.3g})"
    return t, fd, rnd


interior = st.floats(1e-3, 1 - 1e-3)  # fraction of (t_min, t_max); the ends have their own test


@given(name=st.sampled_from(NAMES), frac=interior)
def test_derivatives_match_finite_differences(name, frac):
    """d_alpha, d_sigma and f = d/dt log alpha against finite differences of alpha, sigma, log alpha."""
    p = PATHS[name]
    t0 = _t(p, frac)
    _check_fd(name, p.alpha, p.d_alpha, t0, "d_alpha")
    _check_fd(name, p.sigma, p.d_sigma, t0, "d_sigma")
    _check_fd(name, p.log_alpha, p.f, t0, "f = d log alpha / dt")


@given(name=st.sampled_from(NAMES), frac=interior)
def test_g2_matches_finite_differences(name, frac):
    """g^2 = d sigma^2/dt - 2 f sigma^2 (FORMULAS.md §1) with both derivatives taken by finite differences.

    Bound: the FD bounds of sigma^2' and of f (the latter times 2 sigma^2), plus 1e-8 of each term."""
    p = PATHS[name]
    t0 = _t(p, frac)
    s = _scale(name, t0)
    t, ds2, r_s2 = _fd(lambda u: p.sigma(u) ** 2, t0, s)
    t_f, f_fd, r_f = _fd(p.log_alpha, t0, s)
    assert t_f == t
    tt = torch.tensor(t, dtype=torch.float64)
    s2 = float(p.sigma(tt)) ** 2
    g2_fd = ds2 - 2 * f_fd * s2
    tol = 1e-8 * (abs(ds2) + abs(2 * f_fd * s2)) + r_s2 + 2 * s2 * r_f
    assert abs(float(p.g2(tt)) - g2_fd) <= tol, (name, t, float(p.g2(tt)), g2_fd, tol)


def _autograd(fn, t):
    out = fn(t)
    if not out.requires_grad:  # a constant (alpha = 1 on VE / EDM): no graph, derivative 0
        return 0.0
    (grad,) = torch.autograd.grad(out, t)
    return float(grad)


@given(name=st.sampled_from(NAMES), frac=interior)
def test_derivatives_match_autograd(name, frac):
    """The same derivatives against autograd of alpha, sigma, log alpha: both are float64 evaluations of the
    same closed forms, so only rounding separates them: 1e-12 relative (~4500 ulps), plus 16 eps / alpha^2
    because torch's expm1 backward forms e^x as expm1(x) + 1, which loses log2(1/alpha^2) bits where
    alpha^2 = e^(2 log alpha) is small (VP-type sigma near t_max: alpha^2 ~ 4e-5)."""
    p = PATHS[name]
    t = torch.tensor(_t(p, frac), dtype=torch.float64, requires_grad=True)
    rtol = 1e-12 + 16 * EPS / float(p.alpha(t.detach())) ** 2
    grads = {}
    for key, fn, dfn in (("alpha", p.alpha, p.d_alpha), ("sigma", p.sigma, p.d_sigma), ("log_alpha", p.log_alpha, p.f)):
        grads[key] = grad = _autograd(fn, t)
        exact = float(dfn(t.detach()))
        assert abs(grad - exact) <= rtol * abs(grad), (name, key, float(t), grad, exact)
    # g^2 = 2 sigma sigma' - 2 f sigma^2 from the autograd derivatives
    s = float(p.sigma(t.detach()))
    terms = (2 * s * grads["sigma"], 2 * grads["log_alpha"] * s * s)
    assert abs(float(p.g2(t.detach())) - (terms[0] - terms[1])) <= rtol * (abs(terms[0]) + abs(terms[1])), name


@given(name=st.sampled_from(NAMES), frac=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
def test_t_of_lambda_inverts_lambda(name, frac):
    """t_of_lambda(lam(t)) == t to 1e-10 relative, or to the conditioning of the round trip where that is
    larger: lam carries an absolute rounding error ~ eps (|log alpha| + |log sigma| + 1), which moves the
    recovered time by that over |dlam/dt| (VE near t=0: lam = -log smin - t log(smax/smin) hides small t)."""
    p = PATHS[name]
    t = torch.tensor(_t(p, frac), dtype=torch.float64)
    back = p.t_of_lambda(p.lam(t))
    dlam = float(p.f(t) - p.d_sigma(t) / p.sigma(t))
    lam_err = 16 * EPS * (abs(float(p.log_alpha(t))) + abs(math.log(float(p.sigma(t)))) + 1.0)
    tol = max(1e-10 * abs(float(t)), lam_err / abs(dlam), 1e-300)  # floor: subnormal t has no relative precision
    assert abs(float(back) - float(t)) <= tol, (name, float(t), float(back), tol)


@given(name=st.sampled_from(NAMES), a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_lambda_is_decreasing(name, a, b):
    """lam(t1) > lam(t2) for t1 < t2, and dlam/dt = f - sigma'/sigma < 0 (from the derivative methods)."""
    p = PATHS[name]
    t1, t2 = sorted((_t(p, a), _t(p, b)))
    l1, l2 = (float(p.lam(torch.tensor(s, dtype=torch.float64))) for s in (t1, t2))
    if t2 - t1 > 1e-9 * max(1.0, t2):  # well separated: strictly decreasing
        assert l1 > l2, (name, t1, t2, l1, l2)
    else:  # (nearly) the same time: equal, or within rounding (lam = +inf at t = 0 on both sides is equal)
        assert l1 == l2 or l1 >= l2 - 1e-12 * max(1.0, abs(l1)), (name, t1, t2, l1, l2)
    tt = torch.tensor(t1, dtype=torch.float64)
    assert float(p.f(tt) - p.d_sigma(tt) / p.sigma(tt)) < 0, (name, t1)


def test_lambda_is_decreasing_on_a_dense_grid():
    for name, p in PATHS.items():
        lam = p.lam(torch.linspace(p.t_min, p.t_max, 2001, dtype=torch.float64))
        assert bool((lam[1:] < lam[:-1]).all()), name


def check_close(a, b, rtol=0.0, atol=0.0, what=""):
    a, b = float(a), float(b)
    assert abs(a - b) <= atol + rtol * abs(b), (what, a, b)


@given(frac=st.floats(0.0, 1.0))
def test_closed_forms_and_identities(frac):
    """FORMULAS.md §1 table, re-typed with math: same closed forms, so a few ulps apart (tolerance 8 ulps of
    the magnitude of the largest term). Identities: VP / cosine alpha^2 + sigma^2 = 1; sub-VP sigma = 1 - alpha^2;
    EDM sigma = t; RF alpha = 1 - t; every path alpha = exp(log alpha)."""
    tol = 8 * EPS
    vp, sub, cos, ve, edm, rf = (PATHS[k] for k in ("vp", "subvp", "vp_cosine", "ve", "edm", "rf"))
    bmin, bmax = 0.1, 20.0

    t = _t(vp, frac)
    tt = torch.tensor(t, dtype=torch.float64)
    alpha = math.exp(-t * t * (bmax - bmin) / 4 - t * bmin / 2)
    beta = bmin + t * (bmax - bmin)
    for p in (vp, sub):
        check_close(p.alpha(tt), alpha, rtol=tol * (1 + bmax), what="VP alpha")  # exp(x): relative error ~ eps |x|
        check_close(p.f(tt), -beta / 2, rtol=tol, what="VP f = -beta/2")
    check_close(vp.alpha(tt) ** 2 + vp.sigma(tt) ** 2, 1.0, atol=tol, what="VP alpha^2 + sigma^2")
    check_close(vp.g2(tt), beta, rtol=tol, what="VP g2 = beta")
    check_close(sub.sigma(tt), 1 - sub.alpha(tt) ** 2, atol=tol, what="subVP sigma = 1 - alpha^2")
    check_close(sub.g2(tt), beta * (1 - alpha**4), atol=tol * beta * (1 + bmax), what="subVP g2 = beta (1 - alpha^4)")

    t = _t(cos, frac)
    tt = torch.tensor(t, dtype=torch.float64)
    s = 0.008
    alpha = math.cos(math.pi / 2 * (t + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    check_close(cos.alpha(tt), alpha, rtol=tol * 8, what="cosine alpha")  # exp(log cos - log cos0): |log alpha| < 5
    check_close(cos.alpha(tt) ** 2 + cos.sigma(tt) ** 2, 1.0, atol=tol, what="cosine alpha^2 + sigma^2")
    check_close(cos.g2(tt), -2 * cos.f(tt), rtol=tol, what="cosine g2 = -2 f")

    t = _t(ve, frac)
    tt = torch.tensor(t, dtype=torch.float64)
    sigma = 0.01 * (50 / 0.01) ** t
    check_close(ve.sigma(tt), sigma, rtol=tol * 10, what="VE sigma")  # pow vs exp of t log(5000) <= 8.5
    check_close(ve.alpha(tt), 1.0, what="VE alpha")
    check_close(ve.g2(tt), 2 * sigma**2 * math.log(50 / 0.01), rtol=tol * 20, what="VE g2")

    t = _t(edm, frac)
    tt = torch.tensor(t, dtype=torch.float64)
    check_close(edm.sigma(tt), t, what="EDM sigma = t")
    check_close(edm.alpha(tt), 1.0, what="EDM alpha = 1")
    check_close(edm.g2(tt), 2 * t, rtol=tol, what="EDM g2 = 2t")

    t = _t(rf, frac)
    tt = torch.tensor(t, dtype=torch.float64)
    check_close(rf.alpha(tt), 1 - t, what="RF alpha = 1 - t")
    check_close(rf.sigma(tt), t, what="RF sigma = t")

    for name, p in PATHS.items():
        tt = torch.tensor(_t(p, frac), dtype=torch.float64)
        check_close(p.alpha(tt), math.exp(float(p.log_alpha(tt))), rtol=tol, what=f"{name} alpha = exp(log alpha)")


# Expected values at t = 0 where the path allows it (sigma(0) = 0 except VE); from FORMULAS.md §1 by hand.
_PHI0 = math.pi / 2 * 0.008 / 1.008
_COS_F0 = -math.tan(_PHI0) * math.pi / 2 / 1.008
AT_ZERO = {
    # name: (alpha, sigma, d_alpha, d_sigma, f, g2, lam)
    "vp": (1.0, 0.0, -0.05, math.inf, -0.05, 0.1, math.inf),  # sigma ~ sqrt(0.1 t): sigma' -> +inf
    "subvp": (1.0, 0.0, -0.05, 0.1, -0.05, 0.0, math.inf),  # sigma = 1 - alpha^2 ~ 0.1 t
    "vp_cosine": (1.0, 0.0, _COS_F0, math.inf, _COS_F0, -2 * _COS_F0, math.inf),
    "ve": (1.0, 0.01, 0.0, 0.01 * math.log(5000), 0.0, 2e-4 * math.log(5000), -math.log(0.01)),
    "edm": (1.0, 0.0, 0.0, 1.0, 0.0, 0.0, math.inf),
    "rf": (1.0, 0.0, -1.0, 1.0, -1.0, 0.0, math.inf),
}
METHODS = ("alpha", "sigma", "d_alpha", "d_sigma", "f", "g2", "lam")


@pytest.mark.parametrize("name", NAMES)
def test_value_at_t_zero(name):
    """t = 0 (data end): closed-form values, lam = +inf where sigma = 0, and t_of_lambda maps it back to 0."""
    p = PATHS[name]
    t = torch.tensor(0.0, dtype=torch.float64)
    for method, want in zip(METHODS, AT_ZERO[name]):
        got = float(getattr(p, method)(t))
        assert not math.isnan(got), (name, method)
        if math.isinf(want):
            assert got == want, (name, method, got, want)
        else:
            assert abs(got - want) <= 1e-14 * max(1.0, abs(want)), (name, method, got, want)
    back = float(p.t_of_lambda(p.lam(t)))
    assert abs(back) <= 1e-12, (name, "t_of_lambda(lam(0))", back)


@pytest.mark.parametrize("name", NAMES)
def test_ends_are_finite(name):
    """At the default t_min and t_max (and t_hi = 1 where the path is defined there) no method returns NaN;
    every method is finite except where the closed form is infinite (rectified flow at t=1: f = -inf,
    g2 = +inf, lam = -inf; at its t_min = 0, lam = +inf). Signs hold at the ends: sigma, sigma' >= 0, alpha in [0, 1], alpha' <= 0.
    t_of_lambda(lam(t)) == t there too."""
    p = PATHS[name]
    infinite_at = {("rf", 0.0): {"lam": math.inf},  # RF's default t_min is 0 (sigma = 0)
                   ("rf", 1.0): {"f": -math.inf, "g2": math.inf, "lam": -math.inf}}
    ends = sorted({p.t_min, p.t_max} | ({1.0} if p.t_hi == 1.0 else set()))
    for t0 in ends:
        t = torch.tensor(t0, dtype=torch.float64)
        special = infinite_at.get((name, t0), {})
        vals = {m: float(getattr(p, m)(t)) for m in METHODS}
        for m, v in vals.items():
            assert not math.isnan(v), (name, m, t0)
            if m in special:
                assert v == special[m], (name, m, t0, v)
            else:
                assert math.isfinite(v), (name, m, t0, v)
        assert vals["sigma"] >= 0 and vals["d_sigma"] >= 0 and 0 <= vals["alpha"] <= 1 and vals["d_alpha"] <= 0, (name, t0, vals)
        back = float(p.t_of_lambda(p.lam(t)))
        assert abs(back - t0) <= 1e-10 * max(1.0, t0), (name, t0, back)


@pytest.mark.parametrize("name", NAMES)
def test_ends_have_no_nan_in_float32(name):
    """The same ends in float32 (the default state dtype): no method returns NaN (VPCosine at t = 1 did:
    its log1p argument rounds below -1), alpha in [0, 1], sigma >= 0, and t_of_lambda(lam(t)) returns t to
    float32 rounding (1e-5: ~100 ulps through log, sigmoid and atan2)."""
    p = PATHS[name]
    ends = sorted({p.t_min, p.t_max} | ({1.0} if p.t_hi == 1.0 else set()))
    for t0 in ends:
        t = torch.tensor(t0, dtype=torch.float32)
        vals = {m: getattr(p, m)(t) for m in METHODS}
        for m, v in vals.items():
            assert v.dtype == torch.float32 and not bool(torch.isnan(v)), (name, m, t0, v)
        assert 0 <= float(vals["alpha"]) <= 1 and float(vals["sigma"]) >= 0, (name, t0, vals)
        back = float(p.t_of_lambda(p.lam(t)))
        assert abs(back - t0) <= 1e-5 * max(1.0, t0), (name, t0, back)


@pytest.mark.parametrize("name", NAMES)
def test_methods_keep_dtype_and_shape(name):
    """float32 in, float32 out; a [B] time gives a [B] result; float32 agrees with float64 to float32 rounding
    (1e-5 relative: ~100 float32 ulps for a handful of exp/log/expm1 on O(10) arguments)."""
    p = PATHS[name]
    t64 = torch.tensor([_t(p, 0.1), _t(p, 0.5), _t(p, 0.9)], dtype=torch.float64)
    t32 = t64.float()
    for m in METHODS:
        a32, a64 = getattr(p, m)(t32), getattr(p, m)(t32.double())
        assert a32.dtype == torch.float32 and a32.shape == (3,), (name, m, a32.dtype, a32.shape)
        torch.testing.assert_close(a32.double(), a64, rtol=1e-5, atol=1e-6, msg=f"{name}.{m}")
    lam = p.lam(t64)
    assert p.t_of_lambda(lam.float()).dtype == torch.float32


def test_vp_sigma_is_accurate_near_zero():
    """sigma = sqrt(1 - alpha^2) with expm1: full relative accuracy at t = 1e-9, where 1 - alpha^2 ~ 1e-10."""
    vp = PATHS["vp"]
    t = 1e-9
    b = t * t * (20 - 0.1) / 4 + t * 0.1 / 2
    check_close(vp.sigma(torch.tensor(t, dtype=torch.float64)), math.sqrt(-math.expm1(-2 * b)), rtol=8 * EPS)
