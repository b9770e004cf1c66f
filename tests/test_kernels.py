"""The fused kernel family: Triton (through the interpreter) against its torch twin, and the
keyed Philox noise against independent truth (Random123 known-answer vectors, N(0,1) moments)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowsolve  # noqa: F401  (registers flowsolve.kernels)
from flowsolve import kernels as K
from flowsolve.kernels import philox

SHAPES = [(1,), (7,), (1023,), (4097,), (3, 5, 7)]
needs_triton = pytest.mark.skipif(not (K.HAS_TRITON and K.interpreting()), reason="needs triton + TRITON_INTERPRET=1")


def _step(n):
    return torch.tensor([n], dtype=torch.int64)


# ------------------------------------------------------------------ Philox: known answers
@pytest.mark.parametrize(
    "ctr,key,expected",
    [  # Random123 kat_vectors, philox4x32 with 10 rounds
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_twin_matches_random123_known_answers(ctr, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    out = philox.philox4x32_10_torch(*c, key[0], key[1])
    assert tuple(int(o) for o in out) == expected


@needs_triton
def test_philox_triton_matches_twin_bitwise():
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        c0 = offs.to(tl.uint32) * 2654435761
        c1 = c0 ^ 0x12345678
        c2 = c0 + 7
        c3 = c0 * 3
        r0, r1, r2, r3 = philox.philox4x32_10(c0, c1, c2, c3, (c0 * 0 + 0xDEADBEEF), (c0 * 0 + 0x0BADF00D))
        tl.store(out_ptr + offs * 4 + 0, r0.to(tl.int64), mask=m)
        tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int64), mask=m)
        tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int64), mask=m)
        tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int64), mask=m)

    n = 64
    out = torch.zeros(n * 4, dtype=torch.int64)
    words[(1,)](out, n, BLOCK=64)
    i = torch.arange(n, dtype=torch.int64)
    c0 = (i * 2654435761) & 0xFFFFFFFF
    ref = philox.philox4x32_10_torch(c0, c0 ^ 0x12345678, (c0 + 7) & 0xFFFFFFFF, (c0 * 3) & 0xFFFFFFFF, 0xDEADBEEF, 0x0BADF00D)
    assert torch.equal(out.view(n, 4), torch.stack(ref, 1))


# ------------------------------------------------------------------ keyed noise
def test_noise_is_batch_invariant_on_the_twin():
    seed = torch.tensor([2024], dtype=torch.int64)
    big = K.normal_(torch.empty(64, 3, 11), seed, _step(5), backend="torch")
    for b in (0, 17, 63):
        one = K.normal_(torch.empty(1, 3, 11), seed, _step(5), sample_offset=b, backend="torch")
        assert torch.equal(one[0], big[b])
    # and keys differ across steps, streams, seeds
    assert not torch.equal(big, K.normal_(torch.empty(64, 3, 11), seed, _step(6), backend="torch"))
    assert not torch.equal(big, K.normal_(torch.empty(64, 3, 11), seed, _step(5), stream=1, backend="torch"))
    assert not torch.equal(big, K.normal_(torch.empty(64, 3, 11), seed + 1, _step(5), backend="torch"))


@needs_triton
@pytest.mark.parametrize("shape", SHAPES + [(4, 1000)])
def test_noise_triton_equals_twin(shape):
    seed = torch.tensor([987654321987], dtype=torch.int64)
    a = K.normal_(torch.empty(shape), seed, _step(3), sample_offset=5, backend="triton")
    b = K.normal_(torch.empty(shape), seed, _step(3), sample_offset=5, backend="torch")
    # fp32 rounding of log / sqrt / cos: a few ulp of |z| <= 5.8
    torch.testing.assert_close(a, b, rtol=0, atol=8 * 5.8 * 2**-23)


def test_noise_moments_and_independence_within_5_sigma():
    n_samples, d = 4000, 50
    z = K.normal_(torch.empty(n_samples, d, dtype=torch.float64), torch.tensor([7], dtype=torch.int64), _step(0),
                  backend="torch")
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 * math.sqrt(1 / n)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / (n - 1))
    # 4th moment 3, var of z^4 is 105 - 9 = 96
    assert abs((flat**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    # neighbouring elements, neighbouring samples and neighbouring steps are uncorrelated
    z2 = K.normal_(torch.empty(n_samples, d, dtype=torch.float64), torch.tensor([7], dtype=torch.int64), _step(1),
                   backend="torch")
    for a, b in ((z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z, z2)):
        corr = (a * b).mean().item()
        assert abs(corr) < 5 / math.sqrt(a.numel())


# ------------------------------------------------------------------ lincomb
def _inputs(shape, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]


def _table(k, rows=4, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k + 1, generator=g, dtype=torch.float64).to(dtype)


def _reference(inputs, coef, step, noise=None):
    row = coef[step].double()
    acc = sum(row[i] * t.double() for i, t in enumerate(inputs))
    return acc if noise is None else acc + row[-1] * noise.double()


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_lincomb_triton_equals_twin_fp32(shape, k):
    inputs, coef = _inputs(shape, k), _table(k)
    seed = torch.tensor([11], dtype=torch.int64)
    for noise in (False, True):
        s = seed if noise else None
        a = K.lincomb(torch.empty(shape), inputs, coef, _step(2), s, backend="triton")
        b = K.lincomb(torch.empty(shape), inputs, coef, _step(2), s, backend="torch")
        ref = _reference(inputs, coef, 2, K.normal_(torch.empty(shape), seed, _step(2), backend="torch") if noise else None)
        scale = sum(coef[2].abs()).item() * max(1.0, max(t.abs().max().item() for t in inputs))
        torch.testing.assert_close(a, b, rtol=0, atol=4 * k * scale * 2**-23 + (1e-5 if noise else 0))
        torch.testing.assert_close(b.double(), ref, rtol=0, atol=4 * k * scale * 2**-23 + (1e-5 if noise else 0))


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_lincomb_low_precision_output(out_dtype):
    """fp32 accumulation, cast on store: kernel within 2x the torch-lowprec error of the fp64 reference
    plus half an ulp of the output format (flash-attn's rule)."""
    shape = (4097,)
    inputs, coef = _inputs(shape, 3, dtype=out_dtype), _table(3)
    ref = _reference(inputs, coef, 1)
    a = K.lincomb(torch.empty(shape, dtype=out_dtype), inputs, coef, _step(1), backend="triton")
    b = K.lincomb(torch.empty(shape, dtype=out_dtype), inputs, coef, _step(1), backend="torch")
    lowprec = sum(coef[1, i].to(out_dtype) * t for i, t in enumerate(inputs))  # torch entirely in low precision
    eps = torch.finfo(out_dtype).eps
    bound = 2 * (lowprec.double() - ref).abs() + ref.abs() * eps / 2 + 12 * coef[1].abs().sum().item() * 4 * 2**-24
    assert bool(((b.double() - ref).abs() <= bound).all())
    # Triton's interpreter casts fp32 -> bf16 by truncation (measured here; compiled Triton rounds to
    # nearest even), so its stores may sit one bf16 ulp off: allow that ulp, for bf16 only.
    ulp = torch.finfo(out_dtype).eps * 2.0 ** torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))
    slack = ulp if out_dtype == torch.bfloat16 else 0.0
    assert bool(((a.double() - ref).abs() <= bound + slack).all())
    assert a.dtype == b.dtype == out_dtype


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_lincomb_non_contiguous_input_and_aliasing(backend):
    base = _inputs((8, 12), 2)
    x = base[0].t()  # non-contiguous [12, 8]
    d = base[1].t().contiguous()
    coef = _table(2)
    out = K.lincomb(torch.empty(12, 8), [x, d], coef, _step(0), backend=backend)
    torch.testing.assert_close(out.double(), _reference([x, d], coef, 0), rtol=0, atol=1e-5)
    # in place: out aliases the second input
    y = d.clone()
    K.lincomb(y, [x, y], coef, _step(0), backend=backend)
    torch.testing.assert_close(y, out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_dtype", [torch.float64, torch.float32])
def test_lincomb_fp64_accumulates_in_fp64(in_dtype):
    inputs, coef = _inputs((33,), 3, dtype=in_dtype), _table(3, dtype=torch.float64)
    out = K.lincomb(torch.empty(33, dtype=torch.float64), inputs, coef, _step(3), backend="torch")
    torch.testing.assert_close(out, _reference(inputs, coef, 3), rtol=1e-15, atol=1e-15)


def test_lincomb_rejects_bad_arguments():
    x = torch.zeros(4, 3)
    coef = _table(2)
    with pytest.raises(ValueError, match="inputs\\[1\\] has shape"):
        K.lincomb(torch.empty(4, 3), [x, torch.zeros(4, 2)], coef, _step(0))
    with pytest.raises(ValueError, match="coef must be"):
        K.lincomb(torch.empty(4, 3), [x], coef, _step(0))
    with pytest.raises(TypeError, match="step must be"):
        K.lincomb(torch.empty(4, 3), [x, x], coef, torch.tensor([0.0]))
    with pytest.raises(TypeError, match="floating-point"):
        K.lincomb(torch.empty(4, 3), [x, x.long()], coef, _step(0))
    with pytest.raises(ValueError, match="backend="):
        K.lincomb(torch.empty(4, 3), [x, x], coef, _step(0), backend="cuda")


@needs_triton
def test_int64_offsets_in_index_arithmetic():
    """Offsets are program_id.to(int64) * BLOCK: a block index past 2^31 / BLOCK must not wrap.

    Launching 2^31 elements is too big for CI; instead check the kernel's element -> (sample, elem)
    key arithmetic at large sample offsets, which goes through the same int64 path."""
    seed = torch.tensor([5], dtype=torch.int64)
    off = 2**32 - 3
    a = K.normal_(torch.empty(3, 5), seed, _step(1), sample_offset=off, backend="triton")
    b = K.normal_(torch.empty(3, 5), seed, _step(1), sample_offset=off, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sample_offset"):
        K.normal_(torch.empty(4, 5), seed, _step(1), sample_offset=off, backend="torch")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_named_launchers(backend):
    x, d, d1 = _inputs((5, 4), 3)
    out = K.euler_maruyama_step(x, d, -0.1, 2.0, seed=3, step=9, backend=backend)
    z = K.normal_(torch.empty(5, 4), torch.tensor([3], dtype=torch.int64), _step(9), backend="torch")
    torch.testing.assert_close(out, x - 0.1 * d + 2.0 * math.sqrt(0.1) * z, rtol=0, atol=1e-5)
    torch.testing.assert_close(K.euler_step(x, d, 0.25, backend=backend), x + 0.25 * d, rtol=0, atol=1e-6)
    torch.testing.assert_close(K.heun_step(x, d, d1, 0.5, backend=backend), x + 0.25 * (d + d1), rtol=0, atol=1e-6)


@given(n=st.integers(1, 300), k=st.integers(1, 8), step=st.integers(0, 3))
def test_lincomb_twin_matches_float64_reference(n, k, step):
    inputs, coef = _inputs((n,), k, seed=n), _table(k, seed=k)
    out = K.lincomb(torch.empty(n), inputs, coef, _step(step), backend="torch")
    ref = _reference(inputs, coef, step)
    scale = coef[step].abs().sum().item() * max(t.abs().max().item() for t in inputs)
    assert (out.double() - ref).abs().max().item() <= 2 * k * scale * 2**-24


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_lincomb_out_aliasing_several_inputs(backend):
    """A model may return its input: out, inputs[0] and inputs[1] are then one tensor."""
    x = _inputs((9,), 1)[0]
    coef = _table(2)
    want = (coef[1, 0] + coef[1, 1]).double() * x.double()
    y = x.clone()
    K.lincomb(y, [y, y], coef, _step(1), backend=backend)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-6)
    # a reversed view of out's own memory as input
    z = x.clone()
    ref = coef[1, 0].double() * x.double() + coef[1, 1].double() * x.flip(0).double()
    K.lincomb(z, [z, z.flip(0)], coef, _step(1), backend=backend)
    torch.testing.assert_close(z.double(), ref, rtol=0, atol=1e-6)
    # a shifted contiguous view of out's memory
    w = torch.cat([x, x[:1]])
    ref = coef[1, 0].double() * w[:9].double() + coef[1, 1].double() * w[1:].double()
    K.lincomb(w[:9], [w[:9], w[1:]], coef, _step(1), backend=backend)
    torch.testing.assert_close(w[:9].double(), ref, rtol=0, atol=1e-6)
