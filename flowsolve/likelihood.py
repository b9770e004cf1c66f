"""``fs.log_likelihood``: exact log-densities of a diffusion / flow-matching model by the instantaneous
change of variables (Chen et al. 2018, "Neural ODEs", Thm. 1; FFJORD, Grathwohl et al. 2019; Song et
al. 2021, "Score-based generative modeling through SDEs", App. D.2).

Along the probability-flow ODE dx/dt = u(x, t) of the model (FORMULAS.md §2; a flow-matching velocity
field is used as is), the log-density obeys d/dt log p_t(x_t) = -div u(x_t, t). Integrating the
augmented state (x, L) from data (t_min) up to noise (t_max),

    dx/dt = u(x, t),   dL/dt = div u(x, t),   L(t_min) = 0,
    log p_tmin(x) = log p_tmax(x(t_max)) + L(t_max)                      (FORMULAS.md §6)

The velocity is u = a(t) x + b(t) F(x, t) with F the raw network output and (a, b) from
``Model.conversion("velocity", t)``, so div u = a D + b div F: the divergence is taken of the raw
output and the conversion folded into coefficients, like everywhere else in flowsolve.

Divergence:
* ``"exact"``: tr dF/dx by D vector-Jacobian products with the basis vectors, batched (one forward,
  then ``torch.autograd.grad(..., is_grads_batched=True)`` over chunks of basis vectors: vmap over the
  backward) or by ``torch.func.vmap(jacrev(...))`` (``exact_method="jacrev"``: full per-sample
  Jacobians, D x D memory per sample).
* ``"hutchinson"``: z^T (du/dx) z with ``probes`` keyed probes per sample (Rademacher or Gaussian), held
  fixed along the trajectory (FFJORD), keyed by (seed, global sample, probe index, element) like the
  sampler's noise: sample b gets the same probes in any batch or shard. One VJP per probe per
  evaluation; the dot product and the weighted accumulation run in the fused kernel
  ``flowsolve.kernels.hutchinson_accumulate``. The per-sample standard error is the spread of the k
  per-probe estimates over sqrt(k) (k >= 2); with one probe it cannot be estimated from the run and is
  reported as NaN.
* ``"auto"``: exact for D <= ``AUTO_EXACT_MAX_DIM`` (64), Hutchinson above.

When is exact the better buy? A Hutchinson estimate is unbiased, but with the probe held fixed along
the trajectory a sample's error is z^T M z - tr M (M the trajectory-integrated Jacobian), of variance
2 (||M||_F^2 - sum_i M_ii^2) / k for Rademacher probes (FORMULAS.md §7) at ANY number of steps: 3.2
nats RMS with one probe on a D = 16 Gaussian with a full covariance, against 3.0e-4 (NFE 32) and
1.5e-5 (NFE 64) for the exact trace with RK4 (bench/results/likelihood.md). For per-sample
log-densities (ranking, anomaly scores, anything but a dataset average) use exact divergence whenever
D backward passes per evaluation are affordable (on CPU one exact evaluation costs about D forward
passes, one probe about 2.4: ~25x at D = 64, ~1300x at D = 3072); Hutchinson is the buy for
dataset-level averages (bits/dim over N samples: its noise averages down as 1/sqrt(N k)) and large D.

Integrators (time runs upward, t_min -> t_max): fixed-grid ``"euler"``, ``"midpoint"``, ``"heun"``,
``"rk4"`` (grids from ``flowsolve.grids``, flipped; coefficients planned once in float64 into device
tables read through a device step index, x-updates by the fused ``lincomb`` kernel, no host sync in the
loop) and adaptive ``"bosh3"`` (Bogacki & Shampine 1989, 3(2)) and ``"dopri5"`` (Dormand & Prince
1980, 5(4)), both FSAL (tableaus shared with the samplers: ``flowsolve/tableaus.py``), with an error norm
over x (per-sample RMS) and L, rtol/atol, the PI step-size controller of ``flowsolve/controller.py``, and
ONE host sync per step (the accept/reject decision); one step size is shared by the batch, so with an
adaptive solver a sample's result depends (within the tolerance) on the batch it is in.

No autograd graph outlives one model evaluation: every evaluation builds its graph locally (under
``torch.enable_grad()``, so the function works inside ``torch.no_grad()`` and ``torch.inference_mode()``),
takes its VJPs and drops it; the state is detached. Peak memory does not grow with the number of steps.

Prior: by default N(0, sigma(t_max)^2 I). This neglects the data's contribution alpha(t_max)^2 Sigma at
t_max: exact for rectified flow at t_max = 1 (alpha = 0, sigma = 1); for VP at t_max = 1,
alpha(1) = 6.6e-3 and the error in log p is of order alpha |mu| |x| + alpha^2 D ~ 1e-2 nats; for VE it
is of order |mu| |x| / sigma_max^2. Pass ``prior_log_prob=`` (a callable x_T -> [B]) for the exact
p_{t_max} of an analytic problem (``lambda y: prob.log_prob(y, t_max)``) or any other prior.
"""
from __future__ import annotations

