"""UniPC: the unified predictor-corrector of Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models" (NeurIPS 2023), in
data-prediction (x0) form with the B(h) coefficients (their Sec. 3: the corrector UniC-p, Theorem
3.1, and the predictor UniP-p, Corollary 3.2; the variants bh1 and bh2 of the official code,
github.com/wl-zhao/UniPC, which diffusers' ``UniPCMultistepScheduler`` follows).

Notation of step i (t_i -> t_{i+1}): lambda = log(alpha/sigma), h = lambda_{i+1} - lambda_i, z = -h,
m_0 = x0 prediction at (x_i, t_i), m_k (k = 1..p-1) the earlier ones at lambda_{i-k},
r_k = (lambda_{i-k} - lambda_i) / h (negative), D_k = (m_k - m_0) / r_k, r_p = 1 and D_p = m_t - m_0
with m_t the x0 prediction at the predicted point (x_pred, t_{i+1}):

    x_hat  = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) m_0                 (DDIM, UniP-1)
    UniP-p: x_pred = x_hat - alpha_{i+1} B(h) sum_{k=1}^{p-1} rho^p_k D_k
    UniC-p: x_{i+1} = x_hat - alpha_{i+1} B(h) sum_{k=1}^{p}   rho^c_k D_k
    R_K(r)[j, k] = r_k^j (j = 0..K-1),  b_j = j! z phi_{j+1}(z) / B(h),
    phi_1(z) = (e^z - 1)/z,  phi_{k+1}(z) = (phi_k(z) - 1/k!)/z,
    rho^p = R_{p-1}(r_1..r_{p-1})^{-1} b_{1..p-1},  rho^c = R_p(r_1..r_{p-1}, 1)^{-1} b_{1..p},
    except (as in the paper's code and diffusers) rho^p = 1/2 for p = 2 and rho^c = 1/2 for p = 1;
    B(h) = z ("bh1", B(h) = h in the paper's sign convention) or e^z - 1 ("bh2").

With m polynomial in lambda the exact exponential-integrator step is
x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} int_0^h e^{-u} m(lambda_{i+1} - u) du, and the
condition sum_k rho_k r_k^{j-1} = b_j is exactly its degree-j term: the solved predictor is exact
for m of degree <= p-1, the solved corrector for degree <= p. Where the system is solved, B(h)
cancels (B rho = R^{-1} (b B)); bh1 and bh2 differ only in the two rho = 1/2 shortcuts (UniP-2 with
bh2 is DPM-Solver++(2M), Lu et al. 2022b, Alg. 2). The corrector's model evaluation m_t is the next
step's m_0 (the model is not called again at the corrected point), so NFE = steps; the last step
has no corrector (it would cost an evaluation), as in the reference. The r_k/rho linear solves are
done here, in ``plan``, in float64; ``step`` is evaluate + fused combine calls only.

Order schedule (``dpm_solver_pp.multistep_orders``): warm-up orders 1, 2, ..., p; with fewer than
15 steps the last two steps lower their order (diffusers' ``lower_order_final``); a step with an
infinite h (to sigma = 0, or from alpha = 0 on rectified flow) is first order and has no corrector
(a step to sigma = 0 returns alpha_{i+1} m_0), and no difference reaches back to a lambda = -inf point.

Order. UniC-p raises UniP-p by one (the paper: UniPC-p has order p + 1, given exact starting values), but
a single warm-up step with local error O(h^{q+1}) adds O(h^{q+1}) to the global error: the first step
is UniP-1 + UniC-1 (local O(h^3)), so UniPC-p attains min(p + 1, 3), and UniP-p alone min(p, 2) (its
first step is DDIM). Measured (tests/test_unipc.py; slope of log error vs log NFE over 128..1024,
logsnr grid): UniPC-2 3.00 +- 0.03 on Gaussian data (VP, VE, EDM, subVP, rectified flow, exact flow
map) and on Gaussian mixtures (VP, rectified flow, RK4 reference), UniP-2 2.00 +- 0.02; UniPC-3
2.91-3.04 on VP from t_max = 0.3 (Gaussian and mixture data) and 3.08 on rectified flow from 0.6, the
error ratio per halving tending to 8. From pure noise (the paths' t_max) the warm-up's error is damped
by about e^{2 lambda(t_max)} (its x0'' and the flow's contraction of early errors; ~e^{-10} on VP) and
UniPC-3 shows its fourth-order tail, 3.89-3.99 over 128..1024 (ratios rising to 16 up to NFE 2048):
superconvergence, not its order.
``SolverInfo.order`` is 3 for the four registered instances ("unipc2-bh1", "unipc2-bh2", "unipc3-bh1",
"unipc3-bh2"; the digit is the paper's p and diffusers' ``solver_order``; diffusers' default is
order 2 with bh2), min(p, 2) for ``corrector=False`` ("unip2-bh2", ...). FORMULAS.md §8 lists
UniPC-2 as 2: with its corrector it is 3.
"""
from __future__ import annotations

