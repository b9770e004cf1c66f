"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023):
the rho-AB multistep exponential integrator, its t-AB form, and the same paper's iPNDM.

Change of variables (Zhang & Chen 2023, Sec. 4). With rho = sigma/alpha and y = x/alpha the
probability-flow ODE of any Gaussian path x = alpha x0 + sigma eps is

    dy/drho = eps(x, t)                      (FORMULAS.md §2: x = alpha x0 + sigma eps, u = alpha' x0 + sigma' eps)

so the exact step is y_{i+1} = y_i + int_{rho_i}^{rho_{i+1}} eps drho. DEIS-rhoAB replaces eps
by the Lagrange polynomial P_i through its last k values (rho_{i-j}, eps_{i-j}), j = 0..k-1, and
integrates it exactly:

    x_{i+1} = (alpha_{i+1}/alpha_i) x_i + alpha_{i+1} sum_j C_ij eps_{i-j},
    C_ij    = int_{rho_i}^{rho_{i+1}} prod_{m != j} (rho - rho_{i-m}) / (rho_{i-j} - rho_{i-m}) drho.

C_ij are closed-form polynomial integrals on the *variable* rho-steps of the grid, computed once in
float64 at plan time (in the scaled variable s = (rho - rho_i)/(rho_{i+1} - rho_i)); k = 1 is DDIM.
This is also what k-diffusion calls ``ipndm_v``. Orders k = 1, 2, 3.

