"""Explicit Euler on the probability-flow / flow-matching ODE ``dx/dt = u(x, t)``.

Song et al. 2021 (eq. 13, the probability-flow ODE) and Lipman et al. 2023 (eq. 1) define u; the
update is x_{n+1} = x_n + h_n u(x_n, t_n), h_n = t_{n+1} - t_n < 0. Order 1; one evaluation per step;
the last step may land on sigma = 0 (it evaluates at t_n only).
"""
from __future__ import annotations

from .base import Plan, Solver, SolverInfo, register, table


@register
class Euler(Solver):
    info = SolverInfo("euler", order=1, nfe_per_step=1, stochastic=False, needs="velocity",
                      paper="Euler's method on the PF-ODE (Song et al. 2021, eq. 13)")

    def plan(self, model, grid) -> Plan:
        t0, t1 = grid[:-1], grid[1:]
        h = t1 - t0
        a, b = model.conversion("velocity", t0)  # u = a x + b raw
        return Plan(grid, {"step": table(1.0 + h * a, h * b)}, t0[:, None], [1] * t0.numel())

    def step(self, run, n: int) -> None:
        x = run.x
        run.combine(x, [x, run.evaluate(x, 0)], "step")
