"""Heun's 2nd-order method on the PF-ODE (Karras et al. 2022, "Elucidating the Design Space...",
Algorithm 1): an Euler predictor x' = x_n + h u(x_n, t_n), then the trapezoidal corrector
x_{n+1} = x_n + h/2 (u(x_n, t_n) + u(x', t_{n+1})).

The corrector is evaluated as x_{n+1} = (x_n + x')/2 + h/2 u(x', t_{n+1}), the same update since
x' - x_n = h u(x_n, t_n): it reads (x_n, x', raw_1), one tensor fewer than (x_n, raw_0, x', raw_1), and never
reads the first model output after the second model call, so a model that returns one reused output buffer
(TensorRT / ONNX io-binding, CUDA-graph replay) gives the same result as one returning fresh tensors. The
predictor x' carries raw_0 with weight 1/2 (its rounding, half an ulp of x', is the only difference from the
four-input form).

As in EDM, a step whose end time cannot be evaluated or converted to a velocity (sigma = 0 for an
eps/score/x0 model, alpha = 0 for an x0 model) takes the Euler step only (Alg. 1, line 6: "if sigma_{i+1} != 0"). Decided in the
plan; a velocity model on rectified flow is evaluated at t = 0 and keeps its correction.
NFE = 2 per step, minus one for each such final Euler step.

``heun_rows`` and ``heun_step`` are shared with ``edm-sde`` and ``restart`` (Heun steps from a churned or
restarted state).
"""
from __future__ import annotations

import torch

from .base import Plan, Solver, SolverInfo, register, table


def heun_rows(model, t0: torch.Tensor, t1: torch.Tensor):
    """Euler and Heun rows of the PF-ODE steps t0 -> t1 and whether each step can correct (evaluate at t1).

    ``euler``: x' = (1 + h a0) x + h b0 raw0, inputs (x, raw0); ``heun``: x_{n+1} = x/2 + (1/2 + h a1/2) x'
    + (h b1/2) raw1, inputs (x, x', raw1); u = a x + b raw is the model's velocity conversion."""
    h = t1 - t0
    correct = model.can_convert("velocity", t1)
    a0, b0 = model.conversion("velocity", t0)
    a1, b1 = model.conversion("velocity", t1.where(correct, t0))  # t0: a finite placeholder, unused
    euler = table(1.0 + h * a0, h * b0)
    heun = table(torch.full_like(h, 0.5), 0.5 + 0.5 * h * a1, 0.5 * h * b1)
    return euler, heun, correct


def heun_step(run, out: torch.Tensor, x: torch.Tensor, col: int, euler: str, heun: str, correct: bool) -> None:
    """One Heun step from ``x`` (at ``t_eval[step, col]``) into ``out`` (may be ``x``): evaluate, Euler predictor
    into the run's ``x_pred`` buffer, evaluate there (column ``col + 1``), corrector. Each raw output is consumed
    by the next combine, before any other model call. ``correct=False``: the Euler step only."""
    d0 = run.evaluate(x, col)
    if not correct:
        run.combine(out, [x, d0], euler)
        return
    x_pred = run.combine(run.buffer("x_pred"), [x, d0], euler)
    run.combine(out, [x, x_pred, run.evaluate(x_pred, col + 1)], heun)


@register
class Heun(Solver):
    info = SolverInfo("heun", order=2, nfe_per_step=2, stochastic=False, needs="velocity",
                      paper="Karras et al. 2022, Algorithm 1")

    def plan(self, model, grid) -> Plan:
        t0, t1 = grid[:-1], grid[1:]
        euler, heun, correct = heun_rows(model, t0, t1)
        t_eval = t0[:, None].repeat(1, 2)
        t_eval[:, 1] = t1.where(correct, float("nan"))
        flags = {"correct": [bool(c) for c in correct]}
        return Plan(grid, {"euler": euler, "heun": heun}, t_eval, [1 + c for c in flags["correct"]], flags)

    def step(self, run, n: int) -> None:
        heun_step(run, run.x, run.x, 0, "euler", "heun", run.plan.flags["correct"][n])