Warm-up: step i takes order min(k, i + 1), so NFE = steps (as in the paper and k-diffusion). The
order-1 first step leaves a global O(h^2) term, but with a small constant: at the noise end eps is
nearly constant in rho (for Gaussian data x0 ~ N(mu, s^2), along the exact path eps = K rho/sqrt(s^2 +
rho^2) and d eps/drho = K s^2/(s^2 + rho^2)^(3/2), with rho(t_max) = 50-1000 on the built-in paths), and
the flow contracts errors made there by s/rho(t_max). Measured (tests/test_deis.py), k = 3: slope
2.91-2.96 over NFE 128..1024 on VP, VE, EDM, subVP (logsnr and edm grids) and rectified flow (logsnr grid),
and 2.94-2.99 over 1024..8192. ``warmup="singlestep"`` (k = 3 only) makes the first step the explicit
midpoint rule in rho (one extra evaluation, NFE = steps + 1), which removes that term (2.99-2.995 over
1024..8192). k = 4 is not offered: its order-1 start shows within practical step counts (slope 3.65
over 128..1024 and 2.4 over 1024..8192 on VE), and a midpoint start would still leave the O(h^3) of the
AB2 second step. Lowering the order on
the last steps (diffusers' lower_order_final) was measured and not needed: it changed nothing above 5
steps and helped at no step count from 2 to 20 (VP, EDM).

Grids. The order is asymptotic in the rho-steps relative to rho. Rectified flow's default uniform grid
in t has rho = t/(1 - t), so its first rho-steps are O(1) relative steps (rho_j ~ N/j) until N exceeds
1/(1 - t_max): there every method of order >= 2 in rho (or lambda) sees an O(N^-2) term from the noise
end (measured, t_max = 0.99, NFE 128..1024: deis 2.40, deis2 1.94; t_max = 0.999: 2.17). Use
grid="logsnr" with t_max < 1 on rectified flow for DEIS (2.92).

iPNDM (Zhang & Chen 2023, "improved PNDM") takes the fixed uniform-step Adams-Bashforth
weights (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24) times h = rho_{i+1} - rho_i in
place of C_ij, with the same warm-up. On a grid that is not uniform in rho those weights miss the
variable-step ones by O(h (r - 1)) with r the step ratio, a local error O(h^3): iPNDM is globally second
order (k >= 2) on every grid this library makes (geometric in rho for "logsnr", a power law for "edm";
measured 1.99-2.01 for k = 2, 3, 4 on five paths and on mixture data). ``order`` in ``fs.solvers()`` is 2.
At very few steps its over-extrapolation often beats DEIS (on VP with the edm grid to sigma = 0, 4 steps:
error 0.09 against DEIS's 0.48 and DDIM's 0.49); asymptotically DEIS wins (order 3).

The history holds eps predictions, written by one fused conversion call (model.conversion("eps", t))
per step, and only on steps whose eps a later step reads; the current step's conversion is folded into
the update's coefficients of (x, raw). A last step *to* sigma = 0 (rho = 0) evaluates nothing there.
rho is infinite where alpha = 0 (rectified flow and VPCosine at t = 1): planning raises a ValueError
that names the time and the fix (t_max below it).

DEIS-tAB (``DEISTAB``, not registered) extrapolates eps by the Lagrange polynomial in t instead of rho and
integrates it against d rho (its weights by composite Gauss-Legendre quadrature in rho, float64, at plan
time). Measured: slope 2.93-2.99 over NFE 128..1024 (VE 3.7-3.9, superconvergent), and fewer-step errors
between DEIS-rhoAB's and iPNDM's on VP (10 logsnr steps: 0.042, against 0.13 and 0.041).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Plan, Solver, SolverInfo, register, table

_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def lagrange_integrals(nodes, a: float, b: float) -> list[float]:
    """int_a^b L_j(r) dr for the Lagrange basis L_j on ``nodes`` (distinct floats), in float64.

    Computed in s = (r - a)/(b - a): L_j(s) = prod_{m != j} (s - s_m)/(s_j - s_m) is expanded into its
    monomial coefficients and integrated term by term over [0, 1], then scaled by (b - a).
    """
    h = b - a
    s = [(float(r) - a) / h for r in nodes]
    out = []
    for j, sj in enumerate(s):
        poly = [1.0]  # coefficients of s^0, s^1, ... of prod_{m != j} (s - s_m)
        denom = 1.0
        for m, sm in enumerate(s):
            if m == j:
                continue
            poly = [(poly[i - 1] if i > 0 else 0.0) - sm * (poly[i] if i < len(poly) else 0.0)
                    for i in range(len(poly) + 1)]
            denom *= sj - sm
        out.append(h * math.fsum(c / (i + 1) for i, c in enumerate(poly)) / denom)
    return out


class _RhoAdams(Solver):
    """Adams-Bashforth in rho = sigma/alpha on eps predictions; subclasses choose the weights."""

    info: SolverInfo
    default_order: int
    max_supported: int = 4
    _order_hint = ""

    def __init__(self, order: int | None = None, warmup: str = "multistep"):
        if warmup not in ("multistep", "singlestep"):
            raise ValueError(f"warmup={warmup!r} must be 'multistep' (orders 1, 2, ..., NFE = steps) or 'singlestep' "
                             f"(order >= 3: a midpoint step in rho first, NFE = steps + 1).")
        self.warmup = warmup
        order = self.default_order if order is None else order
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= self.max_supported:
            raise ValueError(f"order={order!r} must be an int in 1..{self.max_supported} (the number of eps values "
                             f"the multistep update uses; {self.default_order} is the default).{self._order_hint}")
        self.order = order
        if warmup == "singlestep" and order < 3:
            raise ValueError(f"warmup='singlestep' applies to order >= 3 (order={order} starts at full order with its "
                             f"multistep warm-up); drop the argument.")
        if order != self.default_order:
            base = type(self).info
            self.info = SolverInfo(f"{base.name.rstrip('0123456789')}{order}", order=self._attained(order),
                                   nfe_per_step=1, stochastic=False, needs="eps", multistep=True, paper=base.paper)

    def _attained(self, order: int) -> int:
        return order

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order}, warmup={self.warmup!r})"

    def weights(self, path, grid: list[float], rho: list[float], i: int, k: int) -> list[float]:
        """int_{rho_i}^{rho_{i+1}} of the weight of eps_{i-j}, j < k (float64)."""
        raise NotImplementedError

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0 = grid[:-1]
        n = t0.numel()
        a_e, b_e = model.conversion("eps", t0)  # eps_i = a_e x + b_e raw: raises at singular evaluation times
        alpha, sigma = path.alpha(grid), path.sigma(grid)
        rho_t = sigma / alpha
        if not bool(torch.isfinite(rho_t).all()):
            j = int((~torch.isfinite(rho_t)).nonzero()[0])
            raise ValueError(
                f"{self.info.name} integrates in rho = sigma/alpha, which is infinite at t={float(grid[j]):.6g} on "
                f"{type(path).__name__} (alpha={float(alpha[j]):.3g}, sigma={float(sigma[j]):.3g}). Start below it: "
                f"pass t_max < {float(grid[j]):.6g} (e.g. t_max=0.999 on RectifiedFlow), or use a solver written in "
                f"velocity such as 'heun' or 'rk4'."
            )
        rho, grid_l = [float(r) for r in rho_t], [float(v) for v in grid]
        orders = [min(self.order, i + 1) for i in range(n)]  # warm-up 1, 2, ..., k
        ratio = alpha[1:] / alpha[:-1]
        cols = {k: torch.zeros(n, k + 1, dtype=torch.float64) for k in range(1, self.order + 1)}
        for i in range(n):
            k = orders[i]
            c = torch.tensor(self.weights(path, grid_l, rho, i, k), dtype=torch.float64) * alpha[i + 1]
            # inputs (x, raw_i, eps_{i-1}, ..., eps_{i-k+1}): the current eps folded in as a_e x + b_e raw
            cols[k][i, 0] = ratio[i] + c[0] * a_e[i]
            cols[k][i, 1] = c[0] * b_e[i]
            cols[k][i, 2:] = c[1:]
        tables = {f"o{k}": table(*cols[k].unbind(1)) for k in cols}
        tables["eps"] = table(a_e, b_e)
        # eps_i is stored only if a later step m reads it (m - orders[m] + 1 <= i)
        push = [any(m - orders[m] + 1 <= i for m in range(i + 1, n)) for i in range(n)]
        flags = {"orders": orders, "push": push, "depth": self.order,  # eps_i and the k-1 before it
                 "singlestep_first": self.warmup == "singlestep" and self.order >= 3 and n >= 2}
        t_eval = torch.full((n, 2), float("nan"), dtype=torch.float64)
        t_eval[:, 0] = t0
        evals = [1] * n
        if flags["singlestep_first"]:
            # explicit midpoint rule in rho: y_m = y_0 + (rho_m - rho_0) eps_0, y_1 = y_0 + (rho_1 - rho_0) eps(y_m)
            rho_m = 0.5 * (rho_t[0] + rho_t[1])
            t_m = path.t_of_lambda(-torch.log(rho_m)).reshape(1)
            t_m = torch.minimum(torch.maximum(t_m, grid[1:2]), grid[:1])
            a_m, b_m = model.conversion("eps", t_m)
            al_m = path.alpha(t_m)
            pad = lambda v: torch.cat([v.reshape(1), torch.zeros(n - 1, dtype=torch.float64)])  # noqa: E731  row 0
            c_m = al_m * (rho_m - rho_t[0])
            tables["mid_u"] = table(pad(al_m / alpha[0] + c_m * a_e[0]), pad(c_m * b_e[0]))       # inputs (x, raw_0)
            c_1 = alpha[1] * (rho_t[1] - rho_t[0])
            tables["mid_out"] = table(pad(ratio[0]), pad(c_1 * a_m), pad(c_1 * b_m))            # inputs (x, u, raw_m)
            t_eval[0, 1] = t_m
            evals[0] = 2
        return Plan(grid, tables, t_eval, evals, flags)

    def step(self, run, n: int) -> None:
        x, flags = run.x, run.plan.flags
        raw = run.evaluate(x, 0)
        k = flags["orders"][n]
        lag = 0
        if flags["push"][n]:
            run.push("eps", flags["depth"], [x, raw], "eps")
            lag = 1  # past(0) is now eps_n itself; the update reads it through (x, raw)
        if n == 0 and flags["singlestep_first"]:
            u = run.combine(run.buffer("u"), [x, raw], "mid_u")
            run.combine(x, [x, u, run.evaluate(u, 1)], "mid_out")
            return
        run.combine(x, [x, raw, *[run.past("eps", lag + j) for j in range(k - 1)]], f"o{k}")


