"""The fused Hutchinson kernel and its keyed probes: Triton (through the interpreter) against the torch
twin and a float64 reference; probe keys and statistics against their definitions (FORMULAS.md §7)."""
import math

import pytest
import torch

import flowsolve  # noqa: F401  (registers flowsolve.kernels)
from flowsolve import kernels as K

needs_triton = pytest.mark.skipif(not (K.HAS_TRITON and K.interpreting()), reason="needs triton + TRITON_INTERPRET=1")
EVENT_SHAPES = [(1,), (7,), (4097,), (2, 3, 5, 7)]
U32 = 2.0**-24  # fp32 unit roundoff


def _seed(v=2024):
    return torch.tensor([v], dtype=torch.int64)


def _step(n):
    return torch.tensor([n], dtype=torch.int64)


def _reference(z, g, coef, step):
    """float64: coef[step, 0] <z, g> + coef[step, 1] <z, z> per (probe, sample) row."""
    k, b = z.shape[:2]
    zz, gg = z.double().reshape(k, b, -1), g.double().reshape(k, b, -1)
    row = coef[step].double()
    return row[0] * (zz * gg).sum(-1) + row[1] * (zz * zz).sum(-1)


def _bound(z, g, coef, step):
    """Rigorous fp32 summation bound: (n + 2) u (|w0| sum|z g| + |w1| sum z^2) per row (Higham, Thm 4.3)."""
    k, b = z.shape[:2]
    zz, gg = z.double().reshape(k, b, -1), g.double().reshape(k, b, -1)
    n = zz.shape[-1]
    row = coef[step].double().abs()
    return (n + 2) * U32 * (row[0] * (zz * gg).abs().sum(-1) + row[1] * (zz * zz).sum(-1)) + 1e-30


# ------------------------------------------------------------------ probes
@needs_triton
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 33, 1), (3, 1, 4097), (2, 2, 2, 3, 5, 7)])
def test_probes_triton_equals_twin(kind, shape):
    a = K.probes_(torch.empty(shape), _seed(987654321987), kind=kind, sample_offset=5, probe_offset=2, backend="triton")
    b = K.probes_(torch.empty(shape), _seed(987654321987), kind=kind, sample_offset=5, probe_offset=2, backend="torch")
    if kind == "rademacher":
        assert torch.equal(a, b)
        assert bool(((a == 1.0) | (a == -1.0)).all())
    else:  # fp32 rounding of log / sqrt / cos, as for the sampler's noise
        torch.testing.assert_close(a, b, rtol=0, atol=8 * 5.8 * 2**-23)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probes_are_keyed_by_sample_probe_and_seed(kind):
    seed = _seed(7)
    big = K.probes_(torch.empty(4, 33, 3, 5), seed, kind=kind, backend="torch")
    for b in (0, 17, 32):  # sample b is the same alone, with its global index as offset
        one = K.probes_(torch.empty(4, 1, 3, 5), seed, kind=kind, sample_offset=b, backend="torch")
        assert torch.equal(one[:, 0], big[:, b])
    for p in (1, 3):  # probe p is the same whatever the number of probes drawn
        one = K.probes_(torch.empty(1, 33, 3, 5), seed, kind=kind, probe_offset=p, backend="torch")
        assert torch.equal(one[0], big[p])
    assert torch.equal(big, K.probes_(torch.empty(4, 33, 3, 5), seed, kind=kind, backend="torch"))  # deterministic
    assert not torch.equal(big, K.probes_(torch.empty(4, 33, 3, 5), seed + 1, kind=kind, backend="torch"))
    # probes are stream 2: not the sampler's per-step noise (stream 0) with the same key
    noise = K.normal_(torch.empty(33, 15), seed, _step(0), backend="torch")
    assert not torch.equal(big[0].reshape(33, 15), noise)


