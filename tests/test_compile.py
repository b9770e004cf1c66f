"""``Sampler.sample`` under ``torch.compile(fullgraph=True)`` on CPU: no graph break inside the loop, and the
compiled loop agrees with eager. Deterministic solvers only here: the eager twin's keyed Philox noise is a
long int64 graph whose inductor compile takes minutes on 2 cores (issue 7 measures it)."""
import pytest
import torch

import flowsolve as fs


@pytest.mark.parametrize("solver", ["heun", "dpm++2m", "euler"])
def test_compiled_fullgraph_sampling_matches_eager(solver):
    """float64 state, so that the comparison is not swamped by float32 reassociation under the large
    conversion coefficients (1/alpha ~ 150 at t = 1 on VP; in float32 dpm++2m differs by 1.1e-5 for |x| ~ 3):
    eager and inductor compute the same sums in another order, a few ulps times those coefficients,
    far below 1e-9 |x|_max (measured: 1.3e-15, 3.8e-15, 1.6e-15 for heun, dpm++2m, euler); a wrong compiled update would be off by O(1e-2)."""
    path = fs.paths.VP()
    model = fs.Model(lambda x, t: x * path.sigma(t).to(x.dtype)[:, None], path, predicts="eps")  # tensor ops only
    sampler = fs.Sampler(model, solver, steps=4)
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(x):
        return sampler.sample(x, seed=0)

    eager = run(x_T)
    compiled = torch.compile(run, fullgraph=True)(x_T)  # fullgraph: any graph break raises
    assert compiled.dtype == torch.float64
    assert float((compiled - eager).abs().max()) <= 1e-9 * float(eager.abs().max())
    assert not torch.equal(eager, x_T)  # the loop did move the state
