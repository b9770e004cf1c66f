"""Flow-matching / rectified-flow velocity models as ``fs.Model`` objects (Lipman et al. 2023, "Flow
Matching for Generative Modeling", eq. 20-23 (conditional OT path); Liu et al. 2023, "Flow Straight and
Fast", rectified flow; Tong et al. 2024, torchcfm).

Those models use the *flow* convention: t' = 0 is noise, t' = 1 is data, ``x_t' = t' x1 + (1 - t') x0``
with x0 ~ N(0, I), and the network predicts ``u'(x, t') = dx/dt'`` (pointing from noise to data; the CFM
target is ``x1 - x0``). flowsolve's ``fs.paths.RectifiedFlow`` uses the diffusion convention
``x_t = (1 - t) x_data + t eps``: t = 1 - t', and along the same trajectories

    u(x, t) = dx/dt = -dx/dt' = -u'(x, 1 - t).

So the model is called at ``t' = 1 - t`` and its output negated; ``fs.Model(..., time_convention="flow")``
does both, folding the sign into the solvers' coefficient tables (no extra pass over memory). This adapter
is that one line, plus the argument order some libraries use.
"""
from __future__ import annotations

from ..model import Model
from ..paths import GaussianPath, RectifiedFlow

__all__ = ["from_flow_matching"]


class _TimeFirst:
    """``fn(x, t)`` calling a velocity field written ``f(t, x)`` (torchdiffeq / torchdyn style)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, x, t):
        return self.fn(t, x)


def from_flow_matching(velocity_fn, *, path: GaussianPath | None = None, t_first: bool = False) -> Model:
    """A velocity model trained with t=0 noise, t=1 data (Lipman et al. 2023; torchcfm; rectified flow).

    Args:
        velocity_fn: ``velocity_fn(x, t') -> u'`` with t' a ``[B]`` tensor in [0, 1] (0 = noise) and
            u' = dx/dt' (noise -> data), shaped like x.
        path: the path the model was trained on, in flowsolve's convention (default
            ``fs.paths.RectifiedFlow()``, the conditional-OT path ``x_t' = t' x1 + (1 - t') x0``);
            must live on t in [0, 1].
        t_first: the callable is ``velocity_fn(t', x)`` (torchdiffeq's ``func(t, y)``; flow_matching's
            ``ODESolver`` and torchcfm's models take ``(x, t)``: the default).

    Returns:
        ``fs.Model(velocity_fn, path, predicts="velocity", time_convention="flow")``: flowsolve calls it at
        t' = 1 - t and uses u = -u' (see the module notes). ``fs.sample(model, shape, ...)`` then runs
        from noise (t = 1, t' = 0) to data (t = 0, t' = 1), and ``fs.log_likelihood`` works on it as is.
    """
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable as velocity_fn(x, t) -> tensor; got {type(velocity_fn).__name__}.")
    path = RectifiedFlow() if path is None else path
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a flowsolve.paths object such as fs.paths.RectifiedFlow(); got {type(path).__name__}.")
    fn = _TimeFirst(velocity_fn) if t_first else velocity_fn
    return Model(fn, path, predicts="velocity", time_convention="flow")