@register
class DEIS(_RhoAdams):
    """DEIS-rhoAB of order ``order`` (1..3, default 3): variable-step Adams-Bashforth in rho = sigma/alpha
    (Zhang & Chen 2023, Sec. 4), lower-order warm-up, NFE = steps (``warmup="singlestep"``: steps + 1)."""

    info = SolverInfo("deis", order=3, nfe_per_step=1, stochastic=False, needs="eps", multistep=True,
                      paper="Zhang & Chen 2023, DEIS rho-AB (Sec. 4)")
    default_order = 3
    max_supported = 3
    _order_hint = (" Order 4 is not offered: its order-1 first step leaves an O(h^2) error that shows within"
                   " practical step counts (measured slope 2.4 on VE over NFE 1024..8192); use 'ipndm' for the"
                   " paper's fourth-order weights, which are second order on these grids anyway.")

    def weights(self, path, grid, rho, i, k):
        return lagrange_integrals([rho[i - j] for j in range(k)], rho[i], rho[i + 1])


@register
class DEIS2(DEIS):
    """DEIS-rhoAB of order 2 (two eps values per update)."""

    info = SolverInfo("deis2", order=2, nfe_per_step=1, stochastic=False, needs="eps", multistep=True,
                      paper="Zhang & Chen 2023, DEIS rho-AB (Sec. 4), order 2")
    default_order = 2


