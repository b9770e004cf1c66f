"""Closed-form reference problems (FORMULAS.md §3, §4, §5): Gaussian and Gaussian-mixture data pushed
along a Gaussian path, and the Ornstein-Uhlenbeck process.

Everything is exact: score, eps, x0 = E[x0 | x_t], v, velocity (the PF-ODE drift), log-density at
every t, an exact sampler at every t, and for Gaussian data the exact flow map of the PF-ODE.
The objects are plain callables: ``fs.Model(prob.eps, path, predicts="eps")`` plugs one in exactly
like a network. Times are path times (data at small t); ``t`` may be a float, a 0-d tensor or a
``[B]`` tensor (one time per sample). ``x`` is batch-first ``[B, *event_shape]``.
"""
from __future__ import annotations

import math

import torch

from .paths import GaussianPath

__all__ = ["Gaussian", "GaussianMixture", "OU"]


def _param(value, name: str, shape=None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, torch.Tensor) else value.detach()
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; got {value!r}.")
    if shape is not None:
        try:
            t = torch.broadcast_to(t, shape)
        except RuntimeError as e:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to {tuple(shape)}.") from e
    return t


def _time(t, x: torch.Tensor | None, event_dims: int, dtype=torch.float64, device=None):
    """t as a tensor broadcastable against [B, *event]: [B, 1, ..., 1] for a [B] time, 0-d otherwise."""
    if x is not None:
        dtype, device = x.dtype, x.device
    tt = torch.as_tensor(t, dtype=dtype, device=device)
    if tt.dim() == 1:
        tt = tt.view(-1, *([1] * event_dims))
    elif tt.dim() != 0:
        raise ValueError(f"t must be a number, a 0-d tensor or a [B] tensor; got shape {tuple(tt.shape)}.")
    return tt