import difflib
import math

import torch

from . import grids as _grids
from .checks import as_times, check_sample_offset
from .controller import PIController
from .kernels import MAX_INPUTS, hutchinson_accumulate, lincomb, probes_, resolve_backend
from .kernels.seed import resolve_seed, seed_tensor, seed_value
from .model import GuardedModel, Model, host_default, user_default_device
from .tableaus import TABLEAUS as _TABLEAUS
from .tableaus import Tableau

__all__ = ["log_likelihood", "bits_per_dim", "dequantize", "Tableau", "TABLEAUS", "DIVERGENCES", "AUTO_EXACT_MAX_DIM"]

DIVERGENCES = ("auto", "exact", "hutchinson")
EXACT_METHODS = ("vjp", "jacrev")
PROBE_KINDS = ("rademacher", "gaussian")
AUTO_EXACT_MAX_DIM = 64
_EXACT_CHUNK = 16  # basis vectors per batched VJP: fastest or within 10% of it on CPU for D = 16..256 (bench)
_EXACT_CHUNK_ELEMS = 1 << 22  # and at most ~4M elements of batched VJP output at once


# Butcher tableaus: the shared ones (flowsolve/tableaus.py; each checks itself: rows of a sum to c, b sums to 1)
TABLEAUS = {name: _TABLEAUS[name] for name in ("euler", "midpoint", "heun", "rk4", "bosh3", "dopri5")}


