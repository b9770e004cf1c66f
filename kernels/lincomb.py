"""The one fused step kernel: ``out = sum_i C[step, i] * T_i + C[step, K] * z``.

Every solver update in flowsolve (Euler, Euler-Maruyama, Heun, DDIM / DPM-Solver++, ...) is a
linear combination of a few tensors (the state, model outputs, their history) plus optional
Gaussian noise, with coefficients that depend only on the time grid and the schedule
(docs/kernels.md). The coefficients live in a device table ``C`` of shape ``[n_rows, K + 1]``
(column K is the noise coefficient), precomputed in float64 and stored in the accumulation
dtype; the kernel reads its row through a step index held in device memory, so the sampling loop
never syncs with the host and can be captured in a CUDA graph.

Accumulation is in the table's dtype (fp32, or fp64 for verification); the result is cast to
``out.dtype`` on store. Noise ``z`` is generated in the kernel, keyed by (seed, global sample,
step, element, stream) (``philox.py``, docs/noise.md), never materialised. A second, noise-free output
(``out2``) can be written in the same pass.

This file holds the Triton kernel, its launcher ``lincomb`` and its torch twin ``lincomb_torch``.
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON, launch, resolve_backend
from .offsets import tile_grid, tile_shape
from .philox import STREAM_STEP, _check_keys, keyed_normal_like_torch

MAX_INPUTS = 8

# dtype triples (inputs, accumulation = the table's dtype, output) of the Triton path. The solvers' loops use the
# first two (state and model outputs in fp32, or everything in fp64 for verification); the others serve users
# with half-precision tensors. Inputs of mixed dtypes are upcast to the widest one first (exact). The twin
# takes any combination.
TRITON_DTYPES = (
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64),
    (torch.float16, torch.float32, torch.float16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float16),
    (torch.float32, torch.float32, torch.bfloat16),
)
TRITON_NOISE_DTYPES = TRITON_DTYPES[:2]  # in-kernel noise: the solvers' state dtypes
BLOCK = 1024  # elements per program of the noise-free kernel


def num_warps(dtype: torch.dtype) -> int:
    """Warps per 1024-element program: 4 for float32 (measured at copy bandwidth on an H200), 8 (4 elements per
    thread) for half-precision inputs and float64, whose extra conversion or wider registers spilled with 4
    (ptxas, sm_80..sm_100: up to 120 bytes for 8 half inputs)."""
    return 4 if dtype == torch.float32 else 8


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .offsets import block_offsets, tile_offsets
    from .philox import keyed_normal_tile

    @triton.jit
    def _combine(row_ptr, t0, t1, t2, t3, t4, t5, t6, t7, offs, mask, K: tl.constexpr):
        """sum_i row[i] T_i over the K inputs, in the table's dtype."""
        c = tl.load(row_ptr)
        acc = c * tl.load(t0 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 1:
            acc += tl.load(row_ptr + 1) * tl.load(t1 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 2:
            acc += tl.load(row_ptr + 2) * tl.load(t2 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 3:
            acc += tl.load(row_ptr + 3) * tl.load(t3 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 4:
            acc += tl.load(row_ptr + 4) * tl.load(t4 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 5:
            acc += tl.load(row_ptr + 5) * tl.load(t5 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 6:
            acc += tl.load(row_ptr + 6) * tl.load(t6 + offs, mask=mask, other=0.0).to(c.dtype)
        if K > 7:
            acc += tl.load(row_ptr + 7) * tl.load(t7 + offs, mask=mask, other=0.0).to(c.dtype)
        return acc

    # The second output (a runtime flag, not a specialization) is written first, from a first read of the inputs;
    # the main sum then reads them again from the cache: no register pressure on the usual one-output path, no
    # extra DRAM traffic, and ``out`` may alias an input that ``out2`` reads.
    @triton.jit(do_not_specialize=["coef_stride", "coef2_stride", "has_out2"])
    def _lincomb_kernel(out_ptr, out2_ptr, t0, t1, t2, t3, t4, t5, t6, t7, coef_ptr, coef_stride, coef2_ptr,
                        coef2_stride, step_ptr, numel, has_out2, K: tl.constexpr, BLOCK: tl.constexpr):
        offs = block_offsets(tl.program_id(0), BLOCK)  # int64: no overflow past 2^31 elements
        mask = offs < numel
        step = tl.load(step_ptr)
        if has_out2 != 0:
            acc2 = _combine(coef2_ptr + step * coef2_stride, t0, t1, t2, t3, t4, t5, t6, t7, offs, mask, K)
            tl.store(out2_ptr + offs, acc2.to(out2_ptr.dtype.element_ty), mask=mask)
        acc = _combine(coef_ptr + step * coef_stride, t0, t1, t2, t3, t4, t5, t6, t7, offs, mask, K)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["coef_stride", "coef2_stride", "has_out2", "stream", "sample_offset"])
    def _lincomb_noise_kernel(out_ptr, out2_ptr, t0, t1, t2, t3, t4, t5, t6, t7, coef_ptr, coef_stride, coef2_ptr,
                              coef2_stride, step_ptr, seed_ptr, stream, sample_offset, batch, per_sample,
                              n_col_blocks, has_out2, K: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, col0, offs, mask = tile_offsets(tl.program_id(0), n_col_blocks, batch, per_sample, ROWS, BLOCK)
        step = tl.load(step_ptr)
        if has_out2 != 0:
            acc2 = _combine(coef2_ptr + step * coef2_stride, t0, t1, t2, t3, t4, t5, t6, t7, offs, mask, K)
            tl.store(out2_ptr + offs, acc2.to(out2_ptr.dtype.element_ty), mask=mask)
        row = coef_ptr + step * coef_stride
        acc = _combine(row, t0, t1, t2, t3, t4, t5, t6, t7, offs, mask, K)
        z = keyed_normal_tile(tl.load(seed_ptr), rows + sample_offset, step, col0, BLOCK, stream)
        acc = acc + tl.load(row + K) * z.to(acc.dtype)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _validate(out, inputs, coef, step, out2=None, coef2=None):
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"lincomb takes 1..{MAX_INPUTS} input tensors; got {len(inputs)}.")
    for i, t in enumerate(inputs):
        if t.shape != out.shape:
            raise ValueError(f"inputs[{i}] has shape {tuple(t.shape)} but out has {tuple(out.shape)}; they must match.")
        if t.device != out.device:
            raise ValueError(f"inputs[{i}] is on {t.device} but out is on {out.device}.")
        if not t.is_floating_point():
            raise TypeError(f"inputs[{i}] has dtype {t.dtype}; lincomb needs floating-point tensors.")
    if coef.dim() != 2 or coef.shape[1] != len(inputs) + 1:
        raise ValueError(
            f"coef must be [n_rows, K+1] = [n, {len(inputs) + 1}] for K={len(inputs)} inputs (last column: noise); "
            f"got {tuple(coef.shape)}."
        )
    if coef.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coef dtype {coef.dtype}: the accumulation dtype must be float32 or float64.")
    if coef.device != out.device or step.device != out.device:
        raise ValueError("coef and step must live on out's device (the loop must not copy them per step).")
    if step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError(f"step must be a one-element int64 tensor; got dtype {step.dtype}, shape {tuple(step.shape)}.")
    if (out2 is None) != (coef2 is None):
        raise ValueError("out2 and coef2 go together: pass both (a second output and its [n_rows, K] table) or neither.")
    if out2 is not None:
        if out2.shape != out.shape or out2.device != out.device or out2.dtype != out.dtype:
            raise ValueError(f"out2 must match out's shape, device and dtype ({tuple(out.shape)}, {out.device}, "
                             f"{out.dtype}); got {tuple(out2.shape)}, {out2.device}, {out2.dtype}.")
        if coef2.dim() != 2 or coef2.shape[1] != len(inputs) or coef2.shape[0] != coef.shape[0]:
            raise ValueError(f"coef2 must be [n_rows, K] = [{coef.shape[0]}, {len(inputs)}] (no noise column: the "
                             f"second output is noise-free); got {tuple(coef2.shape)}.")
        if coef2.dtype != coef.dtype or coef2.device != out.device:
            raise ValueError(f"coef2 must share coef's dtype ({coef.dtype}) and out's device; got {coef2.dtype} on "
                             f"{coef2.device}.")
        if not torch.compiler.is_compiling() and (_overlaps(out2, out) or any(_overlaps(out2, t) for t in inputs)):
            raise ValueError("out2 shares memory with out or an input; it must be a separate buffer (a history slot).")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _row_of(coef, step, host_row):
    if host_row is not None and not torch.compiler.is_compiling():
        return host_row
    if coef.stride(0) == 0:  # a broadcast one-row table (the named launchers): every step reads row 0
        return coef[0]
    return coef.index_select(0, step.reshape(1)).reshape(-1)  # device-side row: no host sync


def lincomb_torch(out, inputs, coef, step, seed=None, *, sample_offset=0, stream=STREAM_STEP, host_row=None,
                  out2=None, coef2=None, host_row2=None):
    """Torch twin of ``lincomb``: same signature and result (to rounding), strided inputs welcome.

    Writes in place into ``out`` without allocating when ``out.dtype == coef.dtype`` and there is
    no noise (noise costs one fp32 temporary on this backend). ``out`` may alias inputs: the same
    tensor is updated in place; any other overlap goes through a temporary. ``out2`` (the second output,
    ``sum_i coef2[step, i] inputs[i]``) is written first, so ``out`` may alias an input it reads.

    ``host_row``/``host_row2``: the coefficient rows ``coef[step]``/``coef2[step]`` as Python floats, for CPU
    tensors, where host and device memory are the same and reading the row costs nothing. The sum is then
    ``mul`` plus one ``add_(alpha=c)`` per input: the row's ``index_select``, its ``select`` per term and the
    0-d multiplies go away, which is most of a step's cost for small batches (``bench/loop.py``). Values
    are those of ``coef`` (``coef.tolist()``), so the result is the same up to the order of rounding
    inside one fused multiply-add. ``step`` still keys the noise.
    """
    if out2 is not None:
        lincomb_torch(out2, inputs, torch.cat([coef2, coef2[:, :1] * 0], 1) if host_row2 is None else coef2, step,
                      host_row=None if host_row2 is None else list(host_row2) + [0.0])
    if out.numel() == 0:  # empty tensors share data_ptr 0: the aliasing test below would see overlap
        return out
    row = _row_of(coef, step, host_row)
    k = len(inputs)
    if torch.compiler.is_compiling():
        # under torch.compile: written out of place and copied, which is correct whatever aliases out (storage
        # pointers cannot be traced); inductor fuses the sum and the copy into one pass
        acc = sum(inputs[i].to(coef.dtype) * row[i] for i in range(k))
        if seed is not None:
            acc = acc + keyed_normal_like_torch(out, seed, step, sample_offset, stream).to(coef.dtype) * row[k]
        return out.copy_(acc)
    order = list(range(k))
    storage = out.untyped_storage().data_ptr()
    shares = [i for i in order if inputs[i].untyped_storage().data_ptr() == storage]
    same = [i for i in shares if inputs[i].data_ptr() == out.data_ptr() and inputs[i].stride() == out.stride()]
    if len(shares) == 1 and same:  # out is one of the inputs: read it first, before it is overwritten
        order.remove(same[0])
        order.insert(0, same[0])
    elif shares:  # several inputs, or a different view, share out's memory: go through a temporary
        tmp = lincomb_torch(torch.empty(out.shape, dtype=out.dtype, device=out.device), inputs, coef, step, seed,
                            sample_offset=sample_offset, stream=stream, host_row=host_row)
        return out.copy_(tmp)
    acc = out if out.dtype == coef.dtype else torch.empty(out.shape, dtype=coef.dtype, device=out.device)
    first = inputs[order[0]]
    if first.dtype == acc.dtype:
        torch.mul(first, row[order[0]], out=acc)
    else:  # a 0-d coefficient does not promote a tensor's dtype: upcast first, then scale
        acc.copy_(first).mul_(row[order[0]])
    if row is host_row:
        for i in order[1:]:
            acc.add_(inputs[i], alpha=row[i])
    else:
        for i in order[1:]:
            acc.addcmul_(inputs[i], row[i])
    if seed is not None:
        z = keyed_normal_like_torch(out, seed, step, sample_offset, stream)
        if row is host_row:
            acc.add_(z, alpha=row[k])
        else:
            acc.addcmul_(z, row[k])
    if acc is not out:
        out.copy_(acc)
    return out


_RANK = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def _triton_inputs(out, inputs, coef, noise: bool):
    """The inputs as the Triton path reads them: contiguous, not overlapping out unless they are out itself
    (blocks run in any order), mixed dtypes upcast to the widest (exact); and the dtype triple checked."""
    storage = out.untyped_storage().data_ptr()

    def _safe(t):
        if t.untyped_storage().data_ptr() == storage and not (t.data_ptr() == out.data_ptr() and t.stride() == out.stride()):
            return t.clone(memory_format=torch.contiguous_format)
        return t if t.is_contiguous() else t.contiguous()

    inputs = [_safe(t) for t in inputs]
    dtypes = {t.dtype for t in inputs}
    if len(dtypes) > 1:
        wide = max(dtypes, key=lambda d: (_RANK[d], d == torch.float16))
        if len(dtypes) == 2 and dtypes == {torch.float16, torch.bfloat16}:
            wide = torch.float32
        inputs = [t if t.dtype == wide else t.to(wide) for t in inputs]
    triple = (inputs[0].dtype, coef.dtype, out.dtype)
    allowed = TRITON_NOISE_DTYPES if noise else TRITON_DTYPES
    if triple not in allowed:
        names = ", ".join("(" + ", ".join(str(d).replace("torch.", "") for d in tr) + ")" for tr in allowed)
        raise TypeError(
            f"lincomb{' with noise' if noise else ''} on the Triton backend supports the dtype triples (inputs, "
            f"table, out) {names}; got ({', '.join(str(d).replace('torch.', '') for d in triple)}). Cast the tensors "
            f"or the table, or use backend='torch'."
        )
    return inputs


def lincomb(out, inputs, coef, step, seed=None, *, sample_offset=0, stream=STREAM_STEP, backend=None,
            out2=None, coef2=None, block=None):
    """``out[...] = sum_i coef[step, i] * inputs[i] + coef[step, K] * z`` (z keyed noise if ``seed`` given),
    and optionally, in the same pass, ``out2[...] = sum_i coef2[step, i] * inputs[i]``.

    Args:
        out: contiguous output tensor ``[B, ...]`` (any float dtype; cast on store). May alias an input.
        inputs: 1..8 tensors shaped like ``out`` (non-contiguous ones are copied for the Triton backend).
        coef: ``[n_rows, K+1]`` float32/float64 table on ``out.device``; its dtype is the accumulation dtype.
            A table expanded from one row (row stride 0) serves every step with that row.
        step: one-element int64 device tensor, the row to read (also the noise key's step).
        seed: one-element int64 device tensor, or None for no noise.
        sample_offset: global index of ``out[0]`` (for sharded batches).
        stream: noise stream id (see ``philox.py``).
        backend: "auto" | "torch" | "triton" (see ``backend.py``).
        out2, coef2: a second, noise-free output (shaped and typed like ``out``, overlapping nothing) and its
            ``[n_rows, K]`` table: a multistep solver writes its history entry and its update in one launch.
        block: Triton only: the tile's columns for the noise kernel (a power of two >= 4; default: fit the row).

    The Triton path reads the dtype triples of ``TRITON_DTYPES``; the twin takes any float dtypes.
    """
    inputs = list(inputs)
    _validate(out, inputs, coef, step, out2, coef2)
    if seed is not None:
        _check_keys(out, seed, step, sample_offset)
    if resolve_backend(backend, out.device) == "torch":
        return lincomb_torch(out, inputs, coef, step, seed, sample_offset=sample_offset, stream=stream,
                             out2=out2, coef2=coef2)
    if not out.is_contiguous() or (out2 is not None and not out2.is_contiguous()):
        raise ValueError("lincomb(out=..., out2=...): outputs must be contiguous for the Triton backend; pass "
                         "contiguous buffers.")
    numel = out.numel()
    if numel == 0:
        return out
    inputs = _triton_inputs(out, inputs, coef, seed is not None)
    k = len(inputs)
    ptrs = inputs + [inputs[0]] * (MAX_INPUTS - k)
    has_out2 = out2 is not None
    o2, c2 = (out2, coef2) if has_out2 else (out, coef)
    if seed is None:
        launch(_lincomb_kernel, (triton.cdiv(numel, BLOCK),), out, o2, *ptrs, coef, coef.stride(0), c2,
               c2.stride(0), step, numel, int(has_out2), K=k, BLOCK=BLOCK, num_warps=num_warps(inputs[0].dtype))
        return out
    b = out.shape[0]
    per = numel // b
    rows, blk = tile_shape(per, block)
    grid, n_col_blocks = tile_grid(b, per, rows, blk)
    launch(_lincomb_noise_kernel, grid, out, o2, *ptrs, coef, coef.stride(0), c2, c2.stride(0), step, seed, stream,
           sample_offset, b, per, n_col_blocks, int(has_out2), K=k, ROWS=rows, BLOCK=blk, enable_fp_fusion=False,
           num_warps=num_warps(inputs[0].dtype))
    return out
