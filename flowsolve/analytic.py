"""Closed-form reference problems: Gaussian and Gaussian-mixture data pushed along a Gaussian path,
and the Ornstein-Uhlenbeck process. The formulas are those of FORMULAS.md §3 (Gaussian data),
§4 (Gaussian mixtures) and §5 (Ornstein-Uhlenbeck), with the parameterizations of §2.

Everything is exact: score, eps, x0 = E[x0 | x_t], v, velocity (the probability-flow ODE drift
of Song et al. 2021, "Score-based generative modeling through SDEs"), the log-density at every t,
an exact sampler at every t, the divergence of the velocity field (for the instantaneous change of
variables of Chen et al. 2018) and, for Gaussian data, the exact flow map of the PF-ODE. The
v-parameterization is Salimans & Ho 2022; the paths are those of ``flowsolve.paths``. For the OU
process: the exact transition law and the exact law of the Euler-Maruyama scheme itself.

The objects are plain callables: ``fs.Model(prob.eps, path, predicts="eps")`` plugs one in exactly
like a network.

Conventions:
    * ``t`` is the path's time (diffusion convention: data at small t). It may be a Python float,
      a 0-d tensor, or a ``[B]`` tensor (one time per sample, broadcast against x's batch dim).
    * ``x`` is batch-first ``[B, *event_shape]``; every output has x's shape, dtype and device
      (``log_prob`` is ``[B]``). Computation happens in x's dtype (float32 or float64).
    * The parameters are stored in float64 on the CPU and cast to (dtype, device) on use (cached).
    * ``std = 0`` (a point mass) is allowed: x0 is then exactly mu at every t, and the score is
      singular only where sigma(t) = 0 too (there it is genuinely infinite).
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .paths import GaussianPath

__all__ = ["Gaussian", "GaussianMixture", "OU"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _param(value, name: str, fix: str) -> torch.Tensor:
    """A float64 CPU copy of a parameter; ValueError naming ``name`` if it is not finite/real."""
    try:
        if isinstance(value, torch.Tensor):
            out = value.detach().to(device="cpu", dtype=torch.float64)
        else:
            out = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a real number, a sequence or a tensor of reals; got {value!r}. {fix}") from e
    if out.is_complex():
        raise ValueError(f"{name} must be real; got a complex tensor. {fix}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf); got {value!r}. {fix}")
    return out.clone()


def _check_path(path):
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a flowsolve.paths object such as flowsolve.paths.VP(); got {type(path).__name__}.")


def _as_time(t, event_dims: int, dtype, device, batch: int | None = None) -> torch.Tensor:
    """``t`` as a tensor of (dtype, device) that broadcasts against ``[B, *event]``:
    0-d for a number or 0-d tensor, ``[B, 1, ..., 1]`` for a ``[B]`` tensor."""
    tt = torch.as_tensor(t, dtype=dtype, device=device)
    if tt.dim() == 0:
        return tt
    if tt.dim() != 1:
        raise ValueError(f"t must be a number, a 0-d tensor or a [B] tensor (one time per sample); "
                         f"got shape {tuple(tt.shape)}.")
    if batch is not None and tt.shape[0] not in (1, batch):
        raise ValueError(f"t has {tt.shape[0]} times but the batch has {batch} samples: pass one time "
                         f"per sample ([B] tensor) or a single time.")
    return tt.reshape(-1, *([1] * event_dims))


def _t_dtype_device(t):
    """(dtype, device) for a method that has only a time: the time's own if it is a float tensor."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.dtype, t.device
    return torch.float64, torch.device("cpu")


