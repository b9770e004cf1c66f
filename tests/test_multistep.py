"""DPM-Solver++(kM) coefficients against the exact exponential-integrator quadrature (scipy)."""
import math

import pytest
import torch
from scipy import integrate

import flowsolve as fs
from flowsolve.solvers.dpm_solver_pp import multistep_x0_coefficients


@pytest.mark.parametrize("max_order,degree", [(3, 1), (3, 2)])
def test_multistep_update_is_exact_for_polynomial_x0(max_order, degree):
    """x_i = (sigma_i/sigma_{i-1}) x + alpha_i int_0^h e^{-u} m(lambda_i - u) du holds exactly when the
    x0 prediction m(lambda) is a polynomial of degree <= 2; the 3M update must reproduce it from m at
    the last 3 grid points (non-uniform lambda-steps). (2M is not exact for linear m: Lu et al. 2022b
    approximate its first-order term, (1 - e^{-h}) h/2 for h - 1 + e^{-h}, which is still 2nd order.)"""
    path = fs.paths.VP()
    grid = torch.tensor([0.9, 0.7, 0.45, 0.3, 0.12], dtype=torch.float64)
    lam = path.lam(grid)
    m = lambda l: 0.3 - 0.7 * l + (0.2 * l * l if degree == 2 else 0.0)  # noqa: E731
    ratio, coef_m, orders = multistep_x0_coefficients(path, grid, max_order, lower_order_final=False)
    i = grid.numel() - 2  # the last step, which has its full order
    assert orders[i] == max_order
    got = sum(float(coef_m[i, j]) * m(float(lam[i - j])) for j in range(max_order))
    h = float(lam[i + 1] - lam[i])
    integral, _ = integrate.quad(lambda u: math.exp(-u) * m(float(lam[i + 1]) - u), 0.0, h, epsabs=1e-14, epsrel=1e-13)
    want = float(path.alpha(grid[i + 1])) * integral
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert float(ratio[i]) == pytest.approx(float(path.sigma(grid[i + 1]) / path.sigma(grid[i])), rel=1e-14)


def test_reference_d2_weight_halves_the_second_derivative():
    """The reference implementations' D2 (without the factor 2) misses a quadratic x0 exactly by
    half of its second-order term: the reason flowsolve's dpm++3m differs from theirs."""
    path = fs.paths.VP()
    grid = torch.tensor([0.9, 0.7, 0.45, 0.3], dtype=torch.float64)
    lam = [float(v) for v in path.lam(grid)]
    m = lambda l: l * l  # noqa: E731
    h, h0, h1 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m(lam[2]) - m(lam[1])) / r0, (m(lam[1]) - m(lam[0])) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2_ref = (d1_0 - d1_1) / (r0 + r1)
    phi1 = math.expm1(-h)
    phi2, phi3 = phi1 / h + 1, (phi1 / h + 1) / h - 0.5
    exact = integrate.quad(lambda u: math.exp(-u) * m(lam[3] - u), 0.0, h, epsabs=1e-14)[0]
    ours = -phi1 * m(lam[2]) + phi2 * d1 - phi3 * 2 * d2_ref
    reference = -phi1 * m(lam[2]) + phi2 * d1 - phi3 * d2_ref
    assert ours == pytest.approx(exact, rel=1e-9)
    assert abs(reference - exact) > 1e-3 * abs(exact)
