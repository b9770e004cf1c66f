"""``fs.Model``: any callable ``fn(x, t)`` plus what it predicts, on a Gaussian path.

All conversions between parameterizations live here (FORMULAS.md §2). Every quantity a solver
may need (x0, eps, score, v, velocity) is affine in the state x and the raw network output:
``target = a(t) x + b(t) raw``. ``Model.conversion(target, t)`` returns (a, b) in float64, and the
solvers fold them into their coefficient tables, so a conversion costs no extra pass over memory.

The two-step recipe: the raw output and ``x = alpha x0 + sigma eps`` determine the pair (x0, eps)
(a 2x2 linear solve per kind); every target is a fixed combination of (x0, eps):

    kind       x0                               eps
    eps        (x - sigma raw) / alpha          raw
    score      (x + sigma^2 raw) / alpha        -sigma raw
    x0         raw                              (x - alpha raw) / sigma
    v          (alpha x - sigma raw) / n2       (sigma x + alpha raw) / n2,   n2 = alpha^2 + sigma^2
    velocity   (sigma' x - sigma raw) / det     (alpha raw - alpha' x) / det,  det = alpha sigma' - sigma alpha'

    score = -eps / sigma,  v = alpha eps - sigma x0,  velocity = alpha' x0 + sigma' eps.
"""
from __future__ import annotations

import contextlib
import difflib

import torch

from .checks import check_unchanged, reraise_with_note
from .paths import GaussianPath

PREDICTS = ("score", "eps", "x0", "v", "velocity")
TIME_CONVENTIONS = ("diffusion", "flow")


