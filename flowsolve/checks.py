"""Argument checks shared by the public entry points, and ``check_model``: does a model mix samples?

Every check raises with the argument, the value and the fix (DESIGN.md, "Errors"). Checks that read
device memory (``check_model``, finiteness of an input state) run once before a loop, never inside it.

``check_model(model, x, t)`` tests the one assumption flowsolve makes of every callable: samples are
treated independently (DESIGN.md, "Conventions"). The keyed noise gives sample b the same noise in any
batch or shard (Salmon et al. 2011 counters keyed by the global sample index), and the per-sample
divergence of ``fs.log_likelihood`` (Chen et al. 2018, Thm. 1; Hutchinson probes per sample) is the trace
of the per-sample Jacobian only if d out[b] / d x[c] = 0 for b != c. A network with batch statistics
(BatchNorm in train mode, ``x - x.mean(0)``, attention across the batch) breaks both silently: its samples
depend on what else is in the batch, and the Jacobian trace picks up cross terms.
"""
from __future__ import annotations

import difflib
import inspect
import math

import torch

__all__ = ["check_model", "check_callback", "check_device", "check_state", "check_bool", "closest",
           "key_from_generator", "callback_wants_denoised", "check_path_args"]


def closest(name, choices) -> str:
    """`` Did you mean 'x'?`` for the nearest of ``choices`` (difflib), or an empty string."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}={v!r} must be True or False.")
    return v


def check_callback(callback):
    """``callback`` must be None or a callable ``callback(step=, t=, x=[, denoised=])``."""
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback={callback!r} is not callable; pass a function callback(step, t, x, denoised) "
            f"(denoised is optional) or None."
        )
    return callback


def callback_wants_denoised(callback) -> bool:
    """True when ``callback`` accepts a ``denoised`` keyword (a named parameter or ``**kwargs``).

    Callbacks written for the three-argument form ``callback(step, t, x)`` keep working, and the x0
    prediction is then not computed at all."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer it
        return True
    return any(p.name == "denoised" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def check_device(device) -> torch.device:
    """A ``torch.device`` from None / str / device, with a clear error for a bad name."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device={device!r} is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:0'.") from e


def check_state(x: torch.Tensor, name: str = "the initial state") -> None:
    """Shape checks of a batch-first state: no empty dimension (B >= 1, every event size >= 1)."""
    if x.dim() == 0:
        raise ValueError(f"{name} must be batch-first [B, ...]; got a 0-d tensor. Use x.reshape(1, -1).")
    if x.numel() == 0:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} with an empty dimension; pass B >= 1 samples with non-empty events."
        )


def check_finite_state(x: torch.Tensor, name: str = "the initial state") -> None:
    """NaN/inf in a state (one host sync: run it before a loop, only when asked)."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} contains NaN/inf in samples {idx[:8]}{' ...' if len(idx) > 8 else ''}; pass finite values."
        )


