"""Flow-matching adapter: a velocity field in the t' = 0 noise, t' = 1 data convention (Lipman et al. 2023)
is integrated to the exact flow-map endpoint (FORMULAS.md §3) and gives the exact log-density (§6).

The analytic field is built from fs.analytic.Gaussian on RectifiedFlow (diffusion convention) by the
conversion the adapter must undo: u'(x, s) = -velocity(x, 1 - s)."""
import pytest
import torch

import flowsolve as fs
from flowsolve.adapters import from_flow_matching
from tests.helpers import Counting, fitted_order

F64 = torch.float64


def _problem():
    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(torch.tensor([1.5, -0.7], dtype=F64), torch.tensor([0.4, 1.3], dtype=F64), path)
    return prob, (lambda x, s: -prob.velocity(x, 1.0 - s))


def _noise(n=32):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


# slope bands: nominal order 4 / 2 with room for the pre-asymptotic range (rk4 measures 4.4 here, heun 2.0)
@pytest.mark.parametrize("solver,steps,band", [("rk4", (8, 16, 32), (3.6, 4.9)), ("heun", (32, 64, 128), (1.8, 2.3))])
def test_endpoint_converges_to_exact_flow_map(solver, steps, band):
    """x(t'=0) = noise -> x(t'=1): the error against the exact flow map falls at the solver's order. A
    wrong time flip or sign would converge to another endpoint (an error that plateaus; see the control)."""
    prob, lipman = _problem()
    counted = Counting(lipman, t_lo=0.0, t_hi=1.0)  # Lipman time stays in [0, 1]
    model = from_flow_matching(counted)
    x1 = _noise()
    exact = prob.flow(x1, 1.0, 0.0)  # our t = 1 (noise) -> t = 0 (data)
    errs = []
    for n in steps:
        counted.calls = 0
        out, info = fs.sample(model, x1, solver=solver, steps=n, return_info=True)
        errs.append(float((out - exact).abs().max()))
        assert counted.calls == info["nfe"] == n * (4 if solver == "rk4" else 2)
    slope = fitted_order(steps, errs)
    assert band[0] <= slope <= band[1], (errs, slope)
    # the finest run: measured 4e-9 (rk4, 32 steps: 1e-6 at 16, /2^4 per halving) and 5.7e-5 (heun, 128
    # steps); the bounds are those values times ~2 to 25, far below the O(1) error of a wrong flip or sign
    assert errs[-1] < (1e-7 if solver == "rk4" else 1e-4)


def test_without_the_flip_the_endpoint_is_wrong():
    """Negative control: the same field declared in the diffusion convention lands far from the flow map."""
    prob, lipman = _problem()
    x1 = _noise()
    wrong = fs.sample(fs.Model(lipman, fs.paths.RectifiedFlow(), predicts="velocity"), x1, solver="rk4", steps=16)
    assert float((wrong - prob.flow(x1, 1.0, 0.0)).abs().max()) > 1.0


def test_log_likelihood_through_the_adapter_is_exact():
    """log p_data(x) by the change of variables (exact divergence, rk4) against the closed form."""
    prob, lipman = _problem()
    x = prob.sample(16, 0.0, generator=torch.Generator().manual_seed(1), dtype=F64)
    lp, err = fs.log_likelihood(from_flow_matching(lipman), x, solver="rk4", steps=32, divergence="exact")
    # rk4 at 32 steps: measured 6.5e-6 at 16 steps, /16 per halving (order 4) -> ~4e-7; bound 1e-5
    torch.testing.assert_close(lp, prob.log_prob(x, 0.0), rtol=0.0, atol=1e-5)


def test_time_first_signature_and_model_fields():
    prob, lipman = _problem()
    model = from_flow_matching(lambda t, x: lipman(x, t), t_first=True)
    assert model.predicts == "velocity" and model.time_convention == "flow"
    assert isinstance(model.path, fs.paths.RectifiedFlow)
    x1 = _noise(8)
    out = fs.sample(model, x1, solver="rk4", steps=32)
    torch.testing.assert_close(out, prob.flow(x1, 1.0, 0.0), rtol=0.0, atol=1e-7)  # as in the convergence test
    with pytest.raises(TypeError, match="callable"):
        from_flow_matching(None)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        from_flow_matching(lipman, path=fs.paths.EDM())
