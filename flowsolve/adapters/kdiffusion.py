"""k-diffusion denoisers as ``fs.Model`` objects on the EDM path (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Sec. 2 and Table 1).

k-diffusion (Crowson) writes every model as a *denoiser* ``D(x; sigma)``: the clean-data estimate
E[x0 | x] at noise level sigma, for states ``x = x0 + sigma eps`` (no scaling of x: alpha = 1). That is
exactly an x0-prediction on ``fs.paths.EDM`` (alpha = 1, sigma = t), so path time *is* sigma and the
denoiser is called with ``sigma`` as the ``[B]`` time tensor. The PF-ODE velocity the Heun/Euler
samplers integrate is ``dx/dsigma = (x - D(x; sigma)) / sigma`` (EDM eq. 3 with sigma(t) = t; k-diffusion's
``to_d``), which ``fs.Model`` derives from the x0 prediction.

``sigma_data``: with ``sigma_data=None`` the callable is already a denoiser (k-diffusion's ``Denoiser``,
``VDenoiser``, ``CompVisDenoiser``, ``DiscreteEpsDDPMDenoiser`` wrappers, or any ``D(x, sigma)``). With a
number, it is the raw network ``F(x_in, c_noise)`` of EDM's preconditioning (Table 1, "Network and
preconditioning", column EDM), and the adapter builds

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4.
"""
from __future__ import annotations

import math

import torch

from ..model import Model
from ..paths import EDM

__all__ = ["from_k_diffusion", "grid_from_sigmas", "KDiffusionDenoiser"]


class KDiffusionDenoiser:
    """``fn(x, t)`` calling a k-diffusion denoiser ``model(x, sigma, **extra_args)`` with ``sigma = t`` ([B]).

    With ``sigma_data`` set, applies EDM's preconditioning (Karras et al. 2022, Table 1) around a raw
    network ``F(c_in x, c_noise, **extra_args)``. At sigma = 0 the preconditioned denoiser is the identity
    (c_skip = 1, c_out = 0) and F is not called there (c_noise = ln 0 would be -inf).
    """

    def __init__(self, denoiser, sigma_data: float | None = None, extra_args: dict | None = None):
        self.denoiser = denoiser
        self.sigma_data = sigma_data
        self.extra_args = {} if extra_args is None else dict(extra_args)
        self.__name__ = f"k_diffusion({getattr(denoiser, '__name__', type(denoiser).__name__)})"

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.sigma_data is None:
            return self.denoiser(x, t, **self.extra_args)
        sd = self.sigma_data
        sigma = t.reshape(-1, *([1] * (x.dim() - 1)))
        s2 = sigma * sigma + sd * sd
        c_skip, c_out, c_in = sd * sd / s2, sigma * sd / torch.sqrt(s2), torch.rsqrt(s2)
        # sigma = 0 gives D = x exactly; keep F away from ln(0) by evaluating it at a positive placeholder
        positive = t > 0
        c_noise = torch.log(torch.where(positive, t, torch.ones_like(t))) / 4.0
        out = c_skip * x + c_out * self.denoiser(c_in * x, c_noise, **self.extra_args)
        return torch.where(positive.reshape(sigma.shape), out, x)


def _check_sigma_data(sigma_data):
    if sigma_data is None:
        return None
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not (0 < sigma_data < math.inf):
        raise ValueError(
            f"sigma_data={sigma_data!r} must be a positive finite number (the data's standard deviation, 0.5 in "
            f"EDM's image models), or None when the callable is already a denoiser D(x, sigma)."
        )
    return float(sigma_data)


def from_k_diffusion(denoiser, *, sigma_data: float | None = None, sigma_min: float | None = None,
                     sigma_max: float | None = None, extra_args: dict | None = None) -> Model:
    """A k-diffusion denoiser ``D(x, sigma)`` as an x0-model on ``fs.paths.EDM`` (Karras et al. 2022, Sec. 2).

    Args:
        denoiser: ``denoiser(x, sigma, **extra_args) -> x0 estimate``, sigma a ``[B]`` tensor; with
            ``sigma_data`` set, the raw network ``F(c_in x, c_noise, **extra_args)`` instead.
        sigma_data: None (default: ``denoiser`` is a full denoiser) or EDM's sigma_data, to apply the
            Table 1 preconditioning (see the module notes).
        sigma_min, sigma_max: the sampling range of the returned model's path (``fs.paths.EDM``); default:
            the denoiser's own ``sigma_min`` / ``sigma_max`` attributes (k-diffusion's discrete-schedule
            wrappers have them), else EDM's 0.002 and 80.
        extra_args: keyword arguments passed to every call (k-diffusion's ``extra_args``: conditioning).

    Returns:
        ``fs.Model(fn, fs.paths.EDM(sigma_min, sigma_max), predicts="x0")``. Path time is sigma: pass
        ``fs.sample`` a k-diffusion sigma schedule through ``grid_from_sigmas`` and an initial state
        already scaled by sigma_max (``torch.randn(shape) * sigmas[0]``, as k-diffusion does).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x, sigma) -> tensor; got {type(denoiser).__name__}.")
    sd = _check_sigma_data(sigma_data)
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the denoiser; got {type(extra_args).__name__}.")
    lo = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
    hi = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
    lo, hi = float(lo), float(hi)  # k-diffusion stores them as 0-d tensors
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf; got sigma_min={lo}, sigma_max={hi}.")
    return Model(KDiffusionDenoiser(denoiser, sd, extra_args), EDM(sigma_min=lo, sigma_max=hi), predicts="x0")


def grid_from_sigmas(sigmas) -> torch.Tensor:
    """A k-diffusion sigma schedule (``K.get_sigmas_karras(n, ...)``, ``get_sigmas_exponential``, a
    model's ``get_sigmas(n)``) as a flowsolve time grid on ``fs.paths.EDM``: the same numbers, float64, CPU.

    On the EDM path t = sigma, so the grid is the schedule itself. A trailing ``sigma = 0`` (k-diffusion's
    ``append_zero``) is kept: ``fs.sample`` then runs n steps (n + 1 points) and lands exactly on sigma = 0,
    as k-diffusion's samplers do. The x0-model is never evaluated there: Heun/EDM take an Euler step into
    sigma = 0 (Karras et al. 2022, Alg. 1 line 6), whose result is the last denoised estimate D(x; sigma_{n-1});
    DPM-Solver++ makes its last step first order, which gives the same D(x; sigma_{n-1}). Solvers whose
    last step needs the velocity at sigma = 0 raise an error naming the time instead. To stop at the last
    positive sigma instead, pass ``sigmas[:-1]``.

    Raises ValueError for a schedule that is not 1-D, has fewer than 2 points, is not strictly decreasing,
    or has negative / non-finite entries.
    """
    try:
        s = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"sigmas must be a 1-D tensor or sequence of noise levels; got {type(sigmas).__name__}.") from e
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 noise levels; got shape {tuple(s.shape)}.")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"sigmas must be finite and >= 0; got min {float(s.min())}, max {float(s.max())}.")
    if not bool((s[1:] < s[:-1]).all()):
        i = int((s[1:] >= s[:-1]).nonzero()[0])
        raise ValueError(
            f"sigmas must be strictly decreasing (noise to data); sigmas[{i}]={float(s[i]):.6g} <= "
            f"sigmas[{i + 1}]={float(s[i + 1]):.6g}. A repeated final sigma (two zeros) makes the last step a no-op: "
            f"drop the duplicate."
        )
    return s