def _sigma_dsigma(path: GaussianPath, t, sigma) -> torch.Tensor:
    """sigma(t) * sigma'(t) = (d sigma^2/dt) / 2, finite at sigma = 0 where sigma' is infinite.

    The direct product where it is finite (e.g. rectified flow at t=1, where f and g^2 are infinite);
    elsewhere g^2/2 + f sigma^2 (FORMULAS.md §1), e.g. VP at t=0 where sigma = 0 and sigma' = inf.
    Selected elementwise with torch.where: no host sync.
    """
    direct = sigma * path.d_sigma(t)
    via_sde = 0.5 * path.g2(t) + path.f(t) * sigma * sigma
    return torch.where(torch.isfinite(direct), direct, via_sde)


def _gain(al, var0, c):
    """alpha std^2 / C, exactly 0 where std = 0 (point mass: E[x0|x_t] = mu even where C = 0)."""
    g = al * var0 / c
    return torch.where(var0 == 0, torch.zeros_like(g), g)


class _Cast:
    """Cache of a problem's float64 parameters cast to a (dtype, device)."""

    def __init__(self, **params):
        self._params = params
        self._cache: dict = {}

    def __call__(self, dtype, device):
        key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
        out = self._cache.get(key)
        if out is None:
            out = {k: v.to(dtype=key[0], device=key[1]) for k, v in self._params.items()}
            self._cache[key] = out
        return out


