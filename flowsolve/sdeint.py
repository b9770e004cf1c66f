"""``fs.sdeint``: a generic Ito SDE ``dx = f(x, t) dt + g(x, t) dW`` on any strictly monotone time grid.

Schemes (h_n = t_{n+1} - t_n, of either sign; dW_n = sqrt(|h_n|) z_n with z_n keyed N(0, 1) noise):

* ``"euler_maruyama"`` (Kloeden & Platen 1992, eq. 9.1.1; FORMULAS.md §5): strong order 1/2 (1 for additive
  noise), weak order 1, one f and one g evaluation per step:

      x_{n+1} = x_n + h_n f(x_n, t_n) + g(x_n, t_n) dW_n

* ``"heun"``: the explicit order-2.0 weak scheme for additive noise (Kloeden & Platen 1992, §15.1,
  eq. 15.1.1 with b = b(t)), two f and one g evaluation per step:

      x~      = x_n + h_n f(x_n, t_n) + g_n dW_n,         g_n = g(x_n, t_n + h_n / 2)
      x_{n+1} = x_n + h_n / 2 (f(x_n, t_n) + f(x~, t_{n+1})) + g_n dW_n   (= x~ + h_n/2 (f(x~) - f(x_n)))

  Weak order 2 when g does not depend on x (additive noise; the mid-step time makes it second order for a
  time-dependent g(t) too). The noise coefficient is evaluated once, at the left state, so the scheme is
  consistent with the *Ito* SDE for any g (weak order 1 for multiplicative noise); it is not the Stratonovich
  stochastic Heun scheme of torchsde's ``"heun"`` (which averages g at both ends and converges to the
  Stratonovich solution when g depends on x).

A decreasing grid integrates backward in time (h_n < 0) with noise of variance |h_n| per step: the
convention of reverse-time diffusion SDEs (``dx = (...) dt + g dw_bar``, dt < 0; FORMULAS.md §2). For a
decreasing grid write f as the drift in the direction of the grid's own time: x_{n+1} = x_n + h_n f + g dW.

Noise. ``noise="diagonal"`` (default): one independent Brownian motion per element of x (g scales each
element). ``noise="scalar"``: one Brownian motion per sample, shared by all its elements (torchsde's
"scalar" noise). The noise of step n of global sample b is keyed by (seed, b + sample_offset, n, element,
stream 0): sample b gets the same path in a batch of 1 or of 4096, on CPU (torch twin) or GPU (Triton), to
fp32 rounding. Scalar noise uses element 0 of that key.

What g may return, and what each costs per step (in passes over a state-sized tensor):

* a Python number or a 0-d tensor (the same diffusion for every element of every sample): the noise is drawn
  in the fused kernel, whose noise coefficient g * sqrt(|h_n|) is written on the device (no host sync). One
  pass, like the fixed-step samplers: read x and f, write x_{n+1}.
* a tensor shaped like x (elementwise, diagonal) or a ``[B]`` tensor (one coefficient per sample): a keyed
  normal buffer is filled (``flowsolve.kernels.normal_``, the same keys as the in-kernel noise), multiplied by
  g, and passed to the fused kernel as one more input: 8 state-sized transfers instead of 3 (write z; read z
  and g, write g z; read x, f, g z and write x_{n+1}), plus one state-sized buffer.

With ``noise="scalar"`` the per-sample normal ``[B]`` is drawn into a small buffer and g z is formed by
broadcasting (a state-sized product when g is elementwise).

``f`` and ``g`` are called as ``f(x, t)`` with ``t`` a 0-d tensor (x's dtype and device; one time for the whole
batch, as ``fs.odeint`` and torchsde do). x is batch-first (the noise is keyed per sample), so f and g must treat
samples independently for "sample b is the same in any batch" to hold.
Coefficients (h_n, sqrt|h_n|) are computed once in float64 and read from a device table by a device step
index: no host sync inside the loop.
"""
from __future__ import annotations

