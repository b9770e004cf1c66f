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
import numbers
import operator

import torch

from .kernels.seed import key_from_generator  # noqa: F401  (the seed's own validator lives beside seed_tensor)

__all__ = ["check_model", "check_callback", "check_device", "check_state", "check_bool", "closest",
           "key_from_generator", "callback_wants_denoised", "check_path_args", "as_int", "as_real", "as_times",
           "as_shape", "check_sample_offset", "check_unchanged", "reraise_with_note", "given", "integer"]


# ------------------------------------------------------------------------------------------ scalar arguments
def given(v) -> str:
    """What was passed, for an error message: ``float 2.0``, ``str 'a'``, ``a tensor of shape (2,) and dtype ...``."""
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    return f"{type(v).__name__} {v!r}"


def _is_bool(v) -> bool:
    return isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"))


def integer(v) -> int | None:
    """``v`` as a Python int when it is an integer scalar: an int, a numpy integer or a one-element integer tensor
    (read on the host: call before a loop); None for anything else (bool, float, complex, other tensors)."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool):
            return int(v.reshape(-1)[0])
        return None
    if isinstance(v, numbers.Integral) and not _is_bool(v):
        return int(v)
    return None


def as_int(name: str, v, *, lo: int | None = None, what: str | None = None) -> int:
    """An integer argument (a count, an index) as a Python int: an int, a numpy integer or a one-element integer
    tensor is accepted; bool, float and complex values are refused (TypeError), and values below ``lo`` too
    (ValueError). ``what`` names the expected value in the message (default ``an int [>= lo]``)."""
    i = integer(v)
    if i is None:
        raise TypeError(f"{name} must be {what or ('an int' if lo is None else f'an int >= {lo}')}; got {given(v)}.")
    if lo is not None and i < lo:
        raise ValueError(f"{name}={i} must be >= {lo}.")
    return i


def check_sample_offset(v, first: str = "x[0]") -> int:
    """``sample_offset``: the global index of the first sample of a batch (for sharding), a non-negative int."""
    i = integer(v)
    if i is None or i < 0:
        raise ValueError(f"sample_offset={v!r} must be a non-negative int (the global index of {first}).")
    return i


def as_real(name: str, v, where: str | None = None) -> float:
    """A finite real number as a Python float: an int, a float, a numpy scalar or a one-element real tensor (read on
    the host: call before a loop). Anything else is a TypeError naming what was given, NaN/inf a ValueError.
    ``where`` (e.g. ``"VP"``) prefixes the message as ``VP(name=value): ...``."""
    prefix = f"{where}({name}={v!r}): " if where else ""
    if isinstance(v, torch.Tensor):
        ok = v.numel() == 1 and not (v.is_complex() or v.dtype == torch.bool)
        value = float(v.reshape(-1)[0]) if ok else None
    else:
        value = float(v) if isinstance(v, numbers.Real) and not _is_bool(v) else None
    if value is None:
        raise TypeError(f"{prefix}{name} must be a finite real number (an int, a float, a numpy scalar or a "
                        f"one-element real tensor); got {given(v)}.")
    if not math.isfinite(value):
        raise ValueError(f"{prefix}{name} must be a finite number." if where else
                         f"{name}={value!r} must be a finite number; got {given(v)}.")
    return value


def as_times(name: str, t, expected: str = "a 1-D sequence or tensor of real times") -> torch.Tensor:
    """A sequence or tensor of times as a float64 CPU tensor (a copy; its shape is kept for the caller to check).
    Complex and bool times are refused: a cast would drop the imaginary part or turn True into 1.0."""
    try:
        src = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t, device="cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be {expected}; got {type(t).__name__}.") from e
    if src.is_complex() or src.dtype == torch.bool:
        raise TypeError(f"{name} has {'complex' if src.is_complex() else 'bool'} dtype {src.dtype}; pass real times "
                        f"(a float tensor or a sequence of numbers).")
    if not isinstance(t, torch.Tensor):  # again in float64: Python floats would have been rounded to float32
        src = torch.as_tensor(t, dtype=torch.float64, device="cpu")
    return src.to(device="cpu", dtype=torch.float64).clone()


def as_shape(v, name: str = "noise_or_shape", hint: str = "pass a tensor x(t_max) or a shape of ints like (B, D), e.g. "
             "(16, 2)") -> tuple[int, ...]:
    """A batch-first shape of positive ints (numpy and 0-d integer tensor entries accepted)."""
    try:
        if isinstance(v, (str, bytes, torch.Tensor)) or any(_is_bool(s) for s in v):
            raise TypeError
        shape = tuple(operator.index(s) for s in v)
    except TypeError as e:
        raise TypeError(f"{name}={v!r}: {hint}.") from e
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"{name}={shape} must be batch-first with positive sizes, e.g. (16, 2).")
    return shape


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
    """A ``torch.device`` from None / str / device, with a clear error for a bad name. None is torch's default
    device (``torch.get_default_device()``: the CPU unless ``torch.set_default_device`` says otherwise), where
    ``torch.randn(shape)`` would put its samples."""
    if device is None:  # (torch.get_default_device is not traceable: a compiled call takes the CPU, as before)
        return torch.device("cpu") if torch.compiler.is_compiling() else torch.get_default_device()
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


def _as_time(t, x: torch.Tensor, model) -> torch.Tensor:
    if t is None:
        t = model.path.t_max if math.isfinite(model.path.t_max) else model.path.t_min
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=x.dtype)
        return t.expand(x.shape[0]) if t.numel() == 1 else t
    if _is_bool(t) or not isinstance(t, numbers.Real) or not math.isfinite(t):
        raise ValueError(f"t={t!r} must be a finite path time (a number or a [B] tensor).")
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def check_unchanged(before: torch.Tensor, x: torch.Tensor) -> None:
    """Raise ValueError if the model changed its input ``x`` in place (``before``: a copy of x taken before the
    call; NaNs compare equal to NaNs). One comparison and one host read: a check, not for the hot loop."""
    same = (before == x) | (torch.isnan(before) & torch.isnan(x))
    if not bool(same.all()):
        raise ValueError(
            f"the model changed its input x in place: fn(x, t) receives the solver's live state (no copy is made "
            f"per call), so an in-place update (x.mul_(...), x += ..., out=x) corrupts this and every later step. "
            f"Fix: clone x in the model (x = x.clone()) before modifying it, or use out-of-place operations."
        )


def reraise_with_note(e: BaseException, note: str):
    """Re-raise ``e``, the exception being handled, with ``note`` saying where it happened.

    Python >= 3.11: the same exception object (its type, arguments and traceback unchanged, so ``except
    OutOfMemoryError`` or a caller's own exception class still works), with ``note`` added (PEP 678: printed under
    the message in the traceback, kept in ``e.__notes__``). Python 3.10 has no notes: a RuntimeError carrying the
    note and the original message, chained from ``e`` (``raise ... from e``)."""
    if hasattr(e, "add_note"):
        e.add_note(note)
        raise e
    raise RuntimeError(f"{note}: {type(e).__name__}: {e}") from e


@torch.no_grad()
def check_model(model, x: torch.Tensor, t=None, *, sample: int = 0, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Raise ValueError if ``model`` mixes samples: perturbing sample ``sample`` of ``x`` must leave the
    outputs of every other sample unchanged.

    Two model calls: ``out = model(x, t)`` and ``model(x', t)`` with ``x'`` equal to ``x`` except sample
    ``sample``, moved by ``0.5 (std(x) + 1)`` in every element (a change large enough that a batch mean
    over B samples moves by 0.5 (std + 1) / B). A sample b != ``sample`` whose output moves by more
    than ``atol + rtol * max|out|`` is reported (the default tolerance admits float reassociation, not
    a dependence). With B = 1 there is nothing to compare: one call, for the in-place check below.

    Args:
        model: a ``fs.Model`` or a plain callable ``fn(x, t)``.
        x: a batch-first state ``[B, ...]`` (B >= 2 to test anything), e.g. noise at t_max.
        t: a path time (number or [B] tensor); default the path's t_max (t_min for EDM's infinite t_max).
        sample: which sample to perturb.

    A model that changes its input in place is refused too (ValueError; the fix is to clone x in the model).

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
    tt = _as_time(t, x, model) if isinstance(model, Model) else (
        t if isinstance(t, torch.Tensor) else torch.full((b,), 0.5 if t is None else float(t), dtype=x.dtype,
                                                         device=x.device))
    x_before = x.clone()
    out = model(x, tt)
    check_unchanged(x_before, x)
    if not isinstance(out, torch.Tensor) or out.shape[:1] != x.shape[:1]:
        raise ValueError(f"the model returned {getattr(out, 'shape', type(out).__name__)}; it must return a tensor "
                         f"shaped like x {tuple(x.shape)}.")
    if b < 2:
        return
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
    return as_real(name, v, where=cls)


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
