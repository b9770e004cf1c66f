"""Langevin dynamics on the fused kernel: the unadjusted Langevin algorithm (ULA) on a fixed score,
and annealed Langevin dynamics over noise levels (Song & Ermon 2019, "Generative Modeling by
Estimating Gradients of the Data Distribution", Algorithm 1).

    ULA:       x_{k+1} = x_k + (eta/2) score(x_k) + sqrt(eta) z_k            (Roberts & Tweedie 1996)
    annealed:  for each noise level t_i (sigma_i decreasing), T steps of ULA on score(., t_i) with
               eta_i = eps * sigma_i^2 / sigma_L^2.

On a Gaussian target N(m, s^2) ULA is AR(1) with a = 1 - eta/(2 s^2): mean m + a^n (x_0 - m) and
stationary variance s^2 / (1 - eta/(4 s^2)), an O(eta) bias (FORMULAS.md §5b). Each step is one
``lincomb`` call with keyed noise (stream 0, keyed by the step number), so chains are batch-invariant.

Seeds: an int, a numpy integer, a one-element integer tensor or a torch.Generator key the noise; ``seed=None``
(the default) draws a fresh 64-bit key from torch's global CPU generator, so each call runs new chains and
``torch.manual_seed`` makes it repeatable; ``return_info=True`` reports the key as ``info["seed"]``.
"""
from __future__ import annotations

import math

import torch

from .checks import as_times, check_bool, check_sample_offset, integer
from .kernels import lincomb, resolve_backend
from .kernels.seed import resolve_seed, seed_tensor, seed_value
from .model import Model


def _state(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError("x must be a batch-first floating-point tensor [B, ...] (the chains' initial states).")
    return x.to(torch.float32 if x.dtype not in (torch.float32, torch.float64) else x.dtype).clone(
        memory_format=torch.contiguous_format)


def langevin(score, x, step_size: float, n_steps: int, *, seed=None, sample_offset: int = 0, backend=None,
             callback=None, return_info: bool = False):
    """Unadjusted Langevin on a fixed score callable ``score(x) -> tensor shaped like x``.

    Returns the states after ``n_steps`` steps of size ``step_size`` (eta) [, info: ``seed``, ``steps``, ``nfe``].
    Noise is keyed by (seed, global sample, step, element); ``seed=None`` draws a fresh key (module notes).
    """
    if not callable(score):
        raise TypeError("score must be callable as score(x) -> tensor shaped like x.")
    if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size={step_size!r} must be a positive number (the Langevin eta).")
    if integer(n_steps) is None or integer(n_steps) < 1:  # an int, a numpy integer or a one-element integer tensor
        raise ValueError(f"n_steps={n_steps!r} must be a positive int.")
    n_steps = integer(n_steps)
    sample_offset = check_sample_offset(sample_offset)
    check_bool("return_info", return_info)
    x = _state(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    coef = torch.tensor([[1.0, step_size / 2.0, math.sqrt(step_size)]], dtype=acc, device=x.device)
    coef = coef.expand(2**31 - 1, 3)  # one row for every step; the step index keys the noise
    step = torch.zeros(1, dtype=torch.int64, device=x.device)
    be = resolve_backend(backend, x.device)
    seed = resolve_seed(seed)
    seed_t = seed_tensor(seed, x.device)
    for k in range(n_steps):
        s = score(x)
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            raise ValueError(f"score(x) must return a tensor shaped like x {tuple(x.shape)}.")
        lincomb(x, [x, s], coef, step, seed_t, sample_offset=sample_offset, backend=be)
        step.add_(1)
        if callback is not None:
            callback(step=k, x=x)
    return (x, {"seed": seed_value(seed), "steps": n_steps, "nfe": n_steps}) if return_info else x


def annealed_langevin(model: Model, x, levels, steps_per_level: int = 100, eps: float = 2e-5, *, seed=None,
                      sample_offset: int = 0, backend=None, return_info: bool = False):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) with a ``fs.Model`` on its path.

    ``levels``: decreasing path times t_1 > ... > t_L (noise levels sigma_i = sigma(t_i) > 0).
    Step size at level i: eta_i = eps * sigma_i^2 / sigma_L^2. The score conversion is folded into the
    coefficient table (one fused call per step, no extra pass). Returns the states [, info: ``seed``, ``steps``,
    ``nfe``]; ``seed=None`` draws a fresh key (module notes).
    """
    if not isinstance(model, Model):
        raise TypeError("model must be a fs.Model (wrap your callable with fs.Model(fn, path, predicts=...)).")
    if integer(steps_per_level) is None or integer(steps_per_level) < 1:
        raise ValueError(f"steps_per_level={steps_per_level!r} must be a positive int.")
    steps_per_level = integer(steps_per_level)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a positive number.")
    sample_offset = check_sample_offset(sample_offset)
    check_bool("return_info", return_info)
    t = as_times("levels", levels, "a sequence of path times").reshape(-1)
    if t.numel() < 1 or not bool(torch.isfinite(t).all()) or (t.numel() > 1 and not bool((t[1:] < t[:-1]).all())):
        raise ValueError("levels must be a non-empty, finite, strictly decreasing sequence of path times.")
    with torch.device("cpu"):  # host planning in float64, whatever torch.set_default_device says
        sig = model.path.sigma(t)
        if not bool((sig > 0).all()):
            raise ValueError("every noise level needs sigma(t) > 0 (the score is infinite at sigma = 0).")
        a, b = model.conversion("score", t)  # score = a x + b raw
        eta = eps * sig**2 / sig[-1] ** 2
        rows = torch.stack([1.0 + eta * a / 2.0, eta * b / 2.0, eta.sqrt()], 1).repeat_interleave(steps_per_level, 0)
    x = _state(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    table = rows.to(device=x.device, dtype=acc)
    t_rows = t.repeat_interleave(steps_per_level).to(device=x.device, dtype=x.dtype)
    step = torch.zeros(1, dtype=torch.int64, device=x.device)
    be = resolve_backend(backend, x.device)
    seed = resolve_seed(seed)
    seed_t = seed_tensor(seed, x.device)
    for _ in range(rows.shape[0]):
        raw = model(x, t_rows.index_select(0, step).expand(x.shape[0]))
        lincomb(x, [x, raw], table, step, seed_t, sample_offset=sample_offset, backend=be)
        step.add_(1)
    n = rows.shape[0]
    return (x, {"seed": seed_value(seed), "steps": n, "nfe": n}) if return_info else x
