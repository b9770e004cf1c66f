"""``fs.odeint``: a generic ODE integrator dx/dt = f(x, t) on the same fused kernels and tableaus as the samplers.

    xs = fs.odeint(f, x0, t, solver="rk4")          # xs[i] = x(t[i]), shape [len(t), *x0.shape] (as torchdiffeq)

* ``f(x, t)``: any callable returning dx/dt shaped like x; ``t`` is passed as a 0-d tensor of x's dtype on x's
  device (the state is one system of any shape, not a batch: unlike ``fs.Model``, whose t is a [B] tensor).
* ``t``: a strictly monotone 1-D grid, increasing or decreasing; ``xs[0] = x0``.
* Fixed-step solvers ``euler``, ``midpoint``, ``heun``, ``rk4`` take exactly one step per interval of ``t``:
  every coefficient (h a_ij, h b_j) and stage time is planned once in float64 into device tables read
  through a device step index; each stage is one fused ``lincomb`` call and ``f``'s output is copied into a
  stage buffer (f may return its input or a buffer it reuses). No host sync in the loop.
* Adaptive solvers ``bosh3``, ``dopri5``, ``tsit5`` (embedded pairs, FSAL; ``flowsolve/solvers/adaptive_rk.py``)
  step freely between the output times with the PI controller of ``flowsolve/controller.py`` and land exactly
  on each of them (a step that would pass within 1% of a step of the next output time is stretched or cut to
  end on it). The error norm is the RMS over ALL elements of the state of e / (atol + rtol max(|x_n|, |x_{n+1}|))
  (one system, as scipy's solve_ivp and torchdiffeq), computed with the new state in one fused pass
  (``embedded_step``); reading it is the one host sync per attempted step (two more for the initial-step
  heuristic unless ``h0`` is given).

Tableaus: ``flowsolve/tableaus.py``. The state is float32 or float64 (another float dtype is promoted to
float32); the output has the state's dtype. No gradient flows through ``odeint`` (the fused kernels write in
place; the output is detached); ``f`` runs in the caller's grad mode, so it may use autograd inside.
"""
from __future__ import annotations

import difflib
import math

import torch

from .checks import as_times
from .kernels import lincomb, resolve_backend
from .model import host_default, on_user_device, user_default_device
from .solvers.adaptive_rk import FunctionField, integrate_embedded
from .tableaus import TABLEAUS

__all__ = ["odeint", "FIXED", "ADAPTIVE"]

FIXED = ("euler", "midpoint", "heun", "rk4")
ADAPTIVE = ("bosh3", "dopri5", "tsit5")
DEFAULT_RTOL, DEFAULT_ATOL = 1e-6, 1e-8


def _grid(t) -> torch.Tensor:
    g = as_times("t", t, "a 1-D sequence or tensor of times").reshape(-1)
    if isinstance(t, torch.Tensor) and t.dim() > 1:
        raise ValueError(f"t must be 1-D; got shape {tuple(t.shape)}.")
    if g.numel() < 2:
        raise ValueError(f"t must hold at least 2 times (the start and one output time); got {g.numel()}.")
    ts = g.tolist()  # validated in Python: planning reads no tensor element through the dispatcher
    if not all(math.isfinite(v) for v in ts):
        raise ValueError("t contains NaN or inf; pass finite times.")
    d = [b - a for a, b in zip(ts[:-1], ts[1:])]
    if not (all(v > 0 for v in d) or all(v < 0 for v in d)):
        raise ValueError("t must be strictly monotone (all increasing or all decreasing), with no repeated times.")
    return g


def _odeint_fixed(field, x, out, grid, tab, backend):
    dev, dt = x.device, x.dtype
    t0, t1 = grid[:-1], grid[1:]
    h = t1 - t0
    n, s = h.numel(), tab.stages
    lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
    t_st = torch.stack([t1 if c == 1.0 else torch.minimum(torch.maximum(t0 + c * h, lo), hi) for c in tab.c], 1)
    t_dev = t_st.to(device=dev, dtype=dt)
    on = lambda cols: torch.stack(cols, 1).to(device=dev, dtype=dt)  # noqa: E731
    one, zero = torch.ones_like(h), torch.zeros_like(h)  # host float64, like the grid
    deps = [[j for j in range(i) if tab.a[i][j] != 0.0] for i in range(s)]
    used = [j for j in range(s) if tab.b[j] != 0.0]
    y_tab = [None] + [on([one] + [h * tab.a[i][j] for j in deps[i]] + [zero]) for i in range(1, s)]
    f_tab = on([one] + [h * tab.b[j] for j in used] + [zero])
    ks = [torch.empty_like(x) for _ in range(s)]
    ybuf = torch.empty_like(x)
    # the state alternates between two buffers of its own: a row of ``out`` as the target with the previous
    # row as an input would share one storage, which the kernels resolve with a temporary copy per call
    cur, nxt = x.clone(), torch.empty_like(x)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    for m in range(n):
        t_row = t_dev.index_select(0, step).reshape(-1)
        for i in range(s):
            y = cur if i == 0 else lincomb(ybuf, [cur] + [ks[j] for j in deps[i]], y_tab[i], step, backend=backend)
            field.evaluate(ks[i], y, t_row[i])
        lincomb(nxt, [cur] + [ks[j] for j in used], f_tab, step, backend=backend)
        out[m + 1].copy_(nxt)
        cur, nxt = nxt, cur
        step.add_(1)
    return {"nfe": field.nfe, "steps": n, "rejected": 0, "grid": grid}


