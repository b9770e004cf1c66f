"""Ancestral sampling: DDIM with eta (Song, Meng & Ermon 2021, eq. 12 and 16); eta = 1 is DDPM's
ancestral sampler (Ho et al. 2020) on the same grid.

    x_i = alpha_i x0 + sqrt(sigma_i^2 - s_i^2) eps_hat + s_i z,   eps_hat = (x - alpha_{i-1} x0) / sigma_{i-1},
    s_i = eta sigma_i sqrt(1 - e^{-2h}),  h = lambda_i - lambda_{i-1}   (DDIM's sigma_t(eta), any path).

eta = 0 is DDIM; a last step to sigma = 0 returns alpha_i x0 with no noise. First order (weak).
"""
from __future__ import annotations

import torch

from .base import Plan, Solver, SolverInfo, register, table


@register
class Ancestral(Solver):
    info = SolverInfo("ancestral", order=1, nfe_per_step=1, stochastic=True, needs="x0",
                      paper="Song et al. 2021 (DDIM) eqs. 12, 16 with eta; Ho et al. 2020 (eta = 1)")

    def __init__(self, eta: float = 1.0):
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1] (0: DDIM, 1: DDPM-like ancestral sampling).")
        self.eta = float(eta)

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        s0, s1, a0, a1 = path.sigma(t0), path.sigma(t1), path.alpha(t0), path.alpha(t1)
        e_minus_h = (a0 * s1) / (s0 * a1)  # e^{-h}; 0 when the step lands on sigma = 0
        noise = self.eta * s1 * torch.sqrt(torch.clamp(1.0 - e_minus_h**2, min=0.0))
        keep = torch.sqrt(torch.clamp(s1**2 - noise**2, min=0.0))  # coefficient of eps_hat
        cx, c0 = keep / s0, a1 - keep * a0 / s0  # x_i = cx x + c0 x0 + noise z
        a, b = model.conversion("x0", t0)
        return Plan(grid, {"step": table(cx + c0 * a, c0 * b, noise=noise)}, t0[:, None], [1] * t0.numel())

    def step(self, run, n: int) -> None:
        x = run.x
        run.combine(x, [x, run.evaluate(x, 0)], "step", noise=True)
