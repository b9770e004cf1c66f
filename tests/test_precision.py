"""Precision at the ends of the paths: float32 state (the default) must not produce NaN/inf."""
import pytest
import torch

import flowsolve as fs

FIXED_STEP = [s.name for s in fs.solvers() if not s.adaptive]


@pytest.mark.parametrize("solver", FIXED_STEP)
def test_float32_sampling_from_vpcosine_t_max_1_is_finite(solver):
    """VPCosine at t = 1 has alpha = 0; in float32 its log-alpha used to round to NaN there, so a float32
    model evaluated at t = 1 returned NaN and every sample was NaN. Every fixed-step solver that can start at
    t = 1 must give finite float32 samples (those written in eps/rho refuse t_max = 1 with a ValueError)."""
    path = fs.paths.VPCosine()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.2]), path)
    model = fs.Model(prob.eps, path, predicts="eps")
    try:
        x = fs.sample(model, (8, 2), solver=solver, steps=10, t_max=1.0, grid="uniform", seed=0)
    except ValueError as e:  # a solver that cannot start where alpha = 0 says so
        assert "t=1" in str(e) or "alpha" in str(e), str(e)
        return
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
