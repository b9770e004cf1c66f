"""Explicit Runge-Kutta methods on the PF-ODE / flow ODE, each a Butcher tableau (data) run by one
generic class (the pattern of diffrax's ``_solver/runge_kutta.py``).

Stage i evaluates the model at y_i = x + h sum_j a_ij k_j, time t + c_i h, and k_i = u(y_i) is
written by one fused call from (y_i, raw_i) with the velocity conversion folded in; the step ends
with x + h sum_j b_j k_j. A step whose stage times cannot be evaluated (the last step *to* sigma = 0
for an eps/score/x0 model) takes the tableau's ``fallback`` instead (one that does not evaluate at
the end point), as EDM does for Heun. The tableaus live in ``flowsolve/tableaus.py`` (shared with the
adaptive solvers, the likelihood and ``fs.odeint``); each checks itself: each row of a sums to c, b sums to 1.
"""
from __future__ import annotations

import torch

from ..tableaus import EULER, MIDPOINT, Tableau
from ..tableaus import RK4 as RK4_TABLEAU
from .base import Plan, Solver, SolverInfo, register, table

ButcherTableau = Tableau  # the shared tableau class (flowsolve/tableaus.py), under its historical name here


class RungeKutta(Solver):
    """Generic explicit RK solver; subclasses set ``info``, ``tableau`` and ``fallback``."""

    tableau: ButcherTableau
    fallback: ButcherTableau = EULER

    def _tables(self, model, grid, tab: ButcherTableau, prefix: str, rows):
        t0, t1 = grid[:-1], grid[1:]
        h = t1 - t0
        out = {}
        t_stage = []
        for i in range(tab.stages):
            # stage time as a fraction of the step, inside [t1, t0] despite rounding (c = 1 is t1 exactly)
            ti = t1 if tab.c[i] == 1.0 else torch.minimum(torch.maximum(t0 + tab.c[i] * h, t1), t0)
            ti = torch.where(rows, ti, t0)  # steps that do not use this tableau get a harmless time
            a, b = model.conversion("velocity", ti)
            out[f"{prefix}k{i}"] = table(a, b)  # k_i = a y_i + b raw_i
            if i > 0:
                out[f"{prefix}y{i}"] = table(torch.ones_like(h), *[h * tab.a[i][j] for j in range(i)])
            t_stage.append(ti)
        out[f"{prefix}out"] = table(torch.ones_like(h), *[h * tab.b[j] for j in range(tab.stages)])
        return out, t_stage

    def plan(self, model, grid) -> Plan:
        t0, t1 = grid[:-1], grid[1:]
        h = t1 - t0
        full = torch.ones_like(t0, dtype=torch.bool)
        for c in self.tableau.c:
            full &= model.can_convert("velocity", t1 if c == 1.0 else t0 + c * h)
        tables, t_main = self._tables(model, grid, self.tableau, "", full)
        fb_tables, t_fb = self._tables(model, grid, self.fallback, "fb_", ~full)
        tables.update(fb_tables)
        n_eval = max(self.tableau.stages, self.fallback.stages)
        t_eval = torch.full((t0.numel(), n_eval), float("nan"), dtype=torch.float64)
        for i, ti in enumerate(t_main):
            t_eval[:, i] = torch.where(full, ti, t_eval[:, i])
        for i, ti in enumerate(t_fb):
            t_eval[:, i] = torch.where(full, t_eval[:, i], ti)
        use_full = [bool(v) for v in full]
        evals = [self.tableau.stages if f else self.fallback.stages for f in use_full]
        return Plan(grid, tables, t_eval, evals, {"full": use_full})

    def step(self, run, n: int) -> None:
        full = run.plan.flags["full"][n]
        tab, prefix = (self.tableau, "") if full else (self.fallback, "fb_")
        x = run.x
        ks = []
        for i in range(tab.stages):
            if i == 0:
                y = x
            else:
                y = run.combine(run.buffer("stage"), [x, *ks], f"{prefix}y{i}")
            k = run.buffer(f"k{i}")
            run.combine(k, [y, run.evaluate(y, i)], f"{prefix}k{i}")
            ks.append(k)
        run.combine(x, [x, *ks], f"{prefix}out")


@register
class Midpoint(RungeKutta):
    """Explicit midpoint rule (Runge 1895): order 2, two evaluations per step (t and t + h/2)."""

    info = SolverInfo("midpoint", order=2, nfe_per_step=2, stochastic=False, needs="velocity",
                      paper="explicit midpoint rule (Hairer, Norsett & Wanner, Sec. II.1)")
    tableau = MIDPOINT
    fallback = EULER


@register
class RK4(RungeKutta):
    """Classical Runge-Kutta (Kutta 1901): order 4, four evaluations per step. A last step to sigma = 0
    that cannot evaluate its end point takes the midpoint rule instead (order 2 on that step)."""

    info = SolverInfo("rk4", order=4, nfe_per_step=4, stochastic=False, needs="velocity",
                      paper="classical RK4 (Hairer, Norsett & Wanner, Table II.1.2)")
    tableau = RK4_TABLEAU
    fallback = MIDPOINT
