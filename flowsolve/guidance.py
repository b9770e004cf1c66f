"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6).

A conditional network ``fn(x, t, cond)`` trained with condition dropout is guided by

    out(x, t) = uncond_out + scale * (cond_out - uncond_out),
    cond_out = fn(x, t, cond),  uncond_out = fn(x, t, uncond)

(Ho & Salimans write w-guidance as (1 + w) cond - w uncond: scale = 1 + w). scale = 1 is the conditional
model, scale = 0 the unconditional one. Both branches run in ONE batched call: the wrapper concatenates
``[x, x]``, ``[t, t]`` and ``[cond, uncond]`` along the batch and splits the output.

Any parameterization. In flowsolve every quantity a solver uses is affine in the raw output at fixed
(x, t): ``target = a(t) x + b(t) raw`` (``fs.Model.conversion``). Both branches see the same x and t, so

    a x + b (u + s (c - u)) = (a x + b u) + s ((a x + b c) - (a x + b u)):

guiding the eps, x0, v, velocity or score output and converting, or converting each branch and guiding,
is the same linear combination with the same scale. (For score = -eps / sigma it is the familiar
score-space form of guidance.) This fails only for nonlinear post-processing of a branch (x0 clipping,
dynamic thresholding), which flowsolve does not do.
"""
from __future__ import annotations

import math
import numbers

import torch

from .model import Model

__all__ = ["CFG", "classifier_free_guidance"]


def _batch_of(value, name: str):
    """Batch sizes of the tensors in a (nested) condition."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; conditions must be batch-first [B, ...] or [1, ...].")
        return {value.shape[0]}
    if isinstance(value, dict):
        return set().union(*[_batch_of(v, f"{name}[{k!r}]") for k, v in value.items()]) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*[_batch_of(v, f"{name}[{i}]") for i, v in enumerate(value)]) if value else set()
    return set()


def _pair(c, u, b: int, where: str = "cond"):
    """Concatenate condition ``c`` (conditional branch) and ``u`` (unconditional) along the batch, each
    expanded from batch 1 to ``b``. Tensors at the same place in matching dicts/lists/tuples are paired;
    any other leaf (a number, a string, None) must be equal in both and is passed as is."""
    if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
        if c.shape[1:] != u.shape[1:]:
            raise ValueError(f"{where}: the conditional tensor has shape {tuple(c.shape)} and the unconditional one "
                             f"{tuple(u.shape)}; they must match after the batch dimension (build uncond like cond, "
                             f"e.g. the embedding of the empty prompt or the null class).")
        parts = []
        for v, which in ((c, "cond"), (u, "uncond")):
            if v.shape[0] == 1 and b != 1:
                v = v.expand(b, *v.shape[1:])
            elif v.shape[0] != b:
                raise ValueError(f"{where}: the {which} tensor has batch {v.shape[0]} but x has batch {b}; pass one "
                                 f"condition per sample or a single one (batch 1) for all.")
            parts.append(v)
        if parts[0].dtype != parts[1].dtype:
            parts[1] = parts[1].to(parts[0].dtype)
        return torch.cat(parts, dim=0)
    if isinstance(c, dict) and isinstance(u, dict):
        if c.keys() != u.keys():
            raise ValueError(f"{where}: cond has keys {sorted(c)} but uncond has {sorted(u)}; give both the same keys.")
        return {k: _pair(c[k], u[k], b, f"{where}[{k!r}]") for k in c}
    if isinstance(c, (list, tuple)) and isinstance(u, (list, tuple)) and len(c) == len(u):
        return type(c)(_pair(ci, ui, b, f"{where}[{i}]") for i, (ci, ui) in enumerate(zip(c, u)))
    if isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
        raise TypeError(f"{where}: cond is {type(c).__name__} and uncond is {type(u).__name__}; to batch the two "
                        f"branches both must be tensors of the same shape (or uncond=None for a separate call).")
    if c != u:
        raise ValueError(f"{where}: the non-tensor parts of cond and uncond differ ({type(c).__name__} {c!r:.40} vs "
                         f"{type(u).__name__} {u!r:.40}); only tensors can differ between the two branches.")
    return c


