"""Hutchinson trace estimation: keyed probes and the fused per-sample dot-product / accumulation kernel.

The divergence of a field u = a(t) x + b(t) F(x, t) (F the raw network output, (a, b) the model's
parameterization conversion) is estimated with probes z, E[z z^T] = I (Hutchinson 1990; FFJORD,
Grathwohl et al. 2019):

    div u ~ z^T (du/dx) z = b <z, z^T dF/dx> + a <z, z>,

where ``z^T dF/dx`` is one vector-Jacobian product of the network, computed in torch by the caller.
``hutchinson_accumulate`` fuses the rest in one pass over memory: the probe (read, or regenerated
in-kernel from its key), the two per-sample dot products, and the accumulation of the
quadrature-weighted estimate into a per-(probe, sample) log-density buffer:

    acc[p, b] += C[step, 0] * <z[p, b], g[p, b]> + C[step, 1] * <z[p, b], z[p, b]>

with C a ``[n_rows, 2]`` device table (row = step, read through a device step index as in
``lincomb``: no host sync) holding (w b, w a) for the quadrature weight w of this evaluation.
Folding the conversion into the table keeps the VJP on the raw output (no extra pass to form u).

Probes (``probes_``): probe p of global sample b, element j is a pure function of
(seed, b, p, j) in stream ``STREAM_PROBE`` (= 2), the probe index taking the place of the step,
so a trajectory sees the same probe at every step and sample b the same probe in any batch or
shard. Both kinds use the noise format of ``philox.py`` (one Philox4x32-10 call per four elements):
Rademacher lane l of group j // 4 is ``1 - 2 (r_l >> 31)``, the top bit of output word l; Gaussian is the
keyed normal (|z| <= 5.77).

Why the kernel can regenerate the probe, and why the likelihood loop does not by default: the VJP
needs the probe as a tensor (``grad_outputs``), so it is materialised once per trajectory anyway
(the probe is held fixed along it). Reading it back costs 4 bytes per element per evaluation;
regenerating it costs a Philox4x32-10 (about 40 integer ops, plus log/sqrt/cos for Gaussian) per
element. On a GPU the two are about even; on CPU (the twin) regeneration is dozens of passes over
memory. ``probes=None`` selects regeneration (useful where the probe tensor cannot be kept).

Reduction: one program per (probe, sample) row loops over the row's elements in BLOCK chunks and
reduces in registers: no atomics, so the result is bitwise deterministic and independent of the
batch size. A split (two-stage) reduction would use a GPU better when there are fewer rows than
SMs and rows are long (B = 1, an image), but this kernel reads 2 tensors once per model
forward+VJP, which costs orders of magnitude more; determinism wins. The twin reduces each row in
fixed chunks of 8192 elements so that torch's intra-op parallel reduction cannot change the
summation order with the batch size: it is bitwise batch-invariant too.
"""
from __future__ import annotations

import numpy as np
import torch

from .backend import HAS_TRITON, launch, resolve_backend
from .offsets import tile_grid, tile_shape
from .philox import STREAM_PROBE, _host_int, keyed_normal_torch, keyed_words_torch, rows_numpy, rows_torch
from .reduce import rowsum_fixed_chunks

