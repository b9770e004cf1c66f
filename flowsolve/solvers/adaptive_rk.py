"""Adaptive embedded Runge-Kutta solvers on the PF-ODE / flow ODE: Bogacki-Shampine 3(2) (``bosh3``),
Dormand-Prince 5(4) (``dopri5``) and Tsitouras 5(4) (``tsit5``), with a PI step-size controller.

Papers and equations:
* the pairs: Bogacki & Shampine 1989 (Appl. Math. Lett. 2, eq. 3.1), Dormand & Prince 1980 (J. Comp. Appl.
  Math. 6, Table 2), Tsitouras 2011 (Comput. Math. Appl. 62, Table 1); tableaus in ``flowsolve/tableaus.py``.
  Each propagates its higher-order solution (local extrapolation) and is FSAL: the last stage is evaluated
  at the new point and, when the step is accepted, is the next step's first stage, so an attempted step
  costs s - 1 evaluations (bosh3 3, dopri5 and tsit5 6).
* the error estimate and norm: e = h sum_j (b_j - b_low_j) k_j, err = max_b RMS_j e / (atol + rtol max(|x_n|,
  |x_{n+1}|)) (Hairer, Norsett & Wanner, "Solving ODEs I", Sec. II.4, eq. 4.11); accept iff err <= 1.
* the controller: PI (Gustafsson 1991; Soederlind 2002; HNW II.4), and Hairer's initial-step heuristic
  (HNW II.4, p. 169); see ``flowsolve/controller.py``.

The field is the model's velocity u = a(t) x + b(t) raw (``Model.conversion("velocity", t)``, folded into
the coefficients as in ``runge_kutta.py``): stage i is y_i = x + h sum_j a_ij k_j by one fused ``lincomb``,
then k_i = a(t_i) y_i + b(t_i) raw_i by one more; the new state, the error estimate and its per-sample RMS
norm are ONE pass of ``flowsolve.kernels.embedded_step``.

Host syncs: the step size is chosen on the host, from the error, so an adaptive solver must read device
memory once per attempted step: the batch maximum of the per-sample error norms (one
``aten._local_scalar_dense``), which decides acceptance and the next step. Hairer's initial-step heuristic
adds two (h0 given: none); ``check_finite=True`` adds one per evaluation. Nothing else in the loop reads device
memory: each attempted step's coefficients (float64 host arithmetic on the controller's h) reach the device in
one host-to-device copy (pinned, non-blocking on CUDA), and the kernels read them through a device step index.
So ``info`` may be read as: syncs = attempted steps (+ 2 with the heuristic), tested.

One step size is shared by the batch (the max over samples), so with these solvers a sample's result depends,
within the tolerance, on the batch it is in (the fixed-step solvers are batch-invariant).

End points: the FSAL stage evaluates the model AT the end of every step, t_min included. A model that cannot
give a velocity at t_min (an eps/score model where sigma = 0, an x0 model where alpha = 0) or at t_max is
refused with a ValueError before any evaluation: pass t_min > 0 (the path's default), or take a fixed-step
solver whose last step to sigma = 0 needs no evaluation there (heun, dpm++2m, ...). Steps never leave
[t_min, t_max]: stage times are fractions of the step clamped to it, and the step that would reach within
1% of a step of t_min (HNW's DOPRI5 rule) is stretched to land on it exactly.

A rejected step leaves the state and the FSAL stage untouched (the candidate is written to a separate
buffer, swapped in only on acceptance) and is retried smaller. A NaN/inf error norm (an overflowing trial
step) is a rejection with the smallest factor; nine in a row raise a FloatingPointError (the field itself is
not finite there). ``max_steps`` attempted steps raise a RuntimeError naming the fix; so does a step size that
underflows.
"""
from __future__ import annotations

import math

import torch

from ..controller import PIController, initial_step
from ..kernels import embedded_step, lincomb
from ..tableaus import BOSH3, DOPRI5, TSIT5, Tableau
from .base import AdaptiveSolver, SolverInfo, register

__all__ = ["AdaptiveRungeKutta", "Bosh3", "Dopri5", "Tsit5", "integrate_embedded", "ModelField", "FunctionField"]

_BIG = 2**31 - 1  # rows of a broadcast one-row table (row stride 0: every step index reads row 0)
_MAX_NONFINITE = 8  # consecutive NaN/inf error norms (each shrinking the step 5x) before giving up