class CFG:
    """A classifier-free-guided callable ``fn(x, t)`` for ``fs.Model`` (Ho & Salimans 2022, eq. 6).

    Args:
        fn: the conditional network, ``fn(x, t, cond) -> tensor shaped like x`` (any parameterization).
        scale: the guidance scale s in ``uncond + s (cond - uncond)``: a number, a ``[B]`` tensor (one per
            sample), or a callable ``scale(t) -> number or [B] tensor`` of the ``[B]`` time tensor (a
            guidance schedule or interval).
        cond: the condition: a tensor with batch B or 1, or a dict / list / tuple of them.
        uncond: the unconditional input, built like ``cond`` (the null class, the empty prompt's embedding),
            or None: then the unconditional branch is ``fn(x, t, None)`` (a model that drops its condition
            when given None) and, since a None cannot be batched with a tensor, it is a second call.
        cond_kwarg: pass the condition as this keyword (``fn(x, t, **{cond_kwarg: c})``, e.g.
            ``"class_labels"``) instead of the third positional argument.

    With tensors for both ``cond`` and ``uncond`` the two branches run in one call on a batch of 2B
    (``[x, x]``, ``[t, t]``, ``[cond, uncond]``); the first B outputs are the conditional branch.
    ``calls`` counts the calls made to ``fn``.
    """

    def __init__(self, fn, scale, cond=None, uncond=None, *, cond_kwarg: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(x, t, cond) -> tensor; got {type(fn).__name__}.")
        if not callable(scale):
            if isinstance(scale, torch.Tensor):
                if scale.dim() > 1 or not bool(torch.isfinite(scale).all()):
                    raise ValueError(f"scale tensor must be 0-d or [B] and finite; got shape {tuple(scale.shape)}.")
            elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"scale={scale!r} must be a finite number (1 = conditional model, 0 = unconditional, "
                                 f"> 1 guides), a [B] tensor or a callable scale(t).")
        if cond_kwarg is not None and not isinstance(cond_kwarg, str):
            raise TypeError(f"cond_kwarg must be a keyword name (str) or None; got {type(cond_kwarg).__name__}.")
        if cond is None:
            raise ValueError("cond is None: pass the condition (a tensor, or a dict / list / tuple of tensors) as cond=; "
                             "with no condition there is nothing to guide.")
        self.fn, self.scale, self.cond, self.uncond, self.cond_kwarg = fn, scale, cond, uncond, cond_kwarg
        self.calls = 0
        self.__name__ = f"CFG({getattr(fn, '__name__', type(fn).__name__)})"

    def _call(self, x, t, c):
        self.calls += 1
        out = self.fn(x, t, **{self.cond_kwarg: c}) if self.cond_kwarg is not None else self.fn(x, t, c)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the conditional network returned {got} for an input of shape {tuple(x.shape)}; "
                             f"fn(x, t, cond) must return a tensor shaped like x.")
        return out

    def _scale(self, t, out):
        s = self.scale(t) if callable(self.scale) else self.scale
        what = "scale(t)" if callable(self.scale) else "scale"
        if isinstance(s, torch.Tensor):
            if s.dim() > 1 or s.is_complex() or s.dtype == torch.bool:
                raise ValueError(f"{what} returned a tensor of shape {tuple(s.shape)} and dtype {s.dtype}; it must be a "
                                 f"number or a real [B] tensor (one scale per sample, B = {out.shape[0]}).")
            s = s.to(dtype=out.dtype, device=out.device)
            if s.dim() == 1:
                if s.shape[0] not in (1, out.shape[0]):
                    raise ValueError(f"{what} has {s.shape[0]} entries but the batch has {out.shape[0]}; give one "
                                     f"scale per sample or a number.")
                s = s.reshape(-1, *([1] * (out.dim() - 1)))
        elif not isinstance(s, numbers.Real) or isinstance(s, bool):
            raise TypeError(f"{what} gave {type(s).__name__}; it must be a number or a [B] tensor.")
        return s

    def branches(self, x: torch.Tensor, t: torch.Tensor):
        """(cond_out, uncond_out) at (x, t): one batched call when both conditions are tensors."""
        b = x.shape[0]
        if self.uncond is None:  # two calls: own the first output before the second (a model may reuse one buffer)
            return self._call(x, t, self.cond).clone(), self._call(x, t, None)
        out = self._call(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), _pair(self.cond, self.uncond, b))
        return out[:b], out[b:]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, u = self.branches(x, t)
        # lerp(u, c, s) = u + s (c - u), computed so that s = 1 gives c and s = 0 gives u bit for bit
        return torch.lerp(u, c, self._scale(t, c))


def classifier_free_guidance(fn, cond, uncond, scale, *, cond_kwarg: str | None = None):
    """Classifier-free guidance of ``fn(x, t, cond)`` (Ho & Salimans 2022, eq. 6): see ``CFG``.

    ``fn`` may be a raw callable (returns a ``CFG``, a callable ``(x, t)`` to wrap in ``fs.Model``) or an
    ``fs.Model`` whose ``fn`` takes ``(x, t, cond)`` (returns an ``fs.Model`` with the same path,
    parameterization and time convention: guidance commutes with the conversions, see the module notes).
    """
    if isinstance(fn, Model):
        guided = CFG(fn.fn, scale, cond, uncond, cond_kwarg=cond_kwarg)
        return Model(guided, fn.path, predicts=fn.predicts, time_convention=fn.time_convention,
                     check_finite=fn.check_finite)
    return CFG(fn, scale, cond, uncond, cond_kwarg=cond_kwarg)