PROBES = ("rademacher", "gaussian")
_KIND = {"rademacher": 0, "gaussian": 1}
# (vjp, probes, accumulator) dtypes of the Triton path (probes None: regenerated in the kernel): the likelihood's
# state in fp32, or fp64 for verification; the twin takes any float dtypes
HUTCHINSON_DTYPES = tuple((d, p, d) for d in (torch.float32, torch.float64) for p in (None, d))
PROBE_DTYPES = (torch.float32, torch.float64)  # probes_ output dtypes of the Triton path
BLOCKS = (128, 2048)  # elements per loop iteration of a row: the first for rows up to 128 elements
_TWIN_CHUNK = 8192

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .offsets import tile_offsets
    from .philox import interleave4, keyed_normal_tile, keyed_words

    _STREAM_PROBE = tl.constexpr(STREAM_PROBE)

    @triton.jit
    def _sign(w):
        return 1.0 - 2.0 * (w >> 31).to(tl.float32)

    @triton.jit
    def keyed_probe_tile(seed, sample, probe, col0, NCOL: tl.constexpr, KIND: tl.constexpr):
        """Probes of elements col0 .. col0 + NCOL - 1 (col0 a multiple of 4) for int64 (seed, sample, probe):
        [R, NCOL] for a sample column [R, 1], [NCOL] for a scalar sample. KIND 0 Rademacher, 1 Gaussian."""
        if KIND == 0:
            group = col0 // 4 + tl.arange(0, NCOL // 4).to(tl.int64)
            if len(sample.shape) == 2:
                group = group[None, :]
            r0, r1, r2, r3 = keyed_words(seed, sample, probe, group, _STREAM_PROBE)
            return interleave4(_sign(r0), _sign(r1), _sign(r2), _sign(r3))
        else:
            return keyed_normal_tile(seed, sample, probe, col0, NCOL, _STREAM_PROBE)

    @triton.jit(do_not_specialize=["sample_offset", "probe_offset"])
    def _probe_kernel(out_ptr, seed_ptr, sample_offset, probe_offset, batch, n_rows, per_sample, n_col_blocks,
                      KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, col0, offs, mask = tile_offsets(tl.program_id(0), n_col_blocks, n_rows, per_sample, ROWS, BLOCK)
        probe = rows // batch  # one division per row, not per element
        sample = rows - probe * batch
        z = keyed_probe_tile(tl.load(seed_ptr), sample + sample_offset, probe + probe_offset, col0, BLOCK, KIND)
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["coef_stride", "sample_offset", "probe_offset"])
    def _hutchinson_kernel(acc_ptr, z_ptr, g_ptr, coef_ptr, coef_stride, step_ptr, seed_ptr,
                           sample_offset, probe_offset, batch, per_sample,
                           KIND: tl.constexpr, REGEN: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # one (probe, sample) row per program; int64 offsets below
        step = tl.load(step_ptr)
        row = coef_ptr + step * coef_stride
        w_zg = tl.load(row)
        w_zz = tl.load(row + 1)
        base = r * per_sample
        s_zg = tl.zeros([BLOCK], dtype=w_zg.dtype)
        s_zz = tl.zeros([BLOCK], dtype=w_zg.dtype)
        if REGEN:
            seed = tl.load(seed_ptr)
            probe = r // batch
            sample = r - probe * batch + sample_offset
            probe = probe + probe_offset
        for start in range(0, per_sample, BLOCK):
            j = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = j < per_sample
            if REGEN:
                z = tl.where(mask, keyed_probe_tile(seed, sample, probe, start, BLOCK, KIND), 0.0).to(w_zg.dtype)
            else:
                z = tl.load(z_ptr + base + j, mask=mask, other=0.0).to(w_zg.dtype)
            g = tl.load(g_ptr + base + j, mask=mask, other=0.0).to(w_zg.dtype)
            s_zg += z * g
            s_zz += z * z
        total = w_zg * tl.sum(s_zg, axis=0) + w_zz * tl.sum(s_zz, axis=0)
        tl.store(acc_ptr + r, tl.load(acc_ptr + r) + total)


# ----------------------------------------------------------------------------------------------
# Torch twins
# ----------------------------------------------------------------------------------------------
def keyed_probe_torch(seed, sample, probe, elem, kind: str) -> torch.Tensor:
    """The probe format element by element (int64 tensors broadcast together; the reference form)."""
    if kind == "gaussian":
        return keyed_normal_torch(seed, sample, probe, elem, STREAM_PROBE)
    w = torch.stack(torch.broadcast_tensors(*keyed_words_torch(seed, sample, probe, elem >> 2, STREAM_PROBE)), -1)
    elem = torch.broadcast_to(elem, w.shape[:-1])
    lane = torch.gather(w, -1, (elem & 3).unsqueeze(-1)).squeeze(-1)
    return 1.0 - 2.0 * (lane >> 31).to(torch.float32)


def _probes_torch(shape, seed, kind, sample_offset, probe_offset, device) -> torch.Tensor:
    """fp32 probes of shape [k, B, *event]: rows (probe p, sample b) in the format of ``keyed_probe_tile``."""
    k, b = shape[0], shape[1]
    per = 1
    for s in shape[2:]:
        per *= s
    if device.type == "cpu" and not torch.compiler.is_compiling():
        out = torch.empty(k * b, per, dtype=torch.float32)
        r = np.arange(k * b, dtype=np.int64)
        rows_numpy(out.numpy(), _host_int(seed), r % b + sample_offset, r // b + probe_offset, STREAM_PROBE, kind)
        return out.view(shape)
    r = torch.arange(k * b, device=device, dtype=torch.int64)
    return rows_torch(seed, r % b + sample_offset, r // b + probe_offset, per, STREAM_PROBE, kind).reshape(shape)


def _check_kind(kind):
    if kind not in PROBES:
        raise ValueError(f"probe kind {kind!r} is not one of {PROBES}; pass kind='rademacher' or kind='gaussian'.")


def _check_probe_keys(k, b, per, seed, sample_offset, probe_offset):
    if per >= 2**32:
        raise ValueError(f"one sample has {per} elements; keyed probes support < 2^32 per sample.")
    if not (isinstance(sample_offset, int) and 0 <= sample_offset and sample_offset + b <= 2**32):
        raise ValueError(f"sample_offset={sample_offset!r}: global sample indices must lie in [0, 2^32).")
    if not (isinstance(probe_offset, int) and 0 <= probe_offset and probe_offset + k <= 2**32):
        raise ValueError(f"probe_offset={probe_offset!r}: probe indices must lie in [0, 2^32).")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"seed must be a one-element int64 tensor on the device (flowsolve.kernels.seed_tensor); got {seed!r}.")


def probes_(out: torch.Tensor, seed: torch.Tensor, *, kind: str = "rademacher", sample_offset: int = 0,
            probe_offset: int = 0, backend: str | None = None, block: int | None = None) -> torch.Tensor:
    """Fill ``out`` (``[k, B, *event]``, contiguous, float) with keyed Hutchinson probes and return it.

    ``out[p, b]`` is probe ``p + probe_offset`` of global sample ``b + sample_offset``; ``seed`` is a
    one-element int64 device tensor. Rademacher values are exactly +-1.
    """
    _check_kind(kind)
    if out.dim() < 2:
        raise ValueError(f"out must be [k, B, *event] (probe index first, then the batch); got shape {tuple(out.shape)}.")
    if not out.is_floating_point():
        raise TypeError(f"out has dtype {out.dtype}; probes need a floating-point tensor.")
    k, b = out.shape[0], out.shape[1]
    per = out.numel() // max(k * b, 1)
    _check_probe_keys(k, b, per, seed, sample_offset, probe_offset)
    if seed.device != out.device:
        raise ValueError(f"seed is on {seed.device} but out is on {out.device}.")
    if out.numel() == 0:
        return out
    if resolve_backend(backend, out.device) == "torch":
        out.copy_(_probes_torch(tuple(out.shape), seed, kind, sample_offset, probe_offset, out.device))
        return out
    if not out.is_contiguous():
        raise ValueError("probes_(out=...): out must be contiguous for the Triton backend; pass a contiguous buffer.")
    if out.dtype not in PROBE_DTYPES:
        raise TypeError(f"probes_ on the Triton backend writes float32 or float64 (the likelihood's state); got "
                        f"{out.dtype}. Use a float32 buffer and cast, or backend='torch'.")
    rows, blk = tile_shape(per, block)
    grid, n_col_blocks = tile_grid(k * b, per, rows, blk)
    launch(_probe_kernel, grid, out, seed, sample_offset, probe_offset, b, k * b, per, n_col_blocks, KIND=_KIND[kind],
           ROWS=rows, BLOCK=blk, enable_fp_fusion=kind != "gaussian",
           num_warps=4 if out.dtype == torch.float32 else 8)
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of [R, n] tensors in fixed chunks: bitwise independent of R."""
    return rowsum_fixed_chunks(a * b, _TWIN_CHUNK)


def hutchinson_accumulate_torch(acc, vjp, coef, step, probes=None, seed=None, *, kind="rademacher",
                                sample_offset=0, probe_offset=0):
    """Torch twin of ``hutchinson_accumulate`` (same arguments, same result to rounding; strided input welcome)."""
    if coef.stride(0) == 0:
        row = coef[0]
    else:
        row = coef.index_select(0, step.reshape(1)).reshape(-1)  # device-side row: no host sync
    rows = acc.numel()
    per = vjp.numel() // max(rows, 1)
    if probes is None:
        probes = _probes_torch(tuple(vjp.shape), seed, kind, sample_offset, probe_offset, vjp.device)
    z = probes.reshape(rows, per).to(acc.dtype)
    g = vjp.reshape(rows, per).to(acc.dtype)
    flat = acc.view(-1)
    flat.addcmul_(_rowdot(z, g), row[0])
    flat.addcmul_(_rowdot(z, z), row[1])
    return acc


def _validate(acc, vjp, coef, step, probes):
    if not isinstance(acc, torch.Tensor) or acc.dim() != 2:
        raise ValueError(f"acc must be a [k, B] tensor (probes x batch); got {getattr(acc, 'shape', acc)!r}.")
    if acc.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"acc has dtype {acc.dtype}; the log-density buffer must be float32 or float64.")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous (it is updated in place).")
    if vjp.dim() < 2 or tuple(vjp.shape[:2]) != tuple(acc.shape):
        raise ValueError(f"vjp has shape {tuple(vjp.shape)}; it must be [k, B, *event] with [k, B] = {tuple(acc.shape)} (acc's shape).")
    if not vjp.is_floating_point():
        raise TypeError(f"vjp has dtype {vjp.dtype}; it must be floating point.")
    if probes is not None:
        if probes.shape != vjp.shape:
            raise ValueError(f"probes has shape {tuple(probes.shape)} but vjp has {tuple(vjp.shape)}; they must match.")
        if not probes.is_floating_point():
            raise TypeError(f"probes has dtype {probes.dtype}; it must be floating point.")
    if coef.dim() != 2 or coef.shape[1] != 2:
        raise ValueError(f"coef must be a [n_rows, 2] table (weight of <z, vjp>, weight of <z, z>); got {tuple(coef.shape)}.")
    if coef.dtype != acc.dtype:
        raise TypeError(f"coef has dtype {coef.dtype} but acc has {acc.dtype}: the table's dtype is the accumulation dtype; match them.")
    for name, t in (("vjp", vjp), ("coef", coef), ("step", step)) + ((("probes", probes),) if probes is not None else ()):
        if t.device != acc.device:
            raise ValueError(f"{name} is on {t.device} but acc is on {acc.device}; keep every argument on one device.")
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError(f"step must be a one-element int64 tensor; got {step!r}.")


def hutchinson_accumulate(acc, vjp, coef, step, probes=None, seed=None, *, kind="rademacher", sample_offset=0,
                          probe_offset=0, backend=None, block=None):
    """``acc[p, b] += C[step, 0] <z[p, b], vjp[p, b]> + C[step, 1] <z[p, b], z[p, b]>`` in one pass.

    Args:
        acc: ``[k, B]`` float32/float64 buffer (per probe, per sample), updated in place.
        vjp: ``[k, B, *event]`` vector-Jacobian products ``z^T dF/dx`` (any float dtype; read in acc's dtype).
        coef: ``[n_rows, 2]`` table in acc's dtype, on acc's device; row ``step`` holds (w b, w a) where w
            is the quadrature weight and (a, b) the conversion u = a x + b F. A table expanded from one row
            (row stride 0) serves every step.
        step: one-element int64 device tensor: the row to read (no host sync).
        probes: ``[k, B, *event]`` probe tensor (the one used for the VJP), or None to regenerate it in
            the kernel from ``seed``, ``kind``, ``sample_offset``, ``probe_offset`` (see ``probes_``).
        backend: "auto" | "torch" | "triton"; block: elements per loop iteration (default: ``BLOCKS[0]`` for rows up
            to that many elements, else ``BLOCKS[1]``). The Triton path reads the dtypes of ``HUTCHINSON_DTYPES``.
    """
    _validate(acc, vjp, coef, step, probes)
    if probes is None:
        _check_kind(kind)
        per = vjp.numel() // max(acc.numel(), 1)
        _check_probe_keys(acc.shape[0], acc.shape[1], per, seed, sample_offset, probe_offset)
    if acc.numel() == 0:
        return acc
    if resolve_backend(backend, acc.device) == "torch":
        return hutchinson_accumulate_torch(acc, vjp, coef, step, probes, seed, kind=kind, sample_offset=sample_offset,
                                           probe_offset=probe_offset)
    rows = acc.numel()
    per = vjp.numel() // rows
    vjp = vjp if vjp.is_contiguous() else vjp.contiguous()
    if probes is not None and not probes.is_contiguous():
        probes = probes.contiguous()
    if block is None:
        block = BLOCKS[0] if per <= BLOCKS[0] else BLOCKS[1]
    elif block < 4 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 4.")
    regen = probes is None
    triple = (vjp.dtype, None if regen else probes.dtype, acc.dtype)
    if triple not in HUTCHINSON_DTYPES:
        raise TypeError(f"hutchinson_accumulate on the Triton backend reads (vjp, probes, acc) dtypes "
                        f"{_names(HUTCHINSON_DTYPES)} (probes None: regenerated); got {_names([triple])}. Cast them, "
                        f"or use backend='torch'.")
    launch(_hutchinson_kernel, (rows,), acc, vjp if regen else probes, vjp, coef, coef.stride(0), step,
           seed if regen else step, sample_offset, probe_offset, acc.shape[1], per,
           KIND=_KIND[kind] if regen else 0, REGEN=regen, BLOCK=block,
           enable_fp_fusion=not (regen and kind == "gaussian"), num_warps=4 if acc.dtype == torch.float32 else 8)
    return acc


def _names(triples) -> str:
    return ", ".join("(" + ", ".join(str(d).replace("torch.", "") for d in t) + ")" for t in triples)


__all__ = ["PROBES", "HUTCHINSON_DTYPES", "probes_", "hutchinson_accumulate", "hutchinson_accumulate_torch",
           "keyed_probe_torch"]
if HAS_TRITON:
    __all__ += ["keyed_probe_tile"]
