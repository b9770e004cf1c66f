"""Keyed Gaussian noise: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3") plus a Box-Muller transform, as a Triton device function and its pure-torch twin.

The noise of element ``j`` of global sample ``b`` at step ``n`` in stream ``s`` is a pure function of
``(seed, b, n, j, s)``: counter = (j, b, n, s), key = (seed low 32 bits, seed high 32 bits). Sample b
therefore gets the same noise whatever batch or shard it is drawn in, on any backend.

Normal transform (both backends, fp32): u1 = (2 (r0 >> 9) + 1) 2^-24 in (0, 1), u2 = (r1 >> 8) 2^-24
in [0, 1), z = sqrt(-2 log u1) cos(2 pi u2). Both uniforms are exact in fp32, so backends differ only
by the rounding of log / sqrt / cos. |z| <= 5.77 (u1 >= 2^-24): the tails beyond 5.77 sigma
(probability 8e-9) are cut.

Streams: 0 = per-step sampler noise, 1 = the initial state x(t_max), 2 = Hutchinson probes, 3 = the
predictor-corrector Langevin corrector (step key n M + k), 8+ = extra noises within one step.
"""
from __future__ import annotations

import math

import torch

from .backend import HAS_TRITON, resolve_backend

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831855  # 2 pi rounded to fp32, the constant both backends use

STREAM_STEP, STREAM_INIT, STREAM_PROBE = 0, 1, 2

# ----------------------------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Ten Philox rounds on uint32 tensors; returns the four output words."""
        M0: tl.constexpr = PHILOX_M0
        M1: tl.constexpr = PHILOX_M1
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, M0)
            lo0 = c0 * M0
            hi1 = tl.umulhi(c2, M1)
            lo1 = c2 * M1
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        return c0, c1, c2, c3

    @triton.jit
    def keyed_normal(seed, sample, step, elem, STREAM: tl.constexpr):
        """fp32 N(0,1) for int64 tensors (seed, global sample, step, element) and a constexpr stream."""
        k0 = (seed & MASK32).to(tl.uint32)
        k1 = ((seed >> 32) & MASK32).to(tl.uint32)
        c0 = (elem & MASK32).to(tl.uint32)
        c1 = (sample & MASK32).to(tl.uint32)
        c2 = (c0 * 0) + (step & MASK32).to(tl.uint32)
        c3 = (c0 * 0) + STREAM
        r0, r1, _, _ = philox4x32_10(c0, c1, c2, c3, k0, k1)
        u1 = ((r0 >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
        u2 = (r1 >> 8).to(tl.float32) * 5.9604644775390625e-08
        return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(TWO_PI_F32 * u2)

    from .offsets import block_offsets, sample_element

    @triton.jit
    def _keyed_normal_kernel(out_ptr, seed_ptr, step_ptr, sample_offset, numel, per_sample,
                             STREAM: tl.constexpr, BLOCK: tl.constexpr):
        offs = block_offsets(tl.program_id(0), BLOCK)  # int64 (offsets.py)
        mask = offs < numel
        seed = tl.load(seed_ptr)
        step = tl.load(step_ptr)
        sample, elem = sample_element(offs, per_sample, sample_offset)
        z = keyed_normal(seed, sample, step, elem, STREAM)
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Torch twin (int64 arithmetic on 32-bit words; products split in 16-bit halves to stay < 2^63)
# ----------------------------------------------------------------------------------------------
def _mulhilo(a: torch.Tensor, m: int):
    mh, ml = m >> 16, m & 0xFFFF
    p1 = a * mh  # < 2^48
    p0 = a * ml  # < 2^48
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & MASK32
    return hi, lo


def philox4x32_10_torch(c0, c1, c2, c3, k0: int | torch.Tensor, k1: int | torch.Tensor):
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcasting); returns four words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def keyed_normal_torch(seed: torch.Tensor, sample: torch.Tensor, step: torch.Tensor, elem: torch.Tensor,
                       stream: int) -> torch.Tensor:
    """Twin of ``keyed_normal``: int64 tensors broadcast together; returns fp32 N(0,1)."""
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0 = elem & MASK32
    c1 = sample & MASK32
    c2 = step & MASK32
    c3 = torch.full_like(c2, stream & MASK32)
    r0, r1, _, _ = philox4x32_10_torch(c0, c1, c2, c3, k0, k1)
    u1 = ((r0 >> 9) * 2 + 1).to(torch.float32) * 5.9604644775390625e-08
    u2 = (r1 >> 8).to(torch.float32) * 5.9604644775390625e-08
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(TWO_PI_F32 * u2)


def keyed_normal_like_torch(out: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, sample_offset: int,
                            stream: int) -> torch.Tensor:
    """Fill a fresh fp32 tensor shaped like ``out`` ([B, ...]) with the keyed noise of its samples."""
    b = out.shape[0]
    per = out.numel() // max(b, 1)
    dev = out.device
    sample = (torch.arange(b, device=dev, dtype=torch.int64) + sample_offset).view(b, 1)
    elem = torch.arange(per, device=dev, dtype=torch.int64).view(1, per)
    z = keyed_normal_torch(seed.view(1, 1), sample, step.view(1, 1), elem, stream)
    return z.view(out.shape)


def _check_keys(out: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, sample_offset: int):
    if out.dim() == 0:
        raise ValueError("noise needs a batch-first tensor [B, ...]; got a 0-d tensor.")
    per = out.numel() // max(out.shape[0], 1)
    if per >= 2**32:
        raise ValueError(f"one sample has {per} elements; keyed noise supports < 2^32 per sample.")
    if not (0 <= sample_offset and sample_offset + out.shape[0] <= 2**32):
        raise ValueError(f"sample_offset={sample_offset}: global sample indices must lie in [0, 2^32).")
    for name, v in (("seed", seed), ("step", step)):
        if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or v.numel() != 1:
            raise TypeError(f"{name} must be a one-element int64 tensor on the device (got {v!r}).")


def normal_(out: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, *, sample_offset: int = 0,
            stream: int = STREAM_STEP, backend: str | None = None, block: int = 1024) -> torch.Tensor:
    """Fill ``out`` ([B, ...], contiguous) with keyed N(0,1) noise in place and return it.

    ``seed`` and ``step`` are one-element int64 tensors on ``out.device`` (no host sync).
    """
    _check_keys(out, seed, step, sample_offset)
    if resolve_backend(backend, out.device) == "torch":
        out.copy_(keyed_normal_like_torch(out, seed, step, sample_offset, stream))
        return out
    if not out.is_contiguous():
        raise ValueError("normal_(out=...): out must be contiguous for the Triton backend; pass out.contiguous().")
    numel = out.numel()
    if numel == 0:
        return out
    per = numel // out.shape[0]
    grid = (triton.cdiv(numel, block),)
    _keyed_normal_kernel[grid](out, seed, step, sample_offset, numel, per, STREAM=stream, BLOCK=block)
    return out


__all__ = [
    "normal_", "keyed_normal_torch", "keyed_normal_like_torch", "philox4x32_10_torch",
    "STREAM_STEP", "STREAM_INIT", "STREAM_PROBE",
]
if HAS_TRITON:
    __all__ += ["philox4x32_10", "keyed_normal"]
del math
