"""The fused embedded-step kernel (new state + error estimate + per-sample RMS norm in one pass): Triton
(through the interpreter) against its torch twin, both against a float64 torch reference with error
bounds derived from the arithmetic; keys, batch invariance, table indexing and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowsolve  # noqa: F401  (registers flowsolve.kernels)
from flowsolve import kernels as K
from flowsolve.kernels.embedded import _f32

needs_triton = pytest.mark.skipif(not (K.HAS_TRITON and K.interpreting()), reason="needs triton + TRITON_INTERPRET=1")
SIZES = [1, 7, 1023, 4097]  # per-sample sizes
RTOL, ATOL = 1e-3, 1e-4
RTOL32, ATOL32 = _f32(RTOL), _f32(ATOL)  # the kernel's documented float32 rounding of the tolerances
Z_DIFF = 8 * 5.8 * 2**-23  # |z_triton - z_twin|: fp32 rounding of log / sqrt / cos (tests/test_kernels.py)


def _step(n):
    return torch.tensor([n], dtype=torch.int64)


def _case(batch, per, k=4, dtype=torch.float32, seed=0, rows=3):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, per)
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]
    x_ref = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    coef = torch.randn(rows, k + 1, generator=g, dtype=torch.float64).to(dtype)
    # error weights small against the state's, as in an embedded pair (e = h (b - b_low) . k)
    err_coef = (1e-3 * torch.randn(rows, k, generator=g, dtype=torch.float64)).to(dtype)
    return inputs, x_ref, coef, err_coef


def _reference(inputs, x_ref, coef, err_coef, step, z=None):
    """float64: (out, e, norm) and the ingredients of the rounding bound."""
    row, erow = coef[step].double(), err_coef[step].double()
    ins = [t.double() for t in inputs]
    out = sum(row[i] * t for i, t in enumerate(ins))
    if z is not None:
        out = out + row[-1] * z.double()
    e = sum(erow[i] * t for i, t in enumerate(ins))
    sc = ATOL32 + RTOL32 * torch.maximum(x_ref.double().abs(), out.abs())
    norm = (e / sc).pow(2).mean(1).sqrt()
    out_mag = sum(row[i].abs() * t.abs() for i, t in enumerate(ins)) + (0 if z is None else row[-1].abs() * z.double().abs())
    e_mag = sum(erow[i].abs() * t.abs() for i, t in enumerate(ins))
    return out, e, sc, norm, out_mag, e_mag


def _norm_bound(e, sc, norm, out_mag, e_mag, u, k, n, extra_out=0.0):
    """First-order rounding bound on |norm_computed - norm| (Higham, Ch. 3-4), per sample:

    e and out are sums of k products: |de| <= g(k+1) sum|c T|, |dout| <= g(k+1) sum|c T| (+ extra_out:
    the cross-backend noise difference); the scale sc = atol + rtol max(.) then moves by rtol |dout| + 2 u sc,
    and q = e / sc by |de| / sc + |e| |dsc| / sc^2 + u |q|. The RMS over a row moves by at most the RMS of
    dq (triangle inequality), and summing n non-negative squares then the root adds (n + 3) u / 2 relative."""
    g = lambda m: m * u / (1 - m * u)  # noqa: E731
    d_out = g(k + 1) * out_mag + extra_out
    d_sc = RTOL * d_out + 2 * u * sc
    dq = g(k + 1) * e_mag / sc + e.abs() * d_sc / sc**2 + u * (e / sc).abs()
    return dq.pow(2).mean(1).sqrt() + (n + 3) * u / 2 * norm + 1e-300


def _run(backend, inputs, x_ref, coef, err_coef, step, seed=None, out_dtype=None, **kw):
    b = x_ref.shape[0]
    out = torch.empty(x_ref.shape, dtype=out_dtype or x_ref.dtype)
    norm = torch.empty(b, dtype=coef.dtype)
    return K.embedded_step(out, norm, inputs, coef, err_coef, _step(step), x_ref=x_ref, rtol=RTOL, atol=ATOL, seed=seed,
                           backend=backend, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("per", SIZES)
def test_triton_equals_twin_and_both_match_float64_reference(per, batch, noise, dtype):
    inputs, x_ref, coef, err_coef = _case(batch, per, dtype=dtype, seed=per + batch)
    seed = torch.tensor([123456789], dtype=torch.int64) if noise else None
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    k, n = len(inputs), per
    outs = {}
    for backend in ("triton", "torch"):
        z = K.normal_(torch.empty(batch, per), seed, _step(2), backend=backend) if noise else None
        out, e, sc, norm, out_mag, e_mag = _reference(inputs, x_ref, coef, err_coef, 2, z)
        got, got_norm = _run(backend, inputs, x_ref, coef, err_coef, 2, seed)
        outs[backend] = (got, got_norm)
        out_bound = (k + 2) * u / (1 - (k + 2) * u) * out_mag + u * out.abs()  # sum of k products, cast on store
        assert bool(((got.double() - out).abs() <= out_bound).all()), backend
        bound = _norm_bound(e, sc, norm, out_mag, e_mag, u, k, n)
        assert bool(((got_norm.double() - norm).abs() <= bound).all()), (backend, got_norm, norm, bound)
    # the two backends agree to the sum of their bounds (plus the noise's cross-backend rounding)
    (a, na), (b, nb) = outs["triton"], outs["torch"]
    c_z = coef[2, -1].abs().item() if noise else 0.0
    out, e, sc, norm, out_mag, e_mag = _reference(inputs, x_ref, coef, err_coef, 2, None)
    assert float((a.double() - b.double()).abs().max()) <= 2 * (k + 3) * u * float(out_mag.max() + 6 * c_z) + c_z * Z_DIFF
    bound = _norm_bound(e, sc, norm, out_mag + 6 * c_z, e_mag, u, k, n, extra_out=c_z * Z_DIFF)
    assert bool(((na.double() - nb.double()).abs() <= 2 * bound + 1e-12 * norm * noise).all())


@needs_triton
@pytest.mark.parametrize("per,block,chunk", [(4097, 256, 512), (1023, 64, 100), (7, 4, 4)])
def test_two_stage_reduction_matches_single_stage(per, block, chunk):
    """A row split over several programs (partials, then a fixed-order sum) gives the norm of the one-pass
    reduction to summation rounding, and the same state bit for bit."""
    inputs, x_ref, coef, err_coef = _case(5, per, seed=per)
    a, na = _run("triton", inputs, x_ref, coef, err_coef, 1)
    b, nb = _run("triton", inputs, x_ref, coef, err_coef, 1, block=block, chunk=chunk)
    assert torch.equal(a, b)
    torch.testing.assert_close(na, nb, rtol=(per + 3) * 2.0**-24, atol=0)
    _, e, sc, norm, out_mag, e_mag = _reference(inputs, x_ref, coef, err_coef, 1)
    assert bool(((nb.double() - norm).abs() <= _norm_bound(e, sc, norm, out_mag, e_mag, 2.0**-24, 4, per)).all())


@settings(max_examples=12)
@given(batch=st.integers(1, 6), per=st.integers(1, 300), k=st.integers(1, 8), step=st.integers(0, 2),
       f64=st.booleans())
def test_twin_matches_float64_reference(batch, per, k, step, f64):
    dtype = torch.float64 if f64 else torch.float32
    inputs, x_ref, coef, err_coef = _case(batch, per, k=k, dtype=dtype, seed=batch * 1000 + per)
    out, e, sc, norm, out_mag, e_mag = _reference(inputs, x_ref, coef, err_coef, step)
    got, got_norm = _run("torch", inputs, x_ref, coef, err_coef, step)
    u = 2.0**-53 if f64 else 2.0**-24
    assert bool(((got.double() - out).abs() <= (k + 2) * u / (1 - (k + 2) * u) * out_mag + u * out.abs()).all())
    assert bool(((got_norm.double() - norm).abs() <= _norm_bound(e, sc, norm, out_mag, e_mag, u, k, per)).all())


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_state_equals_lincomb_and_noise_stays_out_of_the_error(backend):
    """``out`` is exactly lincomb's combination (same keyed noise); ``e`` carries no noise: with a zero error
    row the norm is 0 with noise on, and the norm does not change when only the noise coefficient does
    (beyond the noise's effect on the scale through |out|, removed here by rtol's x_ref dominating)."""
    inputs, x_ref, coef, err_coef = _case(3, 33, k=3, seed=4)
    seed = torch.tensor([99], dtype=torch.int64)
    a, _ = _run(backend, inputs, x_ref, coef, err_coef, 1, seed)
    ref = K.lincomb(torch.empty(3, 33), inputs, coef, _step(1), seed, backend=backend)
    assert torch.equal(a, ref)
    _, n0 = _run(backend, inputs, x_ref, coef, torch.zeros_like(err_coef), 1, seed)
    assert bool((n0 == 0).all())
    big_ref = 1e6 * torch.ones_like(x_ref)  # scale = atol + rtol * 1e6 whatever out is
    coef_quiet = coef.clone()
    coef_quiet[:, -1] = 0.0
    _, n1 = _run(backend, inputs, big_ref, coef, err_coef, 1, seed)
    _, n2 = _run(backend, inputs, big_ref, coef_quiet, err_coef, 1, seed)
    assert torch.equal(n1, n2)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_batch_invariant_and_deterministic(backend):
    """Sample b computed alone (its global index as sample_offset) equals, bit for bit, row b of a batch of
    5: state, noise and norm. The twin at D = 9000 also crosses its fixed 8192-element summation chunk; the
    Triton kernel is checked on both reduction paths."""
    per = 9000 if backend == "torch" else 100
    configs = [{}] if backend == "torch" else [{}, {"block": 16, "chunk": 32}]
    inputs, x_ref, coef, err_coef = _case(5, per, seed=7)
    seed = torch.tensor([5], dtype=torch.int64)
    for kw in configs:
        full, nfull = _run(backend, inputs, x_ref, coef, err_coef, 2, seed, **kw)
        again, nagain = _run(backend, inputs, x_ref, coef, err_coef, 2, seed, **kw)
        assert torch.equal(full, again) and torch.equal(nfull, nagain)
        for b in (0, 4):
            one = [t[b:b + 1].clone() for t in inputs]
            out = torch.empty(1, per)
            norm = torch.empty(1)
            K.embedded_step(out, norm, one, coef, err_coef, _step(2), x_ref=x_ref[b:b + 1].clone(), rtol=RTOL, atol=ATOL,
                            seed=seed, sample_offset=b, backend=backend, **kw)
            assert torch.equal(out[0], full[b]) and torch.equal(norm[0], nfull[b]), (b, kw)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_rows_read_by_device_step_and_broadcast_tables(backend):
    inputs, x_ref, coef, err_coef = _case(2, 9, k=2, rows=4, seed=8)
    for n in (0, 3):
        _, _, _, norm, _, _ = _reference(inputs, x_ref, coef, err_coef, n)
        _, got = _run(backend, inputs, x_ref, coef, err_coef, n)
        torch.testing.assert_close(got.double(), norm, rtol=1e-5, atol=0)
    # a one-row table broadcast over every step (row stride 0) serves any step index
    c1 = coef[1:2].expand(2**31 - 1, 3)
    e1 = err_coef[1:2].expand(2**31 - 1, 2)
    out, norm = K.embedded_step(torch.empty(2, 9), torch.empty(2), inputs, c1, e1, _step(12345), x_ref=x_ref,
                                rtol=RTOL, atol=ATOL, backend=backend)
    ref_out, _, _, ref_norm, _, _ = _reference(inputs, x_ref, coef, err_coef, 1)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_strided_inputs_low_precision_state_and_tolerance_rounding(backend):
    """Non-contiguous inputs and x_ref give the contiguous result; a float16 state is written cast on store
    while the norm uses the fp32 accumulated value (the twin; the Triton path compiles only the adaptive
    solvers' one-dtype states and refuses others by name); rtol/atol enter rounded to float32 on both backends."""
    inputs, x_ref, coef, err_coef = _case(4, 6, k=2, seed=9)
    strided = [t.t().contiguous().t() for t in inputs]
    assert not strided[0].is_contiguous()
    a, na = _run(backend, inputs, x_ref, coef, err_coef, 0)
    b, nb = _run(backend, strided, x_ref.t().contiguous().t(), coef, err_coef, 0)
    assert torch.equal(a, b) and torch.equal(na, nb)
    if backend == "triton":
        with pytest.raises(TypeError, match="one dtype, float32 or float64"):
            _run(backend, inputs, x_ref, coef, err_coef, 0, out_dtype=torch.float16)
    else:
        h, nh = _run(backend, inputs, x_ref, coef, err_coef, 0, out_dtype=torch.float16)
        assert h.dtype == torch.float16 and torch.equal(h, a.half()) and torch.equal(nh, na)
    assert _f32(1e-3) == float(torch.tensor(1e-3, dtype=torch.float32)) and abs(_f32(1e-3) / 1e-3 - 1) < 6e-8


def test_float64_tables_accumulate_in_float64():
    inputs, x_ref, coef, err_coef = _case(3, 4097, dtype=torch.float64, seed=10)
    out, e, sc, norm, out_mag, e_mag = _reference(inputs, x_ref, coef, err_coef, 1)
    got, got_norm = _run("torch", inputs, x_ref, coef, err_coef, 1)
    assert got_norm.dtype == torch.float64
    torch.testing.assert_close(got, out, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got_norm, norm, rtol=1e-12, atol=0)


def test_bad_arguments_name_the_argument():
    inputs, x_ref, coef, err_coef = _case(2, 3, k=2)
    out, norm, st0 = torch.empty(2, 3), torch.empty(2), _step(0)

    def call(**kw):
        args = dict(out=out, err_norm=norm, inputs=inputs, coef=coef, err_coef=err_coef, step=st0, x_ref=x_ref,
                    rtol=RTOL, atol=ATOL)
        args.update(kw)
        return K.embedded_step(args.pop("out"), args.pop("err_norm"), args.pop("inputs"), args.pop("coef"),
                               args.pop("err_coef"), args.pop("step"), **args)

    with pytest.raises(ValueError, match="shares memory with out"):
        call(inputs=[out, inputs[1]])
    with pytest.raises(ValueError, match="x_ref shares memory with out"):
        call(x_ref=out)
    with pytest.raises(ValueError, match="inputs\\[1\\] has shape"):
        call(inputs=[inputs[0], torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="coef must be \\[n_rows, K\\+1\\]"):
        call(coef=coef[:, :2])
    with pytest.raises(ValueError, match="err_coef must be \\[n_rows, K\\]"):
        call(err_coef=coef)
    with pytest.raises(TypeError, match="err_coef has dtype"):
        call(err_coef=err_coef.double())
    with pytest.raises(ValueError, match="err_norm must be a \\[B\\]"):
        call(err_norm=torch.empty(3))
    with pytest.raises(TypeError, match="err_norm has dtype"):
        call(err_norm=torch.empty(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="step must be"):
        call(step=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="atol=0.0 must be > 0"):
        call(atol=0.0)
    with pytest.raises(ValueError, match="rtol=-1"):
        call(rtol=-1)
    with pytest.raises(ValueError, match="out must be contiguous"):
        call(out=torch.empty(3, 2).t())
    with pytest.raises(ValueError, match="1..8 input tensors"):
        call(inputs=[])
    with pytest.raises(TypeError, match="seed must be"):
        call(seed=3)
    assert math.isfinite(float(call()[1].max()))