def test_probe_moments_within_5_sigma():
    """E[z] = 0 and E[z z^T] = I for both kinds; Rademacher is exactly +-1, Gaussian has E z^4 = 3."""
    k, b, d = 4, 500, 40
    for kind in ("rademacher", "gaussian"):
        z = K.probes_(torch.empty(k, b, d, dtype=torch.float64), _seed(11), kind=kind, backend="torch")
        flat = z.flatten()
        n = flat.numel()
        assert abs(flat.mean().item()) < 5 / math.sqrt(n)
        if kind == "rademacher":
            assert bool((flat.abs() == 1).all())
        else:
            assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / (n - 1))
            assert abs((flat**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
        # neighbouring elements, samples and probes are uncorrelated (E[z_i z_j] = 0)
        for u, v in ((z[..., :-1], z[..., 1:]), (z[:, :-1], z[:, 1:]), (z[:-1], z[1:])):
            assert abs((u * v).mean().item()) < 5 / math.sqrt(u.numel())


# ------------------------------------------------------------------ the fused reduction
def _case(shape, batch, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = K.probes_(torch.empty(k, batch, *shape), _seed(3), kind="gaussian", backend="torch")
    vjp = torch.randn((k, batch, *shape), generator=g)
    coef = torch.randn(4, 2, generator=g)
    acc0 = torch.randn(k, batch, generator=g)
    return z, vjp, coef, acc0


@needs_triton
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("shape", EVENT_SHAPES)
def test_accumulate_triton_equals_twin_and_reference(shape, batch):
    z, vjp, coef, acc0 = _case(shape, batch)
    ref = acc0.double() + _reference(z, vjp, coef, 2)
    bound = _bound(z, vjp, coef, 2) + 2 * U32 * ref.abs()
    outs = {}
    for backend in ("triton", "torch"):
        outs[backend] = K.hutchinson_accumulate(acc0.clone(), vjp, coef, _step(2), z, backend=backend)
        assert bool(((outs[backend].double() - ref).abs() <= bound).all()), backend
    # in-kernel regeneration of the probe gives, bit for bit, the probe the Triton launcher writes
    z_tri = K.probes_(torch.empty_like(z), _seed(3), kind="gaussian", backend="triton")
    read = K.hutchinson_accumulate(acc0.clone(), vjp, coef, _step(2), z_tri, backend="triton")
    regen = K.hutchinson_accumulate(acc0.clone(), vjp, coef, _step(2), None, _seed(3), kind="gaussian", backend="triton")
    assert torch.equal(regen, read)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=0, atol=float((2 * bound).max()))


@needs_triton
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_accumulate_regenerated_probe_matches_twin(kind):
    shape, batch, k = (5, 7), 3, 3
    seed = _seed(99)
    g = torch.Generator().manual_seed(1)
    vjp = torch.randn((k, batch, *shape), generator=g)
    coef = torch.randn(2, 2, generator=g)
    a = K.hutchinson_accumulate(torch.zeros(k, batch), vjp, coef, _step(1), None, seed, kind=kind, sample_offset=4,
                                backend="triton")
    b = K.hutchinson_accumulate(torch.zeros(k, batch), vjp, coef, _step(1), None, seed, kind=kind, sample_offset=4,
                                backend="torch")
    z = K.probes_(torch.empty(k, batch, *shape), seed, kind=kind, sample_offset=4, backend="torch")
    ref = _reference(z, vjp, coef, 1)
    bound = _bound(z, vjp, coef, 1) + (1e-5 * (coef[1].abs().sum() * (vjp.abs() + 6).reshape(k, batch, -1).sum(-1) * 6)
                                       if kind == "gaussian" else 0.0)
    assert bool(((a.double() - ref).abs() <= bound).all())
    assert bool(((b.double() - ref).abs() <= bound).all())


def test_twin_reads_its_row_by_the_device_step_and_accumulates():
    z, vjp, coef, acc0 = _case((6,), 4, k=1)
    acc = acc0.clone()
    for n in (0, 3, 1):
        K.hutchinson_accumulate(acc, vjp, coef, _step(n), z, backend="torch")
    ref = acc0.double() + sum(_reference(z, vjp, coef, n) for n in (0, 3, 1))
    torch.testing.assert_close(acc.double(), ref, rtol=0, atol=1e-4)
    # a one-row table broadcast over every step (row stride 0) serves any step index
    row = coef[2:3].expand(2**31 - 1, 2)
    out = K.hutchinson_accumulate(torch.zeros(1, 4), vjp, row, _step(12345), z, backend="torch")
    torch.testing.assert_close(out.double(), _reference(z, vjp, coef, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_accumulate_is_bitwise_batch_invariant(backend):
    """Sample b's row in a batch of 33 equals, bit for bit, the same row computed alone: a deterministic
    per-row reduction (the twin reduces in fixed 8192-element chunks, so also for rows past torch's
    intra-op parallel threshold)."""
    per = 40000 if backend == "torch" else 300
    z, vjp, coef, _ = _case((per,), 33, k=2)
    full = K.hutchinson_accumulate(torch.zeros(2, 33), vjp, coef, _step(1), z, backend=backend)
    for b in (0, 20, 32):
        one = K.hutchinson_accumulate(torch.zeros(2, 1), vjp[:, b:b + 1].contiguous(), coef, _step(1),
                                      z[:, b:b + 1].contiguous(), backend=backend)
        assert torch.equal(one[:, 0], full[:, b])
    again = K.hutchinson_accumulate(torch.zeros(2, 33), vjp, coef, _step(1), z, backend=backend)
    assert torch.equal(again, full)


def test_fp64_buffer_accumulates_in_fp64():
    z, vjp, coef, acc0 = _case((4097,), 3)
    out = K.hutchinson_accumulate(acc0.double(), vjp, coef.double(), _step(3), z, backend="torch")
    ref = acc0.double() + _reference(z, vjp, coef, 3)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_accumulate_takes_strided_input(backend):
    z, vjp, coef, acc0 = _case((5, 6), 3)
    vjp_t = vjp.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
    assert not vjp_t.is_contiguous()
    out = K.hutchinson_accumulate(acc0.clone(), vjp_t, coef, _step(0), z, backend=backend)
    ref = acc0.double() + _reference(z, vjp, coef, 0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)


def test_bad_arguments_name_the_argument():
    z, vjp, coef, acc0 = _case((3,), 2)
    with pytest.raises(ValueError, match="acc must be a \\[k, B\\]"):
        K.hutchinson_accumulate(acc0.reshape(-1), vjp, coef, _step(0), z)
    with pytest.raises(ValueError, match="vjp has shape"):
        K.hutchinson_accumulate(acc0, vjp[:, :1], coef, _step(0), z)
    with pytest.raises(ValueError, match="probes has shape"):
        K.hutchinson_accumulate(acc0, vjp, coef, _step(0), z[..., :2])
    with pytest.raises(ValueError, match="coef must be a \\[n_rows, 2\\]"):
        K.hutchinson_accumulate(acc0, vjp, torch.zeros(3, 3), _step(0), z)
    with pytest.raises(TypeError, match="accumulation dtype"):
        K.hutchinson_accumulate(acc0, vjp, coef.double(), _step(0), z)
    with pytest.raises(TypeError, match="step must be"):
        K.hutchinson_accumulate(acc0, vjp, coef, torch.tensor([0.0]), z)
    with pytest.raises(ValueError, match="probe kind"):
        K.hutchinson_accumulate(acc0, vjp, coef, _step(0), None, _seed(), kind="uniform")
    with pytest.raises(TypeError, match="seed must be"):
        K.hutchinson_accumulate(acc0, vjp, coef, _step(0), None, 3)
    with pytest.raises(ValueError, match="probe kind"):
        K.probes_(torch.empty(1, 2, 3), _seed(), kind="sphere")
    with pytest.raises(ValueError, match="out must be \\[k, B"):
        K.probes_(torch.empty(3), _seed())
    with pytest.raises(ValueError, match="sample_offset"):
        K.probes_(torch.empty(1, 4, 3), _seed(), sample_offset=2**32 - 2)