def _sample_device(generator, device):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Gaussian data (FORMULAS.md §3)
# ---------------------------------------------------------------------------------------------
class Gaussian:
    """x0 ~ N(mu, Sigma) pushed along a GaussianPath (FORMULAS.md §3), Sigma = diag(std^2) by default.

    p_t = N(alpha mu, C(t)) with C(t) = alpha^2 Sigma + sigma^2 I.

    Args:
        mu: the mean; a float, a sequence or a tensor. Its shape is the event shape (a float gives
            event shape ``(1,)``).
        std: per-dimension standard deviation, mu's shape or a single number; >= 0 (0 is a point
            mass). With a rotation: the square roots of Sigma's eigenvalues.
        path: a ``flowsolve.paths`` object.
        rotation: optional orthogonal ``[D, D]`` matrix R (D = mu.numel(), acting on the flattened
            event): Sigma = R diag(std^2) R^T, a full covariance. ``Gaussian.from_covariance(mu, cov,
            path)`` builds it from a covariance matrix. Every C(t) shares R's eigenbasis, so each closed
            form is the diagonal one applied to R^T (x - alpha mu). With a rotation the velocity field's
            Jacobian is not diagonal, which a test of the Hutchinson estimator's variance needs (with a
            diagonal Jacobian Rademacher probes are exact; FORMULAS.md §7).
    """

    def __init__(self, mu, std, path: GaussianPath, *, rotation=None):
        _check_path(path)
        mu = _param(mu, "mu", "Pass the mean as a float, a sequence or a tensor of finite numbers.")
        if mu.dim() == 0:
            mu = mu.reshape(1)
        std = _param(std, "std", "Pass a standard deviation >= 0 per dimension of mu, or a single number.")
        if std.numel() == 1 and std.shape != mu.shape:
            std = std.reshape(()).expand(mu.shape)
        elif std.shape != mu.shape:
            raise ValueError(f"std has shape {tuple(std.shape)} but mu has shape {tuple(mu.shape)}: pass one "
                             f"std per entry of mu (same shape), or a single number for all of them.")
        if bool((std < 0).any()):
            raise ValueError(f"std must be >= 0 (0 gives a point mass); got a negative entry {float(std.min())}. "
                             f"Pass standard deviations, not log-scales or signed values.")
        self.mu = mu
        self.std = std.contiguous().clone()
        self.path = path
        self.event_shape = tuple(mu.shape)
        self.dim = int(mu.numel())
        self.rotation = None if rotation is None else self._check_rotation(rotation)
        extra = {} if self.rotation is None else {"rot": self.rotation}
        self._cast = _Cast(mu=self.mu, var0=self.std * self.std, **extra)

    def __repr__(self) -> str:
        rot = "" if self.rotation is None else ", rotation=[D, D]"
        return f"Gaussian(event_shape={self.event_shape}, path={self.path!r}{rot})"

    def _check_rotation(self, rotation) -> torch.Tensor:
        r = _param(rotation, "rotation", "Pass an orthogonal [D, D] matrix (e.g. torch.linalg.qr(A).Q).")
        d = self.dim
        if tuple(r.shape) != (d, d):
            raise ValueError(f"rotation has shape {tuple(r.shape)}; it must be an orthogonal [{d}, {d}] matrix acting on "
                             f"the flattened event (D = mu.numel() = {d}).")
        err = float((r.T @ r - torch.eye(d, dtype=torch.float64)).abs().max())
        if err > 1e-10:
            raise ValueError(f"rotation is not orthogonal (max |R^T R - I| = {err:.3g}); pass an orthogonal matrix such "
                             f"as torch.linalg.qr(A).Q, or use Gaussian.from_covariance(mu, cov, path).")
        return r.contiguous()

    @classmethod
    def from_covariance(cls, mu, cov, path: GaussianPath) -> "Gaussian":
        """N(mu, cov) for a symmetric positive semi-definite ``[D, D]`` ``cov`` (D = mu.numel()),
        through its eigendecomposition cov = R diag(std^2) R^T."""
        m = _param(mu, "mu", "Pass the mean as a float, a sequence or a tensor of finite numbers.")
        shape = tuple(m.shape) if m.dim() else (1,)
        d = int(m.numel())
        c = _param(cov, "cov", "Pass a symmetric positive semi-definite [D, D] matrix.")
        if tuple(c.shape) != (d, d):
            raise ValueError(f"cov has shape {tuple(c.shape)}; it must be [{d}, {d}] for a mean with {d} entries.")
        scale = max(1.0, float(c.abs().max()))
        if float((c - c.T).abs().max()) > 1e-12 * scale:
            raise ValueError("cov must be symmetric; pass (cov + cov.T) / 2.")
        evals, evecs = torch.linalg.eigh(c)
        if float(evals.min()) < -1e-12 * scale:
            raise ValueError(f"cov must be positive semi-definite; its smallest eigenvalue is {float(evals.min()):.3g}.")
        return cls(mu, evals.clamp_min(0.0).sqrt().reshape(shape), path, rotation=evecs)

    def _eig(self, v, p):
        """R^T v per sample: coordinates in Sigma's eigenbasis (identity without a rotation)."""
        if self.rotation is None:
            return v
        return (v.reshape(v.shape[0], self.dim) @ p["rot"]).reshape(v.shape)

    def _uneig(self, w, p):
        """R w per sample (back from the eigenbasis)."""
        if self.rotation is None:
            return w
        return (w.reshape(w.shape[0], self.dim) @ p["rot"].T).reshape(w.shape)

    # -- internals -------------------------------------------------------------------------
    def _coeffs(self, t, dtype, device, batch=None):
        tt = _as_time(t, len(self.event_shape), dtype, device, batch)
        p = self._cast(dtype, device)
        al, si = self.path.alpha(tt), self.path.sigma(tt)
        c = al * al * p["var0"] + si * si
        return tt, al, si, p["mu"], p["var0"], c

    def _x(self, x, t):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [B, *{self.event_shape}]; got {type(x).__name__}.")
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, *event_shape] = [B, *{self.event_shape}].")
        return self._coeffs(t, x.dtype, x.device, x.shape[0])

    # -- marginal moments ------------------------------------------------------------------
    def mean(self, t):
        """alpha(t) mu: event shape for a scalar t, [B, *event] for a [B] t."""
        _, al, _, mu, _, _ = self._coeffs(t, *_t_dtype_device(t))
        return al * mu

    def var(self, t):
        """Per-dimension variance: C(t) = alpha^2 std^2 + sigma^2; with a rotation the diagonal of the full
        covariance, sum_k R_jk^2 c_k (``cov`` gives the whole matrix)."""
        dtype, device = _t_dtype_device(t)
        c = self._coeffs(t, dtype, device)[-1]
        if self.rotation is None:
            return c
        r2 = self._cast(dtype, device)["rot"] ** 2
        lead = c.shape[: c.dim() - len(self.event_shape)]
        return (c.expand(*lead, *self.event_shape).reshape(*lead, self.dim) @ r2.T).reshape(*lead, *self.event_shape)

    def cov(self, t) -> torch.Tensor:
        """The full covariance C(t) = R diag(alpha^2 std^2 + sigma^2) R^T, ``[D, D]``, for one time t."""
        dtype, device = _t_dtype_device(t)
        c = self._coeffs(t, dtype, device)[-1]
        if c.dim() > len(self.event_shape):
            raise ValueError("cov(t) takes one time (a number or a 0-d tensor).")
        c = c.expand(self.event_shape).reshape(1, self.dim)
        r = torch.eye(self.dim, dtype=dtype, device=device) if self.rotation is None else self._cast(dtype, device)["rot"]
        return (r * c) @ r.T

    def jacobian(self, t) -> torch.Tensor:
        """Jacobian of the velocity field, A(t) = f I + g^2/2 C(t)^-1 (x-independent), ``[D, D]``, one time t.

        Per eigenvalue c_k of C(t): (alpha alpha' std_k^2 + sigma sigma') / c_k, the form of ``divergence``."""
        dtype, device = _t_dtype_device(t)
        tt, al, si, _, var0, c = self._coeffs(t, dtype, device)
        if c.dim() > len(self.event_shape):
            raise ValueError("jacobian(t) takes one time (a number or a 0-d tensor).")
        lam = ((al * self.path.d_alpha(tt) * var0 + _sigma_dsigma(self.path, tt, si)) / c).expand(self.event_shape)
        r = torch.eye(self.dim, dtype=dtype, device=device) if self.rotation is None else self._cast(dtype, device)["rot"]
        return (r * lam.reshape(1, self.dim)) @ r.T

    def integrated_jacobian(self, t_from, t_to) -> torch.Tensor:
        """M = int_{t_from}^{t_to} A(t) dt = R diag(log(c_k(t_to) / c_k(t_from)) / 2) R^T, ``[D, D]``.

        Closed form because f + g^2 / (2 c) = (1/2) d/dt log c for each eigenvalue c(t) = alpha^2 s^2 + sigma^2.
        tr M is the log-density change along the flow (FORMULAS.md §6), and a Hutchinson probe z held fixed
        along a trajectory estimates it by z^T M z: its variance is 2 ||M||_F^2 (Gaussian z) or
        2 (||M||_F^2 - sum_i M_ii^2) (Rademacher z), FORMULAS.md §7."""
        dtype, device = _t_dtype_device(t_from)
        c0 = self._coeffs(t_from, dtype, device)[-1]
        c1 = self._coeffs(t_to, dtype, device)[-1]
        if c0.dim() > len(self.event_shape) or c1.dim() > len(self.event_shape):
            raise ValueError("integrated_jacobian takes one t_from and one t_to (numbers or 0-d tensors).")
        lam = (0.5 * torch.log(c1 / c0)).expand(self.event_shape).reshape(1, self.dim)
        r = torch.eye(self.dim, dtype=dtype, device=device) if self.rotation is None else self._cast(dtype, device)["rot"]
        return (r * lam) @ r.T

    # -- parameterizations (FORMULAS.md §2, §3) -------------------------------------------
    # With a rotation, every map below is applied in Sigma's eigenbasis: d = R^T (x - alpha mu), then R back.
    def _d(self, x, t):
        tt, al, si, mu, var0, c = self._x(x, t)
        p = self._cast(x.dtype, x.device) if self.rotation is not None else None
        return tt, al, si, mu, var0, c, self._eig(x - al * mu, p), p

    def score(self, x, t):
        """-C^-1 (x - alpha mu)."""
        _, _, _, _, _, c, d, p = self._d(x, t)
        return self._uneig(-d / c, p)

    def eps(self, x, t):
        """-sigma score = sigma C^-1 (x - alpha mu)."""
        _, _, si, _, _, c, d, p = self._d(x, t)
        return self._uneig(si * d / c, p)

    def x0(self, x, t):
        """E[x0 | x_t] = mu + alpha Sigma C^-1 (x - alpha mu) (finite at alpha = 0; = mu for std = 0)."""
        _, al, _, mu, var0, c, d, p = self._d(x, t)
        return mu + self._uneig(_gain(al, var0, c) * d, p)

    def v(self, x, t):
        """alpha eps - sigma x0 (Salimans & Ho 2022)."""
        _, al, si, mu, var0, c, d, p = self._d(x, t)
        return self._uneig(al * si * d / c - si * _gain(al, var0, c) * d, p) - si * mu

    def velocity(self, x, t):
        """PF-ODE drift alpha' x0 + sigma' eps (= f x - g^2/2 score), finite where sigma = 0 or alpha = 0."""
        tt, al, si, mu, var0, c, d, p = self._d(x, t)
        da = self.path.d_alpha(tt)
        # sigma' eps = (sigma sigma') C^-1 (x - alpha mu): avoids inf * 0 at sigma = 0
        return da * mu + self._uneig(da * _gain(al, var0, c) * d + _sigma_dsigma(self.path, tt, si) * d / c, p)

    def log_prob(self, x, t):
        """log p_t(x), summed over the event dims: [B]."""
        _, _, _, _, _, c, d, _ = self._d(x, t)
        lp = -0.5 * (torch.log(2.0 * math.pi * c) + d * d / c)
        return lp.expand(x.shape).reshape(x.shape[0], -1).sum(1)

    # -- sampling, flow map, divergence ---------------------------------------------------
    def sample(self, n, t, generator=None, dtype=torch.float32, device=None):
        """n exact samples of p_t: alpha mu + sqrt(C) z. A [B] t needs B == n (or 1)."""
        device = _sample_device(generator, device)
        _, al, _, mu, _, c = self._coeffs(t, dtype, device, int(n))
        z = torch.randn((int(n), *self.event_shape), generator=generator, dtype=dtype, device=device)
        if self.rotation is None:
            return al * mu + c.sqrt() * z
        return al * mu + self._uneig((c.sqrt() * z).expand(z.shape), self._cast(dtype, device))

    def flow(self, x, t_from, t_to):
        """Exact PF-ODE flow map from t_from to t_to (FORMULAS.md §3):
        alpha_to mu + sqrt(C_to / C_from) (x - alpha_from mu), written as r x + (alpha_to - r alpha_from) mu
        so that flow(x, t, t) == x exactly."""
        _, a0, _, mu, _, c0 = self._x(x, t_from)
        _, a1, _, _, _, c1 = self._x(x, t_to)
        r = torch.sqrt(c1 / c0)
        if self.rotation is not None:  # alpha_to mu + R diag(r) R^T (x - alpha_from mu)
            p = self._cast(x.dtype, x.device)
            return a1 * mu + self._uneig(r * self._eig(x - a0 * mu, p), p)
        return r * x + (a1 - r * a0) * mu

    def divergence(self, t):
        """div_x velocity(x, t) = D f + g^2/2 sum_i 1/C_i (x-independent): a 0-d tensor, or [B] for a [B] t.

        Computed as sum_i (alpha alpha' std_i^2 + sigma sigma') / C_i, the same quantity written so that it
        stays finite where f and g^2 are infinite but the velocity is not (rectified flow at t = 1)."""
        dtype, device = _t_dtype_device(t)
        tt, al, si, _, var0, c = self._coeffs(t, dtype, device)
        per_dim = (al * self.path.d_alpha(tt) * var0 + _sigma_dsigma(self.path, tt, si)) / c  # [(B,) *event]
        return per_dim.reshape(tt.shape[0], -1).sum(-1) if tt.dim() else per_dim.sum()