def _closest(name, choices):
    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def _one_row(values, dtype, device) -> torch.Tensor:
    """A coefficient table of one row broadcast to every step (row stride 0; the kernels read row 0)."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1).expand(2**31 - 1, len(values))


# ------------------------------------------------------------------------------------------------
# The field: model evaluation + divergence estimate
# ------------------------------------------------------------------------------------------------
class _Field:
    """Evaluates the raw model output at (X, t) and, when asked, adds ``C[step] . (div F, D)`` to a
    [rows, B] buffer (rows = number of probes, or 1 for exact divergence)."""

    def __init__(self, model: Model, x: torch.Tensor, mode: str, k: int, kind: str, seed, sample_offset: int,
                 backend: str, exact_method: str, chunk: int | None):
        self.model, self.mode, self.backend = model, mode, backend
        self.exact_method, self.chunk = exact_method, chunk
        self.batch = x.shape[0]
        self.dim = x[0].numel() if x.dim() > 1 else 1
        self.nfe = 0
        self.vjps = 0
        self._batched = True  # is_grads_batched (vmap over the backward) works until it fails once
        if mode == "hutchinson":
            self.z = probes_(torch.empty((k, *x.shape), dtype=x.dtype, device=x.device), seed, kind=kind,
                             sample_offset=sample_offset, backend=backend)
            self.rows = k
        else:
            self.z = None
            self.rows = 1

    # -- VJPs of the raw output
    def _grads(self, raw, xg, cot):
        """VJPs for a batch of cotangents ``cot`` ([m, *x.shape]) -> [m, *x.shape]."""
        m = cot.shape[0]
        self.vjps += m
        if not raw.requires_grad:  # the output does not depend on x (e.g. a constant x0 model)
            return torch.zeros_like(cot)
        if m > 1 and self._batched:
            try:
                (g,) = torch.autograd.grad(raw, xg, cot, retain_graph=True, is_grads_batched=True, allow_unused=True)
                return torch.zeros_like(cot) if g is None else g
            except RuntimeError:
                self._batched = False  # a model whose backward vmap cannot batch: loop from now on
        out = torch.empty_like(cot)
        for i in range(m):
            (g,) = torch.autograd.grad(raw, xg, cot[i], retain_graph=True, allow_unused=True)
            out[i] = 0.0 if g is None else g
        return out

    def _exact_vjp(self, raw, xg) -> torch.Tensor:
        b, d = self.batch, self.dim
        chunk = self.chunk or max(1, min(d, _EXACT_CHUNK, _EXACT_CHUNK_ELEMS // max(1, b * d)))
        div = torch.zeros(b, dtype=xg.dtype, device=xg.device)
        for s in range(0, d, chunk):
            e = min(d, s + chunk)
            basis = torch.zeros(e - s, b, d, dtype=xg.dtype, device=xg.device)
            idx = torch.arange(e - s, device=xg.device)
            basis[idx, :, s + idx] = 1.0
            g = self._grads(raw, xg, basis.view(e - s, *xg.shape)).reshape(e - s, b, d)
            div += torch.diagonal(g[:, :, s:e], dim1=0, dim2=2).sum(-1)
        return div

    def _exact_jacrev(self, x, t):
        from torch.func import jacrev, vmap

        model = self.model

        def f(xi, ti):
            o = model(xi.unsqueeze(0), ti.unsqueeze(0)).squeeze(0)
            return o.reshape(-1), o

        with torch.enable_grad():
            jac, raw = vmap(jacrev(f, has_aux=True, chunk_size=self.chunk))(x.detach(), t)
        self.vjps += self.dim
        return raw.detach(), torch.diagonal(jac.reshape(self.batch, self.dim, self.dim), dim1=1, dim2=2).sum(-1)

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, div_buf=None, coef=None, step=None) -> torch.Tensor:
        """Raw model output at (x, t), detached; with ``div_buf`` also accumulate the divergence estimate."""
        self.nfe += 1
        if div_buf is None:
            with torch.no_grad():
                return self.model(x, t)
        if self.mode == "exact" and self.exact_method == "jacrev":
            raw, div = self._exact_jacrev(x, t)
            self._add_exact(div_buf, div, coef, step)
            return raw
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            raw = self.model(xg, t)
            if self.mode == "hutchinson":
                g = self._grads(raw, xg, self.z)
                hutchinson_accumulate(div_buf, g, coef, step, self.z, backend=self.backend)
            else:
                self._add_exact(div_buf, self._exact_vjp(raw, xg), coef, step)
        return raw.detach()

    def _add_exact(self, div_buf, div, coef, step):
        row = coef[0] if coef.stride(0) == 0 else coef.index_select(0, step.reshape(1)).reshape(-1)
        acc = div_buf.view(-1)
        acc.addcmul_(div.to(acc.dtype), row[0])
        acc.add_(row[1] * float(self.dim))


def _combine(out, inputs, coef, step, backend):
    """``out = sum_i coef[step, i] inputs[i]`` with the fused kernel (split when there are more inputs
    than the kernel takes; only dopri5's one-row tables get there)."""
    if len(inputs) <= MAX_INPUTS:
        return lincomb(out, inputs, coef, step, backend=backend)
    if coef.stride(0) != 0:
        raise AssertionError("split combination is only used with one-row tables")
    row = coef[0].tolist()
    m = MAX_INPUTS
    head = _one_row(row[:m] + [0.0], coef.dtype, coef.device)
    lincomb(out, inputs[:m], head, step, backend=backend)
    tail = _one_row([1.0] + row[m:-1] + [0.0], coef.dtype, coef.device)
    return _combine(out, [out] + list(inputs[m:]), tail, step, backend)


# ------------------------------------------------------------------------------------------------
# Integrators
# ------------------------------------------------------------------------------------------------
def _increasing_grid(path, grid, steps, t_min, t_max) -> torch.Tensor:
    if grid is None or isinstance(grid, str):
        return _grids.make_grid(grid, path, 32 if steps is None else steps, t_max=t_max, t_min=t_min).flip(0)
    if t_max is not None or t_min is not None:
        raise ValueError("pass either a grid of times or t_max/t_min, not both.")
    g = as_times("grid", grid, f"a name in {_grids.GRIDS} or a 1-D sequence of times").reshape(-1)
    if g.numel() >= 2 and bool((g[1:] > g[:-1]).all()):
        g = g.flip(0)  # the likelihood accepts either direction: validate as a decreasing grid, then flip
    return _grids.make_grid(g, path, steps).flip(0)


def _integrate_fixed(field: _Field, x, acc, tab: Tableau, grid_up, dtype_acc, backend):
    model, dev = field.model, x.device
    t0, t1 = grid_up[:-1], grid_up[1:]
    h = t1 - t0
    n, s = h.numel(), tab.stages
    t_st = [t1.clone() if c == 1.0 else torch.minimum(t0 + c * h, t1) for c in tab.c]
    conv = [model.conversion("velocity", ts) for ts in t_st]  # raises naming t where u cannot be formed
    on = lambda v: v.to(device=dev, dtype=dtype_acc)  # noqa: E731
    zero = torch.zeros(n, dtype=torch.float64)
    deps = [[j for j, a in enumerate(tab.a[i]) if a != 0.0] for i in range(s)]
    x_tab = [on(torch.stack([torch.ones(n, dtype=torch.float64)] + [h * tab.a[i][j] for j in deps[i]] + [zero], 1))
             for i in range(s)]
    k_tab = [on(torch.stack([conv[i][0], conv[i][1], zero], 1)) for i in range(s)]
    d_tab = [on(torch.stack([h * tab.b[i] * conv[i][1], h * tab.b[i] * conv[i][0]], 1)) for i in range(s)]
    used = [i for i in range(s) if tab.b[i] != 0.0]
    f_tab = on(torch.stack([torch.ones(n, dtype=torch.float64)] + [h * tab.b[i] for i in used] + [zero], 1))
    t_eval = torch.stack(t_st, 1).to(device=dev, dtype=x.dtype)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    xs = [x] + [torch.empty_like(x) for _ in range(1, s)]
    ks = [torch.empty_like(x) for _ in range(s)]
    b = x.shape[0]
    for _ in range(n):
        for i in range(s):
            if i > 0:
                _combine(xs[i], [x] + [ks[j] for j in deps[i]], x_tab[i], step, backend)
            t = t_eval.index_select(0, step).select(1, i).expand(b)
            raw = field.evaluate(xs[i], t, acc if tab.b[i] != 0.0 else None, d_tab[i], step)
            lincomb(ks[i], [xs[i], raw], k_tab[i], step, backend=backend)
        _combine(x, [x] + [ks[i] for i in used], f_tab, step, backend)
        step.add_(1)
    return {"steps": n, "rejected": 0, "grid": grid_up}


def _integrate_adaptive(field: _Field, x, acc, tab: Tableau, t_min, t_max, rtol, atol, h0, max_steps, dtype_acc,
                        backend):
    model, dev, b = field.model, x.device, x.shape[0]
    s = tab.stages
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    xs = [x] + [torch.empty_like(x) for _ in range(1, s)]
    ks = [torch.empty_like(x) for _ in range(s)]
    ds = [torch.zeros_like(acc) for _ in range(s)]
    x_new, err = torch.empty_like(x), torch.empty_like(x)
    e = [tab.b[i] - tab.b_low[i] for i in range(s)]
    need_div = [tab.b[i] != 0.0 or e[i] != 0.0 for i in range(s)]

    def stage(i, xi, ti):
        a, bb = (float(v) for v in model.conversion("velocity", torch.tensor([ti], dtype=torch.float64)))
        ds[i].zero_()
        coef = _one_row([bb, a], dtype_acc, dev)
        t = torch.full((b,), ti, dtype=x.dtype, device=dev)
        raw = field.evaluate(xi, t, ds[i] if need_div[i] else None, coef, step)
        lincomb(ks[i], [xi, raw], _one_row([a, bb, 0.0], dtype_acc, dev), step, backend=backend)

    t = float(t_min)
    stage(0, x, t)
    if h0 is None:  # Hairer, Norsett & Wanner (1993), II.4: h = 0.01 ||x|| / ||u(x)|| in the error norm
        sc = atol + rtol * x.abs()
        d0 = float((x / sc).pow(2).mean().sqrt())
        d1 = float((ks[0] / sc).pow(2).mean().sqrt())
        h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    else:
        h = float(h0)
    span = t_max - t_min
    h = min(max(h, 1e-12 * span), span)
    ctrl = PIController(min(tab.order, tab.order_low))
    accepted = rejected = 0
    times = [t]
    while t < t_max:
        if accepted + rejected >= max_steps:
            raise RuntimeError(
                f"the adaptive solver {tab.name!r} used max_steps={max_steps} steps and reached t={t:.6g} of "
                f"t_max={t_max:.6g} (last step size {h:.3g}): raise max_steps, loosen rtol/atol "
                f"(now {rtol:g}/{atol:g}), or use a fixed-grid solver (solver='rk4', steps=...)."
            )
        last = (t_max - t) - h <= 1e-10 * span
        t_next = t_max if last else t + h
        h = t_next - t
        for i in range(1, s):
            deps = [j for j, a in enumerate(tab.a[i]) if a != 0.0]
            row = [1.0] + [h * tab.a[i][j] for j in deps] + [0.0]
            _combine(xs[i], [x] + [ks[j] for j in deps], _one_row(row, dtype_acc, dev), step, backend)
            stage(i, xs[i], t + tab.c[i] * h if tab.c[i] != 1.0 else t_next)
        used = [i for i in range(s) if tab.b[i] != 0.0]
        if tab.fsal:
            x_cand = xs[s - 1]
        else:
            _combine(x_new, [x] + [ks[i] for i in used], _one_row([1.0] + [h * tab.b[i] for i in used] + [0.0], dtype_acc, dev),
                     step, backend)
            x_cand = x_new
        eu = [i for i in range(s) if e[i] != 0.0]
        _combine(err, [ks[i] for i in eu], _one_row([h * e[i] for i in eu] + [0.0], dtype_acc, dev), step, backend)
        acc_new = acc + sum(h * tab.b[i] * ds[i] for i in used)
        acc_err = sum(h * e[i] * ds[i] for i in eu)
        sc = atol + rtol * torch.maximum(x.abs(), x_cand.abs())
        rms_x = (err / sc).pow(2).reshape(b, -1).mean(1).sqrt()
        sc_l = atol + rtol * torch.maximum(acc.abs(), acc_new.abs())
        e_l = (acc_err / sc_l).abs().amax(0)
        norm = float(torch.maximum(rms_x, e_l.to(rms_x.dtype)).max())  # the one host sync per step
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"the error estimate of {tab.name!r} is not finite at t={t:.6g}: the model returned NaN/inf there."
            )
        ok, factor = ctrl.decide(norm)  # the shared PI controller (flowsolve/controller.py)
        if ok:
            accepted += 1
            t = t_next
            times.append(t)
            x.copy_(x_cand)
            acc.copy_(acc_new)
            if tab.fsal:
                ks[0], ks[s - 1] = ks[s - 1], ks[0]
                ds[0], ds[s - 1] = ds[s - 1], ds[0]
            elif t < t_max:
                stage(0, x, t)
        else:
            rejected += 1
        h = h * factor
    return {"steps": accepted, "rejected": rejected, "grid": torch.tensor(times, dtype=torch.float64)}


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _gaussian_prior(std: float):
    def log_prob(x):
        d = x[0].numel() if x.dim() > 1 else 1
        return -0.5 * (x.reshape(x.shape[0], -1).pow(2).sum(1) / std**2) - 0.5 * d * math.log(2 * math.pi * std**2)

    return log_prob