import difflib
import numbers

import torch

from .checks import as_times, check_sample_offset
from .kernels import STREAM_STEP, lincomb, normal_, resolve_backend
from .kernels.seed import resolve_seed, seed_tensor, seed_value

__all__ = ["sdeint", "SDE_SOLVERS", "NOISE_TYPES"]

SDE_SOLVERS = ("euler_maruyama", "heun")
NOISE_TYPES = ("diagonal", "scalar")
_ROWS = 2**31 - 1  # a one-row table broadcast over every step index (row stride 0)


def _closest(name, choices):
    match = difflib.get_close_matches(str(name), choices, n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def _grid(t) -> torch.Tensor:
    g = as_times("t", t, "a 1-D sequence or tensor of times")
    if g.dim() != 1 or g.numel() < 2:
        raise ValueError(f"t must be a 1-D sequence of at least 2 times (start, ..., end); got shape {tuple(g.shape)}.")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"t must hold finite times; got {g.tolist()}.")
    d = g[1:] - g[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        i = int(((d > 0) != (d[0] > 0)).nonzero()[0]) if bool((d != 0).all()) else int((d == 0).nonzero()[0])
        raise ValueError(
            f"t must be strictly monotone (all increasing or all decreasing); it is not at index {i + 1} "
            f"(t[{i}]={float(g[i]):.6g}, t[{i + 1}]={float(g[i + 1]):.6g}). Remove repeated times and sort the grid."
        )
    return g


def _state(x0) -> torch.Tensor:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a batch-first tensor [B, ...]; got {type(x0).__name__}.")
    if not x0.is_floating_point():
        raise TypeError(f"x0 has dtype {x0.dtype}; pass a floating-point tensor (float32 or float64).")
    if x0.dim() == 0 or x0.shape[0] == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must be batch-first [B, ...] with B >= 1 and no empty dimension; got shape {tuple(x0.shape)}.")
    return x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()


def _check_drift(out, x, n, t, name="f"):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}(x, t) returned {type(out).__name__} at step {n}; it must return a tensor shaped like x.")
    if out.shape != x.shape:
        raise ValueError(
            f"{name}(x, t) returned shape {tuple(out.shape)} at step {n} (t={t:.6g}) but x has shape {tuple(x.shape)}; "
            f"the drift must be shaped like x."
        )
    return out