def t_lagrange_integrals(path, t_nodes, rho_a: float, rho_b: float, points: int = 16) -> list[float]:
    """int_{rho_a}^{rho_b} L_j(t(rho)) drho (rho_a > rho_b >= 0), L_j the Lagrange basis in t on ``t_nodes``,
    in float64 by composite Gauss-Legendre quadrature in rho on pieces [r/2, r] halving from rho_a down to
    rho_b (down to rho_a 2^-60, then [0, that], when rho_b = 0). t(rho) = path.t_of_lambda(-log rho) is smooth
    there, with singularities at distance O(rho) or O(1) from the real axis (VP: rho = +-i; VE: log rho), so each
    piece is well inside them; in t the weight d rho/dt is singular at sigma = 0 on VP (sigma ~ sqrt(t))."""
    cuts = [rho_a]
    while cuts[-1] / 2 > rho_b and len(cuts) <= 60:
        cuts.append(cuts[-1] / 2)
    cuts.append(rho_b)
    x, w = np.polynomial.legendre.leggauss(points)
    lo, hi = np.asarray(cuts[1:]), np.asarray(cuts[:-1])
    r = (0.5 * (lo + hi))[:, None] + (0.5 * (lo - hi))[:, None] * x[None, :]  # [pieces, points], hi -> lo
    wr = (0.5 * (lo - hi))[:, None] * w[None, :]
    t = path.t_of_lambda(-torch.log(torch.as_tensor(r, dtype=torch.float64))).numpy()
    t0 = float(t_nodes[0])
    scale = float(t_nodes[1]) - t0 if len(t_nodes) > 1 else 1.0
    s = (t - t0) / scale  # scaled in t: nodes s_j = (t_j - t_0)/(t_1 - t_0) of order one
    sn = [(float(v) - t0) / scale for v in t_nodes]
    out = []
    for j, sj in enumerate(sn):
        basis = np.ones_like(s)
        for m, sm in enumerate(sn):
            if m != j:
                basis = basis * (s - sm) / (sj - sm)
        out.append(float(np.sum(wr * basis)))
    return out


class DEISTAB(DEIS):
    """DEIS-tAB (Zhang & Chen 2023, Sec. 4, the polynomial in t): eps extrapolated by the Lagrange
    polynomial in t through its last k values, integrated against the exponential-integrator weight
    alpha_{i+1} d rho = alpha_{i+1} rho'(tau) d tau, by composite Gauss-Legendre quadrature in rho at plan
    time (``t_lagrange_integrals``). Order k (1..3). ``warmup`` defaults to "singlestep" for k = 3
    (NFE = steps + 1): in t the order-1 start costs more than in rho (measured on VE, NFE 128..1024:
    slope 2.14 with the multistep start, 3.9 with the midpoint start, where the t-polynomial is
    superconvergent). On EDM (t = rho) it is DEIS-rhoAB. Not registered (import it from
    flowsolve.solvers.deis)."""

    info = SolverInfo("deis-tab", order=3, nfe_per_step=1, stochastic=False, needs="eps", multistep=True,
                      paper="Zhang & Chen 2023, DEIS t-AB (Sec. 4)")
    default_order = 3

    def __init__(self, order: int | None = None, warmup: str | None = None):
        k = self.default_order if order is None else order
        if warmup is None:
            warmup = "singlestep" if isinstance(k, int) and not isinstance(k, bool) and k >= 3 else "multistep"
        super().__init__(order, warmup)

    def weights(self, path, grid, rho, i, k):
        return t_lagrange_integrals(path, [grid[i - j] for j in range(k)], rho[i], rho[i + 1])


@register
class IPNDM(_RhoAdams):
    """iPNDM (Zhang & Chen 2023): fixed uniform-step Adams-Bashforth weights in rho, order 1..4 with
    warm-up; globally second order on grids not uniform in rho (module docstring)."""

    info = SolverInfo("ipndm", order=2, nfe_per_step=1, stochastic=False, needs="eps", multistep=True,
                      paper="Zhang & Chen 2023, iPNDM (fixed-coefficient AB in rho)")
    default_order = 4

    def _attained(self, order: int) -> int:
        return min(order, 2)

    def weights(self, path, grid, rho, i, k):
        h = rho[i + 1] - rho[i]
        return [h * w for w in _AB[k]]
