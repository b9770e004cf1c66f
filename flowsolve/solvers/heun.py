"""Heun's 2nd-order method on the PF-ODE (Karras et al. 2022, "Elucidating the Design Space...",
Algorithm 1): an Euler predictor x' = x_n + h u(x_n, t_n), then the trapezoidal corrector
x_{n+1} = x_n + h/2 (u(x_n, t_n) + u(x', t_{n+1})).

As in EDM, a step whose end time cannot be evaluated or converted to a velocity (sigma = 0 for an
eps/score/x0 model, alpha = 0 for an x0 model) takes the Euler step only (Alg. 1, line 6: "if sigma_{i+1} != 0"). Decided in the
plan; a velocity model on rectified flow is evaluated at t = 0 and keeps its correction.
NFE = 2 per step, minus one for each such final Euler step.
"""
from __future__ import annotations

from .base import Plan, Solver, SolverInfo, register, table


@register
class Heun(Solver):
    info = SolverInfo("heun", order=2, nfe_per_step=2, stochastic=False, needs="velocity",
                      paper="Karras et al. 2022, Algorithm 1")

    def plan(self, model, grid) -> Plan:
        t0, t1 = grid[:-1], grid[1:]
        h = t1 - t0
        correct = model.can_convert("velocity", t1)
        a0, b0 = model.conversion("velocity", t0)
        a1, b1 = model.conversion("velocity", t1.where(correct, t0))  # t0: a finite placeholder, unused
        euler = table(1.0 + h * a0, h * b0)
        # x_{n+1} = x + h/2 (a0 x + b0 raw0) + h/2 (a1 x' + b1 raw1); inputs (x, raw0, x', raw1)
        heun = table(1.0 + 0.5 * h * a0, 0.5 * h * b0, 0.5 * h * a1, 0.5 * h * b1)
        t_eval = t0[:, None].repeat(1, 2)
        t_eval[:, 1] = t1.where(correct, float("nan"))
        flags = {"correct": [bool(c) for c in correct]}
        return Plan(grid, {"euler": euler, "heun": heun}, t_eval, [1 + c for c in flags["correct"]], flags)

    def step(self, run, n: int) -> None:
        x = run.x
        d0 = run.evaluate(x, 0)
        if not run.plan.flags["correct"][n]:
            run.combine(x, [x, d0], "euler")
            return
        x_pred = run.buffer("x_pred")
        run.combine(x_pred, [x, d0], "euler")
        d1 = run.evaluate(x_pred, 1)
        run.combine(x, [x, d0, x_pred, d1], "heun")