class _Diffusion:
    """Turns g's output into the noise term of one step (see the module docstring for the cost of each kind)."""

    def __init__(self, x: torch.Tensor, em: torch.Tensor, noise: str, seed, sample_offset: int, backend: str):
        self.x, self.em, self.noise = x, em, noise  # em: [N, 4] rows (1, h, sqrt|h|, 0)
        self.seed, self.sample_offset, self.backend = seed, sample_offset, backend
        acc = em.dtype
        self.scale = torch.ones(3, dtype=acc, device=x.device)  # (1, 1, g): the in-kernel row is em[n, :3] * scale
        self.row = torch.empty(1, 3, dtype=acc, device=x.device)
        self.zbuf = None
        self.zb = None

    def kind(self, gx, n, t):
        x = self.x
        if isinstance(gx, numbers.Real) and not isinstance(gx, bool):
            return "number"
        if not isinstance(gx, torch.Tensor):
            raise TypeError(f"g(x, t) returned {type(gx).__name__} at step {n}; return a tensor shaped like x, a [B] "
                            f"tensor (one coefficient per sample), or a number.")
        if gx.dim() == 0:
            return "tensor0"
        if gx.shape == x.shape:
            return "elementwise"
        if gx.shape == (x.shape[0],):
            return "per_sample"
        raise ValueError(
            f"g(x, t) returned shape {tuple(gx.shape)} at step {n} (t={t:.6g}); x has shape {tuple(x.shape)}. For "
            f"noise={self.noise!r} g must return a tensor shaped like x (elementwise diffusion), a [B] = "
            f"[{x.shape[0]}] tensor (one coefficient per sample) or a number / 0-d tensor (the same for all)."
        )

    def combine(self, out, x, fx, gx, kind, step):
        """out = x + h f + g sqrt|h| z for the step held in ``step`` (fused kernel)."""
        em = self.em
        if self.noise == "diagonal" and kind in ("number", "tensor0"):
            if kind == "number":
                self.scale[2:].fill_(float(gx))
            else:
                self.scale[2:].copy_(gx.reshape(1))
            torch.mul(em[:, :3].index_select(0, step), self.scale, out=self.row)  # device-side: no host sync
            return lincomb(out, [x, fx], self.row.expand(_ROWS, 3), step, self.seed, sample_offset=self.sample_offset,
                           stream=STREAM_STEP, backend=self.backend)
        gz = self._noise_term(gx, kind, step)
        return lincomb(out, [x, fx, gz], em, step, backend=self.backend)

    def _noise_term(self, gx, kind, step):
        x = self.x
        b = x.shape[0]
        bshape = (b,) + (1,) * (x.dim() - 1)
        if self.noise == "diagonal":
            if self.zbuf is None:
                self.zbuf = torch.empty_like(x, memory_format=torch.contiguous_format)
            z = normal_(self.zbuf, self.seed, step, sample_offset=self.sample_offset, stream=STREAM_STEP,
                        backend=self.backend)
            return z.mul_(gx.reshape(bshape) if kind == "per_sample" else gx)
        # scalar noise: one normal per sample (element 0 of its key), broadcast over the sample's elements
        if self.zb is None:
            self.zb = torch.empty((b, 1), dtype=x.dtype, device=x.device)
        zb = normal_(self.zb, self.seed, step, sample_offset=self.sample_offset, stream=STREAM_STEP,
                     backend=self.backend).view(bshape)
        if kind == "elementwise":
            if self.zbuf is None:
                self.zbuf = torch.empty_like(x, memory_format=torch.contiguous_format)
            return torch.mul(gx, zb, out=self.zbuf)
        if kind == "number":
            g = zb * float(gx)
        elif kind == "tensor0":
            g = zb * gx.to(x.dtype)
        else:
            g = zb * gx.reshape(bshape).to(x.dtype)
        return g.expand(x.shape)