def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int >= {lo}; got {v!r}.")
    if v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}.")


def log_likelihood(model: Model, x: torch.Tensor, solver: str = "heun", steps: int | None = None, grid=None, *,
                   divergence: str = "auto", probes: int = 1, probe: str = "rademacher", seed=None, t_min=None,
                   t_max=None, prior_log_prob=None, rtol: float | None = None, atol: float | None = None,
                   h0: float | None = None,
                   max_steps: int = 10_000, exact_method: str = "vjp", chunk: int | None = None,
                   sample_offset: int = 0, backend: str | None = None, return_info: bool = False):
    """Per-sample log-density log p_{t_min}(x) of a model by the instantaneous change of variables.

    Args:
        model: a ``fs.Model`` (score / eps / x0 / v / velocity; either time convention).
        x: data ``[B, *event]`` at t_min, float32 or float64 (float16/bfloat16 is promoted to float32;
            integer data must be dequantized first: ``dequantize``). Not modified.
        solver: "euler" | "midpoint" | "heun" | "rk4" (fixed grid) or "bosh3" | "dopri5" (adaptive).
        steps: fixed-grid steps (default 32); not NFE: rk4 makes 4 model calls per step.
        grid: "uniform" | "logsnr" | "edm" | "quadratic" or a monotone sequence of times (either
            direction); None: the path's default grid. Fixed-grid solvers only.
        divergence: "exact" | "hutchinson" | "auto" (exact for D <= 64).
        probes: Hutchinson probes per sample (k >= 1), each held fixed along the trajectory.
        probe: "rademacher" | "gaussian".
        seed: int (numpy integers too), torch.Generator or one-element integer tensor: keys the Hutchinson probes
            per global sample. None (the default) draws a fresh 64-bit key from torch's global CPU generator
            (new probes per call, as FFJORD draws them; ``torch.manual_seed`` makes it repeatable; the key is
            ``info["seed"]``). Exact divergence draws nothing.
        t_min, t_max: the integration range (default: the path's range).
        prior_log_prob: callable ``x_T -> [B]``; default N(0, sigma(t_max)^2 I) (see the module notes).
        rtol, atol, h0, max_steps: adaptive solvers: tolerances (default 1e-5 each), first step (default:
            Hairer's heuristic), and the limit on attempted steps (a RuntimeError names the fix when reached).
            Passing rtol/atol/h0 with a fixed-grid solver is an error (they would be ignored).
        exact_method: "vjp" (batched VJPs with basis vectors) | "jacrev" (torch.func vmap(jacrev)).
        chunk: basis vectors per batched VJP / jacrev chunk (default: 16, fewer if the batched VJP output
            would exceed ~4M elements; jacrev: all at once).
        sample_offset: global index of x[0] (for sharded batches: keys the probes).
        backend: "auto" | "torch" | "triton" for the fused kernels.
        return_info: also return a dict: nfe (model forwards), vjps (backward passes), steps, rejected,
            grid (accepted times), divergence, solver, delta_log_p [B], prior_log_prob [B], x_T,
            per_probe [k, B] (Hutchinson: each probe's integral of the divergence), seed (the probes' int key;
            None for exact divergence).

    Returns:
        ``(log_p, stderr)``: ``[B]`` tensors (float64 for float64 x, else float32). ``stderr`` is the
        Monte-Carlo standard error of the Hutchinson estimate (spread of the k per-probe estimates over
        sqrt(k)); 0 for exact divergence; NaN for one probe. It does not include discretization error.
    """
    if not isinstance(model, Model):
        if callable(model):
            raise TypeError("model must be a fs.Model; wrap your callable: fs.Model(fn, path, predicts='velocity').")
        raise TypeError(f"model must be a fs.Model; got {type(model).__name__}.")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [B, *event] of data; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"x has dtype {x.dtype}; log_likelihood needs floating-point data. Dequantize integer (e.g. 8-bit) data "
            f"first: flowsolve.likelihood.dequantize(x, n_bits=8), and report bits_per_dim(...) with the offset."
        )
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must be batch-first [B, *event] with B >= 1 and no empty dimension; got shape "
                         f"{tuple(x.shape)}. Use x.reshape(B, -1) for flat data.")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}.{_closest(divergence, DIVERGENCES)}")
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe={probe!r} is not one of {PROBE_KINDS}.{_closest(probe, PROBE_KINDS)}")
    _check_int("probes", probes)
    if exact_method not in EXACT_METHODS:
        raise ValueError(f"exact_method={exact_method!r} is not one of {EXACT_METHODS}.{_closest(exact_method, EXACT_METHODS)}")
    if chunk is not None:
        _check_int("chunk", chunk)
    if not isinstance(solver, str) or solver not in TABLEAUS:
        raise ValueError(
            f"unknown likelihood solver {solver!r}; choose one of {', '.join(TABLEAUS)}.{_closest(solver, TABLEAUS)}"
        )
    sample_offset = check_sample_offset(sample_offset)
    if prior_log_prob is not None and not callable(prior_log_prob):
        raise TypeError(f"prior_log_prob must be a callable x_T -> [B] log-densities; got {type(prior_log_prob).__name__}.")
    tab = TABLEAUS[solver]
    path = model.path
    if not tab.adaptive and (rtol is not None or atol is not None or h0 is not None):
        raise ValueError(
            f"rtol/atol/h0 apply to the adaptive solvers (bosh3, dopri5); solver={solver!r} is a fixed-grid solver: "
            f"pass steps= (and grid=) instead, or solver='dopri5' to set tolerances."
        )
    if not bool(torch.isfinite(x).all()):  # one host read before the integration, never inside it
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"x contains NaN/inf in samples {bad[:8]}; the log-likelihood needs finite data.")
    rtol = 1e-5 if rtol is None else rtol
    atol = 1e-5 if atol is None else atol
    if tab.adaptive:
        if steps is not None or grid is not None:
            raise ValueError(
                f"solver={solver!r} is adaptive: it chooses its own steps from rtol/atol; do not pass steps or grid "
                f"(or use a fixed-grid solver: euler, midpoint, heun, rk4)."
            )
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a positive number.")
        _check_int("max_steps", max_steps)
        if h0 is not None and not (isinstance(h0, (int, float)) and h0 > 0):
            raise ValueError(f"h0={h0!r} must be a positive number or None.")
        hi, lo = _grids.time_range(path, t_max, t_min)
    else:
        with torch.device("cpu"):  # host planning, whatever torch.set_default_device says
            grid_up = _increasing_grid(path, grid, steps, t_min, t_max)
        lo, hi = float(grid_up[0]), float(grid_up[-1])

    from .checks import check_f32_times

    check_f32_times([lo, hi], torch.float64 if x.dtype == torch.float64 else torch.float32,
                    f"the integration range of {solver}")
    user_device = user_default_device()  # None unless torch.set_default_device moved it off the CPU
    with torch.inference_mode(False), torch.no_grad(), host_default(user_device):
        if user_device is not None:  # our code runs with the CPU as default device, the model with the user's
            model = GuardedModel(model, device=user_device)
        state = x.detach()
        if state.dtype not in (torch.float32, torch.float64):
            state = state.float()
        state = state.clone(memory_format=torch.contiguous_format)  # also turns an inference tensor into a normal one
        dtype_acc = torch.float64 if state.dtype == torch.float64 else torch.float32
        dim = state[0].numel() if state.dim() > 1 else 1
        mode = divergence if divergence != "auto" else ("exact" if dim <= AUTO_EXACT_MAX_DIM else "hutchinson")
        be = resolve_backend(backend, state.device)
        k = probes if mode == "hutchinson" else 1
        # validated always; seed=None draws a fresh key only where probes are drawn (exact divergence draws none)
        seed = None if (seed is None and mode != "hutchinson") else resolve_seed(seed)
        seed_t = seed_tensor(0 if seed is None else seed, state.device)
        field = _Field(model, state, mode, k, probe, seed_t, sample_offset, be, exact_method, chunk)
        acc = torch.zeros(field.rows, state.shape[0], dtype=dtype_acc, device=state.device)
        if tab.adaptive:
            stats = _integrate_adaptive(field, state, acc, tab, lo, hi, float(rtol), float(atol), h0, max_steps, dtype_acc, be)
        else:
            stats = _integrate_fixed(field, state, acc, tab, grid_up, dtype_acc, be)
        if prior_log_prob is None:
            prior_log_prob = _gaussian_prior(float(path.sigma(torch.tensor(hi, dtype=torch.float64))))
        prior = prior_log_prob(state)
        if not isinstance(prior, torch.Tensor) or prior.shape != (state.shape[0],):
            raise ValueError(
                f"prior_log_prob returned {getattr(prior, 'shape', type(prior).__name__)}; it must return a [B] = "
                f"[{state.shape[0]}] tensor of log-densities of x(t_max)."
            )
        delta = acc.mean(0)
        logp = prior.to(dtype_acc) + delta
        finite = torch.isfinite(logp)
        if not bool(finite.all()):  # one host read after the integration: never return a silent NaN
            bad = (~finite).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"log_likelihood gave NaN/inf for samples {bad[:8]} with {solver} on [{lo:.3g}, {hi:.3g}]: the "
                f"{model.predicts}-model's velocity is too stiff there for this grid (its conversion grows like "
                f"1/sigma or 1/alpha near the ends). Raise t_min / lower t_max, use more steps or solver='dopri5', "
                f"or run with fs.Model(..., check_finite=True) to find the evaluation."
            )
        if mode == "exact":
            stderr = torch.zeros_like(logp)
        elif k == 1:
            stderr = torch.full_like(logp, float("nan"))
        else:
            stderr = acc.std(0, correction=1) / math.sqrt(k)
    if not return_info:
        return logp, stderr
    info = {"nfe": field.nfe, "vjps": field.vjps, "steps": stats["steps"], "rejected": stats["rejected"],
            "grid": stats["grid"], "divergence": mode, "solver": solver, "probes": k if mode == "hutchinson" else 0,
            "delta_log_p": delta, "prior_log_prob": prior.to(dtype_acc), "x_T": state,
            "per_probe": acc if mode == "hutchinson" else None, "seed": None if seed is None else seed_value(seed)}
    return logp, stderr, info