def key_from_generator(generator: torch.Generator) -> int:
    """A 64-bit int key drawn from ``generator`` (two 32-bit words, on the generator's device).

    Deterministic: the same generator state gives the same key, so ``torch.Generator().manual_seed(s)``
    reproduces its samples. Like every torch sampling call it advances the generator, so two calls with
    one generator draw two different (reproducible) keys. Returned in int64's signed range."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}.")
    words = torch.randint(0, 2**32, (2,), generator=generator, device=generator.device, dtype=torch.int64).tolist()
    key = (words[1] << 32) | words[0]
    return key - 2**64 if key >= 2**63 else key


def _as_time(t, x: torch.Tensor, model) -> torch.Tensor:
    if t is None:
        t = model.path.t_max if math.isfinite(model.path.t_max) else model.path.t_min
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=x.dtype)
        return t.expand(x.shape[0]) if t.numel() == 1 else t
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"t={t!r} must be a finite path time (a number or a [B] tensor).")
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


@torch.no_grad()
def check_model(model, x: torch.Tensor, t=None, *, sample: int = 0, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Raise ValueError if ``model`` mixes samples: perturbing sample ``sample`` of ``x`` must leave the
    outputs of every other sample unchanged.

    Two model calls: ``out = model(x, t)`` and ``model(x', t)`` with ``x'`` equal to ``x`` except sample
    ``sample``, moved by ``0.5 (std(x) + 1)`` in every element (a change large enough that a batch mean
    over B samples moves by 0.5 (std + 1) / B). A sample b != ``sample`` whose output moves by more
    than ``atol + rtol * max|out|`` is reported (the default tolerance admits float reassociation, not
    a dependence). With B = 1 there is nothing to compare and nothing is raised.

    Args:
        model: a ``fs.Model`` or a plain callable ``fn(x, t)``.
        x: a batch-first state ``[B, ...]`` (B >= 2 to test anything), e.g. noise at t_max.
        t: a path time (number or [B] tensor); default the path's t_max (t_min for EDM's infinite t_max).
        sample: which sample to perturb.

    Note: the model runs twice with gradients off; a BatchNorm in train mode updates its running
    statistics on both calls (put it in ``eval()``, which is also the fix).
    """
    from .model import Model

    if not callable(model):
        raise TypeError(f"model must be a fs.Model or a callable fn(x, t); got {type(model).__name__}.")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor [B, ...]; got {getattr(x, 'dtype', type(x).__name__)}.")
    check_state(x, "x")
    b = x.shape[0]
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < b:
        raise ValueError(f"sample={sample!r} must be an int in [0, {b}) (the sample to perturb).")
    if b < 2:
        return
    tt = _as_time(t, x, model) if isinstance(model, Model) else (
        t if isinstance(t, torch.Tensor) else torch.full((b,), 0.5 if t is None else float(t), dtype=x.dtype,
                                                         device=x.device))
    out = model(x, tt)
    if not isinstance(out, torch.Tensor) or out.shape[:1] != x.shape[:1]:
        raise ValueError(f"the model returned {getattr(out, 'shape', type(out).__name__)}; it must return a tensor "
                         f"shaped like x {tuple(x.shape)}.")
    out = out.clone()
    x2 = x.clone()
    x2[sample] += 0.5 * (float(x.float().std()) + 1.0)
    out2 = model(x2, tt)
    diff = (out2.double() - out.double()).reshape(b, -1).abs().amax(dim=1)
    tol = atol + rtol * float(out.double().abs().max())
    diff[sample] = 0.0
    changed = (diff > tol).nonzero().flatten().tolist()
    if changed:
        shown = ", ".join(str(i) for i in changed[:8]) + (" ..." if len(changed) > 8 else "")
        raise ValueError(
            f"the model mixes samples: perturbing sample {sample} changed the outputs of samples [{shown}] "
            f"(max change {float(diff.max()):.3g} > tolerance {tol:.3g}). fn(x, t) must treat samples independently: "
            f"flowsolve keys noise per sample (sample b gets the same noise in any batch) and takes per-sample "
            f"divergences for log_likelihood, and both are wrong when outputs depend on the rest of the batch. "
            f"Fix: put the network in eval() mode (BatchNorm in train mode uses batch statistics) and remove "
            f"reductions over the batch dimension (x.mean(0), cross-sample attention)."
        )


def _number(cls: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{cls}({name}={v!r}): {name} must be a finite number.")
    return float(v)


def check_path_args(cls: str, *, t_min=None, t_max=None, t_lo: float = 0.0, t_hi: float = 1.0, positive=(),
                    nonnegative=(), increasing=()) -> None:
    """Validate a path constructor's arguments (for ``fs.paths``; raises ValueError naming the argument and fix).

    ``positive`` / ``nonnegative``: (name, value) pairs; ``increasing``: ((name_lo, lo), (name_hi, hi)) that
    must satisfy lo < hi; ``t_min``/``t_max``: the default sampling range, which must satisfy
    t_lo <= t_min < t_max <= t_hi."""
    for name, v in positive:
        if not _number(cls, name, v) > 0:
            raise ValueError(f"{cls}({name}={v!r}): {name} must be > 0.")
    for name, v in nonnegative:
        if not _number(cls, name, v) >= 0:
            raise ValueError(f"{cls}({name}={v!r}): {name} must be >= 0.")
    if increasing:
        (n_lo, lo), (n_hi, hi) = increasing
        if not _number(cls, n_lo, lo) < _number(cls, n_hi, hi):
            raise ValueError(f"{cls}({n_lo}={lo!r}, {n_hi}={hi!r}): need {n_lo} < {n_hi}; swap them.")
    if t_min is not None or t_max is not None:
        lo, hi = _number(cls, "t_min", t_min), _number(cls, "t_max", t_max)
        if not t_lo <= lo < hi <= t_hi:
            raise ValueError(
                f"{cls}(t_min={t_min!r}, t_max={t_max!r}): need {t_lo} <= t_min < t_max <= {t_hi} (the path is "
                f"defined on [{t_lo}, {t_hi}])."
            )


def check_f32_times(times, dtype, what: str) -> None:
    """Refuse a float32 run whose times include one that is nonzero but below float32's smallest normal number
    (1.18e-38): cast to the state's dtype, the model would be evaluated at 0 or a subnormal instead."""
    if dtype == torch.float64:
        return
    tiny = float(torch.finfo(torch.float32).tiny)
    bad = [float(t) for t in times if float(t) != 0.0 and abs(float(t)) < tiny]
    if bad:
        raise ValueError(
            f"{what} reaches t={bad[0]:.3g}, below float32's smallest normal number ({tiny:.3g}): a float32 model "
            f"would be evaluated at another time than planned. Raise t_min (e.g. t_min >= 1e-6, or exactly 0 where "
            f"the path allows it) or pass float64 data."
        )