import math

import torch

from .base import Plan, Solver, SolverInfo, register, table
from .dpm_solver_pp import multistep_orders

VARIANTS = ("bh1", "bh2")


def phi_weights(z: float, n: int) -> list[float]:
    """[j! z phi_{j+1}(z) for j = 1..n] in float64, with phi_k(z) = sum_{m>=0} z^m / (m+k)!.

    Taylor series for |z| < 1 (the recursion phi_{k+1} = (phi_k - 1/k!)/z cancels there), the
    recursion from phi_1 = expm1(z)/z otherwise (it divides by |z| >= 1: stable)."""
    if abs(z) < 1.0:
        phis = [sum(z**m / math.factorial(m + k) for m in range(30)) for k in range(1, n + 2)]
    else:
        phis = [math.expm1(z) / z]
        for k in range(1, n + 1):
            phis.append((phis[-1] - 1.0 / math.factorial(k)) / z)
    return [math.factorial(j) * z * phis[j] for j in range(1, n + 1)]


def _solve(r: list[float], rhs: list[float]) -> torch.Tensor:
    """rho with sum_k rho_k r_k^j = rhs_j (j = 0..K-1), float64."""
    rr = torch.tensor(r, dtype=torch.float64)
    vander = torch.stack([rr**j for j in range(len(r))])  # R[j, k] = r_k^j
    return torch.linalg.solve(vander, torch.tensor(rhs, dtype=torch.float64))


def unipc_orders(lam: torch.Tensor, max_order: int, lower_order_final: bool = True) -> list[int]:
    """Per-step order p_i: ``multistep_orders`` further capped so that every history point used
    (lambda_i, ..., lambda_{i-p+1}) has a finite lambda."""
    h = lam[1:] - lam[:-1]
    orders = multistep_orders(h, max_order, lower_order_final)
    finite = [bool(v) for v in torch.isfinite(lam)]
    for i, k in enumerate(orders):
        back = 0
        while back < k and i - back >= 0 and finite[i - back]:
            back += 1
        orders[i] = max(1, min(k, back))
    return orders