def bits_per_dim(log_p: torch.Tensor, dim, *, n_bits: int = 8, data_range=(-1.0, 1.0)) -> torch.Tensor:
    """Bits per dimension of n-bit data from the log-density of its dequantized, rescaled version.

    With integer data x in {0, ..., 2^n - 1}, uniform dequantization u = x + U[0, 1) and the affine map
    y = lo + (hi - lo) u / 2^n to the model's space (``dequantize``), the discrete log-likelihood obeys
    log P(x) >= E_U[log p(y)] + D log((hi - lo) / 2^n) (Theis et al. 2016; Ho et al. 2019). So

        bpd = -log p(y) / (D ln 2) + n_bits - log2(hi - lo),

    the "offset" of Song et al. 2021 (7 for data in [-1, 1], 8 for [0, 1] with 8 bits).

    Args:
        log_p: ``[B]`` log-densities in nats (``log_likelihood``'s first output) at dequantized points.
        dim: D, the number of dimensions per sample, or a data tensor ``[B, *event]`` to read it from.
    """
    if isinstance(dim, torch.Tensor):
        dim = dim[0].numel() if dim.dim() > 1 else 1
    _check_int("dim", dim)
    _check_int("n_bits", n_bits)
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise ValueError(f"data_range={data_range!r} must be (lo, hi) with hi > lo.")
    return -log_p / (dim * math.log(2.0)) + n_bits - math.log2(hi - lo)


def dequantize(x: torch.Tensor, *, n_bits: int = 8, data_range=(-1.0, 1.0), generator=None,
               dtype=torch.float32) -> torch.Tensor:
    """Uniformly dequantize integer data x in {0, ..., 2^n - 1} to y = lo + (hi - lo) (x + U) / 2^n, U ~ U[0, 1)."""
    _check_int("n_bits", n_bits)
    if x.is_floating_point():
        raise TypeError(f"dequantize takes integer data (e.g. uint8 pixels); got dtype {x.dtype}.")
    if bool((x < 0).any()) or bool((x >= 2**n_bits).any()):
        raise ValueError(f"x must lie in [0, 2^{n_bits} - 1] = [0, {2**n_bits - 1}].")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise ValueError(f"data_range={data_range!r} must be (lo, hi) with hi > lo.")
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return (lo + (hi - lo) * (x.to(torch.float64) + u) / 2**n_bits).to(dtype)
