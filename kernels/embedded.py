"""The fused embedded-step kernel: new state, embedded error estimate and its per-sample RMS norm in ONE pass.

An embedded Runge-Kutta pair (Bogacki-Shampine 3(2), Dormand-Prince 5(4), Tsitouras 5(4), ...) advances
the state with one set of weights and estimates the local error with the difference of two
(Hairer, Norsett & Wanner, "Solving ODEs I", Sec. II.4). Both are linear combinations of the same
stage tensors, so one pass over memory computes

    out     = sum_i coef[step, i] * inputs[i] + coef[step, K] * z          (z: keyed noise iff seed given)
    e       = sum_i err_coef[step, i] * inputs[i]                          (the local error estimate; no noise)
    err_norm[b] = sqrt( mean_j ( e[b, j] / (atol + rtol * max(|x_ref[b, j]|, |out[b, j]|)) )^2 )

the per-sample RMS of the scaled error (HNW II.4, eq. 4.11, with sc_j = atol + rtol max(|x_0j|, |x_1j|)).
``out`` is written (cast on store to ``out.dtype``); ``e`` is never materialised. ``out`` in the norm is
the value in the accumulation dtype, before the cast on store. The coefficient tables follow ``lincomb``:
``coef`` ``[n_rows, K+1]`` (last column: noise), ``err_coef`` ``[n_rows, K]``, float32 or float64 (the
accumulation dtype), rows read through a one-element int64 device step index (no host sync), a table
expanded from one row (row stride 0) serving every step.

``rtol`` and ``atol`` are Python floats (the controller's, fixed for a run); both backends round them to
float32 (a relative change below 6e-8) because Triton passes Python floats as fp32 scalars.

Reduction (deterministic, batch-invariant, no atomics). Every launch parameter is a function of the
per-sample size D alone, never of the batch size, so sample b's norm is bitwise the same in any batch:
* D <= ``chunk`` (8 blocks of up to 1024 elements by default): one program reduces ROWS = max(1, 1024 //
  BLOCK) whole rows (several short rows share a tile), looping over each row in BLOCK-element blocks, and
  writes the norm.
* D > ``chunk``: program (b, c) reduces elements [c * chunk, (c + 1) * chunk) of row b into a partial
  sum; a second small kernel adds each row's partials in a fixed order and takes the root. A row of an
  image (B = 1, D = 3 x 512 x 512) is then spread over 96 programs instead of one.
The torch twin sums each row in fixed chunks of 8192 elements (as ``hutchinson.py``), so torch's
intra-op parallel reduction cannot change the summation order with the batch size: also batch-invariant.

This file holds the Triton kernels, the launcher ``embedded_step`` and its torch twin ``embedded_step_torch``.
"""
from __future__ import annotations

import collections
import math
import struct
import threading

import torch

from .backend import HAS_TRITON, launch, resolve_backend
from .lincomb import MAX_INPUTS
from .offsets import TILE, tile_shape
from .philox import STREAM_STEP, _check_keys, keyed_normal_like_torch
from .reduce import rowsum_fixed_chunks