def unipc_coefficients(path, grid: torch.Tensor, max_order: int, variant: str = "bh2", corrector: bool = True,
                       lower_order_final: bool = True):
    """Per-step float64 coefficients of UniP-p and UniC-p.

    Returns (ratio [N], pred [N, max_order] over (m_0..m_{p-1}), corr [N, max_order + 1] over
    (m_t, m_0..m_{p-1}), orders, use_corrector): x_pred = ratio x + pred . m and
    x_{i+1} = ratio x + corr . (m_t, m); columns past a step's order are 0, and so is the corrector
    row of a step without one (the last step, a step with an infinite h, or ``corrector=False``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS} (B(h) = h or e^h - 1).")
    t0, t1 = grid[:-1], grid[1:]
    n = t0.numel()
    lam = path.lam(grid)
    s0, s1, a0, a1 = path.sigma(t0), path.sigma(t1), path.alpha(t0), path.alpha(t1)
    ratio = s1 / s0
    c1 = a1 - ratio * a0  # alpha_{i+1} (1 - e^{-h}), finite at sigma_{i+1} = 0 and alpha_i = 0
    orders = unipc_orders(lam, max_order, lower_order_final)
    lam_f = [float(v) for v in lam]
    pred = torch.zeros(n, max_order, dtype=torch.float64)
    corr = torch.zeros(n, max_order + 1, dtype=torch.float64)
    use_corrector = []
    for i in range(n):
        k = orders[i]
        h = lam_f[i + 1] - lam_f[i]
        finite = math.isfinite(h)
        use_c = bool(corrector) and i < n - 1 and finite
        use_corrector.append(use_c)
        pred[i, 0] = c1[i]
        if use_c:
            corr[i, 1] = c1[i]
        if not finite:
            continue  # order 1 (multistep_orders), no corrector
        z = -h
        big_b = z if variant == "bh1" else math.expm1(z)
        g = phi_weights(z, k)  # b_j = g_j / B(h)
        r = [(lam_f[i - j] - lam_f[i]) / h for j in range(1, k)]
        scale = -float(a1[i]) * big_b  # x = x_hat - alpha B sum rho_k D_k
        if k >= 2:
            rho = torch.tensor([0.5], dtype=torch.float64) if k == 2 else _solve(r, [gj / big_b for gj in g[: k - 1]])
            w = scale * rho / torch.tensor(r, dtype=torch.float64)  # coefficient of m_k in rho_k D_k
            pred[i, 1:k] += w
            pred[i, 0] -= w.sum()
        if use_c:
            rc = r + [1.0]
            rho = torch.tensor([0.5], dtype=torch.float64) if k == 1 else _solve(rc, [gj / big_b for gj in g[:k]])
            w = scale * rho / torch.tensor(rc, dtype=torch.float64)
            corr[i, 2:k + 1] += w[:-1]  # m_1..m_{k-1}
            corr[i, 0] += w[-1]  # m_t
            corr[i, 1] -= w.sum()  # m_0
    return ratio, pred, corr, orders, use_corrector


def _info(order: int, variant: str, corrector: bool) -> SolverInfo:
    """Attained orders (module docstring): UniPC-p min(p + 1, 3), UniP-p min(p, 2)."""
    if corrector:
        return SolverInfo(f"unipc{order}-{variant}", order=min(order + 1, 3), nfe_per_step=1, stochastic=False, needs="x0",
                          multistep=True, paper=f"Zhao et al. 2023, UniPC-{order} (UniP-{order} + UniC-{order}, "
                                                f"B(h) {variant}), Sec. 3")
    return SolverInfo(f"unip{order}-{variant}", order=min(order, 2), nfe_per_step=1, stochastic=False, needs="x0",
                      multistep=True, paper=f"Zhao et al. 2023, UniP-{order} (B(h) {variant}), Sec. 3")


class UniPC(Solver):
    """UniPC-p (Zhao et al. 2023) in x0 form; see the module docstring.

    Args:
        order: p, the predictor's order (1, 2 or 3; diffusers' ``solver_order``); with the corrector
            the method attains order min(p + 1, 3) (the module docstring says why not 4 for p = 3).
        variant: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1; diffusers' default).
        corrector: False gives UniP-p alone (order min(p, 2)), for comparison.
        lower_order_final: lower the order of the last two of fewer than 15 steps (diffusers).
    """

    info = _info(2, "bh2", True)
    # step n's m_0 is the model evaluation made in step n - 1 (at the predicted point): a wrapper that
    # moves x between steps (e.g. a Langevin corrector) leaves it stale
    carries_evaluation = True

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True):
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order={order!r} must be 1, 2 or 3 (the UniP-p predictor order; 2 or 3 are the usual).")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} must be 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1).")
        if not isinstance(corrector, bool):
            raise TypeError(f"corrector={corrector!r} must be True (UniPC) or False (UniP alone).")
        self.order, self.variant, self.corrector = order, variant, corrector
        self.lower_order_final = bool(lower_order_final)
        self.info = _info(order, variant, corrector)

    def __repr__(self) -> str:
        return (f"UniPC(order={self.order}, variant={self.variant!r}, corrector={self.corrector}, "
                f"lower_order_final={self.lower_order_final})")

    def plan(self, model, grid) -> Plan:
        path = model.path
        ratio, pred, corr, orders, use_c = unipc_coefficients(path, grid, self.order, self.variant, self.corrector,
                                                              self.lower_order_final)
        n = grid.numel() - 1
        zeros = torch.zeros(n, dtype=torch.float64)
        a0, b0 = model.conversion("x0", grid[:1])  # raises, naming t, if the model cannot give x0 at t_max
        tables = {"x0_start": table(torch.cat([a0, zeros[1:]]), torch.cat([b0, zeros[1:]]))}
        a1, b1 = zeros.clone(), zeros.clone()
        if n > 1:  # evaluations at t_1..t_{N-1}; never at t_N (which may be sigma = 0)
            a, b = model.conversion("x0", grid[1:-1])
            a1[:-1], b1[:-1] = a, b
        tables["x0_end"] = table(a1, b1)
        for k in range(1, self.order + 1):
            tables[f"p{k}"] = table(ratio, *[pred[:, j] for j in range(k)])  # inputs (x, m_0..m_{k-1})
            # the corrector with the new history entry m_t = a1 u + b1 F folded in, over (x, u, F, m_0..m_{k-1}):
            # one launch writes the corrected state and m_t (Run.push_update)
            c0 = corr[:, 0]
            tables[f"c{k}"] = table(ratio, c0 * a1, c0 * b1, *[corr[:, j] for j in range(1, k + 1)])
            tables[f"m{k}"] = table(zeros, a1, b1, *[zeros] * k)[:, :-1]
        t_eval = torch.full((n, 2), float("nan"), dtype=torch.float64)
        t_eval[0, 0] = grid[0]
        t_eval[:-1, 1] = grid[1:-1]
        evals = [(1 if i == 0 else 0) + (1 if i < n - 1 else 0) for i in range(n)]
        return Plan(grid, tables, t_eval, evals, {"orders": orders, "corrector": use_c})

    def step(self, run, n: int) -> None:
        """Predict with the history (x, m_0..m_{p-1}); unless this is the last step, evaluate the model
        at the predicted point and time t_{n+1} (the next step's m_0), then correct with it."""
        x, flags, depth = run.x, run.plan.flags, self.order + 1
        if n == 0:
            run.push("x0", depth, [x, run.evaluate(x, 0)], "x0_start")
        k = flags["orders"][n]
        hist = [run.past("x0", j) for j in range(k)]
        if n == run.plan.n_steps - 1:
            run.combine(x, [x, *hist], f"p{k}")
            return
        if not flags["corrector"][n]:
            run.combine(x, [x, *hist], f"p{k}")
            run.push("x0", depth, [x, run.evaluate(x, 1)], "x0_end")
            return
        u = run.combine(run.buffer("pred"), [x, *hist], f"p{k}")
        # one launch: the corrected state and the new entry m_t = x0(u, t_{n+1}); depth = p + 1 > k, so the slot
        # the push reuses is never one of hist
        run.push_update("x0", depth, x, [x, u, run.evaluate(u, 1), *hist], f"c{k}", f"m{k}")


def _fixed(order: int, variant: str):
    class _Fixed(UniPC):
        info = _info(order, variant, True)

        def __init__(self, corrector: bool = True, lower_order_final: bool = True):
            super().__init__(order, variant, corrector, lower_order_final)

    _Fixed.__name__ = _Fixed.__qualname__ = f"UniPC{order}{variant.upper()}"
    _Fixed.__doc__ = f"UniPC-{order} with B(h) {variant} (registered as {_Fixed.info.name!r})."
    return register(_Fixed)


UniPC2BH1 = _fixed(2, "bh1")
UniPC2BH2 = _fixed(2, "bh2")
UniPC3BH1 = _fixed(3, "bh1")
UniPC3BH2 = _fixed(3, "bh2")
