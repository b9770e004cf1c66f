"""SDE-DPM-Solver++(2M) and (3M) (Lu et al. 2022b, "DPM-Solver++", Sec. 5 / App. B, the
variance-preserving SDE solver in data-prediction form), with eta as practitioners use it
(k-diffusion's ``sample_dpmpp_2m_sde`` with its midpoint correction and ``sample_dpmpp_3m_sde``):

    x_i = (sigma_i/sigma_{i-1}) e^{-eta h} x + alpha_i (1 - e^{-h_eta}) m_0
          + alpha_i (phi_2 D1 - phi_3 D2) + sigma_i sqrt(1 - e^{-2 eta h}) z,       h_eta = (1 + eta) h,
    2M (midpoint): alpha_i (1 - e^{-h_eta}) / (2 r0) (m_0 - m_1) in place of the phi terms,
    3M: phi_2 = (e^{-h_eta} - 1)/h_eta + 1, phi_3 = phi_2/h_eta - 1/2, D1, D2 as in dpm++3m
        (with the factor 2 in D2 that makes the quadrature exact to second order, see dpm_solver_pp.py).

``order`` is the weak order measured on Gaussian data (error of the exact law of the scheme against
the true marginal; tests/test_sde_family.py): 2M-SDE 1.92, 3M-SDE 2.33 over 20..200 steps on VP.

eta = 0 is the deterministic DPM-Solver++ ODE step; eta = 1 is the reverse SDE. Warm-up with lower
orders, lower orders on the last two of fewer than 15 steps (as dpm++2m/3m); a step to sigma = 0
returns alpha_i m_0 with no noise.
"""
from __future__ import annotations

import torch

from .base import Plan, SolverInfo, X0Multistep, register
from .dpm_solver_pp import backward_differences, multistep_orders


class _MultistepSDE(X0Multistep):
    max_order: int

    def __init__(self, eta: float = 1.0):
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1].")
        self.eta = float(eta)

    def plan(self, model, grid) -> Plan:
        path = model.path
        eta = self.eta
        t0, t1 = grid[:-1], grid[1:]
        n = t0.numel()
        lam = path.lam(grid)
        h = lam[1:] - lam[:-1]
        s0, s1, a0, a1 = path.sigma(t0), path.sigma(t1), path.alpha(t0), path.alpha(t1)
        e_h = (a0 * s1) / (s0 * a1)  # e^{-h}, exactly 0 at sigma_i = 0
        e_eta = torch.where(e_h > 0, e_h**eta, torch.zeros_like(e_h)) if eta > 0 else torch.ones_like(e_h)
        cx = (s1 / s0) * e_eta
        c0 = a1 * (1.0 - e_h * e_eta)  # alpha_i (1 - e^{-(1+eta) h})
        noise = s1 * torch.sqrt(torch.clamp(1.0 - e_eta**2, min=0.0))
        coef_m = torch.zeros(n, self.max_order, dtype=torch.float64)
        coef_m[:, 0] = c0
        orders = multistep_orders(h, self.max_order)
        for i in range(n):
            order = orders[i]
            if order == 1:
                continue
            hi = float(h[i])
            d1_0, d1, d2 = backward_differences(h, i, order)
            if order == 2 and self.max_order == 2:  # k-diffusion's midpoint correction
                coef_m[i, :2] += (c0[i] / 2.0) * d1_0[:2]
                continue
            h_eta = (1.0 + eta) * hi
            phi_2 = float(torch.expm1(torch.tensor(-h_eta, dtype=torch.float64))) / h_eta + 1.0
            phi_3 = phi_2 / h_eta - 0.5
            coef_m[i] += a1[i] * (phi_2 * d1 - phi_3 * d2)  # d2 = 0 at order 2
        return self.x0_plan(model, grid, cx, coef_m, orders, noise)


@register
class DPMSolverPP2MSDE(_MultistepSDE):
    info = SolverInfo("dpm++2m-sde", order=2, nfe_per_step=1, stochastic=True, needs="x0", multistep=True,
                      paper="Lu et al. 2022b, SDE-DPM-Solver++(2M) (midpoint variant, as in k-diffusion)")
    max_order = 2


@register
class DPMSolverPP3MSDE(_MultistepSDE):
    info = SolverInfo("dpm++3m-sde", order=2, nfe_per_step=1, stochastic=True, needs="x0", multistep=True,
                      paper="Lu et al. 2022b, SDE-DPM-Solver++(3M) (as in k-diffusion's sample_dpmpp_3m_sde)")
    max_order = 3
