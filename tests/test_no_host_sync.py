"""The sampling loop never reads device memory from the host: zero aten._local_scalar_dense calls."""

import pytest
import torch

import flowsolve as fs
from helpers import CountOps




def _linear_eps(path):
    # an eps model made of tensor ops only (what a network does): eps = sigma(t) * x
    return lambda x, t: x * path.sigma(t).to(x.dtype)[:, None]


@pytest.mark.parametrize("solver", [s.name for s in fs.solvers() if not s.adaptive])
@pytest.mark.parametrize("init", ["shape", "tensor"])
def test_sampling_loop_makes_no_host_sync(solver, init):
    path = fs.paths.VP()
    sampler = fs.Sampler(fs.Model(_linear_eps(path), path, predicts="eps"), solver, steps=6)  # planning: host math
    x_T = torch.randn(4, 3) if init == "tensor" else (4, 3)
    with CountOps() as mode:
        x = sampler.sample(x_T, seed=1)
    assert mode.counts["aten._local_scalar_dense"] == 0
    assert sum(mode.counts.values()) > 0  # the mode did see the loop's ops
    assert x.shape == (4, 3)
