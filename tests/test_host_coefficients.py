"""The CPU host-coefficient path of the sampling loop (``Run(host_coefficients=True)``: coefficient rows and
evaluation times read as Python floats by the Python step number) against the device-step-index path that
CUDA, Triton, CUDA graphs and torch.compile use (``host_coefficients=False``), for every fixed-step solver,
float32 and float64, noise included. The two paths compute the same sums from the same table values, so
they must agree to rounding: 4 ulp of the state's magnitude per step."""
import pytest
import torch

import flowsolve as fs
from flowsolve.kernels import seed_tensor
from flowsolve.sample import Run
from flowsolve.solvers import PredictorCorrector

FIXED = [s.name for s in fs.solvers() if not s.adaptive]


def _loop(sampler, x, seed, host):
    run = Run(sampler.model, sampler.plan, x.clone(), seed_tensor(seed, x.device), "torch", 0, False,
              host_coefficients=host)
    assert (run._host_rows is not None) == host
    for n in range(sampler.plan.n_steps):
        sampler.solver.step(run, n)
        run.advance()
    return run.x, run.nfe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", FIXED + ["pc-ddim-snr"])
def test_host_path_equals_device_index_path(solver, dtype):
    prob = fs.analytic.GaussianMixture(torch.tensor([[1.0, -1.0], [-1.5, 0.5]], dtype=torch.float64),
                                       torch.tensor([[0.3, 0.5], [0.6, 0.2]], dtype=torch.float64),
                                       torch.tensor([0.4, 0.6], dtype=torch.float64), fs.paths.VP())
    model = fs.Model(prob.eps, prob.path, predicts="eps")
    solv = PredictorCorrector(predictor="ddim", corrector_steps=3, step_size="snr") if solver == "pc-ddim-snr" else solver
    for steps in (1, 3, 8):
        sampler = fs.Sampler(model, solv, steps=steps)
        x = (torch.randn(16, 2, generator=torch.Generator().manual_seed(steps)) * sampler.prior_std).to(dtype)
        host, nfe_h = _loop(sampler, x, 5, True)
        dev, nfe_d = _loop(sampler, x, 5, False)
        assert nfe_h == nfe_d == sampler.nfe
        eps = torch.finfo(dtype).eps
        tol = 4 * eps * max(1, steps) * float(dev.abs().max().clamp(min=1.0))
        assert float((host - dev).abs().max()) <= tol, (solver, steps, float((host - dev).abs().max()), tol)
