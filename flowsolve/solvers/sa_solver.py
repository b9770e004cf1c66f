"""SA-Solver: the stochastic Adams solver of Xue, Yi, Wang, Luo, Zhao & Zhu, "SA-Solver: Stochastic
Adams Solver for Fast Sampling of Diffusion Models" (NeurIPS 2023), data-prediction (x0) form.

The SDE family (their eq. 6): for any tau(t) >= 0,

    dx = [f x - (1 + tau^2)/2 g^2 score] dt + tau g dw_bar

has the path's marginals (tau = 0: the PF-ODE; tau = 1: the reverse SDE). In x0 form with
lambda = log(alpha/sigma) and tau constant over a step (lambda_i -> lambda_{i+1}, h = lambda_{i+1} - lambda_i)
its exact solution is (their eq. 12, Prop. 4.1)

    x_{i+1} = (sigma_{i+1}/sigma_i) e^{-tau^2 h} x_i
              + alpha_{i+1} (1 + tau^2) int_{lambda_i}^{lambda_{i+1}} e^{-(1 + tau^2)(lambda_{i+1} - lam)} x0(lam) dlam
              + sigma_{i+1} sqrt(1 - e^{-2 tau^2 h}) xi,                                   xi ~ N(0, I).

SA-Predictor (s_p steps, their eq. 14): x0 replaced by the Lagrange polynomial through the last s_p
evaluations (lambda_{i-j}, m_{i-j}), j = 0..s_p-1, so the drift is sum_j b_ij m_{i-j} with

    b_ij = alpha_{i+1} (1 + tau^2) int_{lambda_i}^{lambda_{i+1}} e^{-(1 + tau^2)(lambda_{i+1} - lam)} l_j(lam) dlam.

SA-Corrector (s_c steps, their eq. 16): the same formula, from the same x_i and with the *same* xi,
but the Lagrange polynomial runs through (lambda_{i+1}, m_t) and the last s_c - 1 evaluations, where m_t
is the x0-prediction at the predicted point (x^p_{i+1}, t_{i+1}) (their Alg. 1: evaluate once per step,
correct with it, keep it as the next step's m_i; NFE = steps, as UniPC). Since x_i and xi are shared,
x^c = x^p + sum_j (c_ij - b_ij) m_j exactly, which is how ``step`` applies the corrector (no second
noise draw). The last step has no corrector (it would cost an evaluation at t_min), as in diffusers'
``SASolverScheduler``. Unlike diffusers, the order-2 steps use the plain Lagrange weights (diffusers adds an
O(h^3) heuristic term to b and c at order 2); the weights are computed in float64 at plan time by composite
Gauss-Legendre quadrature in the scaled variable v = (lam - lambda_i)/h (exact to rounding for these
exp-times-polynomial integrands; panels keep (1 + tau^2) h per panel <= 4).

tau(t): a constant ``tau`` (default 1: the reverse SDE) applied on steps whose start noise level
s_i = sigma_i/alpha_i lies in [tau_s_min, tau_s_max] (default: everywhere), 0 elsewhere (diffusers' default
applies tau = 1 only for timesteps in [200, 800]: pass that window in noise level if wanted). tau = 0
everywhere is a deterministic variable-step Adams-Bashforth(-Moulton) exponential integrator in lambda.

Orders. Defaults s_p = 3, s_c = 3 (the paper's recommendation for unconditional few-step sampling, as in
diffusers' docs). Warm-up: predictor order min(s_p, i + 1), corrector points min(s_c, i + 2); with fewer
than 15 steps the last steps lower them (diffusers' ``lower_order_final``): predictor <= N - i, corrector
<= N - i + 1. A step with infinite h (to sigma = 0, or from alpha = 0) is first order, uncorrected, and
returns alpha_{i+1} m_i (no noise) when it lands on sigma = 0; no Lagrange node is at lambda = +-inf.
``SolverInfo.order`` is the weak order measured on Gaussian data from the exact law of the scheme
(tests/test_sa_solver.py; docs/sde_solvers.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Plan, Solver, SolverInfo, register, table
from .unipc import unipc_orders

_PAPER = "Xue et al. 2023, SA-Solver, eqs. 12, 14, 16 (SA-Predictor / SA-Corrector), Alg. 1, data prediction"


def exp_lagrange_weights(nodes, a: float, points: int = 16) -> list[float]:
    """[int_0^1 e^{-a (1 - v)} l_j(v) dv for each node j] in float64, l_j the Lagrange basis polynomials on
    ``nodes`` (scaled lambdas, (lam_j - lambda_i)/h). Composite Gauss-Legendre, panels of width <= 4/a."""
    nodes = [float(v) for v in nodes]
    panels = max(1, math.ceil(abs(a) / 4.0))
    x, w = np.polynomial.legendre.leggauss(points)
    edges = np.linspace(0.0, 1.0, panels + 1)
    v = np.concatenate([(lo + hi) / 2 + (hi - lo) / 2 * x for lo, hi in zip(edges[:-1], edges[1:])])
    wv = np.concatenate([(hi - lo) / 2 * w for lo, hi in zip(edges[:-1], edges[1:])])
    kernel = np.exp(-a * (1.0 - v)) * wv
    out = []
    for j, nj in enumerate(nodes):
        ell = np.ones_like(v)
        for m, nm in enumerate(nodes):
            if m != j:
                ell *= (v - nm) / (nj - nm)
        out.append(float((kernel * ell).sum()))
    return out


def _info(p: int, c: int, tau: float) -> SolverInfo:
    """Weak order measured on Gaussian data (docs/sde_solvers.md): 2 with a corrector of >= 2 points or a
    predictor of order >= 2; 1 with a one-point corrector (it overrides the predictor with a first-order rule)
    or with predictor order 1 alone (then it is SDE-DPM-Solver-1 / DDIM-eta)."""
    order = 1 if c == 1 or (c == 0 and p == 1) else 2
    return SolverInfo("sa-solver", order=order, nfe_per_step=1, stochastic=tau > 0, needs="x0", multistep=True,
                      paper=f"{_PAPER}; predictor {p}, corrector {c}, tau {tau:g}")


@register
class SASolver(Solver):
    """SA-Solver (Xue et al. 2023) in x0 form; see the module docstring.

    Args:
        predictor_order: s_p in {1, 2, 3} (SA-Predictor steps).
        corrector_order: s_c in {0, 1, 2, 3}: Lagrange points of the SA-Corrector including the new one
            (0: predictor only).
        tau: the noise scale tau >= 0 (1: reverse SDE, 0: deterministic Adams in lambda).
        tau_s_min, tau_s_max: tau applies on steps whose noise level sigma_i/alpha_i lies in this range.
        lower_order_final: lower the orders on the last steps of fewer than 15 (diffusers' default).
    """

    info = _info(3, 3, 1.0)
    carries_evaluation = True  # step n's m_i is the evaluation at step n-1's predicted point

    def __init__(self, predictor_order: int = 3, corrector_order: int = 3, tau: float = 1.0,
                 tau_s_min: float = 0.0, tau_s_max: float = math.inf, lower_order_final: bool = True):
        if isinstance(predictor_order, bool) or predictor_order not in (1, 2, 3):
            raise ValueError(f"predictor_order={predictor_order!r} must be 1, 2 or 3 (SA-Predictor steps s_p).")
        if isinstance(corrector_order, bool) or corrector_order not in (0, 1, 2, 3):
            raise ValueError(f"corrector_order={corrector_order!r} must be 0 (no corrector), 1, 2 or 3 (SA-Corrector "
                             f"points s_c, the new evaluation included).")
        for name, v in (("tau", tau), ("tau_s_min", tau_s_min), ("tau_s_max", tau_s_max)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative number.")
        if math.isinf(tau):
            raise ValueError(f"tau={tau!r} must be finite (1: reverse SDE, 0: ODE).")
        if not tau_s_min <= tau_s_max:
            raise ValueError(f"tau_s_min={tau_s_min} must not exceed tau_s_max={tau_s_max}.")
        self.p, self.c, self.tau = predictor_order, corrector_order, float(tau)
        self.tau_s_min, self.tau_s_max = float(tau_s_min), float(tau_s_max)
        self.lower_order_final = bool(lower_order_final)
        self.depth = max(self.p, self.c - 1) + 1  # history slots: the push never reuses a slot still read
        self.info = _info(self.p, self.c, self.tau)

    def __repr__(self) -> str:
        return (f"SASolver(predictor_order={self.p}, corrector_order={self.c}, tau={self.tau:g}, "
                f"tau_s_min={self.tau_s_min:g}, tau_s_max={self.tau_s_max:g})")

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        n = t0.numel()
        lam = path.lam(grid)
        lam_f = [float(v) for v in lam]
        finite = [math.isfinite(v) for v in lam_f]
        s_start = torch.exp(-lam[:-1])
        taus = torch.where((s_start >= self.tau_s_min) & (s_start <= self.tau_s_max),
                           torch.full_like(s_start, self.tau), torch.zeros_like(s_start))
        s0, s1, a0, a1 = path.sigma(t0), path.sigma(t1), path.alpha(t0), path.alpha(t1)
        e_h = (a0 * s1) / (s0 * a1)  # e^{-h}: 0 on a step to sigma = 0 or from alpha = 0
        tau2 = taus**2
        e_tau = torch.where(tau2 > 0, e_h ** tau2, torch.ones_like(e_h))  # e^{-tau^2 h}
        cx = (s1 / s0) * e_tau
        noise = s1 * torch.sqrt(torch.clamp(-torch.expm1(2.0 * tau2 * torch.log(e_h)), min=0.0))
        noise = torch.where(e_h > 0, noise, s1)  # h = inf: the full sigma_{i+1} (0 at sigma_{i+1} = 0)
        noise = torch.where(tau2 > 0, noise, torch.zeros_like(noise))
        c0 = a1 * (1.0 - e_h * e_tau)  # alpha_{i+1} (1 - e^{-(1 + tau^2) h}): the order-1 weight
        orders = unipc_orders(lam, self.p, self.lower_order_final)
        depth = self.depth
        pred = torch.zeros(n, self.p, dtype=torch.float64)
        corr = torch.zeros(n, depth, dtype=torch.float64)  # over (m_t, m_0, .., m_{depth-2}): c - b
        n_corr, n_hist = [], []
        for i in range(n):
            k = orders[i]
            h = lam_f[i + 1] - lam_f[i]
            fin = math.isfinite(h)
            kc = 0
            if self.c > 0 and i < n - 1 and fin:
                back = 0
                while back < i + 1 and finite[i - back]:
                    back += 1
                kc = min(self.c, back + 1)
                if self.lower_order_final and n < 15:
                    kc = min(kc, n - i + 1)
            n_corr.append(kc)
            if not fin or k == 1:
                pred[i, 0] = c0[i]
            if fin:
                a = (1.0 + float(tau2[i])) * h
                scale = float(a1[i]) * a  # alpha_{i+1} (1 + tau^2) h: the dv = dlam / h Jacobian included
                if k > 1:
                    nodes = [(lam_f[i - j] - lam_f[i]) / h for j in range(k)]
                    pred[i, :k] = torch.tensor(exp_lagrange_weights(nodes, a), dtype=torch.float64) * scale
                if kc > 0:
                    nodes = [1.0] + [(lam_f[i - j] - lam_f[i]) / h for j in range(kc - 1)]
                    w = torch.tensor(exp_lagrange_weights(nodes, a), dtype=torch.float64) * scale
                    corr[i, :kc] = w
                    corr[i, 1:k + 1] -= pred[i, :k]
            n_hist.append(max(k, kc - 1) if kc > 0 else k)
        zeros = torch.zeros(n, dtype=torch.float64)
        ax, bx = model.conversion("x0", grid[:1])
        tables = {"x0_start": table(torch.cat([ax, zeros[1:]]), torch.cat([bx, zeros[1:]]))}
        ae, be = zeros.clone(), zeros.clone()
        if n > 1:  # evaluations at t_1..t_{N-1}; never at t_N
            a, b = model.conversion("x0", grid[1:-1])
            ae[:-1], be[:-1] = a, b
        tables["x0_end"] = table(ae, be)
        for k in range(1, self.p + 1):
            tables[f"p{k}"] = table(cx, *[pred[:, j] for j in range(k)], noise=noise)
        for m in range(1, depth):
            tables[f"c{m}"] = table(torch.ones(n, dtype=torch.float64), *[corr[:, j] for j in range(m + 1)])
        t_eval = torch.full((n, 2), float("nan"), dtype=torch.float64)
        t_eval[0, 0] = grid[0]
        t_eval[:-1, 1] = grid[1:-1]
        evals = [(1 if i == 0 else 0) + (1 if i < n - 1 else 0) for i in range(n)]
        flags = {"orders": orders, "corrector": n_corr, "hist": n_hist, "tau": [float(v) for v in taus]}
        return Plan(grid, tables, t_eval, evals, flags)

    def step(self, run, n: int) -> None:
        """Predict from (x, m_0..m_{k-1}) with noise; unless last, evaluate at the predicted point (the next
        step's m_0) and correct with it: x = x_pred + sum (c - b) m (same noise, no new draw)."""
        x, flags, depth = run.x, run.plan.flags, self.depth
        if n == 0:
            run.push("x0", depth, [x, run.evaluate(x, 0)], "x0_start")
        k = flags["orders"][n]
        hist = [run.past("x0", j) for j in range(k)]
        if n == run.plan.n_steps - 1:
            run.combine(x, [x, *hist], f"p{k}", noise=True)
            return
        if flags["corrector"][n] == 0:
            run.combine(x, [x, *hist], f"p{k}", noise=True)
            run.push("x0", depth, [x, run.evaluate(x, 1)], "x0_end")
            return
        u = run.combine(run.buffer("pred"), [x, *hist], f"p{k}", noise=True)
        m_t = run.push("x0", depth, [u, run.evaluate(u, 1)], "x0_end")
        m = flags["hist"][n]
        run.combine(x, [u, m_t, *[run.past("x0", j + 1) for j in range(m)]], f"c{m}")
