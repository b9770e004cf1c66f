"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2), on any Gaussian path.

Per step, in the noise level s = sigma/alpha (the VE view x/alpha):
    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= s_i <= S_tmax else 0
    s_hat = s_i (1 + gamma_i),  x_hat = x_i + sqrt(s_hat^2 - s_i^2) S_noise z       (lines 4-6)
    then one Heun step of the PF-ODE from t_hat = t(s_hat) to t_{i+1} (lines 7-10), with the
    Euler-only last step where t_{i+1} cannot be evaluated (line 9); the step is ``heun``'s (``heun_step``:
    its corrector reads (x_hat, x', raw_1), so no model output is read after the next model call).
In data space x_hat = (alpha_hat/alpha_i) x + alpha_hat sqrt(s_hat^2 - s_i^2) S_noise z. S_churn = 0
is exactly ``heun``. t_hat is capped at the path's upper end.
"""
from __future__ import annotations

import math

import torch

from .base import Plan, Solver, SolverInfo, register, table
from .heun import heun_rows, heun_step


@register
class EDMStochastic(Solver):
    info = SolverInfo("edm-sde", order=1, nfe_per_step=2, stochastic=True, needs="velocity",
                      paper="Karras et al. 2022, Algorithm 2 (S_churn, S_tmin, S_tmax, S_noise)")

    def __init__(self, s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003):
        for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
            if not (isinstance(v, (int, float)) and v >= 0 and not math.isnan(v)):
                raise ValueError(f"{name}={v!r} must be a non-negative number.")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = map(float, (s_churn, s_tmin, s_tmax, s_noise))

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        n = t0.numel()
        s_i = torch.exp(-path.lam(t0))
        in_range = (s_i >= self.s_tmin) & (s_i <= self.s_tmax)
        gamma = torch.where(in_range, torch.full_like(s_i, min(self.s_churn / n, math.sqrt(2.0) - 1.0)),
                            torch.zeros_like(s_i))
        t_hat = path.t_of_lambda(path.lam(t0) - torch.log1p(gamma))
        t_hat = torch.where(gamma > 0, torch.minimum(t_hat, torch.full_like(t_hat, path.t_hi)), t0)
        s_hat = torch.exp(-path.lam(t_hat))
        a_i, a_hat = path.alpha(t0), path.alpha(t_hat)
        churned = gamma > 0  # elsewhere x_hat = x exactly (also where s_i = inf, e.g. rectified flow at t = 1)
        scale = torch.where(churned, a_hat / a_i, torch.ones_like(a_i))
        noise = torch.where(churned, a_hat * torch.sqrt(torch.clamp(s_hat**2 - s_i**2, min=0.0)) * self.s_noise,
                            torch.zeros_like(a_i))
        churn = table(scale, noise=noise)
        euler, heun, correct = heun_rows(model, t_hat, t1)
        t_eval = torch.stack([t_hat, t1.where(correct, torch.full_like(t1, float("nan")))], 1)
        flags = {"correct": [bool(c) for c in correct]}
        return Plan(grid, {"churn": churn, "euler": euler, "heun": heun}, t_eval,
                    [1 + c for c in flags["correct"]], flags)

    def step(self, run, n: int) -> None:
        x = run.x
        x_hat = run.combine(run.buffer("x_hat"), [x], "churn", noise=True)
        heun_step(run, x, x_hat, 0, "euler", "heun", run.plan.flags["correct"][n])
