"""DPM-Solver++(2M) and DPM-Solver++(3M), multistep, data-prediction form (Lu et al. 2022b,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2 and
the third-order multistep update of its reference implementation).

With x0 predictions m_0 (now), m_1, m_2 (previous steps), h = lambda_i - lambda_{i-1},
r0 = h_{i-1}/h, r1 = h_{i-2}/h:

    x_i = (sigma_i/sigma_{i-1}) x + alpha_i (1 - e^{-h}) D0
          + alpha_i ((e^{-h} - 1)/h + 1) D1 - alpha_i ((e^{-h} - 1 + h)/h^2 - 1/2) D2        (3M)
    D0 = m_0,  D1_0 = (m_0 - m_1)/r0,  D1_1 = (m_1 - m_2)/r1,
    D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),  D2 = 2 (D1_0 - D1_1)/(r0 + r1)
    2M:  x_i = (sigma_i/sigma_{i-1}) x + alpha_i (1 - e^{-h}) ((1 + 1/(2 r0)) m_0 - m_1/(2 r0))

The factor 2 in D2. Taylor-expanding m(lambda) shows D1 = h m' and (D1_0 - D1_1)/(r0 + r1) = h^2 m''/2,
while the weight alpha_i ((e^{-h} - 1 + h)/h^2 - 1/2) is the exact integral's coefficient of h^2 m''
(integral_0^h e^{-u} (h-u)^2/2 du / h^2). The reference implementations (DPM-Solver, diffusers,
k-diffusion's 3M-SDE) use D2 without the 2, which halves the second-derivative term and makes the
method second order (measured here: slope 2.02-2.04 on VP, VE, EDM and rectified flow with either
warm-up; tests/test_multistep.py checks the one-step quadrature against scipy).

Warm-up. A multistep method of order k needs starting values accurate to O(h^k): the reference
implementation's warm-up (orders 1, then 2) makes 3M globally second order (measured: slope 2.02 on
the logsnr grid). So 3M's first step is, by default, the singlestep DPM-Solver++(2S) (Lu et al.
2022b, Alg. 1, r = 1/2; one extra evaluation, NFE = steps + 1), then 2M, then 3M: third order.
``warmup="multistep"`` gives the reference behaviour (NFE = steps). A step ending at sigma = 0
(h = +inf, r = 0) is first order (it returns alpha_i m_0, as k-diffusion's final denoising step), and
with fewer than 15 steps the last two steps lower their order (diffusers' ``lower_order_final``).
The history holds x0 predictions, each written once per step by a fused conversion call.
"""
from __future__ import annotations

import torch

from .base import Plan, Solver, SolverInfo, fused_x0_tables, register, table


def multistep_orders(h: torch.Tensor, max_order: int, lower_order_final: bool = True) -> list[int]:
    """Order of each step: warm-up 1, 2, ...; first order on a step to sigma = 0 (h = inf); and, as
    diffusers' ``lower_order_final`` does for fewer than 15 steps, order <= 1 on the last step and
    <= 2 on the one before (multistep extrapolation over the last, widest lambda-steps is unstable)."""
    n = h.numel()
    orders = []
    for i in range(n):
        order = min(max_order, i + 1)
        if not bool(torch.isfinite(h[i])):
            order = 1
        if lower_order_final and n < 15:
            order = min(order, n - i)
        orders.append(order)
    return orders


def backward_differences(h: torch.Tensor, i: int, order: int):
    """Coefficient vectors over (m_0, m_1, m_2) of D1_0 = (m_0 - m_1)/r0 and, for order 3,
    D1 = D1_0 + r0/(r0 + r1)(D1_0 - D1_1) ~ h m' and D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 m''."""
    hi = float(h[i])
    r0 = float(h[i - 1]) / hi
    d1_0 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
    if order < 3:
        return d1_0, d1_0, torch.zeros(3, dtype=torch.float64)
    r1 = float(h[i - 2]) / hi
    d1_1 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / r1
    return d1_0, d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), 2.0 * (d1_0 - d1_1) / (r0 + r1)


