"""Euler-Maruyama on the reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6):

    dx = (f(t) x - g^2(t) score(x, t)) dt + g(t) dw_bar,   integrated from t_max down to t_min,
    x_{n+1} = x_n + h_n (f_n x_n - g_n^2 score_n) + g_n sqrt(|h_n|) z_n,   h_n = t_{n+1} - t_n < 0.

Noise is added at every step, the last one included (the plain scheme; its exact law for Gaussian
data is FORMULAS.md §3). Strong and weak order 1 for this additive-noise SDE.
"""
from __future__ import annotations

from .base import Plan, Solver, SolverInfo, register, table


@register
class EulerMaruyama(Solver):
    info = SolverInfo("euler_maruyama", order=1, nfe_per_step=1, stochastic=True, needs="score",
                      paper="Song et al. 2021, eq. 6 (reverse SDE), Euler-Maruyama")

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        h = t1 - t0
        f, g2 = path.f(t0), path.g2(t0)
        a, b = model.conversion("score", t0)  # score = a x + b raw
        step = table(1.0 + h * (f - g2 * a), -h * g2 * b, noise=(g2 * h.abs()).sqrt())
        return Plan(grid, {"step": step}, t0[:, None], [1] * t0.numel())

    def step(self, run, n: int) -> None:
        x = run.x
        run.combine(x, [x, run.evaluate(x, 0)], "step", noise=True)