# ---------------------------------------------------------------------------------------------
# Gaussian-mixture data (FORMULAS.md §4)
# ---------------------------------------------------------------------------------------------
class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, diag(std_k^2)) pushed along a GaussianPath (FORMULAS.md §4).

    Args:
        means: ``[K, *event_shape]`` (for 1-D data pass ``[K, 1]``).
        stds: ``[K, *event_shape]``, ``[K]`` (one isotropic std per component) or a single number; >= 0.
        weights: ``[K]`` positive numbers, normalised internally.
        path: a ``flowsolve.paths`` object.

    No closed-form flow map exists: ``flow`` raises NotImplementedError.
    """

    def __init__(self, means, stds, weights, path: GaussianPath):
        _check_path(path)
        means = _param(means, "means", "Pass the component means as a [K, *event_shape] array.")
        if means.dim() < 2:
            raise ValueError(f"means must have shape [K, *event_shape] (at least 2-D); got shape {tuple(means.shape)}. "
                             f"For K components of 1-D data pass means[:, None] (shape [K, 1]).")
        k = means.shape[0]
        if k < 1:
            raise ValueError("means must hold at least one component (K >= 1).")
        event = tuple(means.shape[1:])
        stds = _param(stds, "stds", "Pass stds as [K, *event_shape], [K] or a single number, all >= 0.")
        if stds.shape == means.shape:
            pass
        elif stds.shape == (k,):
            stds = stds.reshape(k, *([1] * len(event))).expand(means.shape)
        elif stds.numel() == 1:
            stds = stds.reshape(()).expand(means.shape)
        else:
            raise ValueError(f"stds has shape {tuple(stds.shape)}; expected {tuple(means.shape)} (= means), "
                             f"({k},) (one std per component) or a single number.")
        if bool((stds < 0).any()):
            raise ValueError(f"stds must be >= 0 (0 gives a point-mass component); got a negative entry "
                             f"{float(stds.min())}.")
        w = _param(weights, "weights", "Pass K positive weights (they are normalised internally).")
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), one per component of means; got shape {tuple(w.shape)}.")
        if bool((w <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers (they are normalised internally); got {weights!r}. "
                             f"Drop components with zero weight.")
        self.means = means
        self.stds = stds.contiguous().clone()
        self.weights = w / w.sum()
        self.path = path
        self.event_shape = event
        self.dim = int(math.prod(event))
        self.n_components = k
        self._cast = _Cast(means=self.means, var0=self.stds * self.stds, weights=self.weights,
                           log_weights=torch.log(self.weights))

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, event_shape={self.event_shape}, path={self.path!r})"

    # -- internals -------------------------------------------------------------------------
    def _parts(self, x, t):
        """Per-component pieces at (x, t): alpha, sigma, C_k, x - alpha mu_k, responsibilities gamma."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [B, *{self.event_shape}]; got {type(x).__name__}.")
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, *event_shape] = [B, *{self.event_shape}].")
        nd = len(self.event_shape)
        tt = _as_time(t, nd, x.dtype, x.device, x.shape[0])
        tk = tt.unsqueeze(1) if tt.dim() else tt  # [B, 1(K), 1, ...]
        p = self._cast(x.dtype, x.device)
        al, si = self.path.alpha(tk), self.path.sigma(tk)
        c = al * al * p["var0"] + si * si  # [(B,) K, *event]
        diff = x.unsqueeze(1) - al * p["means"]  # [B, K, *event]
        logn = (-0.5 * (torch.log(2.0 * math.pi * c) + diff * diff / c)).expand(diff.shape)
        logits = p["log_weights"] + logn.reshape(*diff.shape[:2], -1).sum(-1)  # [B, K]
        return tt, tk, al, si, p, c, diff, logits

    def _mix(self, logits, per_component):
        gamma = torch.softmax(logits, dim=1)
        return (gamma.reshape(*gamma.shape, *([1] * len(self.event_shape))) * per_component).sum(1)

    # -- densities and parameterizations ---------------------------------------------------
    def log_prob(self, x, t):
        """log p_t(x) = logsumexp_k (log w_k + log N(x; alpha mu_k, C_k)): [B]."""
        return torch.logsumexp(self._parts(x, t)[-1], dim=1)

    def score(self, x, t):
        """sum_k gamma_k (-(x - alpha mu_k) / C_k)."""
        _, _, _, _, _, c, diff, logits = self._parts(x, t)
        return self._mix(logits, -diff / c)

    def eps(self, x, t):
        """-sigma score."""
        _, _, _, si, _, c, diff, logits = self._parts(x, t)
        return self._mix(logits, si * diff / c)

    def x0(self, x, t):
        """E[x0 | x_t] = sum_k gamma_k (mu_k + alpha std_k^2 (x - alpha mu_k) / C_k)."""
        _, _, al, _, p, c, diff, logits = self._parts(x, t)
        return self._mix(logits, p["means"] + _gain(al, p["var0"], c) * diff)

    def v(self, x, t):
        """alpha eps - sigma x0."""
        _, _, al, si, p, c, diff, logits = self._parts(x, t)
        return self._mix(logits, al * si * diff / c - si * (p["means"] + _gain(al, p["var0"], c) * diff))

    def velocity(self, x, t):
        """alpha' x0 + sigma' eps (= f x - g^2/2 score)."""
        tt, tk, al, si, p, c, diff, logits = self._parts(x, t)
        da, ss = self.path.d_alpha(tk), _sigma_dsigma(self.path, tk, si)
        return self._mix(logits, da * (p["means"] + _gain(al, p["var0"], c) * diff) + ss * diff / c)

    # -- marginal moments ------------------------------------------------------------------
    def _moments(self, t):
        dtype, device = _t_dtype_device(t)
        tt = _as_time(t, len(self.event_shape), dtype, device)
        p = self._cast(dtype, device)
        w = p["weights"].reshape(-1, *([1] * len(self.event_shape)))
        m0 = (w * p["means"]).sum(0)
        v0 = (w * (p["var0"] + (p["means"] - m0) ** 2)).sum(0)
        return self.path.alpha(tt), self.path.sigma(tt), m0, v0

    def mean(self, t):
        """Mean of the marginal p_t: alpha sum_k w_k mu_k."""
        al, _, m0, _ = self._moments(t)
        return al * m0

    def var(self, t):
        """Per-dimension variance of p_t: alpha^2 sum_k w_k (std_k^2 + (mu_k - m)^2) + sigma^2."""
        al, si, _, v0 = self._moments(t)
        return al * al * v0 + si * si

    def sample(self, n, t, generator=None, dtype=torch.float32, device=None):
        """n exact samples of p_t: k ~ w, then alpha mu_k + sqrt(C_k) z."""
        device = _sample_device(generator, device)
        n = int(n)
        tt = _as_time(t, len(self.event_shape), dtype, device, n)
        p = self._cast(dtype, device)
        k = torch.multinomial(p["weights"], n, replacement=True, generator=generator)
        z = torch.randn((n, *self.event_shape), generator=generator, dtype=dtype, device=device)
        al, si = self.path.alpha(tt), self.path.sigma(tt)
        c = al * al * p["var0"][k] + si * si
        return al * p["means"][k] + c.sqrt() * z

    def flow(self, x, t_from, t_to):
        raise NotImplementedError(
            "GaussianMixture.flow: a Gaussian mixture has no closed-form flow map (FORMULAS.md §4). "
            "Use a fine float64 reference solve instead (a high-order solver such as RK4 or Heun with many "
            "steps on self.velocity), and check its own error by halving the step."
        )