class _DeviceRows:
    """A flat float64 host vector -> one device buffer in the accumulation dtype, one transfer per write.

    On CUDA the host side is a pinned buffer copied non-blocking; it is rewritten only after the next host
    read of the error norm, which orders it after the previous copy."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.dev = torch.empty(n, dtype=dtype, device=device)
        self.pinned = torch.empty(n, dtype=torch.float64, pin_memory=True) if device.type == "cuda" else None

    def write(self, values) -> None:
        host = torch.tensor(values, dtype=torch.float64)
        if self.pinned is None:
            self.dev.copy_(host)
        else:
            self.pinned.copy_(host)
            self.dev.copy_(self.pinned, non_blocking=True)

    def table(self, offset: int, width: int) -> torch.Tensor:
        return self.dev[offset:offset + width].view(1, width).expand(_BIG, width)

    def scalar(self, offset: int) -> torch.Tensor:
        return self.dev[offset]


class ModelField:
    """The velocity of a ``fs.Model``: k = a(t) y + b(t) raw(y, t), t passed to the model as a [B] tensor."""

    converts = True

    def __init__(self, model, check_finite: bool, backend: str):
        self.model, self.check_finite, self.backend = model, check_finite, backend
        self.nfe = 0

    def conversion(self, ts: list[float]) -> list[float]:
        """Host float64 (a_1, b_1, a_2, b_2, ...) at the stage times (no tensor read back: ``tolist``)."""
        t = torch.tensor(ts, dtype=torch.float64)
        a, b = self.model._raw_conversion("velocity", t)
        ok = self.model.evaluable(t).tolist()
        out = []
        for ti, ai, bi, oki in zip(ts, a.tolist(), b.tolist(), ok):
            if not (oki and math.isfinite(ai) and math.isfinite(bi)):
                raise ValueError(
                    f"the adaptive solver would evaluate this {self.model.predicts}-model at t={ti:.6g}, where it cannot "
                    f"give a velocity; keep t_min/t_max inside the range where the model is defined."
                )
            out += [ai, bi]
        return out

    def evaluate(self, k_out, y, t0d, conv, step) -> None:
        raw = self.model(y, t0d.expand(y.shape[0]))
        self.nfe += 1
        if self.check_finite and not bool(torch.isfinite(raw).all()):
            raise FloatingPointError(
                f"the model returned NaN/inf at t={float(t0d):.6g}; check the model at this time or raise t_min."
            )
        lincomb(k_out, [y, raw], conv, step, backend=self.backend)


class FunctionField:
    """A plain ``f(x, t) -> dx/dt`` (``fs.odeint``); t is passed as a 0-d tensor; the output is copied into
    the solver's stage buffer (f may return its input or a buffer it reuses). ``f`` runs in the caller's
    grad mode ``grad_enabled`` (it may use autograd inside); the solver's own arithmetic records no graph."""

    converts = False

    def __init__(self, f, check_finite: bool = False, grad_enabled: bool = False):
        self.f, self.check_finite, self.grad_enabled = f, check_finite, grad_enabled
        self.nfe = 0

    def evaluate(self, k_out, y, t0d, conv=None, step=None) -> None:
        with torch.set_grad_enabled(self.grad_enabled):
            out = self.f(y, t0d)
        self.nfe += 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f returned {type(out).__name__}; f(x, t) must return a tensor shaped like x.")
        if out.shape != y.shape:
            raise ValueError(f"f returned shape {tuple(out.shape)} but x has shape {tuple(y.shape)}; f(x, t) must return dx/dt "
                             f"shaped like x.")
        if out.device != y.device:
            raise ValueError(f"f returned a tensor on {out.device} but x is on {y.device}; keep f on x's device.")
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"f returned NaN/inf at t={float(t0d):.6g}.")
        k_out.copy_(out.detach())


