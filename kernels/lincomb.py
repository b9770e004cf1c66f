"""The one fused step kernel: ``out = sum_i C[step, i] * T_i + C[step, K] * z``.

Every solver update in flowsolve (Euler, Euler-Maruyama, Heun, DDIM / DPM-Solver++, ...) is a
linear combination of a few tensors (the state, model outputs, their history) plus optional
Gaussian noise, with coefficients that depend only on the time grid and the schedule (DESIGN.md,
"Principles"). The coefficients live in a device table ``C`` of shape ``[n_rows, K + 1]``
(column K is the noise coefficient), precomputed in float64 and stored in the accumulation
dtype; the kernel reads its row through a step index held in device memory, so the sampling loop
never syncs with the host and can be captured in a CUDA graph.

Accumulation is in the table's dtype (fp32, or fp64 for verification); the result is cast to
``out.dtype`` on store. Noise ``z`` is generated in the kernel, keyed by (seed, global sample,
step, element, stream) (see ``philox.py``), never materialised.

This file holds the Triton kernel, its launcher ``lincomb`` and its torch twin ``lincomb_torch``.
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON, resolve_backend
from .philox import STREAM_STEP, _check_keys, keyed_normal_like_torch

MAX_INPUTS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .offsets import block_offsets, sample_element
    from .philox import keyed_normal

    @triton.jit
    def _term(acc, row_ptr, i: tl.constexpr, t_ptr, offs, mask):
        c = tl.load(row_ptr + i)
        return acc + c * tl.load(t_ptr + offs, mask=mask, other=0.0).to(c.dtype)

    @triton.jit
    def _lincomb_kernel(out_ptr, t0, t1, t2, t3, t4, t5, t6, t7, coef_ptr, coef_stride, step_ptr, seed_ptr,
                        sample_offset, numel, per_sample,
                        STREAM: tl.constexpr, K: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
        offs = block_offsets(tl.program_id(0), BLOCK)  # int64: no overflow past 2^31 elements
        mask = offs < numel
        step = tl.load(step_ptr)
        row = coef_ptr + step * coef_stride
        c0 = tl.load(row)
        acc = c0 * tl.load(t0 + offs, mask=mask, other=0.0).to(c0.dtype)
        if K > 1:
            acc = _term(acc, row, 1, t1, offs, mask)
        if K > 2:
            acc = _term(acc, row, 2, t2, offs, mask)
        if K > 3:
            acc = _term(acc, row, 3, t3, offs, mask)
        if K > 4:
            acc = _term(acc, row, 4, t4, offs, mask)
        if K > 5:
            acc = _term(acc, row, 5, t5, offs, mask)
        if K > 6:
            acc = _term(acc, row, 6, t6, offs, mask)
        if K > 7:
            acc = _term(acc, row, 7, t7, offs, mask)
        if HAS_NOISE:
            seed = tl.load(seed_ptr)
            sample, elem = sample_element(offs, per_sample, sample_offset)
            z = keyed_normal(seed, sample, step, elem, STREAM)
            acc = acc + tl.load(row + K) * z.to(c0.dtype)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _validate(out, inputs, coef, step):
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


def lincomb_torch(out, inputs, coef, step, seed=None, *, sample_offset=0, stream=STREAM_STEP, host_row=None):
    """Torch twin of ``lincomb``: same signature and result (to rounding), strided inputs welcome.

    Writes in place into ``out`` without allocating when ``out.dtype == coef.dtype`` and there is
    no noise (noise costs one fp32 temporary on this backend). ``out`` may alias inputs: the same
    tensor is updated in place; any other overlap goes through a temporary.

    ``host_row``: the coefficient row ``coef[step]`` as Python floats, for CPU tensors, where host and
    device memory are the same and reading the row costs nothing. The sum is then ``mul`` plus one
    ``add_(alpha=c)`` per input: the row's ``index_select``, its ``select`` per term and the 0-d
    multiplies go away, which is most of a step's cost for small batches (``bench/loop.py``). Values
    are those of ``coef`` (``coef.tolist()``), so the result is the same up to the order of rounding
    inside one fused multiply-add. ``step`` still keys the noise.
    """
    if out.numel() == 0:  # empty tensors share data_ptr 0: the aliasing test below would see overlap
        return out
    if host_row is not None and not torch.compiler.is_compiling():
        row = host_row
    elif coef.stride(0) == 0:  # a broadcast one-row table (the named launchers): every step reads row 0
        row = coef[0]
    else:
        row = coef.index_select(0, step.reshape(1)).reshape(-1)  # device-side row: no host sync
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


def lincomb(out, inputs, coef, step, seed=None, *, sample_offset=0, stream=STREAM_STEP, backend=None, block=1024):
    """``out[...] = sum_i coef[step, i] * inputs[i] + coef[step, K] * z`` (z keyed noise if ``seed`` given).

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
    """
    inputs = list(inputs)
    _validate(out, inputs, coef, step)
    if seed is not None:
        _check_keys(out, seed, step, sample_offset)
    if resolve_backend(backend, out.device) == "torch":
        return lincomb_torch(out, inputs, coef, step, seed, sample_offset=sample_offset, stream=stream)
    if not out.is_contiguous():
        raise ValueError("lincomb(out=...): out must be contiguous for the Triton backend; pass a contiguous buffer.")
    numel = out.numel()
    if numel == 0:
        return out
    storage = out.untyped_storage().data_ptr()

    def _safe(t):  # contiguous, and either out itself or not overlapping it (blocks run in any order)
        if t.untyped_storage().data_ptr() == storage and not (t.data_ptr() == out.data_ptr() and t.stride() == out.stride()):
            return t.clone(memory_format=torch.contiguous_format)
        return t if t.is_contiguous() else t.contiguous()

    inputs = [_safe(t) for t in inputs]
    k = len(inputs)
    ptrs = inputs + [inputs[0]] * (MAX_INPUTS - k)
    per = numel // out.shape[0] if out.dim() > 0 else numel
    has_noise = seed is not None
    grid = (triton.cdiv(numel, block),)
    _lincomb_kernel[grid](
        out, *ptrs, coef, coef.stride(0), step, seed if has_noise else step,
        sample_offset, numel, per, STREAM=stream, K=k, HAS_NOISE=has_noise, BLOCK=block,
    )
    return out
