"""Gaussian paths against finite differences and their defining identities (FORMULAS.md §1), float64."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowsolve as fs

PATHS = {"vp": fs.paths.VP(), "vp_cosine": fs.paths.VPCosine(), "subvp": fs.paths.SubVP(), "ve": fs.paths.VE(),
         "edm": fs.paths.EDM(), "rf": fs.paths.RectifiedFlow()}


def _t(path, frac):
    return torch.tensor(path.t_min + frac * (path.t_max - path.t_min), dtype=torch.float64)


def _fd(fn, t, rel=1e-6):
    """Central difference; truncation error O(h^2 f''') and rounding O(eps |f| / h) ~ 1e-10 relative."""
    h = rel * max(1.0, float(t))
    return (fn(t + h) - fn(t - h)) / (2 * h)


def _close(a, b, rtol):
    a, b = float(a), float(b)
    assert abs(a - b) <= rtol * max(1.0, abs(b)), (a, b)


@given(name=st.sampled_from(sorted(PATHS)), frac=st.floats(0.01, 0.99))
def test_derivatives_match_finite_differences(name, frac):
    path = PATHS[name]
    t = _t(path, frac)
    _close(path.d_alpha(t), _fd(path.alpha, t), 1e-6)
    _close(path.d_sigma(t), _fd(path.sigma, t), 1e-6)
    _close(path.f(t), _fd(lambda s: torch.log(path.alpha(s)), t), 1e-6)
    g2_fd = _fd(lambda s: path.sigma(s) ** 2, t) - 2 * path.f(t) * path.sigma(t) ** 2
    _close(path.g2(t), g2_fd, 1e-6)


@given(name=st.sampled_from(sorted(PATHS)), frac=st.floats(0.0, 1.0))
def test_t_of_lambda_inverts_lambda(name, frac):
    path = PATHS[name]
    t = _t(path, frac)
    back = path.t_of_lambda(path.lam(t))
    assert abs(float(back) - float(t)) <= 1e-10 * max(1.0, float(t))


@pytest.mark.parametrize("name", sorted(PATHS))
def test_lambda_is_decreasing(name):
    path = PATHS[name]
    lam = path.lam(torch.linspace(path.t_min, path.t_max, 200, dtype=torch.float64))
    assert bool((lam[1:] < lam[:-1]).all())


@given(frac=st.floats(0.0, 1.0))
def test_path_identities(frac):
    vp, cos, sub, edm, rf = PATHS["vp"], PATHS["vp_cosine"], PATHS["subvp"], PATHS["edm"], PATHS["rf"]
    for p in (vp, cos):
        t = _t(p, frac)
        _close(p.alpha(t) ** 2 + p.sigma(t) ** 2, 1.0, 1e-14)
        _close(p.g2(t), -2 * p.f(t), 1e-14)
    t = _t(sub, frac)
    _close(sub.sigma(t), 1 - sub.alpha(t) ** 2, 1e-14)
    _close(sub.g2(t), vp.beta(t) * (1 - sub.alpha(t) ** 4), 1e-14)
    t = _t(edm, frac)
    _close(edm.sigma(t), t, 0)
    _close(edm.alpha(t), 1.0, 0)
    t = _t(rf, frac)
    _close(rf.alpha(t), 1 - t, 0)
    _close(rf.sigma(t), t, 0)
    t = _t(vp, frac)
    # VP linear: alpha = exp(-t^2 (bmax - bmin)/4 - t bmin/2), beta = bmin + t (bmax - bmin) (FORMULAS.md §1)
    _close(vp.alpha(t), math.exp(-float(t) ** 2 * (20 - 0.1) / 4 - float(t) * 0.1 / 2), 1e-14)
    _close(vp.g2(t), 0.1 + float(t) * (20 - 0.1), 1e-14)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_ends_are_finite(name):
    """No NaN at the ends of the range: t_min, t_max and t = 0 (where lambda = +inf is allowed)."""
    path = PATHS[name]
    ends = [path.t_min, path.t_max] + ([0.0] if path.t_lo == 0.0 else [])
    for t in ends:
        t = torch.tensor(t, dtype=torch.float64)
        for fn in (path.alpha, path.sigma, path.f, path.g2):
            v = fn(t)
            assert not bool(torch.isnan(v)), (name, fn.__name__, float(t))
        assert not bool(torch.isnan(path.lam(t)))
    assert float(fs.paths.VP().g2(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.1)
    assert float(fs.paths.VP().sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0


def test_vp_sigma_is_accurate_near_zero():
    """sigma = sqrt(1 - alpha^2) with expm1: relative accuracy at t = 1e-9 where 1 - alpha^2 ~ 1e-10."""
    vp = fs.paths.VP()
    t = torch.tensor(1e-9, dtype=torch.float64)
    b = float(t) ** 2 * (20 - 0.1) / 4 + float(t) * 0.1 / 2
    _close(vp.sigma(t) / math.sqrt(-math.expm1(-2 * b)), 1.0, 1e-14)
