"""Gaussian probability paths ``x_t = alpha(t) x0 + sigma(t) eps`` (FORMULAS.md §1).

Each path is one small object holding alpha, sigma, their time derivatives, the half log-SNR
``lambda = log(alpha / sigma)`` and its inverse, and the drift / diffusion ``f``, ``g^2`` of the
forward SDE ``dx = f(t) x dt + g(t) dw`` with these marginals:

    f(t)   = d/dt log alpha(t)
    g^2(t) = d sigma^2/dt - 2 f(t) sigma^2 = 2 sigma^2 d/dt log(sigma / alpha)

Convention: data at small t, noise at large t (the diffusion convention). Methods take and return
tensors and keep their dtype; solvers call them in float64 when they build coefficient tables.
Each closed form is written to stay finite at the ends of the range (expm1/log1p; no 0/0 at t=0).
"""
from __future__ import annotations

import math

import torch

from .checks import check_path_args

__all__ = ["GaussianPath", "VP", "VPCosine", "SubVP", "VE", "EDM", "RectifiedFlow"]


def _as_tensor(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


class GaussianPath:
    """Base class. Subclasses define ``log_alpha``, ``sigma`` (and derivatives) and ``t_of_lambda``.

    Attributes:
        t_lo, t_hi: the closed interval of times where the path is defined.
        t_min, t_max: the default sampling range (inside [t_lo, t_hi]).
        default_grid: the time grid ``fs.sample`` uses when none is given.
    """

    name = "path"
    t_lo: float = 0.0
    t_hi: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    default_grid = "logsnr"

    # ----- to override -------------------------------------------------------------------
    def log_alpha(self, t):
        raise NotImplementedError

    def d_log_alpha(self, t):
        """f(t) = d/dt log alpha(t)."""
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    def t_of_lambda(self, lam):
        """Inverse of ``lam(t)``; +inf maps to the time where sigma = 0, -inf to where alpha = 0."""
        raise NotImplementedError

    # ----- derived -----------------------------------------------------------------------
    def alpha(self, t):
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def d_alpha(self, t):
        t = _as_tensor(t)
        return self.alpha(t) * self.d_log_alpha(t)

    def f(self, t):
        return self.d_log_alpha(_as_tensor(t))

    def g2(self, t):
        """g^2 = 2 sigma sigma' - 2 f sigma^2 (override where this is 0 * inf at an end)."""
        t = _as_tensor(t)
        s = self.sigma(t)
        return 2.0 * s * self.d_sigma(t) - 2.0 * self.f(t) * s * s

    def lam(self, t):
        """Half log-SNR lambda(t) = log(alpha / sigma); decreasing in t; +inf where sigma = 0."""
        t = _as_tensor(t)
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior at t_max (data contribution neglected)."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _LinearBetaMixin:
    """log alpha(t) = -(t^2 (bmax - bmin) / 4 + t bmin / 2) (Song et al. 2021, VP SDE)."""

    def _half_int_beta(self, t):
        return t * t * (self.beta_max - self.beta_min) / 4.0 + t * self.beta_min / 2.0

    def log_alpha(self, t):
        return -self._half_int_beta(_as_tensor(t))

    def beta(self, t):
        t = _as_tensor(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def d_log_alpha(self, t):
        return -self.beta(t) / 2.0

    def _t_of_half_int_beta(self, b):
        """Solve a t^2 + c t = b for t >= 0, a = (bmax - bmin)/4, c = bmin/2 (stable near b=0)."""
        a = (self.beta_max - self.beta_min) / 4.0
        c = self.beta_min / 2.0
        return 2.0 * b / (c + torch.sqrt(c * c + 4.0 * a * b))


class VP(_LinearBetaMixin, GaussianPath):
    """Variance-preserving path with linear beta(t) (Song et al. 2021; DDPM's continuous limit).

    alpha = exp(-int_0^t beta / 2), sigma = sqrt(1 - alpha^2), f = -beta/2, g^2 = beta.
    """

    name = "vp"
    default_grid = "logsnr"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        check_path_args(type(self).__name__, t_min=t_min, t_max=t_max, nonnegative=[("beta_min", beta_min)],
                        positive=[("beta_max", beta_max)])
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def sigma(self, t):
        return torch.sqrt(torch.abs(torch.expm1(2.0 * self.log_alpha(t))))  # abs: no -0.0 at t = 0

    def d_sigma(self, t):
        # sigma sigma' = -alpha alpha' = -alpha^2 f
        t = _as_tensor(t)
        return -torch.exp(2.0 * self.log_alpha(t)) * self.d_log_alpha(t) / self.sigma(t)

    def g2(self, t):
        return self.beta(t)

    def lam(self, t):
        la = self.log_alpha(_as_tensor(t))
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lambda(self, lam):
        lam = _as_tensor(lam)
        # alpha^2 = sigmoid(2 lam)  =>  -log alpha = softplus(-2 lam) / 2
        return self._t_of_half_int_beta(torch.nn.functional.softplus(-2.0 * lam) / 2.0)


class SubVP(_LinearBetaMixin, GaussianPath):
    """sub-VP path (Song et al. 2021): alpha as VP, sigma = 1 - alpha^2, g^2 = beta (1 - alpha^4)."""

    name = "subvp"
    default_grid = "logsnr"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        check_path_args(type(self).__name__, t_min=t_min, t_max=t_max, nonnegative=[("beta_min", beta_min)],
                        positive=[("beta_max", beta_max)])
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def sigma(self, t):
        return -torch.expm1(2.0 * self.log_alpha(t))

    def d_sigma(self, t):
        t = _as_tensor(t)
        return -2.0 * torch.exp(2.0 * self.log_alpha(t)) * self.d_log_alpha(t)

    def g2(self, t):
        t = _as_tensor(t)
        return self.beta(t) * -torch.expm1(4.0 * self.log_alpha(t))

    def t_of_lambda(self, lam):
        lam = _as_tensor(lam)
        # alpha / (1 - alpha^2) = e^lam  <=>  sinh(-log alpha) = e^-lam / 2: exact near alpha = 1, finite at +-inf
        return self._t_of_half_int_beta(torch.asinh(0.5 * torch.exp(-lam)))


class VPCosine(GaussianPath):
    """Cosine schedule (Nichol & Dhariwal 2021): alpha = cos(phi(t)) / cos(phi(0)), phi = pi/2 (t+s)/(1+s).

    Variance preserving: sigma = sqrt(1 - alpha^2), g^2 = -2 f. alpha(1) = 0 exactly, so the default
    t_max is clipped to 0.9946 (as DPM-Solver does) where lambda is finite.
    """

    name = "vp_cosine"
    default_grid = "logsnr"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        check_path_args(type(self).__name__, t_min=t_min, t_max=t_max, positive=[("s", s)])
        self.s = float(s)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._phi0 = math.pi / 2.0 * self.s / (1.0 + self.s)

    def _phi(self, t):
        return math.pi / 2.0 * (_as_tensor(t) + self.s) / (1.0 + self.s)

    def log_alpha(self, t):
        # cos(phi)/cos(phi0) = 1 - 2 sin(phi0 + d/2) sin(d/2) / cos(phi0), d = phi - phi0: log1p keeps the
        # digits near t = 0; the clamp keeps sigma^2 = -expm1(2 log alpha) >= 0 under rounding
        # clamp the log1p argument at -1 as well: at t = 1 (alpha = 0) it rounds below -1 in float32 (NaN)
        d = math.pi / 2.0 * _as_tensor(t) / (1.0 + self.s)
        arg = -2.0 * torch.sin(self._phi0 + d / 2) * torch.sin(d / 2) / math.cos(self._phi0)
        return torch.clamp(torch.log1p(torch.clamp(arg, min=-1.0)), max=0.0)

    def d_log_alpha(self, t):
        return -torch.tan(self._phi(t)) * (math.pi / 2.0 / (1.0 + self.s))

    def sigma(self, t):
        # abs: at t = 0, -expm1(-0.0) is -0.0 and sqrt(-0.0) = -0.0 would flip the sign of 1/sigma
        return torch.sqrt(torch.abs(torch.expm1(2.0 * self.log_alpha(t))))

    def d_sigma(self, t):
        t = _as_tensor(t)
        return -torch.exp(2.0 * self.log_alpha(t)) * self.d_log_alpha(t) / self.sigma(t)

    def g2(self, t):
        return -2.0 * self.d_log_alpha(_as_tensor(t))

    def lam(self, t):
        la = self.log_alpha(_as_tensor(t))
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lambda(self, lam):
        lam = _as_tensor(lam)
        c0, s0 = math.cos(self._phi0), math.sin(self._phi0)
        # phi = arccos(alpha c0) through atan2 (well conditioned near phi0); alpha^2 = sigmoid(2 lam)
        phi = torch.atan2(torch.sqrt(s0 * s0 + torch.sigmoid(-2.0 * lam) * c0 * c0), torch.sqrt(torch.sigmoid(2.0 * lam)) * c0)
        return phi * 2.0 * (1.0 + self.s) / math.pi - self.s


class VE(GaussianPath):
    """Variance-exploding path (NCSN; Song et al. 2021): alpha = 1, sigma = smin (smax/smin)^t."""

    name = "ve"
    default_grid = "edm"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0, t_max: float = 1.0):
        check_path_args(type(self).__name__, t_min=t_min, t_max=t_max, positive=[("sigma_min", sigma_min)],
                        increasing=(("sigma_min", sigma_min), ("sigma_max", sigma_max)))
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t):
        return torch.zeros_like(_as_tensor(t))

    def d_log_alpha(self, t):
        return torch.zeros_like(_as_tensor(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(self._log_ratio * _as_tensor(t))

    def d_sigma(self, t):
        return self.sigma(t) * self._log_ratio

    def g2(self, t):
        return 2.0 * self.sigma(t) ** 2 * self._log_ratio

    def t_of_lambda(self, lam):
        return (-_as_tensor(lam) - math.log(self.sigma_min)) / self._log_ratio


class EDM(GaussianPath):
    """EDM path (Karras et al. 2022): alpha = 1, sigma = t; time is the noise level itself."""

    name = "edm"
    t_hi = math.inf
    default_grid = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        check_path_args(type(self).__name__, positive=[("sigma_min", sigma_min)],
                        increasing=(("sigma_min", sigma_min), ("sigma_max", sigma_max)))
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def log_alpha(self, t):
        return torch.zeros_like(_as_tensor(t))

    def d_log_alpha(self, t):
        return torch.zeros_like(_as_tensor(t))

    def sigma(self, t):
        return _as_tensor(t).clone()

    def d_sigma(self, t):
        return torch.ones_like(_as_tensor(t))

    def g2(self, t):
        return 2.0 * _as_tensor(t)

    def t_of_lambda(self, lam):
        return torch.exp(-_as_tensor(lam))


class RectifiedFlow(GaussianPath):
    """Rectified flow / conditional OT path (Liu et al. 2023; Lipman et al. 2023): alpha = 1-t, sigma = t.

    Here t=0 is data and t=1 noise; models trained with Lipman's convention (t'=0 noise) are wrapped
    with ``fs.Model(..., time_convention="flow")``. f = -1/(1-t), g^2 = 2t/(1-t): both blow up at
    t = 1, where only a velocity (or x0 / v) model can be evaluated.
    """

    name = "rectified_flow"
    default_grid = "uniform"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        check_path_args(type(self).__name__, t_min=t_min, t_max=t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t):
        return torch.log1p(-_as_tensor(t))

    def d_log_alpha(self, t):
        return -1.0 / (1.0 - _as_tensor(t))

    def alpha(self, t):
        return 1.0 - _as_tensor(t)

    def d_alpha(self, t):
        return -torch.ones_like(_as_tensor(t))

    def sigma(self, t):
        return _as_tensor(t).clone()

    def d_sigma(self, t):
        return torch.ones_like(_as_tensor(t))

    def g2(self, t):
        t = _as_tensor(t)
        return 2.0 * t / (1.0 - t)

    def t_of_lambda(self, lam):
        return torch.sigmoid(-_as_tensor(lam))
