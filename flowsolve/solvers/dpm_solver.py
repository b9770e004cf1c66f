"""DPM-Solver-2 and DPM-Solver-3, singlestep, noise-prediction form (Lu et al. 2022, "DPM-Solver:
A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps", Algorithms 1 and 2).

With lambda = log(alpha/sigma), h = lambda_i - lambda_{i-1} and intermediate times s_k where
lambda(s_k) = lambda_{i-1} + r_k h, every stage is an exponential-integrator update of x by eps:

    u      = (alpha_s / alpha_{i-1}) x - sigma_s (e^{r h} - 1) eps_{i-1}
    DPM-Solver-2 (r1 = 1/2):  x_i = (alpha_i/alpha_{i-1}) x - sigma_i (e^h - 1) eps_{i-1}
                                    - sigma_i / (2 r1) (e^h - 1) (eps(u, s1) - eps_{i-1})
    DPM-Solver-3 (r1 = 1/3, r2 = 2/3): Alg. 2, with D_k = eps(u_k, s_k) - eps_{i-1}.

sigma_s (e^{r h} - 1) is computed as alpha_s sigma_{i-1} / alpha_{i-1} - sigma_s, finite when sigma_s = 0.
A step that ends at sigma = 0 (lambda = +inf) would evaluate its intermediate stages there, so it is
taken as DPM-Solver-1 (= DDIM), as the reference implementation's lower-order final step does.
"""
from __future__ import annotations

import torch

from .base import Plan, Solver, SolverInfo, register, table


def _stage_time(path, lam0, h, r):
    return path.t_of_lambda(lam0 + r * h)


class _SinglestepDPM(Solver):
    """Stage k >= 1 evaluates at u_k; every stage (and the final update) is ``cx x + w eps_{i-1} + v eps_{k-1}``
    with eps_j = ae_j x + be_j raw_j. A subclass's ``_stages`` gives (cx, w, v) per stage after u1 and for the
    output, in float64.

    No raw output is read after a later model call: eps_{i-1} enters every stage after u1 through u1 itself,
    eps_{i-1} = (u1 - cx1 x) / ce1 (u1 = cx1 x + ce1 eps_{i-1}, ce1 = -sigma_s1 (e^{r1 h} - 1) != 0 on a full
    step), folded into the coefficients in float64. A stage then reads (x, u1, u_{k-1}, raw_{k-1}) -- (x, u1,
    raw1) when u_{k-1} is u1 -- one tensor fewer than with raw0, and a model that returns one reused output
    buffer gives the fresh-output result. Conditioning: the weight of u1 is w / ce1, of order 1 (3/4 for DPM-Solver-3's
    update as h -> 0, 0 for DPM-Solver-2's r1 = 1/2, where w = 0), so the rounding of u1 adds about an ulp."""

    r: tuple  # intermediate fractions r_k of the step in lambda

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        lam0, lam1 = path.lam(t0), path.lam(t1)
        h = lam1 - lam0
        full = torch.isfinite(h)
        for r in self.r:
            full &= model.can_convert("eps", torch.where(torch.isfinite(h), _stage_time(path, lam0, h, r), t0))
        h_safe = torch.where(full, h, torch.ones_like(h))
        a0, s0 = path.alpha(t0), path.sigma(t0)
        ae0, be0 = model.conversion("eps", t0)  # eps_{i-1} = ae0 x + be0 raw0

        def exp_update(t_to):
            """(coef of x, coef of eps_{i-1}) for u = (alpha_to/alpha0) x - sigma_to (e^{h_to} - 1) eps0."""
            a_to, s_to = path.alpha(t_to), path.sigma(t_to)
            return a_to / a0, -(a_to * s0 / a0 - s_to)

        tables, t_eval = {}, torch.full((t0.numel(), 1 + len(self.r)), float("nan"), dtype=torch.float64)
        t_eval[:, 0] = t0
        # DDIM (order 1) for steps that cannot take the full method
        cx, ce = exp_update(t1)
        tables["ddim"] = table(cx + ce * ae0, ce * be0)
        stage_times = [torch.where(full, _stage_time(path, lam0, h_safe, r), t0) for r in self.r]
        for k, ts in enumerate(stage_times):
            t_eval[:, 1 + k] = torch.where(full, ts, torch.full_like(ts, float("nan")))
        zero = torch.zeros_like(h)
        cx1, ce1 = exp_update(stage_times[0])
        tables["u1"] = table(torch.where(full, cx1 + ce1 * ae0, zero), torch.where(full, ce1 * be0, zero))  # (x, raw0)
        ce1_safe = torch.where(full, ce1, torch.ones_like(ce1))  # rows of steps that are not full: unused, finite
        names = [f"u{k}" for k in range(2, len(self.r) + 1)] + ["out"]
        for k, (name, (cx, w, v)) in enumerate(zip(names, self._stages(path, t1, h_safe, stage_times, exp_update)), 1):
            # stage after u_k: cx x + w eps0 + v eps_k, eps0 = (u1 - cx1 x) / ce1, eps_k = ae_k u_k + be_k raw_k
            ae, be = model.conversion("eps", stage_times[k - 1])
            w1 = w / ce1_safe
            cols = [cx - w1 * cx1, w1] + ([v * be] if k == 1 else [v * ae, v * be])  # (x, u1, [u_k,] raw_k)
            if k == 1:
                cols[1] = cols[1] + v * ae
            tables[name] = table(*[torch.where(full, c, zero) for c in cols])
        use_full = [bool(v) for v in full]
        evals = [1 + len(self.r) if f else 1 for f in use_full]
        return Plan(grid, tables, t_eval, evals, {"full": use_full})

    def step(self, run, n: int) -> None:
        """u1 from (x, raw0); stage k >= 2 from (x, u1, u_{k-1}, raw_{k-1}) (u_{k-1} = u1 counted once); the
        update likewise. A step that cannot take the full method is DDIM."""
        x = run.x
        raw0 = run.evaluate(x, 0)
        if not run.plan.flags["full"][n]:
            run.combine(x, [x, raw0], "ddim")
            return
        u1 = run.combine(run.buffer("u1"), [x, raw0], "u1")
        prev = [run.evaluate(u1, 1)]  # (u1 is already an input)
        for k in range(2, len(self.r) + 1):
            u = run.combine(run.buffer(f"u{k}"), [x, u1, *prev], f"u{k}")
            prev = [u, run.evaluate(u, k)]
        run.combine(x, [x, u1, *prev], "out")


