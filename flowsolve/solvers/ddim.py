"""DDIM (Song, Meng & Ermon 2021, eq. 12 with eta = 0) = DPM-Solver-1 = DPM-Solver++(1).

In the half log-SNR lambda = log(alpha/sigma) (Lu et al. 2022b, "DPM-Solver++", eq. 8 with k=1):
    x_{n+1} = (sigma_{n+1}/sigma_n) x_n - alpha_{n+1} (e^{-h} - 1) x0(x_n, t_n),  h = lambda_{n+1} - lambda_n,
written with e^{-h} = alpha_n sigma_{n+1} / (sigma_n alpha_{n+1}) as
    x_{n+1} = (sigma_{n+1}/sigma_n) x_n + (alpha_{n+1} - sigma_{n+1} alpha_n / sigma_n) x0,
which stays finite when the last step lands on sigma = 0 (it returns alpha_N x0). First order;
exact when the data is a single point (x0 constant).
"""
from __future__ import annotations

from .base import Plan, Solver, SolverInfo, register, table


@register
class DDIM(Solver):
    info = SolverInfo("ddim", order=1, nfe_per_step=1, stochastic=False, needs="x0",
                      paper="Song et al. 2021 (DDIM) eq. 12; Lu et al. 2022b eq. 8")

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        s0, s1, a0, a1 = path.sigma(t0), path.sigma(t1), path.alpha(t0), path.alpha(t1)
        ratio = s1 / s0
        c = a1 - ratio * a0
        a, b = model.conversion("x0", t0)  # x0 = a x + b raw
        return Plan(grid, {"step": table(ratio + c * a, c * b)}, t0[:, None], [1] * t0.numel())

    def step(self, run, n: int) -> None:
        x = run.x
        run.combine(x, [x, run.evaluate(x, 0)], "step")
