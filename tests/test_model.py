"""Parameterization conversions (FORMULAS.md §2) against the closed forms of fs.analytic."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowsolve as fs

PATHS = {"vp": fs.paths.VP, "vp_cosine": fs.paths.VPCosine, "subvp": fs.paths.SubVP, "ve": fs.paths.VE,
         "edm": fs.paths.EDM, "rf": fs.paths.RectifiedFlow}


@given(path_name=st.sampled_from(sorted(PATHS)), frac=st.floats(0.02, 0.98),
       predicts=st.sampled_from(fs.PREDICTS), target=st.sampled_from(fs.PREDICTS))
def test_conversion_maps_each_parameterization_to_each_other(path_name, frac, predicts, target):
    """target(x, t) == a x + b raw(x, t) where raw and target are the exact Gaussian quantities."""
    path = PATHS[path_name]()
    t = path.t_min + frac * (path.t_max - path.t_min)
    prob = fs.analytic.Gaussian(torch.tensor([0.4, -1.2], dtype=torch.float64),
                                torch.tensor([0.8, 0.3], dtype=torch.float64), path)
    x = prob.sample(32, t, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tt = torch.full((32,), t, dtype=torch.float64)
    model = fs.Model(getattr(prob, predicts), path, predicts=predicts)
    a, b = model.conversion(target, [t])
    got = a * x + b * model(x, tt)
    want = getattr(prob, target)(x, tt)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max().clamp_min(1.0)))


@given(frac=st.floats(0.02, 0.98), target=st.sampled_from(fs.PREDICTS))
def test_flow_convention_velocity(frac, target):
    """Lipman's convention: called at t' = 1 - t, u' = -u; the wrapper maps time and sign."""
    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64), path)
    seen = {}

    def lipman(x, t_prime):
        seen["t"] = t_prime
        return -prob.velocity(x, 1.0 - t_prime)

    model = fs.Model(lipman, path, predicts="velocity", time_convention="flow")
    t = frac
    x = prob.sample(8, t, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tt = torch.full((8,), t, dtype=torch.float64)
    a, b = model.conversion(target, [t])
    torch.testing.assert_close(a * x + b * model(x, tt), getattr(prob, target)(x, tt), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(seen["t"], 1.0 - tt)


def test_flow_convention_needs_unit_interval():
    with pytest.raises(ValueError, match="path on \\[0, 1\\]"):
        fs.Model(lambda x, t: x, fs.paths.EDM(), predicts="velocity", time_convention="flow")


def test_evaluable_rules():
    vp, rf = fs.paths.VP(), fs.paths.RectifiedFlow()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert fs.Model(lambda x, t: x, vp, predicts="eps").evaluable(t).tolist() == [False, True, True]
    assert fs.Model(lambda x, t: x, rf, predicts="x0").evaluable(t).tolist() == [True, True, False]
    assert fs.Model(lambda x, t: x, rf, predicts="velocity").evaluable(t).tolist() == [True, True, True]
    assert fs.Model(lambda x, t: x, vp, predicts="eps").evaluable(torch.tensor([1.5])).tolist() == [False]