def multistep_x0_coefficients(path, grid, max_order: int, lower_order_final: bool = True):
    """Per-step (coef of x, coefs of m_0..m_{k-1}, order) of DPM-Solver++(kM), float64."""
    t0, t1 = grid[:-1], grid[1:]
    n = t0.numel()
    lam = path.lam(grid)
    h = lam[1:] - lam[:-1]
    s0, s1, a1 = path.sigma(t0), path.sigma(t1), path.alpha(t1)
    ratio = s1 / s0
    # alpha_i (1 - e^{-h}) written without e^{-h} * inf: alpha_i - sigma_i alpha_{i-1} / sigma_{i-1}
    c1 = a1 - ratio * path.alpha(t0)
    orders = multistep_orders(h, max_order, lower_order_final)
    coef_m = torch.zeros(n, max_order, dtype=torch.float64)
    for i in range(n):
        order = orders[i]
        coef_m[i, 0] = c1[i]
        if order == 1:
            continue
        hi = float(h[i])
        em1 = torch.expm1(torch.tensor(-hi, dtype=torch.float64))  # e^{-h} - 1
        d1_0, d1, d2 = backward_differences(h, i, order)
        if order == 2:
            # 2M: alpha (1-e^{-h}) / (2 r0) (m0 - m1) -- Lu et al. 2022b, Alg. 2
            coef_m[i, :2] += (c1[i] / 2.0) * d1_0[:2]
            continue
        phi1 = a1[i] * (em1 / hi + 1.0)
        phi2 = a1[i] * ((em1 + hi) / hi**2 - 0.5)  # the weight of h^2 m'' (hence the 2 in D2)
        coef_m[i] += phi1 * d1 - phi2 * d2
    return ratio, coef_m, orders


class _MultistepDPMpp(Solver):
    max_order: int

    def __init__(self, warmup: str = "singlestep", lower_order_final: bool = True):
        if warmup not in ("singlestep", "multistep"):
            raise ValueError(f"warmup={warmup!r} must be 'singlestep' (full order) or 'multistep' (the reference's).")
        self.warmup, self.lower_order_final = warmup, bool(lower_order_final)

    def plan(self, model, grid) -> Plan:
        path = model.path
        ratio, coef_m, orders = multistep_x0_coefficients(path, grid, self.max_order, self.lower_order_final)
        a, b = model.conversion("x0", grid[:-1])
        tables = {"x0": table(a, b), **fused_x0_tables(ratio, coef_m, a, b, self.max_order)}
        t_eval = torch.full((grid.numel() - 1, 2), float("nan"), dtype=torch.float64)
        t_eval[:, 0] = grid[:-1]
        evals = [1] * (grid.numel() - 1)
        lam0, lam1 = path.lam(grid[0]), path.lam(grid[1])
        singlestep = (self.warmup == "singlestep" and self.max_order >= 3 and orders[0] == 1 and len(orders) > 1
                      and orders[1] >= 2 and bool(torch.isfinite(lam1 - lam0)))
        if singlestep:
            # DPM-Solver++(2S), r = 1/2: u = DDIM step to s; x_1 = (sigma_1/sigma_0) x + c1 x0(u, s)
            s_mid = path.t_of_lambda((lam0 + lam1) / 2).reshape(1)
            if not bool(model.can_convert("x0", s_mid)):
                singlestep = False
        if singlestep:
            t0 = grid[:1]
            s0, ss, a0, as_ = path.sigma(t0), path.sigma(s_mid), path.alpha(t0), path.alpha(s_mid)
            a_s, b_s = model.conversion("x0", s_mid)
            n = grid.numel() - 1
            pad = lambda v: torch.cat([v, torch.zeros(n - 1, dtype=torch.float64)])  # noqa: E731  row 0 only
            tables["s2_u"] = table(pad(ss / s0), pad(as_ - ss * a0 / s0))          # inputs (x, m_0)
            c1 = coef_m[:1, 0]
            tables["s2_out"] = table(pad(ratio[:1]), pad(c1 * a_s), pad(c1 * b_s))  # inputs (x, u, raw_s)
            t_eval[0, 1] = s_mid
            evals[0] = 2
        return Plan(grid, tables, t_eval, evals, {"orders": orders, "singlestep_first": singlestep})

    def step(self, run, n: int) -> None:
        x = run.x
        if n == 0 and run.plan.flags["singlestep_first"]:
            run.push("x0", self.max_order, [x, run.evaluate(x, 0)], "x0")
            u = run.combine(run.buffer("u"), [x, run.past("x0", 0)], "s2_u")
            run.combine(x, [x, u, run.evaluate(u, 1)], "s2_out")
            return
        k = run.plan.flags["orders"][n]
        past = [run.past("x0", j) for j in range(k - 1)]  # m_1, ... (read before the push)
        run.push_update("x0", self.max_order, x, [x, run.evaluate(x, 0), *past], f"f{k}", f"h{k}")


@register
class DPMSolverPP2M(_MultistepDPMpp):
    info = SolverInfo("dpm++2m", order=2, nfe_per_step=1, stochastic=False, needs="x0", multistep=True,
                      paper="Lu et al. 2022b, DPM-Solver++(2M), Algorithm 2")
    max_order = 2


@register
class DPMSolverPP3M(_MultistepDPMpp):
    info = SolverInfo("dpm++3m", order=3, nfe_per_step=1, stochastic=False, needs="x0", multistep=True,
                      paper="Lu et al. 2022b, DPM-Solver++(3M) (third-order multistep update)")
    max_order = 3
