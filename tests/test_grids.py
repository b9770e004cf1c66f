"""Time grids: exact ends, strictly decreasing, and the spacing each name promises."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowsolve as fs

PATHS = [fs.paths.VP(), fs.paths.VPCosine(), fs.paths.SubVP(), fs.paths.VE(), fs.paths.EDM(), fs.paths.RectifiedFlow()]


def _finite_lambda_range(path):
    return bool(torch.isfinite(path.lam(torch.tensor([path.t_max, path.t_min], dtype=torch.float64))).all())


@given(path=st.sampled_from(PATHS), steps=st.integers(1, 300), name=st.sampled_from(fs.grids.GRIDS))
def test_named_grids_are_decreasing_and_exact_at_the_ends(path, steps, name):
    if name in ("logsnr", "edm") and not _finite_lambda_range(path):
        with pytest.raises(ValueError):
            fs.grids.make_grid(name, path, steps)
        return
    g = fs.grids.make_grid(name, path, steps)
    assert g.dtype == torch.float64 and g.numel() == steps + 1
    assert float(g[0]) == path.t_max and float(g[-1]) == path.t_min
    assert bool((g[1:] < g[:-1]).all())


@given(steps=st.integers(2, 100))
def test_logsnr_grid_is_uniform_in_lambda(steps):
    path = fs.paths.VP()
    lam = path.lam(fs.grids.make_grid("logsnr", path, steps))
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-9, atol=1e-12)


@given(steps=st.integers(2, 100))
def test_edm_grid_matches_karras_eq5(steps):
    path = fs.paths.EDM()
    rho, smax, smin = 7.0, 80.0, 0.002
    i = torch.arange(steps + 1, dtype=torch.float64)
    ref = (smax ** (1 / rho) + i / steps * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    torch.testing.assert_close(fs.grids.make_grid("edm", path, steps), ref, rtol=1e-12, atol=0)


def test_uniform_and_quadratic():
    path = fs.paths.RectifiedFlow()
    torch.testing.assert_close(fs.grids.make_grid("uniform", path, 4),
                               torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(fs.grids.make_grid("quadratic", path, 4),
                               torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64))


def test_edm_grid_to_sigma_zero():
    g = fs.grids.make_grid("edm", fs.paths.EDM(), 5, t_min=0.0)
    assert float(g[-1]) == 0.0 and bool((g[1:] < g[:-1]).all())


def test_user_grid_is_validated_and_kept():
    g = fs.grids.make_grid([1.0, 0.4, 0.1], fs.paths.VP())
    assert g.tolist() == [1.0, 0.4, 0.1]


def test_too_many_steps_for_the_range_is_an_error():
    with pytest.raises(ValueError, match="repeated times"):
        fs.grids.make_grid("uniform", fs.paths.VP(), 100, t_max=0.5, t_min=0.5 - 1e-15)