@register
class DPMSolver2(_SinglestepDPM):
    info = SolverInfo("dpm2", order=2, nfe_per_step=2, stochastic=False, needs="eps",
                      paper="Lu et al. 2022, DPM-Solver-2 (Algorithm 1, r1 = 1/2)")
    r = (0.5,)

    def _stages(self, path, t1, h, stage_times, exp_update):
        r1 = self.r[0]
        # x_i = cx_i x + ce_i eps0 + (ce_i / (2 r1)) (eps1 - eps0); ce_i = -sigma_i (e^h - 1)
        cxi, cei = exp_update(t1)
        w1 = cei / (2 * r1)
        return [(cxi, cei - w1, w1)]  # out: (x, eps0, eps1)


@register
class DPMSolver3(_SinglestepDPM):
    info = SolverInfo("dpm3", order=3, nfe_per_step=3, stochastic=False, needs="eps",
                      paper="Lu et al. 2022, DPM-Solver-3 (Algorithm 2, r1 = 1/3, r2 = 2/3)")
    r = (1.0 / 3.0, 2.0 / 3.0)

    def _stages(self, path, t1, h, stage_times, exp_update):
        s1, s2 = stage_times
        r1, r2 = self.r
        cx2, ce2 = exp_update(s2)
        cxi, cei = exp_update(t1)
        # u2 = cx2 x + ce2 eps0 - (sigma_s2 r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) D1,   -ce2 = sigma_s2 (e^{r2 h} - 1)
        phi2 = (-ce2) / (r2 * h) - path.sigma(s2)  # sigma_s2 ((e^{r2 h} - 1)/(r2 h) - 1)
        d1 = -(r2 / r1) * phi2
        # x_i = cxi x + cei eps0 - (sigma_i / r2) ((e^h - 1)/h - 1) D2
        phi = (-cei) / h - path.sigma(t1)
        d2 = -phi / r2
        return [(cx2, ce2 - d1, d1),    # u2: (x, eps0, eps1), D1 = eps1 - eps0
                (cxi, cei - d2, d2)]    # out: (x, eps0, eps2), D2 = eps2 - eps0
