"""ER-SDE-Solver-1/2/3 (Cui, Zhang, Feng, Shen, Liu, Xiang & Chen 2023, "Elucidating the Solution Space of
Extended Reverse-Time SDE for Diffusion Models", arXiv:2309.06169), VE form with data prediction, on any
Gaussian path through y = x/alpha and the noise level s = sigma/alpha (so x = alpha y).

The extended reverse-time SDE (ER SDE, their eq. 7) dy = -(1 + h^2(s))/2 d(s^2)/ds score ds + h(s) sqrt(d s^2/ds) dw
is parameterized by a noise scale function phi(s) (their eq. 11: h^2 = s phi'(s)/phi(s) - 1, so phi(s) = s is the
PF-ODE and phi(s) = s^2 the reverse SDE). Its exact solution from s_i to s_{i+1} < s_i (their eq. 12) is

    y_{i+1} = r y_i + phi(s_{i+1}) int_{s_{i+1}}^{s_i} phi'(s)/phi(s)^2 x0(s) ds + sqrt(s_{i+1}^2 - r^2 s_i^2) z,
    r = phi(s_{i+1}) / phi(s_i).

A Taylor expansion of x0 at s_i and integration by parts give ER-SDE-Solver-k (their eqs. 16-18, Alg. 1-3):

    y_{i+1} = r y_i + (1 - r) m_i + c1 D1 + c2 D2 + sqrt(s_{i+1}^2 - r^2 s_i^2) z,
    c1 = (s_{i+1} - s_i) + phi(s_{i+1}) int_{s_{i+1}}^{s_i} ds / phi(s),                       (k >= 2)
    c2 = (s_{i+1} - s_i)^2 / 2 + phi(s_{i+1}) int_{s_{i+1}}^{s_i} (s - s_i) / phi(s) ds,        (k = 3)
    D1 = (m_i - m_{i-1}) / (s_i - s_{i-1}) ~ x0',   D2 = (D1_i - D1_{i-1}) / ((s_i - s_{i-2}) / 2) ~ x0'',

with the multistep (backward-difference) derivative estimates of the paper's code (and ComfyUI's
``sample_er_sde``), one model evaluation per step. The two integrals are computed in float64 at plan time
by composite Gauss-Legendre quadrature in log s (the paper's code uses a 200-point Riemann sum).

Noise scale functions (``noise_scale``): "er-sde-5" (default; the paper's recommended
phi(s) = s (e^{s^0.3} + 10), their App. A.8 "ER SDE 5", also ComfyUI's default), "ode" (phi = s: ER-SDE-1 is
DDIM), "sde" (phi = s^2: the reverse SDE), or a callable phi(s) on float64 tensors, positive and increasing
with phi(s)/s non-decreasing (so that h^2 >= 0 and r^2 s_i^2 <= s_{i+1}^2).

Order. D1 is a first-order estimate of x0'(s_i) (its error -(s_i - s_{i-1})/2 x0'' is not corrected by the c2 term),
so the c1 D1 term has local error O(ds^3) and ER-SDE-Solver-3, as the paper writes it (and its code and ComfyUI run
it), is globally second order like ER-SDE-Solver-2, with a smaller constant: measured on the PF-ODE (phi = s) against
the exact flow map, slopes 2.02 (k = 2) and 2.05-2.06 (k = 3) over 80..640 steps on VP and EDM, and weak slopes
2.04 / 2.12 over 50..200 steps on VP with the default phi (tests/test_er_sde.py). ``order`` is 1, 2, 2.

Warm-up orders min(k, i + 1); a step to sigma = 0 returns alpha_{i+1} m_i (no noise), as the paper's code;
orders are capped so that no difference reaches a point with infinite s (alpha = 0). ``SolverInfo.order`` is
the weak order measured on Gaussian data from the exact law of the scheme (tests/test_er_sde.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Plan, SolverInfo, X0Multistep, register

_PAPER = "Cui et al. 2023, ER-SDE-Solver, eqs. 12, 16-18 (VE, data prediction)"


def _phi_er5(s):
    return s * (torch.exp(s**0.3) + 10.0)


NOISE_SCALES = {"er-sde-5": _phi_er5, "ode": lambda s: s, "sde": lambda s: s * s}


def phi_integrals(phi, s_lo: float, s_hi: float, points: int = 16) -> tuple[float, float]:
    """(int_{s_lo}^{s_hi} ds / phi(s), int_{s_lo}^{s_hi} (s - s_hi) / phi(s) ds) in float64, 0 < s_lo < s_hi,
    by composite Gauss-Legendre in u = log s (panels of width <= 0.25 in u)."""
    u_lo, u_hi = math.log(s_lo), math.log(s_hi)
    panels = max(1, math.ceil((u_hi - u_lo) / 0.25))
    x, w = np.polynomial.legendre.leggauss(points)
    edges = np.linspace(u_lo, u_hi, panels + 1)
    u = np.concatenate([(lo + hi) / 2 + (hi - lo) / 2 * x for lo, hi in zip(edges[:-1], edges[1:])])
    wu = np.concatenate([(hi - lo) / 2 * w for lo, hi in zip(edges[:-1], edges[1:])])
    s = torch.tensor(np.exp(u), dtype=torch.float64)
    dens = (s / phi(s)).numpy() * wu  # ds / phi = s du / phi
    return float(dens.sum()), float((dens * (np.exp(u) - s_hi)).sum())


class _ERSDE(X0Multistep):
    max_order: int

    def __init__(self, noise_scale="er-sde-5"):
        if isinstance(noise_scale, str):
            if noise_scale not in NOISE_SCALES:
                raise ValueError(f"noise_scale={noise_scale!r} is not one of {tuple(NOISE_SCALES)}; or pass a callable "
                                 f"phi(s) on float64 tensors (positive, increasing, phi(s)/s non-decreasing).")
            self.phi, self.noise_scale = NOISE_SCALES[noise_scale], noise_scale
        elif callable(noise_scale):
            self.phi, self.noise_scale = noise_scale, getattr(noise_scale, "__name__", "custom")
        else:
            raise TypeError(f"noise_scale must be a name in {tuple(NOISE_SCALES)} or a callable phi(s); "
                            f"got {type(noise_scale).__name__}.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise_scale={self.noise_scale!r})"

    def _phi(self, s: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(self.phi(s), dtype=torch.float64)
        if out.shape != s.shape or not bool(torch.isfinite(out).all()) or not bool((out > 0).all()):
            raise ValueError(f"noise_scale phi({s.tolist()}) = {out.tolist()}: phi must return a positive finite value "
                             f"of the same shape for every noise level s = sigma/alpha of the grid.")
        return out

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        n = t0.numel()
        s = torch.exp(-path.lam(grid))  # noise level sigma/alpha: inf where alpha = 0, 0 where sigma = 0
        s_f = [float(v) for v in s]
        a0, a1 = path.alpha(t0), path.alpha(t1)
        ok = torch.isfinite(s) & (s > 0)
        phi = torch.full_like(s, float("nan"))
        phi[ok] = self._phi(s[ok])
        cx = torch.zeros(n, dtype=torch.float64)
        noise = torch.zeros(n, dtype=torch.float64)
        coef = torch.zeros(n, 3, dtype=torch.float64)  # over (m_i, m_{i-1}, m_{i-2}), times alpha_{i+1}
        orders = []
        for i in range(n):
            k = min(self.max_order, i + 1)
            back = 0
            while back < k and math.isfinite(s_f[i - back]):
                back += 1
            k = max(1, min(k, back))
            if s_f[i + 1] == 0.0 or not math.isfinite(s_f[i]):
                k = 1
            orders.append(k)
            if s_f[i + 1] == 0.0:  # to sigma = 0: x = alpha m
                coef[i, 0] = 1.0
                continue
            if not math.isfinite(s_f[i]):  # from alpha = 0: r = 0, y = m + s_{i+1} z
                coef[i, 0] = 1.0
                noise[i] = float(a1[i]) * s_f[i + 1]
                continue
            # q = (phi/s)(s_{i+1}) / (phi/s)(s_i) <= 1 and r = q s_{i+1}/s_i: the noise variance
            # s_{i+1}^2 - r^2 s_i^2 = s_{i+1}^2 (1 - q^2) without cancellation (exactly 0 for phi = s)
            q = float((phi[i + 1] / s[i + 1]) / (phi[i] / s[i]))
            if q > 1.0 + 1e-12:  # negative noise variance: the ER-SDE needs phi(s)/s non-decreasing in s
                raise ValueError(
                    f"noise_scale={self.noise_scale!r}: phi(s)/s must not decrease with s (Cui et al. 2023, eq. 12), "
                    f"but between s={s_f[i]:.4g} and s={s_f[i + 1]:.4g} it gives q = {q:.4g} > 1, a negative noise "
                    f"variance. Use a built-in noise_scale ({', '.join(NOISE_SCALES)}) or a phi with phi(s)/s "
                    f"non-decreasing, e.g. phi(s) = s or s * (exp(s**0.3) + 10).")
            r = q * s_f[i + 1] / s_f[i]
            cx[i] = float(a1[i]) / float(a0[i]) * r
            noise[i] = float(a1[i]) * s_f[i + 1] * math.sqrt(max(1.0 - q * q, 0.0))
            coef[i, 0] = 1.0 - r
            if k >= 2:
                i1, i2 = phi_integrals(self._phi, s_f[i + 1], s_f[i])
                ds = s_f[i + 1] - s_f[i]
                c1 = ds + float(phi[i + 1]) * i1
                d1 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / (s_f[i] - s_f[i - 1])
                coef[i] += c1 * d1
                if k >= 3:
                    c2 = ds * ds / 2.0 + float(phi[i + 1]) * i2
                    d1_prev = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / (s_f[i - 1] - s_f[i - 2])
                    coef[i] += c2 * (d1 - d1_prev) / ((s_f[i] - s_f[i - 2]) / 2.0)
        coef *= a1[:, None]
        return self.x0_plan(model, grid, cx, coef, orders, noise)


@register
class ERSDE1(_ERSDE):
    """ER-SDE-Solver-1 (Cui et al. 2023, eq. 16, Alg. 1): first order; with noise_scale="ode" it is DDIM."""

    info = SolverInfo("er-sde-1", order=1, nfe_per_step=1, stochastic=True, needs="x0",
                      paper=_PAPER + "; ER-SDE-Solver-1, phi = s (e^{s^0.3} + 10)")
    max_order = 1


@register
class ERSDE2(_ERSDE):
    """ER-SDE-Solver-2 (Cui et al. 2023, eq. 17, Alg. 2): multistep, one backward difference."""

    info = SolverInfo("er-sde-2", order=2, nfe_per_step=1, stochastic=True, needs="x0", multistep=True,
                      paper=_PAPER + "; ER-SDE-Solver-2, phi = s (e^{s^0.3} + 10)")
    max_order = 2


@register
class ERSDE3(_ERSDE):
    """ER-SDE-Solver-3 (Cui et al. 2023, eq. 18, Alg. 3): multistep, two backward differences (globally second
    order as written in the paper: see the module docstring)."""

    info = SolverInfo("er-sde-3", order=2, nfe_per_step=1, stochastic=True, needs="x0", multistep=True,
                      paper=_PAPER + "; ER-SDE-Solver-3, phi = s (e^{s^0.3} + 10)")
    max_order = 3