def integrate_embedded(tab: Tableau, field, x: torch.Tensor, times: list[float], *, rtol: float, atol: float,
                       h0: float | None, max_steps: int, backend: str, nb: int, name: str, fix: str = "",
                       on_accept=None, on_time=None, controller: PIController | None = None) -> dict:
    """Integrate ``x`` (contiguous, float32/float64, updated in place) through the strictly monotone host
    ``times``, landing exactly on each; ``on_time(i, state)`` on reaching times[i] (i >= 1), ``on_accept(n,
    t, state)`` after every accepted step. The error norm views the state as ``nb`` samples (its RMS per
    sample, maxed). Returns dict(nfe, steps, rejected, grid)."""
    if not tab.adaptive:
        raise ValueError(f"tableau {tab.name} has no embedded error estimate; use a fixed-step integrator.")
    dev, dt = x.device, x.dtype
    s = tab.stages
    deps = [[j for j in range(i) if tab.a[i][j] != 0.0] for i in range(s)]
    err_w = tab.err
    used = [j for j in range(s) if tab.b[j] != 0.0 or err_w[j] != 0.0]
    conv_w = 3 if field.converts else 0
    # one attempted step's coefficient block: per stage i >= 1 the y_i row, the conversion row and the time;
    # then the new-state row and the error row
    layout, off = [], 0
    for i in range(1, s):
        layout.append((off, off + len(deps[i]) + 2, off + len(deps[i]) + 2 + conv_w))
        off += len(deps[i]) + 2 + conv_w + 1
    off_f = off
    off_e = off_f + len(used) + 2
    block = _DeviceRows(off_e + len(used) + 1, dt, dev)
    point = _DeviceRows(7, dt, dev)  # single evaluations: conversion (3), time (1), Euler probe row (3)
    step0 = torch.zeros(1, dtype=torch.int64, device=dev)
    ks = [torch.empty_like(x) for _ in range(s)]
    ybuf = torch.empty_like(x)
    cand = torch.empty_like(x)
    norm = torch.empty(nb, dtype=dt, device=dev)
    flat = lambda v: v.view(nb, -1)  # noqa: E731

    def eval_point(k_out, state, t, euler_h=None, src=None):
        vals = (field.conversion([t]) + [0.0] if field.converts else [0.0, 0.0, 0.0]) + [t]
        vals += [1.0, 0.0 if euler_h is None else euler_h, 0.0]
        point.write(vals)
        if euler_h is not None:  # the heuristic's Euler probe: state = src + euler_h * k(src)
            lincomb(state, [src, ks[0]], point.table(4, 3), step0, backend=backend)
        field.evaluate(k_out, state, point.scalar(3), point.table(0, 3) if field.converts else None, step0)

    t = float(times[0])
    cur = x
    eval_point(ks[0], cur, t)
    direction = 1.0 if times[-1] > times[0] else -1.0
    span = abs(float(times[-1]) - t)
    if h0 is None:
        def probe(h):
            eval_point(ks[1], ybuf, t + direction * h, euler_h=direction * h, src=cur)
            return ks[1]

        h = initial_step(cur, ks[0], probe, order=tab.order, rtol=rtol, atol=atol, span=span, nb=nb)
    else:
        h = min(float(h0), span)
    ctrl = controller or PIController(tab.order_low)
    accepted = rejected = bad = 0
    grid = [t]
    target_i = 1
    while target_i < len(times):
        target = float(times[target_i])
        if accepted + rejected >= max_steps:
            raise RuntimeError(
                f"{name} used max_steps={max_steps} attempted steps ({accepted} accepted, {rejected} rejected) and "
                f"reached t={t:.6g} on the way to t={float(times[-1]):.6g} (last step size {h:.3g}): raise max_steps"
                f"{fix}, loosen rtol/atol (now {rtol:g}/{atol:g}), or use a fixed-step solver (e.g. solver='rk4')."
            )
        land = h * 1.01 >= abs(target - t)
        t_next = target if land else t + direction * h
        hs = t_next - t
        if t_next == t:
            raise RuntimeError(
                f"{name}: the step size underflowed at t={t:.6g} (h={h:.3g}) after {rejected} rejections; the field is "
                f"singular or not finite there. Check the model/f near this time, loosen rtol/atol, or shorten the interval."
            )
        lo, hi = min(t, t_next), max(t, t_next)
        ts = [t_next if c == 1.0 else min(max(t + c * hs, lo), hi) for c in tab.c]
        conv = field.conversion(ts[1:]) if field.converts else None
        vals = []
        for i in range(1, s):
            vals += [1.0] + [hs * tab.a[i][j] for j in deps[i]] + [0.0]
            if conv is not None:
                vals += [conv[2 * i - 2], conv[2 * i - 1], 0.0]
            vals.append(ts[i])
        vals += [1.0] + [hs * tab.b[j] for j in used] + [0.0]
        vals += [0.0] + [hs * err_w[j] for j in used]
        block.write(vals)
        for i in range(1, s):
            oy, oc, ot = layout[i - 1]
            yi = cand if (tab.fsal and i == s - 1) else ybuf
            lincomb(yi, [cur] + [ks[j] for j in deps[i]], block.table(oy, len(deps[i]) + 2), step0, backend=backend)
            field.evaluate(ks[i], yi, block.scalar(ot), block.table(oc, 3) if conv is not None else None, step0)
        embedded_step(flat(cand), norm, [flat(cur)] + [flat(ks[j]) for j in used], block.table(off_f, len(used) + 2),
                      block.table(off_e, len(used) + 1), step0, x_ref=flat(cur), rtol=rtol, atol=atol, backend=backend)
        err = float(norm.max())  # THE host sync of an attempted step: accept / reject and the next step size
        bad = 0 if math.isfinite(err) else bad + 1
        if bad > _MAX_NONFINITE:
            raise FloatingPointError(
                f"{name}: the error estimate was NaN/inf on {bad} attempts in a row at t={t:.6g} (the last step "
                f"{hs:.3g}, shrunk {_MAX_NONFINITE} times by {ctrl.factor_min:g}): the field returns NaN/inf near this "
                f"time. Check the model/f there (check_finite=True names the evaluation), or stop before it."
            )
        ok, factor = ctrl.decide(err)
        if ok:
            accepted += 1
            cur, cand = cand, cur
            t = t_next
            grid.append(t)
            if tab.fsal:
                ks[0], ks[s - 1] = ks[s - 1], ks[0]
            elif not (land and target_i == len(times) - 1):
                eval_point(ks[0], cur, t)
            if land:
                if on_time is not None:
                    on_time(target_i, cur)
                target_i += 1
            if on_accept is not None:
                on_accept(accepted - 1, t, cur)
        else:
            rejected += 1
        h_next = abs(hs) * factor
        if ok and land and abs(hs) < h:  # a step cut short to land on an output time keeps the proposal it cut
            h_next = max(h_next, h)
        h = min(h_next, span)
    if cur is not x:
        x.copy_(cur)
    return {"nfe": field.nfe, "steps": accepted, "rejected": rejected, "grid": torch.tensor(grid, dtype=torch.float64)}


