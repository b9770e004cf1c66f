"""Keyed Gaussian noise, stream format 2: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as
easy as 1, 2, 3") and a Box-Muller transform that uses every output word, as Triton device functions and
their twins (numpy on CPU, torch elsewhere).

Format (``NOISE_FORMAT_VERSION = 2``; ``docs/noise.md`` states it in full)
-------------------------------------------------------------------------
Element ``j`` of global sample ``b`` at step ``n`` in stream ``s`` under seed ``k`` is lane ``j % 4`` of
group ``g = j // 4``. One Philox4x32-10 call per group:

    counter = (g, b, n, s)   (each taken modulo 2^32)     key = (k mod 2^32, (k >> 32) mod 2^32)
    (r0, r1, r2, r3) = Philox4x32-10(counter, key)

and two Box-Muller pairs, lanes (0, 1) from (r0, r1) and lanes (2, 3) from (r2, r3):

    u     = (float(ra >> 9) + 0.5) * 2^-23                     (exact in fp32, in (0, 1))
    R     = sqrt(-2 log u)                                     (log rounded to fp32, sqrt correctly rounded)
    m     = rb >> 8                                            (24-bit angle: theta = 2 pi m / 2^24)
    q     = (m + 2^21) >> 22,  t = float(m - q 2^22) * 2^-21   (nearest quarter turn; t in [-1, 1), exact)
    s, c  = sin(pi t / 4), cos(pi t / 4)                       (the fp32 polynomials below, no fused multiply-add)
    (cos theta, sin theta) = (c, s) rotated by q quarter turns (swaps and sign flips: exact)
    lane 2i = R cos theta,  lane 2i + 1 = R sin theta

Sample b's noise is a pure function of (seed, b, n, j, s): the same in any batch, shard or backend. The
integer words agree bitwise everywhere; so do the floats, except that the GPU's fp32 ``log`` (libdevice) may
round differently from the correctly rounded value the twins use (measured by ``python -m bench gpu``).
|z| <= sqrt(-2 log 2^-24) = 5.77: the tails beyond (probability 8e-9) are cut.

Streams: 0 = per-step sampler noise, 1 = the initial state x(t_max), 2 = Hutchinson probes, 3 = the
predictor-corrector Langevin corrector (step key n M + k), 8+ = extra noises within one step.

Format 1 (flowsolve <= 0.1.0 before this change) keyed every element by its own Philox call and used one
normal of it; it was 4x the integer work and is not reproduced.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .backend import HAS_TRITON, launch, resolve_backend
from .offsets import tile_grid, tile_shape

NOISE_FORMAT_VERSION = 2

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

STREAM_STEP, STREAM_INIT, STREAM_PROBE = 0, 1, 2

# sin(pi t / 4) = t (S0 + t^2 (S1 + t^2 (S2 + t^2 S3))),  cos(pi t / 4) = 1 + t^2 (C1 + t^2 (C2 + t^2 (C3 + t^2 C4)))
# on t in [-1, 1]: near-minimax relative-error fits (iteratively reweighted least squares in float64), rounded
# to fp32. Evaluated in fp32 by Horner's rule without fused multiply-add: at most 1.7 ulp from the true values.
SIN_COEFFS = (0.7853981852531433, -0.08074543625116348, 0.00249000103212893, -3.59504520019982e-05)
COS_COEFFS = (-0.3084251284599304, 0.015854323282837868, -0.0003259365039411932, 3.52876168108196e-06)

if sys.byteorder != "little":  # pragma: no cover - the numpy twin reads 64-bit products as two 32-bit words
    raise ImportError("flowsolve.kernels.philox assumes a little-endian machine.")

# ----------------------------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _M0 = tl.constexpr(PHILOX_M0)
    _M1 = tl.constexpr(PHILOX_M1)
    _W0 = tl.constexpr(PHILOX_W0)
    _W1 = tl.constexpr(PHILOX_W1)
    _MASK32 = tl.constexpr(MASK32)
    _S0 = tl.constexpr(SIN_COEFFS[0])
    _S1 = tl.constexpr(SIN_COEFFS[1])
    _S2 = tl.constexpr(SIN_COEFFS[2])
    _S3 = tl.constexpr(SIN_COEFFS[3])
    _C1 = tl.constexpr(COS_COEFFS[0])
    _C2 = tl.constexpr(COS_COEFFS[1])
    _C3 = tl.constexpr(COS_COEFFS[2])
    _C4 = tl.constexpr(COS_COEFFS[3])

    @triton.jit
    def philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Ten Philox rounds on uint32 operands of broadcastable shapes; returns the four output words."""
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, _M0)
            lo0 = c0 * _M0
            hi1 = tl.umulhi(c2, _M1)
            lo1 = c2 * _M1
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + _W0
            k1 = k1 + _W1
        return c0, c1, c2, c3

    @triton.jit
    def keyed_words(seed, sample, step, group, stream):
        """Philox4x32-10 of counter (group, sample, step, stream) under key seed: int64 operands, a small
        non-negative int (or int32 scalar) stream.

        ``group`` and ``sample`` may have different broadcastable shapes ([1, G] and [R, 1]): the first two
        rounds then run on the small shapes and only the rest on the full tile."""
        seed = tl.cast(seed, tl.int64)
        k0 = (seed & _MASK32).to(tl.uint32)
        k1 = ((seed >> 32) & _MASK32).to(tl.uint32)
        c0 = (tl.cast(group, tl.int64) & _MASK32).to(tl.uint32)
        c1 = (tl.cast(sample, tl.int64) & _MASK32).to(tl.uint32)
        c2 = (tl.cast(step, tl.int64) & _MASK32).to(tl.uint32)
        c3 = tl.cast(stream, tl.uint32)
        return philox4x32_10(c0, c1, c2, c3, k0, k1)

    @triton.jit
    def box_muller(ra, rb):
        """(R cos theta, R sin theta) of one word pair (format 2): radius from ``ra``, angle from ``rb``."""
        u = ((ra >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
        rad = tl.sqrt_rn(-2.0 * tl.log(u))
        m = (rb >> 8).to(tl.int32)
        q = (m + 2097152) >> 22  # nearest quarter turn (2^21 = half a quarter)
        t = (m - (q << 22)).to(tl.float32) * 4.76837158203125e-07  # 2^-21
        t2 = t * t
        s = t * (_S0 + t2 * (_S1 + t2 * (_S2 + t2 * _S3)))
        c = 1.0 + t2 * (_C1 + t2 * (_C2 + t2 * (_C3 + t2 * _C4)))
        odd = (q & 1) != 0
        cs = tl.where(odd, s, c)
        sn = tl.where(odd, c, s)
        cos = tl.where(((q + 1) & 2) != 0, -cs, cs)
        sin = tl.where((q & 2) != 0, -sn, sn)
        return rad * cos, rad * sin

    @triton.jit
    def keyed_normal4(seed, sample, step, group, stream):
        """The four fp32 normals (lanes 0..3) of each group: int64 (seed, sample, step, group), broadcastable."""
        r0, r1, r2, r3 = keyed_words(seed, sample, step, group, stream)
        z0, z1 = box_muller(r0, r1)
        z2, z3 = box_muller(r2, r3)
        return z0, z1, z2, z3

    @triton.jit
    def interleave4(a, b, c, d):
        """[..., n] x 4 -> [..., 4 n] with element 4 i + l taken from the l-th argument."""
        return tl.interleave(tl.interleave(a, c), tl.interleave(b, d))

    @triton.jit
    def keyed_normal_tile(seed, sample, step, col0, NCOL: tl.constexpr, stream):
        """Normals of elements col0 .. col0 + NCOL - 1 (col0 a multiple of 4) of the samples ``sample``
        (int64 [R, 1] or scalar): an [R, NCOL] (or [NCOL]) fp32 tile, one Philox call per four elements."""
        group = col0 // 4 + tl.arange(0, NCOL // 4).to(tl.int64)
        if len(sample.shape) == 2:
            group = group[None, :]
        z0, z1, z2, z3 = keyed_normal4(seed, sample, step, group, stream)
        return interleave4(z0, z1, z2, z3)

    @triton.jit
    def keyed_normal(seed, sample, step, elem, stream):
        """The format's definition element by element (int64 tensors of one shape): lane elem % 4 of group
        elem // 4. Four times the work of ``keyed_normal_tile``; tests use it as the reference form."""
        z0, z1, z2, z3 = keyed_normal4(seed, sample, step, elem >> 2, stream)
        lane = elem & 3
        return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))

    from .offsets import tile_offsets

    @triton.jit(do_not_specialize=["stream", "sample_offset"])
    def _keyed_normal_kernel(out_ptr, seed_ptr, step_ptr, stream, sample_offset, batch, per_sample, n_col_blocks,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, col0, offs, mask = tile_offsets(tl.program_id(0), n_col_blocks, batch, per_sample, ROWS, BLOCK)
        z = keyed_normal_tile(tl.load(seed_ptr), rows + sample_offset, tl.load(step_ptr), col0, BLOCK, stream)
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Twins. Reference forms in torch (any device, traceable by torch.compile) and the numpy path that eager
# CPU tensors take (the same integer words; the same fp32 operations in the same order).
# ----------------------------------------------------------------------------------------------
def philox4x32_10_torch(c0, c1, c2, c3, k0: int | torch.Tensor, k1: int | torch.Tensor):
    """Philox4x32-10 on int64 tensors (or ints) holding 32-bit words, broadcasting; returns four words.

    One wrapping int64 multiply per word product: its low 64 bits are exact, so the high word is
    ``(p >> 32) & MASK`` and the low word ``p & MASK``."""
    for _ in range(10):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _box_muller_torch(ra: torch.Tensor, rb: torch.Tensor):
    """Twin of ``box_muller`` on int64 tensors holding 32-bit words (fp32 arithmetic, log in float64)."""
    u = ((ra >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07
    # log rounded from float64; sqrt taken in float64 and rounded: correctly rounded, as the GPU's sqrt_rn (torch's
    # float32 sqrt on CPU is not: its AVX-512 path differs in the last bit)
    rad = torch.sqrt((-2.0 * torch.log(u.to(torch.float64)).to(torch.float32)).to(torch.float64)).to(torch.float32)
    m = rb >> 8
    q = (m + 2097152) >> 22
    t = (m - (q << 22)).to(torch.float32) * 4.76837158203125e-07
    t2 = t * t
    s = t * (SIN_COEFFS[0] + t2 * (SIN_COEFFS[1] + t2 * (SIN_COEFFS[2] + t2 * SIN_COEFFS[3])))
    c = 1.0 + t2 * (COS_COEFFS[0] + t2 * (COS_COEFFS[1] + t2 * (COS_COEFFS[2] + t2 * COS_COEFFS[3])))
    odd = (q & 1) != 0
    cs, sn = torch.where(odd, s, c), torch.where(odd, c, s)
    cos = torch.where(((q + 1) & 2) != 0, -cs, cs)
    sin = torch.where((q & 2) != 0, -sn, sn)
    return rad * cos, rad * sin


def keyed_words_torch(seed, sample, step, group, stream: int):
    """Twin of ``keyed_words``: int64 tensors (or ints) broadcast together; returns four int64 words."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    return philox4x32_10_torch(group & MASK32, sample & MASK32, step & MASK32, stream & MASK32, k0, k1)


def keyed_normal4_torch(seed, sample, step, group, stream: int):
    """Twin of ``keyed_normal4``: the four fp32 lanes of each group."""
    r0, r1, r2, r3 = keyed_words_torch(seed, sample, step, group, stream)
    z0, z1 = _box_muller_torch(r0, r1)
    z2, z3 = _box_muller_torch(r2, r3)
    return z0, z1, z2, z3


def keyed_normal_torch(seed: torch.Tensor, sample: torch.Tensor, step: torch.Tensor, elem: torch.Tensor,
                       stream: int) -> torch.Tensor:
    """Twin of ``keyed_normal`` (the element-by-element definition): int64 tensors broadcast together."""
    z = torch.stack(torch.broadcast_tensors(*keyed_normal4_torch(seed, sample, step, elem >> 2, stream)), -1)
    elem = torch.broadcast_to(elem, z.shape[:-1])
    return torch.gather(z, -1, (elem & 3).unsqueeze(-1)).squeeze(-1)


def rows_torch(seed, samples: torch.Tensor, steps, per: int, stream: int, kind: str = "gaussian") -> torch.Tensor:
    """[R, per] fp32 values of rows r = (global sample ``samples[r]``, step ``steps`` or ``steps[r]``): the torch
    reference path. ``kind`` "gaussian" (the normals) or "rademacher" (lane l = 1 - 2 (r_l >> 31))."""
    groups = torch.arange((per + 3) // 4, device=samples.device, dtype=torch.int64).view(1, -1)
    steps = steps.reshape(-1, 1) if isinstance(steps, torch.Tensor) else steps
    if kind == "gaussian":
        z = keyed_normal4_torch(seed.reshape(1, 1), samples.view(-1, 1), steps, groups, stream)
    else:
        z = [1.0 - 2.0 * (w >> 31).to(torch.float32)
             for w in keyed_words_torch(seed.reshape(1, 1), samples.view(-1, 1), steps, groups, stream)]
    z = torch.stack(torch.broadcast_tensors(*z), -1)  # [R, G, 4]
    return z.reshape(samples.numel(), -1)[:, :per]


# --- numpy path: uint32 words, each 32x32 product one uint64 multiply read back as two uint32 views --------
_CHUNK_GROUPS = 16384  # groups per chunk: fewer numpy calls per element; the working set (~1.5 MiB) stays in L2
_F32 = np.float32
_SIN32 = tuple(_F32(c) for c in SIN_COEFFS)
_COS32 = tuple(_F32(c) for c in COS_COEFFS)


class _Work:
    """Preallocated buffers for one [rows, groups] chunk of Philox calls (allocating per operation costs page
    faults: numpy's arrays of 128 KiB and more are fresh mmaps). The words c0/c2 and the two products of a
    round share one [2, rows, groups] buffer each, so that the final words come out stacked as the two
    Box-Muller pairs' radius words (r0, r2) and angle words (r1, r3): the transform then runs once on both."""

    def __init__(self, rows: int, groups: int):
        self.shape = (rows, groups)
        self.n = rows * groups
        self.c02 = np.empty((2, rows, groups), np.uint32)
        self.c0, self.c2 = self.c02[0], self.c02[1]
        self.pp = [np.empty((2, rows, groups), np.uint64) for _ in range(2)]  # per round parity: [p1; p0]
        m = 2 * self.n
        self.f = [np.empty(m, np.float32) for _ in range(5)]
        self.i = [np.empty(m, np.int32) for _ in range(3)]
        self.d = np.empty(m, np.float64)


def _np_mulhilo(c, m: int, buf: np.ndarray):
    """(hi, lo) words of c * m: Python ints stay ints; 2-D arrays give uint32 views of one uint64 product (written
    into ``buf`` when c is a full chunk)."""
    if isinstance(c, int):
        p = c * m
        return p >> 32, p & MASK32
    p = np.multiply(c, np.uint64(m), dtype=np.uint64, out=buf if c.shape == buf.shape else None)
    v = p.view(np.uint32)
    return v[:, 1::2], v[:, 0::2]


def _np_xor3(a, b, k: int, buf: np.ndarray):
    """a ^ b ^ k for Python ints and 2-D uint32 arrays (broadcasting): the smaller operand meets the key first; a
    full-chunk result goes to ``buf``."""
    if isinstance(a, int):
        if isinstance(b, int):
            return a ^ b ^ k
        a, b = b, a
    if isinstance(b, int):
        return np.bitwise_xor(a, np.uint32(b ^ k), out=buf if a.shape == buf.shape else None)
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    out = buf if shape == buf.shape else None
    if a.shape == b.shape:
        r = np.bitwise_xor(a, b, out=out)
        r ^= np.uint32(k)
        return r
    if a.size < b.size:
        a, b = b, a
    return np.bitwise_xor(a, np.bitwise_xor(b, np.uint32(k)), out=out)


_MULT = np.array([PHILOX_M0, PHILOX_M1], dtype=np.uint64).reshape(2, 1, 1)


def _np_philox(c0, c1, c2, c3, k0: int, k1: int, work: _Work):
    """Philox4x32-10 on Python ints and 2-D uint32 arrays of broadcastable shapes ([1, G] groups, [R, 1] samples);
    returns four words. The first rounds run on the small shapes; once every word fills the chunk, the rounds run
    stacked: c02 = [c0; c2] times [M0; M1] in one multiply into pp = [p0; p1], and the new [c0; c2] =
    [hi1; hi0] ^ [lo1; lo0] ^ [k0; k1] in two xors (three numpy calls per round instead of six)."""
    r = 0
    while r < 10:
        pp = work.pp[r & 1]
        hi0, lo0 = _np_mulhilo(c0, PHILOX_M0, pp[0])
        hi1, lo1 = _np_mulhilo(c2, PHILOX_M1, pp[1])
        c0, c1, c2, c3 = _np_xor3(hi1, c1, k0, work.c0), lo1, _np_xor3(hi0, c3, k1, work.c2), lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
        r += 1
        if c0 is work.c0 and c2 is work.c2 and not isinstance(c1, int) and not isinstance(c3, int) \
                and c1.base is pp and c3.base is pp and c1.shape == c3.shape == work.shape:
            break
    lo = work.pp[(r - 1) & 1].view(np.uint32)[..., 0::2]  # [lo0; lo1] of the last round
    while r < 10:
        pp = work.pp[r & 1]
        np.multiply(work.c02, _MULT, out=pp)
        v = pp.view(np.uint32)
        np.bitwise_xor(v[..., 1::2][::-1], lo[::-1], out=work.c02)
        work.c02 ^= np.array([k0, k1], dtype=np.uint32).reshape(2, 1, 1)
        lo = v[..., 0::2]
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
        r += 1
    if isinstance(c0, int) or c0 is not work.c0:  # never reached the chunk's full shape (a degenerate chunk)
        return c0, c1, c2, c3
    return work.c0, lo[1], work.c2, lo[0]


def _np_box_muller(ra, rb, out_cos, out_sin, work: _Work):
    """Twin of ``box_muller`` in numpy fp32 (log in float64, rounded): the same operations in the same order, the
    quadrant's swaps and sign flips done on the floats' bits; writes the two lanes into (strided) views. ``ra`` and
    ``rb`` are uint32 arrays of one shape (both pairs of a chunk stacked, or one pair)."""
    shape, size = ra.shape, ra.size
    f = [b[:size].reshape(shape) for b in work.f]
    i = [b[:size].reshape(shape) for b in work.i]
    u, rad, t, t2, s = f
    m, q, tmp = i
    d = work.d[:size].reshape(shape)
    np.right_shift(ra, 9, out=m.view(np.uint32))
    np.copyto(u, m, casting="unsafe")  # < 2^23: exact
    u += _F32(0.5)
    u *= _F32(1.1920928955078125e-07)
    np.log(u, out=d, dtype=np.float64)
    np.copyto(rad, d, casting="same_kind")
    rad *= _F32(-2.0)
    np.sqrt(rad, out=rad)
    np.right_shift(rb, 8, out=m.view(np.uint32))
    np.add(m, np.int32(2097152), out=q)
    q >>= 22
    np.left_shift(q, 22, out=tmp)
    np.subtract(m, tmp, out=tmp)
    np.copyto(t, tmp, casting="unsafe")  # |.| <= 2^21: exact
    t *= _F32(4.76837158203125e-07)
    np.multiply(t, t, out=t2)
    np.multiply(t2, _SIN32[3], out=s)
    s += _SIN32[2]
    s *= t2
    s += _SIN32[1]
    s *= t2
    s += _SIN32[0]
    s *= t
    c = u  # u is no longer needed
    np.multiply(t2, _COS32[3], out=c)
    c += _COS32[2]
    c *= t2
    c += _COS32[1]
    c *= t2
    c += _COS32[0]
    c *= t2
    c += _F32(1.0)
    sb, cb = s.view(np.int32), c.view(np.int32)
    np.bitwise_and(q, 1, out=m)
    np.negative(m, out=m)  # all ones where the quadrant is odd: swap cos and sin
    np.bitwise_xor(sb, cb, out=tmp)
    tmp &= m
    sb ^= tmp
    cb ^= tmp  # now c holds the cos lane's magnitude, s the sin lane's
    np.add(q, 1, out=m)
    m &= 2
    m <<= 30
    cb ^= m  # cos theta < 0 in quadrants 1 and 2
    q &= 2
    q <<= 30
    sb ^= q  # sin theta < 0 in quadrants 2 and 3
    np.multiply(rad, c, out=out_cos)
    np.multiply(rad, s, out=out_sin)


def _np_rademacher(w, out, work: _Work):
    m = work.i[0][:w.size].reshape(w.shape)
    np.right_shift(w, 31, out=m.view(np.uint32))
    np.multiply(m, _F32(-2.0), out=out, casting="unsafe")
    out += _F32(1.0)


def _philox_int(c0: int, c1: int, c2: int, c3: int, k0: int, k1: int):
    """Philox4x32-10 on Python ints (one call)."""
    for _ in range(10):
        p0, p1 = c0 * PHILOX_M0, c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _box_muller_scalar(ra: int, rb: int):
    """``box_muller`` on one word pair with numpy float32 scalars (each operation rounded to fp32, as the
    vectorised twin and the kernel do; log and sqrt through float64 and rounded)."""
    u = (_F32(ra >> 9) + _F32(0.5)) * _F32(1.1920928955078125e-07)
    rad = _F32(math.sqrt(float(_F32(-2.0) * _F32(math.log(float(u))))))
    m = rb >> 8
    q = (m + 2097152) >> 22
    t = _F32(m - (q << 22)) * _F32(4.76837158203125e-07)
    t2 = t * t
    s = (((t2 * _SIN32[3] + _SIN32[2]) * t2 + _SIN32[1]) * t2 + _SIN32[0]) * t
    c = (((t2 * _COS32[3] + _COS32[2]) * t2 + _COS32[1]) * t2 + _COS32[0]) * t2 + _F32(1.0)
    cos, sin = ((s, c) if q & 1 else (c, s))
    return rad * (-cos if (q + 1) & 2 else cos), rad * (-sin if q & 2 else sin)


_SCALAR_GROUPS = 8  # up to this many Philox calls, Python scalars beat numpy's per-call overhead


class _SampleRange:
    """The global samples start .. start + n - 1, without building the array unless it is needed."""

    def __init__(self, start: int, n: int):
        self.start, self.n = start, n

    def __len__(self):
        return self.n

    def __getitem__(self, r):
        return self.start + r

    def __array__(self, dtype=None, copy=None):
        return np.arange(self.start, self.start + self.n, dtype=dtype or np.int64)


def _rows_scalar(out: np.ndarray, seed: int, samples, steps, stream: int, kind: str):
    """``rows_numpy`` for a handful of groups (a sampler's tiny batches): the same values, computed one call at a
    time in Python scalars."""
    rows, per = out.shape
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for r in range(rows):
        st = (steps if isinstance(steps, int) else int(steps[r])) & MASK32
        b = int(samples[r]) & MASK32
        for g in range((per + 3) // 4):
            w = _philox_int(g, b, st, stream & MASK32, k0, k1)
            lanes = min(4, per - 4 * g)
            if kind == "gaussian":  # the second pair only when its lanes exist
                z = _box_muller_scalar(w[0], w[1]) + (_box_muller_scalar(w[2], w[3]) if lanes > 2 else ())
            else:
                z = tuple(_F32(1.0 - 2.0 * (x >> 31)) for x in w)
            for lane in range(lanes):
                out[r, 4 * g + lane] = z[lane]


def rows_numpy(out: np.ndarray, seed: int, samples: np.ndarray, steps, stream: int, kind: str = "gaussian"):
    """Fill ``out`` (fp32 [R, per], C-contiguous) in place: row r holds the values of global sample
    ``samples[r]`` (int64 [R]) at step ``steps`` (an int, or int64 [R]); ``kind`` as ``rows_torch``."""
    rows, per = out.shape
    n_groups = (per + 3) // 4
    if rows * n_groups <= _SCALAR_GROUPS:
        return _rows_scalar(out, seed, samples, steps, stream, kind)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    col_groups = max(1, min(n_groups, _CHUNK_GROUPS))
    row_chunk = max(1, _CHUNK_GROUPS // col_groups)
    works = {}
    tile = np.empty((row_chunk, col_groups, 4), dtype=np.float32)
    samples32 = (np.asarray(samples, dtype=np.int64) & MASK32).astype(np.uint32)
    steps32 = steps & MASK32 if isinstance(steps, int) else (np.asarray(steps, dtype=np.int64) & MASK32).astype(np.uint32)
    for g0 in range(0, n_groups, col_groups):
        ng = min(col_groups, n_groups - g0)
        groups = np.arange(g0, g0 + ng, dtype=np.uint32)[None, :]
        j0, j1 = 4 * g0, min(per, 4 * (g0 + ng))
        for r0 in range(0, rows, row_chunk):
            nr = min(row_chunk, rows - r0)
            work = works.get((nr, ng)) or works.setdefault((nr, ng), _Work(nr, ng))
            st = steps32 if isinstance(steps32, int) else steps32[r0:r0 + nr, None]
            w = _np_philox(groups, samples32[r0:r0 + nr, None], st, stream & MASK32, k0, k1, work)
            z = tile[:nr, :ng]
            stacked = w[0] is work.c0 and w[2] is work.c2 and w[1].base is work.pp[1] and w[3].base is work.pp[1]
            if kind == "gaussian" and stacked:  # both pairs at once: radius words c02 = (r0, r2), angles (r1, r3)
                z4 = z.reshape(nr, ng, 2, 2)
                angles = work.pp[1].view(np.uint32)[..., 0::2][::-1]  # [lo1; lo0] = (r1, r3)
                _np_box_muller(work.c02, angles, np.moveaxis(z4[..., 0], -1, 0), np.moveaxis(z4[..., 1], -1, 0), work)
            else:
                w = [np.broadcast_to(x, (nr, ng)) for x in w]
                if kind == "gaussian":
                    _np_box_muller(w[0], w[1], z[..., 0], z[..., 1], work)
                    _np_box_muller(w[2], w[3], z[..., 2], z[..., 3], work)
                else:
                    for lane in range(4):
                        _np_rademacher(w[lane], z[..., lane], work)
            out[r0:r0 + nr, j0:j1] = tile[:nr, :ng].reshape(nr, 4 * ng)[:, : j1 - j0]


def _host_int(t: torch.Tensor) -> int:
    """The value of a one-element CPU int64 tensor, read through numpy: CPU memory is host memory, so this is a
    load, not a device sync (and it dispatches no aten op: the loop's no-sync tests see nothing)."""
    return int(t.detach().numpy().reshape(-1)[0])


def keyed_normal_into(out: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, sample_offset: int,
                      stream: int) -> torch.Tensor:
    """Fill an fp32 tensor ``out`` ([B, ...]) with the keyed noise of its samples, in place, and return it.

    Eager CPU tensors take the numpy path (the seed and step are read on the host: on CPU that is a memory
    read, not a device sync); other devices, and code being compiled, take the torch reference path."""
    b = out.shape[0]
    per = out.numel() // max(b, 1)
    if out.numel() == 0:
        return out
    if out.device.type == "cpu" and out.is_contiguous() and out.dtype == torch.float32 \
            and not torch.compiler.is_compiling():
        rows_numpy(out.view(b, per).numpy(), _host_int(seed), _SampleRange(sample_offset, b), _host_int(step), stream)
        return out
    samples = torch.arange(b, device=out.device, dtype=torch.int64) + sample_offset
    z = rows_torch(seed, samples, step, per, stream).view(out.shape)
    return out.copy_(z)


def keyed_normal_like_torch(out: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, sample_offset: int,
                            stream: int) -> torch.Tensor:
    """A fresh fp32 tensor shaped like ``out`` ([B, ...]) holding the keyed noise of its samples."""
    return keyed_normal_into(torch.empty(out.shape, dtype=torch.float32, device=out.device), seed, step,
                             sample_offset, stream)


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
            stream: int = STREAM_STEP, backend: str | None = None, block: int | None = None) -> torch.Tensor:
    """Fill ``out`` ([B, ...], contiguous) with keyed N(0,1) noise in place and return it.

    ``seed`` and ``step`` are one-element int64 tensors on ``out.device`` (no host sync on GPUs).
    """
    _check_keys(out, seed, step, sample_offset)
    if resolve_backend(backend, out.device) == "torch":
        if out.dtype == torch.float32 and out.is_contiguous():
            return keyed_normal_into(out, seed, step, sample_offset, stream)
        out.copy_(keyed_normal_like_torch(out, seed, step, sample_offset, stream))
        return out
    if not out.is_contiguous():
        raise ValueError("normal_(out=...): out must be contiguous for the Triton backend; pass out.contiguous().")
    if out.numel() == 0:
        return out
    b = out.shape[0]
    per = out.numel() // b
    rows, blk = tile_shape(per, block)
    grid, n_col_blocks = tile_grid(b, per, rows, blk)
    launch(_keyed_normal_kernel, grid, out, seed, step, stream, sample_offset, b, per, n_col_blocks, ROWS=rows,
           BLOCK=blk, enable_fp_fusion=False, num_warps=4 if out.dtype == torch.float32 else 8)
    return out


__all__ = [
    "NOISE_FORMAT_VERSION", "normal_", "keyed_normal_torch", "keyed_normal_like_torch", "keyed_normal_into",
    "keyed_normal4_torch", "keyed_words_torch", "philox4x32_10_torch", "rows_numpy", "rows_torch",
    "STREAM_STEP", "STREAM_INIT", "STREAM_PROBE",
]
if HAS_TRITON:
    __all__ += ["philox4x32_10", "keyed_words", "keyed_normal4", "keyed_normal_tile", "keyed_normal", "box_muller"]