class Gaussian:
    """x0 ~ N(mu, diag(std^2)) along ``path``: p_t = N(alpha mu, C(t)), C = alpha^2 std^2 + sigma^2.

    ``std`` = 0 is a point mass (DDIM is exact on it). FORMULAS.md §3.
    """

    def __init__(self, mu, std, path: GaussianPath):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowsolve.paths object; got {type(path).__name__}.")
        self.mu = _param(mu, "mu")
        if self.mu.dim() == 0:
            self.mu = self.mu.reshape(1)
        self.std = _param(std, "std", self.mu.shape).clone()
        if bool((self.std < 0).any()):
            raise ValueError("std must be >= 0 (0 gives a point mass); got a negative entry.")
        self.path = path
        self.event_shape = tuple(self.mu.shape)
        self.dim = self.mu.numel()

    # -- helpers
    def _coeffs(self, t, x=None, dtype=torch.float64, device=None):
        tt = _time(t, x, len(self.event_shape), dtype, device)
        p = self.path
        al, si = p.alpha(tt), p.sigma(tt)
        ref = x if x is not None else torch.empty(0, dtype=dtype, device=device)
        mu, var0 = self.mu.to(ref), (self.std**2).to(ref)
        return tt, al, si, mu, var0, al * al * var0 + si * si

    def mean(self, t):
        _, al, _, mu, _, _ = self._coeffs(t)
        return al * mu

    def var(self, t):
        return self._coeffs(t)[-1]

    def score(self, x, t):
        _, al, _, mu, _, c = self._coeffs(t, x)
        return -(x - al * mu) / c

    def eps(self, x, t):
        _, al, si, mu, _, c = self._coeffs(t, x)
        return si * (x - al * mu) / c

    def x0(self, x, t):
        _, al, _, mu, var0, c = self._coeffs(t, x)
        return mu + al * var0 * (x - al * mu) / c

    def velocity(self, x, t):
        tt = self._coeffs(t, x)[0]
        return self.path.d_alpha(tt) * self.x0(x, t) + self.path.d_sigma(tt) * self.eps(x, t)

    def v(self, x, t):
        _, al, si, _, _, _ = self._coeffs(t, x)
        return al * self.eps(x, t) - si * self.x0(x, t)

    def log_prob(self, x, t):
        _, al, _, mu, _, c = self._coeffs(t, x)
        lp = -0.5 * (torch.log(2 * math.pi * c) + (x - al * mu) ** 2 / c)
        return lp.reshape(x.shape[0], -1).sum(1)

    def sample(self, n, t, generator=None, dtype=torch.float32, device=None):
        _, al, _, mu, _, c = self._coeffs(t, dtype=torch.float64)
        z = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        return (al * mu + c.sqrt() * z).to(dtype=dtype, device=device)

    def flow(self, x, t_from, t_to):
        """Exact PF-ODE flow map: x_to = alpha_to mu + sqrt(C_to / C_from) (x - alpha_from mu)."""
        _, a0, _, mu, _, c0 = self._coeffs(t_from, x)
        _, a1, _, _, _, c1 = self._coeffs(t_to, x)
        return a1 * mu + torch.sqrt(c1 / c0) * (x - a0 * mu)

    def divergence(self, t):
        """div of the velocity field (x-independent): D f + g^2/2 sum(1/C) (FORMULAS.md §3)."""
        tt, _, _, _, _, c = self._coeffs(t)
        p = self.path
        inv = (1.0 / c).reshape(*c.shape[: c.dim() - len(self.event_shape)], -1).sum(-1) if c.dim() else self.dim / c
        tt = tt.reshape(-1) if tt.dim() else tt
        return self.dim * p.f(tt) + 0.5 * p.g2(tt) * inv


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, diag(std_k^2)) along ``path`` (FORMULAS.md §4). No closed-form flow map."""

    def __init__(self, means, stds, weights, path: GaussianPath):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowsolve.paths object; got {type(path).__name__}.")
        self.means = _param(means, "means")
        if self.means.dim() < 2:
            raise ValueError(f"means must be [K, *event_shape]; got shape {tuple(self.means.shape)}.")
        k = self.means.shape[0]
        stds = _param(stds, "stds")
        if stds.dim() == 1 and stds.shape[0] == k and self.means.dim() > 1:
            stds = stds.view(k, *([1] * (self.means.dim() - 1)))
        self.stds = _param(stds, "stds", self.means.shape).clone()
        if bool((self.stds < 0).any()):
            raise ValueError("stds must be >= 0.")
        w = _param(weights, "weights")
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers (one per component); got {weights!r}.")
        self.weights = w / w.sum()
        self.path = path
        self.event_shape = tuple(self.means.shape[1:])
        self.dim = int(math.prod(self.event_shape))

    def _parts(self, x, t):
        nd = len(self.event_shape)
        tt = _time(t, x, nd)
        if tt.dim():
            tt = tt.unsqueeze(1)  # [B, 1(K), 1...]
        al, si = self.path.alpha(tt), self.path.sigma(tt)
        mu, var0 = self.means.to(x), (self.stds**2).to(x)  # [K, *event]
        c = al * al * var0 + si * si  # [B or 1, K, *event]
        diff = x.unsqueeze(1) - al * mu  # [B, K, *event]
        logn = (-0.5 * (torch.log(2 * math.pi * c) + diff**2 / c)).reshape(*diff.shape[:2], -1).sum(-1)
        logits = torch.log(self.weights.to(x)) + logn  # [B, K]
        return tt, al, si, mu, var0, c, diff, logits

    def _mix(self, gamma, per_component):
        nd = len(self.event_shape)
        return (gamma.view(*gamma.shape, *([1] * nd)) * per_component).sum(1)

    def log_prob(self, x, t):
        return torch.logsumexp(self._parts(x, t)[-1], dim=1)

    def score(self, x, t):
        _, _, _, _, _, c, diff, logits = self._parts(x, t)
        return self._mix(torch.softmax(logits, 1), -diff / c)

    def x0(self, x, t):
        _, al, _, mu, var0, c, diff, logits = self._parts(x, t)
        return self._mix(torch.softmax(logits, 1), mu + al * var0 * diff / c)

    def eps(self, x, t):
        _, _, si, _, _, c, diff, logits = self._parts(x, t)
        return self._mix(torch.softmax(logits, 1), si * diff / c)

    def velocity(self, x, t):
        tt = _time(t, x, len(self.event_shape))
        return self.path.d_alpha(tt) * self.x0(x, t) + self.path.d_sigma(tt) * self.eps(x, t)

    def v(self, x, t):
        tt = _time(t, x, len(self.event_shape))
        return self.path.alpha(tt) * self.eps(x, t) - self.path.sigma(tt) * self.x0(x, t)

    def mean(self, t):
        al = self.path.alpha(torch.as_tensor(t, dtype=torch.float64))
        w = self.weights.view(-1, *([1] * len(self.event_shape)))
        return al * (w * self.means).sum(0)

    def var(self, t):
        tt = torch.as_tensor(t, dtype=torch.float64)
        al, si = self.path.alpha(tt), self.path.sigma(tt)
        w = self.weights.view(-1, *([1] * len(self.event_shape)))
        m = (w * self.means).sum(0)
        second = (w * (self.stds**2 + self.means**2)).sum(0)
        return al * al * (second - m * m) + si * si

    def sample(self, n, t, generator=None, dtype=torch.float32, device=None):
        tt = torch.as_tensor(t, dtype=torch.float64)
        al, si = self.path.alpha(tt), self.path.sigma(tt)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        c = al * al * self.stds[k] ** 2 + si * si
        return (al * self.means[k] + c.sqrt() * z).to(dtype=dtype, device=device)

    def flow(self, x, t_from, t_to):
        raise NotImplementedError(
            "a Gaussian mixture has no closed-form flow map; use a fine float64 reference solve "
            "(e.g. fs.sample with solver='heun' and many steps, its error checked by halving the step)."
        )


class OU:
    """Ornstein-Uhlenbeck process dx = theta (m - x) dt + s dw (FORMULAS.md §5)."""

    def __init__(self, theta: float, m: float, s: float):
        if not (theta > 0 and s > 0 and math.isfinite(m)):
            raise ValueError(f"OU needs theta > 0, s > 0 and finite m; got theta={theta}, m={m}, s={s}.")
        self.theta, self.m, self.s = float(theta), float(m), float(s)

    def drift(self, x, t=None):
        return self.theta * (self.m - x)

    def diffusion(self, t=None):
        return self.s

    def transition_mean(self, x0, t):
        return self.m + (torch.as_tensor(x0, dtype=torch.float64) - self.m) * math.exp(-self.theta * t)

    def transition_var(self, t):
        return self.s**2 / (2 * self.theta) * -math.expm1(-2 * self.theta * t)

    def stationary_mean(self):
        return self.m

    def stationary_var(self):
        return self.s**2 / (2 * self.theta)

    def sample_transition(self, x0, t, generator=None):
        x0 = torch.as_tensor(x0, dtype=torch.float64)
        z = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return self.transition_mean(x0, t) + math.sqrt(self.transition_var(t)) * z

    def euler_maruyama_law(self, x0, h: float, n: int):
        """Exact (mean, var) of n Euler-Maruyama steps of size h from x0: a = 1 - theta h,
        mean = m + a^n (x0 - m), var = s^2 h (1 - a^(2n)) / (1 - a^2)."""
        a = 1.0 - self.theta * h
        mean = self.m + a**n * (torch.as_tensor(x0, dtype=torch.float64) - self.m)
        var = self.s**2 * h * n if a * a == 1.0 else self.s**2 * h * (1 - a ** (2 * n)) / (1 - a * a)
        return mean, torch.as_tensor(var, dtype=torch.float64)