class AdaptiveRungeKutta(AdaptiveSolver):
    """An embedded RK pair (``tableau``) on the model's PF-ODE / flow ODE; see the module docstring.

    ``Bosh3(rtol=1e-4, atol=1e-4, h0=None, max_steps=10000)`` etc.: pass an instance as ``solver=`` to set
    ``h0`` or ``max_steps`` (``fs.sample`` sets rtol/atol itself)."""

    tableau: Tableau

    def integrate(self, model, x, t_max, t_min, *, seed, backend, sample_offset, check_finite, trajectory=None,
                  callback=None) -> dict:
        name = self.info.name
        ends = torch.tensor([t_max, t_min], dtype=torch.float64)
        ok = model.can_convert("velocity", ends).tolist()
        for t_end, good, which in zip((t_max, t_min), ok, ("t_max", "t_min")):
            if not good:
                path = model.path
                te = torch.tensor(t_end, dtype=torch.float64)
                raise ValueError(
                    f"{name} evaluates the model at both ends of [t_min, t_max] (its FSAL stage lands on them), but a "
                    f"{model.predicts}-model gives no velocity at {which}={t_end:g} on {type(path).__name__} (alpha="
                    f"{float(path.alpha(te)):.3g}, sigma={float(path.sigma(te)):.3g}). Pass "
                    + ("t_min > 0 (e.g. the path's default t_min={:g})".format(path.t_min) if which == "t_min"
                       else "t_max < {:g}".format(t_end))
                    + ", or use a fixed-step solver whose last step to sigma = 0 needs no evaluation there "
                    "(e.g. solver='heun' or 'dpm++2m')."
                )
        x_dtype = x.dtype
        if x_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the state has dtype {x_dtype}; adaptive solvers need a float32 or float64 state.")
        if not x.is_contiguous():
            raise ValueError("the state must be contiguous (fs.sample passes a contiguous clone).")
        if x.dim() == 0:
            raise ValueError("the state must be batch-first [B, ...].")
        field = ModelField(model, check_finite, backend)

        def on_accept(n, t, state):
            if trajectory is not None:
                trajectory.append(state.clone())
            if callback is not None:
                callback(step=n, t=t, x=state)

        fix = f" (solver={type(self).__name__}(max_steps=...), from flowsolve.solvers)"
        stats = integrate_embedded(self.tableau, field, x, [float(t_max), float(t_min)], rtol=self.rtol, atol=self.atol,
                                   h0=self.h0, max_steps=self.max_steps, backend=backend, nb=x.shape[0], name=name,
                                   fix=fix, on_accept=on_accept if (trajectory is not None or callback is not None) else None)
        return stats


@register
class Bosh3(AdaptiveRungeKutta):
    """Bogacki-Shampine 3(2) (the method of MATLAB's ode23): 3 evaluations per attempted step (FSAL)."""

    info = SolverInfo("bosh3", order=3, nfe_per_step=3, stochastic=False, needs="velocity", adaptive=True,
                      paper="Bogacki & Shampine 1989, 3(2) pair, FSAL")
    tableau = BOSH3


@register
class Dopri5(AdaptiveRungeKutta):
    """Dormand-Prince 5(4) (ode45 / torchdiffeq's default): 6 evaluations per attempted step (FSAL)."""

    info = SolverInfo("dopri5", order=5, nfe_per_step=6, stochastic=False, needs="velocity", adaptive=True,
                      paper="Dormand & Prince 1980, 5(4) pair, FSAL")
    tableau = DOPRI5


@register
class Tsit5(AdaptiveRungeKutta):
    """Tsitouras 5(4): smaller error constants than dopri5 at the same cost (6 evaluations per attempted step)."""

    info = SolverInfo("tsit5", order=5, nfe_per_step=6, stochastic=False, needs="velocity", adaptive=True,
                      paper="Tsitouras 2011, 5(4) pair, FSAL")
    tableau = TSIT5