def odeint(f, x0: torch.Tensor, t, solver: str = "rk4", *, rtol: float | None = None, atol: float | None = None,
           h0: float | None = None, max_steps: int = 10_000, backend: str | None = None, return_info: bool = False):
    """Integrate dx/dt = f(x, t) from x(t[0]) = x0 and return x at every time of ``t``.

    Args:
        f: callable ``f(x, t) -> dx/dt`` shaped like x; ``t`` is a 0-d tensor (x's dtype and device).
        x0: initial state, any shape (float32/float64; other float dtypes are promoted to float32). Not modified.
        t: strictly monotone 1-D times (increasing or decreasing), at least 2.
        solver: fixed-step "euler" | "midpoint" | "heun" | "rk4" (one step per interval of t) or adaptive
            "bosh3" | "dopri5" | "tsit5".
        rtol, atol: tolerances of an adaptive solver (default 1e-6 / 1e-8); an error for fixed-step solvers.
        h0: first step size of an adaptive solver (default: Hairer's heuristic); max_steps: its limit on
            attempted steps (reaching it raises a RuntimeError naming the fix).
        backend: "auto" | "torch" | "triton" for the fused kernels.
        return_info: also return a dict: nfe (calls of f), steps (accepted), rejected, grid (the accepted
            times, float64, from t[0] to t[-1]), solver.

    Returns: ``xs`` of shape ``[len(t), *x0.shape]`` (``xs[0]`` = x0) [, info].
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(x, t) -> dx/dt; got {type(f).__name__}.")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a tensor; got {type(x0).__name__}.")
    if not x0.is_floating_point():
        raise TypeError(f"x0 has dtype {x0.dtype}; pass a floating-point tensor (float32 or float64).")
    names = FIXED + ADAPTIVE
    if not isinstance(solver, str) or solver not in names:
        match = difflib.get_close_matches(str(solver), names, n=1)
        hint = f" Did you mean {match[0]!r}?" if match else ""
        raise ValueError(f"unknown odeint solver {solver!r}; choose one of {', '.join(names)}.{hint}")
    adaptive = solver in ADAPTIVE
    if not adaptive and (rtol is not None or atol is not None or h0 is not None):
        raise ValueError(
            f"rtol/atol/h0 apply to the adaptive solvers ({', '.join(ADAPTIVE)}); {solver!r} takes one step per "
            f"interval of t (refine t for more accuracy)."
        )
    rtol = DEFAULT_RTOL if rtol is None else rtol
    atol = DEFAULT_ATOL if atol is None else atol
    if adaptive:
        for name, v in (("rtol", rtol), ("atol", atol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a positive finite number.")
        if h0 is not None and (isinstance(h0, bool) or not isinstance(h0, (int, float)) or not (h0 > 0)
                               or not math.isfinite(h0)):
            raise ValueError(f"h0={h0!r} must be a positive finite number or None (Hairer's heuristic).")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} must be a positive int.")
    grid = _grid(t)
    dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
    be = resolve_backend(backend, x0.device)
    user_device = user_default_device()  # None unless torch.set_default_device moved it off the CPU
    field = FunctionField(on_user_device(f, user_device), grad_enabled=torch.is_grad_enabled())
    with torch.no_grad(), host_default(user_device):  # host planning on the CPU; f runs on the user's default
        out = torch.empty((grid.numel(), *x0.shape), dtype=dtype, device=x0.device)
        out[0].copy_(x0.detach())
        tab = TABLEAUS[solver]
        if adaptive:
            x = out[0].clone()

            def on_time(i, state):
                out[i].copy_(state)

            stats = integrate_embedded(tab, field, x, grid.tolist(), rtol=float(rtol), atol=float(atol), h0=h0,
                                       max_steps=max_steps, backend=be, nb=1, name=f"odeint({solver!r})",
                                       fix=" (odeint(..., max_steps=...))", on_time=on_time)
        else:
            stats = _odeint_fixed(field, out[0], out, grid, tab, be)
    if not return_info:
        return out
    info = dict(stats)
    info["solver"] = solver
    return out, info