def _closest(name, choices):
    match = difflib.get_close_matches(str(name), choices, n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


class Model:
    """A callable ``fn(x, t) -> tensor shaped like x`` declared as predicting one parameterization.

    Args:
        fn: the network or analytic function. ``t`` is passed as a ``[B]`` tensor (x's dtype and device).
        path: the ``fs.paths`` object the model was trained on.
        predicts: "score" | "eps" | "x0" | "v" | "velocity".
        time_convention: "diffusion" (data at t=0, noise at t=1; the library's convention) or "flow"
            (Lipman et al.: t=0 noise, t=1 data). For "flow" the model is called at ``1 - t`` and a
            velocity output is negated (u' = -u); only meaningful on paths whose time runs over [0, 1].
        check_finite: check every model output for NaN/inf (one host sync per evaluation; off by
            default so that the sampling loop never syncs).

    The callable must treat samples independently (needed for per-sample noise and divergence);
    ``fs.check_model(model, x, t)`` tests it. The output must be a floating-point tensor on x's device;
    a float16/bfloat16 output (half weights, autocast) is cast to x's dtype, so the solver state and
    its coefficients stay in fp32/fp64.
    """

    def __init__(self, fn, path: GaussianPath, predicts: str = "eps", time_convention: str = "diffusion",
                 check_finite: bool = False):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(x, t) -> tensor; got {type(fn).__name__}.")
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowsolve.paths object such as fs.paths.VP(); got {type(path).__name__}.")
        if not isinstance(predicts, str) or predicts not in PREDICTS:
            raise ValueError(f"predicts={predicts!r} is not one of {PREDICTS}.{_closest(predicts, PREDICTS)}")
        if not isinstance(time_convention, str) or time_convention not in TIME_CONVENTIONS:
            raise ValueError(
                f"time_convention={time_convention!r} is not one of {TIME_CONVENTIONS}.{_closest(time_convention, TIME_CONVENTIONS)}"
            )
        if time_convention == "flow" and not (path.t_lo == 0.0 and path.t_hi == 1.0):
            raise ValueError("time_convention='flow' maps t -> 1 - t and needs a path on [0, 1] (e.g. fs.paths.RectifiedFlow()).")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite={check_finite!r} must be True or False.")
        self.fn, self.path, self.predicts = fn, path, predicts
        self.time_convention, self.check_finite = time_convention, bool(check_finite)
        # Lipman's velocity points from noise to data: in our time it is the negative
        self._raw_sign = -1.0 if (time_convention == "flow" and predicts == "velocity") else 1.0

    # ------------------------------------------------------------------ evaluation
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw output of ``fn`` at path time ``t`` ([B] tensor); shape-checked."""
        t_fn = 1.0 - t if self.time_convention == "flow" else t
        try:
            out = self.fn(x, t_fn)
        except RuntimeError as e:
            if torch.is_grad_enabled() or "does not require grad" not in str(e):
                raise
            raise RuntimeError(
                "the model differentiates inside (e.g. a score -grad E(x), classifier guidance) but flowsolve samples "
                "under torch.no_grad(), as k-diffusion does; compute the gradient inside `with torch.enable_grad():` "
                "in fn (x.detach().requires_grad_() there) and return a detached tensor."
            ) from e
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; fn(x, t) must return a tensor shaped like x.")
        if out.shape != x.shape:
            raise ValueError(
                f"the model's output has shape {tuple(out.shape)} but its input x has shape {tuple(x.shape)}; "
                f"fn(x, t) must return a {self.predicts} prediction shaped like x."
            )
        if out.device != x.device:
            raise ValueError(
                f"the model's output is on {out.device} but its input x is on {x.device}; move the model to x's "
                f"device (model.to({str(x.device)!r})) or pass device= / a state tensor on the model's device."
            )
        if not out.is_floating_point():
            raise TypeError(
                f"the model returned dtype {out.dtype}; fn(x, t) must return a floating-point {self.predicts} prediction."
            )
        if out.dtype != x.dtype:
            # a half-precision network (fp16/bf16 weights or autocast): the solver state and its coefficients stay
            # in x's dtype (fp32/fp64), so the update is accumulated there, never in half (DESIGN.md, "Dtypes")
            out = out.to(x.dtype)
        return out

    # ------------------------------------------------------------------ conversions
    def evaluable(self, t: torch.Tensor) -> torch.Tensor:
        """Boolean mask: may the model be evaluated at these (float64) times?

        A score/eps model is not evaluated where sigma = 0 (score infinite, eps unidentifiable) and
        an x0 model not where alpha = 0 (its target carries no information about x there);
        every model needs 0 <= t within the path's range.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        ok = (t >= self.path.t_lo) & (t <= self.path.t_hi)
        if self.predicts in ("score", "eps"):
            ok &= self.path.sigma(t) > 0
        elif self.predicts == "x0":
            ok &= self.path.alpha(t) > 0
        return ok

    def _x0_eps(self, t: torch.Tensor):
        """((a_x0, b_x0), (a_eps, b_eps)) with x0 = a_x0 x + b_x0 raw, eps = a_eps x + b_eps raw."""
        p = self.path
        al, si = p.alpha(t), p.sigma(t)
        k = self.predicts
        if k == "eps":
            return (1.0 / al, -si / al), (torch.zeros_like(t), torch.ones_like(t))
        if k == "score":
            return (1.0 / al, si * si / al), (torch.zeros_like(t), -si)
        if k == "x0":
            return (torch.zeros_like(t), torch.ones_like(t)), (1.0 / si, -al / si)
        if k == "v":
            n2 = al * al + si * si
            return (al / n2, -si / n2), (si / n2, al / n2)
        dal, dsi = p.d_alpha(t), p.d_sigma(t)  # velocity
        det = al * dsi - si * dal
        return (dsi / det, -si / det), (-dal / det, al / det)

    def can_convert(self, target: str, t) -> torch.Tensor:
        """Boolean mask: can the model be evaluated at ``t`` and give ``target`` there (no raising)?"""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        a, b = self._raw_conversion(target, t)
        return torch.isfinite(a) & torch.isfinite(b) & self.evaluable(t)

    def conversion(self, target: str, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 (a, b) with ``target(x, t) = a x + b raw`` at each time in ``t``.

        ``target`` in PREDICTS. Raises ValueError naming the time if the conversion is singular there.
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        a, b = self._raw_conversion(target, t)
        bad = ~(torch.isfinite(a) & torch.isfinite(b)) | ~self.evaluable(t)
        if bool(bad.any()):
            t_bad = float(t[bad][0])
            raise ValueError(
                f"the solver would evaluate this {self.predicts}-model at t={t_bad:.6g} on {type(self.path).__name__} "
                f"(alpha={float(self.path.alpha(torch.tensor(t_bad, dtype=torch.float64))):.3g}, "
                f"sigma={float(self.path.sigma(torch.tensor(t_bad, dtype=torch.float64))):.3g}), where a {self.predicts} "
                f"prediction cannot be turned into the {target} the solver needs. Keep the grid inside the range where "
                f"the model is defined (e.g. t_min > 0 for an eps/score model, t_max < 1 for an eps model on a path "
                f"with alpha(1) = 0), or use a model of another parameterization."
            )
        return a, b

    def _raw_conversion(self, target: str, t: torch.Tensor):
        if target not in PREDICTS:
            raise ValueError(f"target={target!r} is not one of {PREDICTS}.")
        if target == self.predicts:
            a, b = torch.zeros_like(t), torch.ones_like(t)
        else:
            p = self.path
            (ax, bx), (ae, be) = self._x0_eps(t)
            if target == "x0":
                a, b = ax, bx
            elif target == "eps":
                a, b = ae, be
            elif target == "score":
                si = p.sigma(t)
                a, b = -ae / si, -be / si
            elif target == "v":
                al, si = p.alpha(t), p.sigma(t)
                a, b = al * ae - si * ax, al * be - si * bx
            else:
                dal, dsi = p.d_alpha(t), p.d_sigma(t)
                a, b = dal * ax + dsi * ae, dal * bx + dsi * be
        return a, b * self._raw_sign

    def __repr__(self) -> str:
        return f"Model({getattr(self.fn, '__name__', type(self.fn).__name__)}, {self.path!r}, predicts={self.predicts!r})"


# ---------------------------------------------------------------------------------------------- inside a run
def user_default_device() -> torch.device | None:
    """torch's default device when the user moved it off the CPU (``torch.set_default_device('cuda')``, a
    ``with torch.device(...)`` block), else None."""
    if torch.compiler.is_compiling():  # not traceable; a compiled run keeps torch's default as it was traced
        return None
    device = torch.get_default_device()
    return None if device.type == "cpu" else device


def host_default(user_device):
    """A context for a run's own code while the user's default device is ``user_device`` (not None): torch's
    default device is the CPU there, as flowsolve's code assumes: host planning (grids, coefficient tables,
    adaptive step decisions) stays on the host, and every tensor a run puts on the state's device names that
    device. The model itself runs under the user's default (``GuardedModel(model, device=user_device)``). A null
    context when ``user_device`` is None: nothing to do, nothing paid."""
    return contextlib.nullcontext() if user_device is None else torch.device("cpu")


def on_user_device(fn, user_device):
    """``fn`` (a plain callable such as odeint's ``f``) called with ``user_device`` as torch's default device,
    inside a run whose own code holds the CPU as default (``host_default``); ``fn`` itself when None."""
    if user_device is None:
        return fn

    def call(*args, **kwargs):
        with torch.device(user_device):
            return fn(*args, **kwargs)

    return call


class GuardedModel(Model):
    """A run's view of a ``fs.Model``: the same path, parameterization and conversions, each call wrapped.

    Args:
        inner: the model.
        device: torch's default device during the call (the user's own, while the run's code holds the CPU as
            the default: ``host_default``); None leaves it alone.
        check_inplace: copy x before each call and refuse a model that changed it (``checks.check_unchanged``;
            one state copy, one comparison and one host read per call).
        where: ``where(t, call_number) -> str``: an exception raised by the call is re-raised with that note
            (``checks.reraise_with_note``); None re-raises it unchanged.
    """

    def __init__(self, inner: Model, *, device=None, check_inplace: bool = False, where=None):
        self.__dict__.update(inner.__dict__)
        self._inner, self._device, self._check_inplace, self._where = inner, device, check_inplace, where
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        before = x.clone() if self._check_inplace else None
        try:
            with contextlib.nullcontext() if self._device is None else torch.device(self._device):
                out = self._inner(x, t)
            if before is not None:
                check_unchanged(before, x)
        except Exception as e:
            note = self._note(t)
            if note is None:
                raise
            reraise_with_note(e, note)
        return out

    # the inner model's own conversions (a Model subclass may define its own)
    def evaluable(self, t):
        return self._inner.evaluable(t)

    def can_convert(self, target, t):
        return self._inner.can_convert(target, t)

    def conversion(self, target, t):
        return self._inner.conversion(target, t)

    def _raw_conversion(self, target, t):
        return self._inner._raw_conversion(target, t)

    def __repr__(self) -> str:
        return repr(self._inner)

    def _note(self, t) -> str | None:
        if self._where is None:
            return None
        try:
            return self._where(t, self.calls)
        except Exception:  # e.g. t on a device that holds no data: the error goes on without a note
            return None