# ---------------------------------------------------------------------------------------------
# Ornstein-Uhlenbeck (FORMULAS.md §5)
# ---------------------------------------------------------------------------------------------
def _real(value, name: str, cond, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(float(value)) or not cond(float(value)):
        raise ValueError(f"{name} must be {what}; got {value!r}.")
    return float(value)


class OU:
    """dx = theta (m - x) dt + s dw (FORMULAS.md §5); theta > 0, s >= 0.

    Returns float64 tensors (or x0's floating dtype where an x0 tensor is given).
    """

    def __init__(self, theta, m, s):
        self.theta = _real(theta, "theta", lambda v: v > 0, "a finite number > 0 (the mean-reversion rate)")
        self.m = _real(m, "m", lambda v: True, "a finite number (the long-run mean)")
        self.s = _real(s, "s", lambda v: v >= 0, "a finite number >= 0 (the noise scale)")

    def __repr__(self) -> str:
        return f"OU(theta={self.theta}, m={self.m}, s={self.s})"

    @staticmethod
    def _x(x0):
        if isinstance(x0, torch.Tensor):
            return x0 if x0.is_floating_point() else x0.to(torch.float64)
        return torch.as_tensor(x0, dtype=torch.float64)

    def drift(self, x, t=None):
        """theta (m - x)."""
        return self.theta * (self.m - x)

    def diffusion(self, t=None):
        """s (additive noise)."""
        return self.s

    def transition_mean(self, x0, t):
        """E[x_t | x_0] = m + (x_0 - m) e^(-theta t)."""
        x0 = self._x(x0)
        tt = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        return self.m + (x0 - self.m) * torch.exp(-self.theta * tt)

    def transition_var(self, t):
        """Var[x_t | x_0] = s^2 / (2 theta) (1 - e^(-2 theta t)) (expm1: accurate for small t)."""
        dtype, device = _t_dtype_device(t)
        tt = torch.as_tensor(t, dtype=dtype, device=device)
        return self.s**2 / (2.0 * self.theta) * -torch.expm1(-2.0 * self.theta * tt)

    def stationary_mean(self):
        return self.m

    def stationary_var(self):
        """s^2 / (2 theta)."""
        return self.s**2 / (2.0 * self.theta)

    def sample_transition(self, x0, t, generator=None):
        """Exact draw of x_t given x_0 (one per entry of x0 broadcast against t)."""
        x0 = self._x(x0)
        mean = self.transition_mean(x0, t)
        var = self.transition_var(torch.as_tensor(t, dtype=x0.dtype, device=x0.device))
        z = torch.randn(torch.broadcast_shapes(mean.shape, var.shape), generator=generator,
                        dtype=x0.dtype, device=x0.device)
        return mean + var.sqrt() * z

    def euler_maruyama_law(self, x0, h, n):
        """Exact (mean, var) of n Euler-Maruyama steps of size h from x0 (FORMULAS.md §5):
        a = 1 - theta h, mean = m + a^n (x0 - m), var = s^2 h (1 - a^(2n)) / (1 - a^2).

        1 - a^2 = theta h (2 - theta h) and 1 - a^(2n) = -expm1(2n log|a|): no cancellation for small h.
        """
        h = _real(h, "h", lambda v: v > 0, "a finite step size > 0")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer number of steps >= 0; got {n!r}.")
        x0 = self._x(x0)
        th = self.theta * h
        a = 1.0 - th
        mean = self.m + a**n * (x0 - self.m)
        one_minus_a2 = th * (2.0 - th)
        if a == 0.0:
            ratio = 1.0 if n > 0 else 0.0
        elif one_minus_a2 == 0.0:  # a = -1: |a|^(2k) = 1 for every k
            ratio = float(n)
        else:
            log_abs_a = math.log1p(-th) if th < 1.0 else math.log(th - 1.0)
            ratio = -math.expm1(2.0 * n * log_abs_a) / one_minus_a2
        var = torch.full_like(mean, self.s**2 * h * ratio)
        return mean, var