_FINISH_BLOCK = 128  # partial sums per iteration of the second-stage reduction
_CHUNK_BLOCKS = 8  # default chunk: 8 blocks (8192 elements) per program before the two-stage reduction
_TWIN_CHUNK = 8192  # the twin's fixed per-row summation chunk
EMBEDDED_DTYPES = ((torch.float32,) * 3, (torch.float64,) * 3)  # (inputs, tables, out) of the Triton path

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .philox import keyed_normal_tile

    @triton.jit
    def _terms(acc, err, crow, erow, i: tl.constexpr, t_ptr, offs, mask):
        v = tl.load(t_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
        return acc + tl.load(crow + i) * v, err + tl.load(erow + i) * v

    # noise is a runtime flag (has_noise), not a specialization: the adaptive solvers step without it, and the
    # kernel compiles once per (K, dtype, tile) instead of twice; fused multiply-add is off in both cases, so
    # that the in-kernel noise matches the twin's bits (docs/noise.md)
    @triton.jit(do_not_specialize=["coef_stride", "ecoef_stride", "stream", "sample_offset", "has_noise"])
    def _embedded_kernel(out_ptr, norm_ptr, part_ptr, t0, t1, t2, t3, t4, t5, t6, t7, xref_ptr,
                         coef_ptr, coef_stride, ecoef_ptr, ecoef_stride, step_ptr, seed_ptr,
                         rtol, atol, stream, sample_offset, batch, per_sample, n_chunks, chunk,
                         has_noise, K: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr, SINGLE: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # int64 offsets throughout: no overflow past 2^31 elements
        rblock = pid // n_chunks
        ck = pid % n_chunks
        rows = rblock * ROWS + tl.arange(0, ROWS).to(tl.int64)
        rmask = rows < batch
        step = tl.load(step_ptr)
        crow = coef_ptr + step * coef_stride
        erow = ecoef_ptr + step * ecoef_stride
        c0 = tl.load(crow)
        rt = c0 * 0 + rtol  # in the accumulation dtype (a Python float arrives as an fp32 scalar)
        at = c0 * 0 + atol
        lo = ck * chunk
        hi = tl.minimum(lo + chunk, per_sample)
        ssq = tl.zeros([ROWS, BLOCK], dtype=c0.dtype)
        seed = tl.load(seed_ptr)  # step_ptr stands in when there is no noise: a valid address either way
        noise_c = tl.load(crow + K)
        for start in range(lo, hi, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = rmask[:, None] & (cols[None, :] < hi)
            offs = rows[:, None] * per_sample + cols[None, :]
            v = tl.load(t0 + offs, mask=mask, other=0.0).to(c0.dtype)
            acc = c0 * v
            err = tl.load(erow) * v
            if K > 1:
                acc, err = _terms(acc, err, crow, erow, 1, t1, offs, mask)
            if K > 2:
                acc, err = _terms(acc, err, crow, erow, 2, t2, offs, mask)
            if K > 3:
                acc, err = _terms(acc, err, crow, erow, 3, t3, offs, mask)
            if K > 4:
                acc, err = _terms(acc, err, crow, erow, 4, t4, offs, mask)
            if K > 5:
                acc, err = _terms(acc, err, crow, erow, 5, t5, offs, mask)
            if K > 6:
                acc, err = _terms(acc, err, crow, erow, 6, t6, offs, mask)
            if K > 7:
                acc, err = _terms(acc, err, crow, erow, 7, t7, offs, mask)
            if has_noise != 0:  # start is a multiple of BLOCK >= 4: the tile holds whole groups of the noise format
                z = keyed_normal_tile(seed, rows[:, None] + sample_offset, step, start, BLOCK, stream)
                acc = acc + noise_c * z.to(c0.dtype)
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            xr = tl.load(xref_ptr + offs, mask=mask, other=0.0).to(c0.dtype)
            q = err / (at + rt * tl.maximum(tl.abs(xr), tl.abs(acc)))
            ssq += tl.where(mask, q * q, 0.0)
        part = tl.sum(ssq, axis=1)
        if SINGLE:
            tl.store(norm_ptr + rows, tl.sqrt(part / per_sample), mask=rmask)
        else:
            tl.store(part_ptr + rows * n_chunks + ck, part, mask=rmask)

    @triton.jit
    def _finish_kernel(norm_ptr, part_ptr, n_chunks, per_sample, NB: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        s = tl.zeros([NB], dtype=norm_ptr.dtype.element_ty)
        for start in range(0, n_chunks, NB):
            j = start + tl.arange(0, NB).to(tl.int64)
            s += tl.load(part_ptr + r * n_chunks + j, mask=j < n_chunks, other=0.0)
        tl.store(norm_ptr + r, tl.sqrt(tl.sum(s, axis=0) / per_sample))


def _f32(v: float) -> float:
    """``v`` rounded to float32 (pure Python: no tensor, so no dispatch inside a sampling loop)."""
    return struct.unpack("f", struct.pack("f", float(v)))[0]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() > 0 and b.numel() > 0


def _validate(out, err_norm, inputs, coef, err_coef, step, x_ref, rtol, atol):
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise ValueError("out must be a batch-first state tensor [B, ...]; got a 0-d tensor or a non-tensor.")
    if not out.is_floating_point():
        raise TypeError(f"out has dtype {out.dtype}; embedded_step needs a floating-point state.")
    if not out.is_contiguous():
        raise ValueError("embedded_step(out=...): out must be contiguous; pass a contiguous state buffer.")
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"embedded_step takes 1..{MAX_INPUTS} input tensors; got {len(inputs)}.")
    named = [(f"inputs[{i}]", t) for i, t in enumerate(inputs)] + [("x_ref", x_ref)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor shaped like out; got {type(t).__name__}.")
        if t.shape != out.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but out has {tuple(out.shape)}; they must match.")
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}; keep every argument on one device.")
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; embedded_step needs floating-point tensors.")
        if _shares_memory(t, out):
            raise ValueError(
                f"{name} shares memory with out; embedded_step reads every input after writing out (the norm uses "
                f"both), so out must be a separate buffer (e.g. the candidate state, swapped in when accepted)."
            )
    k = len(inputs)
    if coef.dim() != 2 or coef.shape[1] != k + 1:
        raise ValueError(
            f"coef must be [n_rows, K+1] = [n, {k + 1}] for K={k} inputs (last column: noise); got {tuple(coef.shape)}."
        )
    if err_coef.dim() != 2 or err_coef.shape[1] != k:
        raise ValueError(f"err_coef must be [n_rows, K] = [n, {k}] for K={k} inputs; got {tuple(err_coef.shape)}.")
    if coef.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coef dtype {coef.dtype}: the accumulation dtype must be float32 or float64.")
    if err_coef.dtype != coef.dtype:
        raise TypeError(f"err_coef has dtype {err_coef.dtype} but coef has {coef.dtype}; use one accumulation dtype.")
    if not isinstance(err_norm, torch.Tensor) or err_norm.dim() != 1 or err_norm.shape[0] != out.shape[0]:
        raise ValueError(
            f"err_norm must be a [B] = [{out.shape[0]}] tensor (one norm per sample); got "
            f"{tuple(err_norm.shape) if isinstance(err_norm, torch.Tensor) else type(err_norm).__name__}."
        )
    if err_norm.dtype != coef.dtype:
        raise TypeError(f"err_norm has dtype {err_norm.dtype} but coef has {coef.dtype}: err_norm is in the "
                        f"accumulation dtype; match them.")
    if not err_norm.is_contiguous():
        raise ValueError("err_norm must be contiguous (it is overwritten).")
    for name, t in (("coef", coef), ("err_coef", err_coef), ("step", step), ("err_norm", err_norm)):
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}; the loop must not copy it per step.")
    if _shares_memory(err_norm, out) or any(_shares_memory(err_norm, t) for _, t in named):
        raise ValueError("err_norm shares memory with out, an input or x_ref; pass a separate [B] buffer.")
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError(f"step must be a one-element int64 tensor; got {step!r}.")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v!r} must be a finite number >= 0.")
    if not atol > 0:
        raise ValueError(f"atol={atol!r} must be > 0 so that the error scale atol + rtol |x| never vanishes.")


def _rowsum(p: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a [B, n] tensor in fixed chunks: bitwise independent of B."""
    return rowsum_fixed_chunks(p, _TWIN_CHUNK)


_SCRATCH_KEYS = 4
_LOCAL = threading.local()  # scratch per thread: two threads stepping the same shape never share buffers


def _scratch(shape, dtype, device) -> list:
    """Three state-sized scratch tensors for the twin, reused across calls of one thread (LRU over its last 4
    shapes): a fresh CPU allocation per step costs page faults (measured 6.3 ms against 1.2 ms per call at
    [64, 3072] fp32). Per thread, so concurrent sampling loops in one process cannot overwrite each other's."""
    cache = getattr(_LOCAL, "scratch", None)
    if cache is None:
        cache = _LOCAL.scratch = collections.OrderedDict()
    key = (tuple(shape), dtype, str(device))
    bufs = cache.pop(key, None)
    if bufs is None:
        bufs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(3)]
    cache[key] = bufs
    while len(cache) > _SCRATCH_KEYS:
        cache.popitem(last=False)
    return bufs


def _row(table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    if table.stride(0) == 0:  # a broadcast one-row table: every step reads row 0
        return table[0]
    return table.index_select(0, step.reshape(1)).reshape(-1)  # device-side row: no host sync


def embedded_step_torch(out, err_norm, inputs, coef, err_coef, step, *, x_ref, rtol: float, atol: float,
                        seed=None, sample_offset=0, stream=STREAM_STEP, backend=None):
    """Torch twin of ``embedded_step``: same signature and result (to rounding); strided inputs welcome.

    Uses three state-sized scratch tensors in the accumulation dtype (the error, its scale, |out|), kept between
    calls of the same thread (``_scratch``); ``backend`` is accepted for the
    common signature and ignored.
    """
    inputs = list(inputs)
    _validate(out, err_norm, inputs, coef, err_coef, step, x_ref, rtol, atol)
    if seed is not None:
        _check_keys(out, seed, step, sample_offset)
    if out.numel() == 0:
        return out, err_norm.zero_()
    row, erow = _row(coef, step), _row(err_coef, step)
    dt = coef.dtype
    err, scale, mag = _scratch(out.shape, dt, out.device)
    acc = out if out.dtype == dt else torch.empty(out.shape, dtype=dt, device=out.device)
    for i, t in enumerate(inputs):
        if i == 0:
            if t.dtype == dt:
                torch.mul(t, row[0], out=acc)
                torch.mul(t, erow[0], out=err)
            else:  # a 0-d coefficient does not promote a tensor's dtype: upcast first, then scale
                acc.copy_(t).mul_(row[0])
                err.copy_(t).mul_(erow[0])
        else:
            acc.addcmul_(t, row[i])
            err.addcmul_(t, erow[i])
    if seed is not None:
        acc.addcmul_(keyed_normal_like_torch(out, seed, step, sample_offset, stream), row[len(inputs)])
    if x_ref.dtype == dt:
        torch.abs(x_ref, out=scale)
    else:
        scale.copy_(x_ref).abs_()
    torch.abs(acc, out=mag)
    torch.maximum(scale, mag, out=scale)
    scale.mul_(_f32(rtol)).add_(_f32(atol))
    err.div_(scale).square_()
    b = out.shape[0]
    per = out.numel() // b
    torch.sqrt(_rowsum(err.view(b, per)).div_(per), out=err_norm)
    if acc is not out:
        out.copy_(acc)
    return out, err_norm


def _launch_params(per: int, block: int | None, chunk: int | None):
    """(BLOCK, ROWS, chunk, n_chunks): functions of the per-sample size only (batch invariance)."""
    _, block = tile_shape(per, block)  # a power of two >= 4: whole groups of four noise elements per tile
    if chunk is None:
        chunk = _CHUNK_BLOCKS * block
    elif chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1.")
    chunk = triton.cdiv(chunk, block) * block  # whole blocks per chunk
    n_chunks = triton.cdiv(per, chunk)
    rows = max(1, TILE // block) if n_chunks == 1 else 1
    return block, rows, chunk, n_chunks


def embedded_step(out, err_norm, inputs, coef, err_coef, step, *, x_ref, rtol: float, atol: float,
                  seed=None, sample_offset=0, stream=STREAM_STEP, backend=None, block=None, chunk=None):
    """One fused pass of an embedded (error-estimating) step:
        out   = sum_i coef[step, i] * inputs[i] + coef[step, K] * z        (z: keyed noise iff seed given)
        e     = sum_i err_coef[step, i] * inputs[i]                        (the local error estimate; no noise)
        err_norm[b] = sqrt( mean_j ( e[b, j] / (atol + rtol * max(|x_ref[b, j]|, |out[b, j]|)) )^2 )
    out: contiguous state-shaped [B, ...]; must not overlap inputs or x_ref.
    err_norm: [B] tensor (the accumulation dtype: float32, or float64 for float64 tables), overwritten.
    inputs: 1..8 state-shaped tensors; coef: [n_rows, K+1] like lincomb; err_coef: [n_rows, K];
    step: one-element int64 device tensor (row index and noise key). Returns (out, err_norm).
    Deterministic and batch-invariant: no atomics; the per-sample reduction is in a fixed order/chunking.

    Also: ``seed`` (one-element int64 device tensor) keys the noise by (seed, b + sample_offset, step,
    element, stream) exactly as ``lincomb``; ``backend`` "auto" | "torch" | "triton"; ``block``/``chunk``
    (Triton only) override the block size and the per-program chunk of a row (tests use them to reach the
    two-stage reduction at small sizes). Non-contiguous inputs / x_ref are copied for the Triton backend.
    """
    inputs = list(inputs)
    _validate(out, err_norm, inputs, coef, err_coef, step, x_ref, rtol, atol)
    if seed is not None:
        _check_keys(out, seed, step, sample_offset)
    if resolve_backend(backend, out.device) == "torch":
        return embedded_step_torch(out, err_norm, inputs, coef, err_coef, step, x_ref=x_ref, rtol=rtol, atol=atol,
                                   seed=seed, sample_offset=sample_offset, stream=stream)
    if out.numel() == 0:
        return out, err_norm.zero_()
    inputs = [t if t.is_contiguous() else t.contiguous() for t in inputs]
    x_ref = x_ref if x_ref.is_contiguous() else x_ref.contiguous()
    kinds = {t.dtype for t in inputs} | {x_ref.dtype, out.dtype, coef.dtype}
    if len(kinds) != 1 or (coef.dtype,) * 3 not in EMBEDDED_DTYPES:
        raise TypeError(f"embedded_step on the Triton backend needs inputs, x_ref, out and the tables in one dtype, "
                        f"float32 or float64 (the adaptive solvers' state); got {sorted(str(d) for d in kinds)}. Cast "
                        f"them, or use backend='torch'.")
    b = out.shape[0]
    per = out.numel() // b
    blk, rows, chk, n_chunks = _launch_params(per, block, chunk)
    k = len(inputs)
    ptrs = inputs + [inputs[0]] * (MAX_INPUTS - k)
    single = n_chunks == 1
    part = err_norm if single else torch.empty(b * n_chunks, dtype=err_norm.dtype, device=out.device)
    has_noise = seed is not None
    grid = (triton.cdiv(b, rows) * n_chunks,)
    launch(_embedded_kernel, grid, out, err_norm, part, *ptrs, x_ref, coef, coef.stride(0), err_coef,
           err_coef.stride(0), step, seed if has_noise else step, _f32(rtol), _f32(atol), stream, sample_offset, b, per,
           n_chunks, chk, int(has_noise), K=k, ROWS=rows, BLOCK=blk, SINGLE=single, enable_fp_fusion=False,
           num_warps=8)
    if not single:
        launch(_finish_kernel, (b,), err_norm, part, n_chunks, per, NB=_FINISH_BLOCK)
    return out, err_norm


__all__ = ["embedded_step", "embedded_step_torch"]