def sdeint(f, g, x0: torch.Tensor, t, solver: str = "euler_maruyama", *, seed=None, noise: str = "diagonal",
           sample_offset: int = 0, backend=None, return_info: bool = False):
    """Integrate the Ito SDE ``dx = f(x, t) dt + g(x, t) dW`` from ``x0`` at ``t[0]`` over the grid ``t``.

    Args:
        f: drift, ``f(x, t) -> tensor shaped like x``; ``t`` is a 0-d tensor (x's dtype and device).
        g: diffusion, ``g(x, t)`` -> a tensor shaped like x (elementwise), a ``[B]`` tensor (per sample), or a
            number / 0-d tensor (the same for all; the cheapest: noise drawn in the fused kernel).
        x0: the state at ``t[0]``, batch-first ``[B, ...]`` (float32 or float64; half precision is promoted).
        t: strictly monotone 1-D sequence of times (increasing, or decreasing to integrate backward, with noise
            variance |h| per step). The scheme steps exactly on it.
        solver: ``"euler_maruyama"`` (weak order 1) or ``"heun"`` (weak order 2 for additive noise; Ito).
        seed: int (numpy integers too), torch.Generator or one-element integer tensor keying the noise; None (the
            default) draws a fresh 64-bit key from torch's global CPU generator, so each call gives new paths and
            ``torch.manual_seed`` makes it repeatable (the key is ``info["seed"]``).
        noise: ``"diagonal"`` (an independent Brownian motion per element) or ``"scalar"`` (one per sample).
        sample_offset: global index of ``x0[0]`` (for sharded batches): the noise of sample b is keyed by
            ``b + sample_offset``.
        backend: "auto" | "torch" | "triton" (see ``flowsolve.kernels.backend``).
        return_info: also return a dict with ``nfe`` (f evaluations), ``nfe_g`` (g evaluations), ``steps``,
            ``solver``, ``noise``, ``grid`` (float64) and ``seed`` (the int key used).

    Returns: the states at every time of ``t``, ``[len(t), *x0.shape]`` (the first is ``x0``), and the info dict
    if ``return_info``.
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(x, t) -> tensor shaped like x (the drift); got {type(f).__name__}.")
    if not callable(g):
        raise TypeError(f"g must be callable as g(x, t) -> tensor shaped like x, a [B] tensor or a number (the "
                        f"diffusion); got {type(g).__name__}.")
    if not isinstance(solver, str) or solver not in SDE_SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SDE_SOLVERS}.{_closest(solver, SDE_SOLVERS)}")
    if not isinstance(noise, str) or noise not in NOISE_TYPES:
        raise ValueError(f"noise={noise!r} is not one of {NOISE_TYPES} ('diagonal': one Brownian motion per element; "
                         f"'scalar': one per sample).{_closest(noise, NOISE_TYPES)}")
    sample_offset = check_sample_offset(sample_offset, "x0[0]")
    x0 = _state(x0)
    grid = _grid(t)
    dev = x0.device
    be = resolve_backend(backend, dev)
    seed = resolve_seed(seed)  # None: a fresh key from the global generator, drawn after the argument checks
    seed_t = seed_tensor(seed, dev)
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32

    h = grid[1:] - grid[:-1]
    n_steps = h.numel()
    sq = h.abs().sqrt()
    em = torch.stack([torch.ones_like(h), h, sq, torch.zeros_like(h)], 1).to(device=dev, dtype=acc)  # x + h f + sqrt|h| gz
    corr = torch.stack([torch.ones_like(h), -0.5 * h, 0.5 * h, torch.zeros_like(h)], 1).to(device=dev, dtype=acc)
    t_dev = grid.to(device=dev, dtype=x0.dtype)
    t_g = (grid[:-1] + 0.5 * h) if solver == "heun" else grid[:-1]
    t_g_dev = t_g.to(device=dev, dtype=x0.dtype)
    t_host, t_g_host = grid.tolist(), t_g.tolist()

    out = torch.empty((n_steps + 1,) + tuple(x0.shape), dtype=x0.dtype, device=dev)
    out[0].copy_(x0)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    diff = _Diffusion(out[0], em, noise, seed_t, sample_offset, be)
    pred = torch.empty_like(out[0]) if solver == "heun" else None
    fbuf = torch.empty_like(out[0])  # the drift, owned: f and g may return one reused buffer (io-binding engines)
    nfe = nfe_g = 0
    for n in range(n_steps):
        x, x_next = out[n], out[n + 1]
        tn = t_dev.index_select(0, step).reshape(())  # a 0-d device tensor: no host sync
        fx = fbuf.copy_(_check_drift(f(x, tn), x, n, t_host[n]))
        nfe += 1
        tg = tn if solver == "euler_maruyama" else t_g_dev.index_select(0, step).reshape(())
        gx = g(x, tg)
        nfe_g += 1
        kind = diff.kind(gx, n, t_g_host[n])
        if solver == "euler_maruyama":
            diff.combine(x_next, x, fx, gx, kind, step)
        else:
            diff.combine(pred, x, fx, gx, kind, step)
            t1 = t_dev.index_select(0, step + 1).reshape(())
            fp = _check_drift(f(pred, t1), x, n, t_host[n + 1])
            nfe += 1
            lincomb(x_next, [pred, fx, fp], corr, step, backend=be)
        step.add_(1)
    if return_info:
        return out, {"nfe": nfe, "nfe_g": nfe_g, "steps": n_steps, "solver": solver, "noise": noise, "grid": grid,
                     "seed": seed_value(seed)}
    return out

