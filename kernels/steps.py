"""Named step launchers: thin wrappers over the one fused kernel ``lincomb``.

They take Python numbers for the coefficients and build a one-row table broadcast over all steps
(row stride 0), for callers that step one at a time (tests, scripts, generic integrators). The
sampling loop of ``fs.sample`` does not use them: it calls ``lincomb`` with a whole precomputed
table and a device step index, so that no Python float enters the loop.
"""
from __future__ import annotations

import math

import torch

from .lincomb import lincomb
from .philox import STREAM_STEP


def _row(values, like: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor(values, dtype=dtype, device=like.device).view(1, -1).expand(2**31 - 1, len(values))


def _int_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(value)], dtype=torch.int64, device=device)


def _out(x, out):
    return torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out


def euler_maruyama_step(x, drift, dt: float, g: float, seed, step, *, out=None, sample_offset=0,
                        stream=STREAM_STEP, backend=None):
    """Euler-Maruyama (Kloeden & Platen 1992, eq. 9.1.1): ``out = x + dt * drift + g sqrt(|dt|) z``.

    ``dt`` may be negative (reverse time); ``g`` is a scalar diffusion coefficient. ``z`` is the
    keyed noise of (seed, sample, step, element): ``seed``/``step`` are ints or int64 tensors.
    """
    coef = _row([1.0, dt, g * math.sqrt(abs(dt))], x)
    return lincomb(_out(x, out), [x, drift], coef, _int_tensor(step, x.device), _int_tensor(seed, x.device),
                   sample_offset=sample_offset, stream=stream, backend=backend)


def euler_step(x, velocity, dt: float, *, out=None, backend=None):
    """Explicit Euler: ``out = x + dt * velocity``."""
    coef = _row([1.0, dt, 0.0], x)
    return lincomb(_out(x, out), [x, velocity], coef, _int_tensor(0, x.device), backend=backend)


def heun_step(x, d0, d1, dt: float, *, out=None, backend=None):
    """Heun's corrector (trapezoidal rule; Karras et al. 2022, Alg. 1 line 8):
    ``out = x + dt/2 (d0 + d1)`` with ``d0 = u(x, t)`` and ``d1 = u(x_pred, t + dt)`` evaluated at the
    Euler predictor ``x_pred = x + dt d0`` (``euler_step``).
    """
    coef = _row([1.0, 0.5 * dt, 0.5 * dt, 0.0], x)
    return lincomb(_out(x, out), [x, d0, d1], coef, _int_tensor(0, x.device), backend=backend)
