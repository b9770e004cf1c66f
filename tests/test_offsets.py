"""int64 index arithmetic past 2^31 and 2^32 elements, tested without allocating them (issue 8, item 5).

The kernels compute flat offsets with ``kernels/offsets.py``'s ``block_offsets`` (program id cast to int64
before the multiply) and split them into the noise key's (sample, element) with ``sample_element``. A probe
kernel launched for ONE block, with a program-id base passed in, evaluates exactly that arithmetic at
offsets near 2^31 and 2^32 (under TRITON_INTERPRET=1 on CPU, or on a GPU); the truth is Python's unbounded
integer arithmetic (``sample_element_ref``). A negative control shows the int32 version does wrap there,
so the probe is sensitive to the bug it guards against (triton #1058, fla #1080)."""
import pytest
import torch

import flowsolve as fs
from flowsolve.kernels import philox
from flowsolve.kernels.backend import HAS_TRITON, interpreting
from flowsolve.kernels.offsets import sample_element_ref, sample_element_torch

K = fs.kernels
needs_triton = pytest.mark.skipif(not (HAS_TRITON and (interpreting() or torch.cuda.is_available())),
                                  reason="needs triton (TRITON_INTERPRET=1 on CPU, or a GPU)")
DEV = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
BLOCK = 64
PER = 3 * 2**20 + 7  # an awkward per-sample size: offsets split across a sample boundary in the blocks below
# program-id bases whose single block covers [2^31 - 64, 2^31), [2^31, 2^31 + 64), near 2^32, and past 2^32
PID_BASES = [2**31 // BLOCK - 1, 2**31 // BLOCK, 2**32 // BLOCK - 1, 2**32 // BLOCK + 5]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowsolve.kernels.offsets import block_offsets, sample_element
    from flowsolve.kernels.philox import keyed_normal

    @triton.jit
    def _offsets_probe(out_off, out_s, out_e, pid_base, per_sample, sample_offset, BLOCK: tl.constexpr):
        offs = block_offsets(pid_base + tl.program_id(0), BLOCK)
        s, e = sample_element(offs, per_sample, sample_offset)
        i = tl.arange(0, BLOCK)
        tl.store(out_off + i, offs)
        tl.store(out_s + i, s)
        tl.store(out_e + i, e)

    @triton.jit
    def _int32_offsets_probe(out_off, pid_base, BLOCK: tl.constexpr):
        pid = (pid_base + tl.program_id(0)).to(tl.int32)
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # the bug: int32 multiply
        tl.store(out_off + tl.arange(0, BLOCK), offs.to(tl.int64))

    @triton.jit
    def _keyed_normal_probe(out, seed_ptr, sample, step, elem_base, STREAM: tl.constexpr, BLOCK: tl.constexpr):
        elem = elem_base + tl.arange(0, BLOCK).to(tl.int64)
        z = keyed_normal(tl.load(seed_ptr), elem * 0 + sample, elem * 0 + step, elem, STREAM)
        tl.store(out + tl.arange(0, BLOCK), z)


def _ref(pid_base, per, sample_offset):
    offs = [pid_base * BLOCK + i for i in range(BLOCK)]
    pairs = [sample_element_ref(o, per, sample_offset) for o in offs]
    return offs, [p[0] for p in pairs], [p[1] for p in pairs]


@needs_triton
@pytest.mark.parametrize("pid_base", PID_BASES)
@pytest.mark.parametrize("sample_offset", [0, 2**31 - 700])
def test_kernel_offsets_past_2_31_and_2_32_match_python_ints(pid_base, sample_offset):
    bufs = [torch.empty(BLOCK, dtype=torch.int64, device=DEV) for _ in range(3)]
    _offsets_probe[(1,)](*bufs, pid_base, PER, sample_offset, BLOCK=BLOCK)
    offs, s, e = _ref(pid_base, PER, sample_offset)
    assert bufs[0].tolist() == offs
    assert bufs[1].tolist() == s and bufs[2].tolist() == e
    assert max(offs) >= 2**31 - 1  # these blocks really are past int32


@needs_triton
def test_negative_control_int32_offsets_wrap():
    """The same probe with the multiply in int32 is wrong at 2^31: proves the test above can fail."""
    out = torch.empty(BLOCK, dtype=torch.int64, device=DEV)
    pid_base = 2**31 // BLOCK
    _int32_offsets_probe[(1,)](out, pid_base, BLOCK=BLOCK)
    assert out.tolist() != _ref(pid_base, PER, 0)[0]
    assert int(out[0]) == -(2**31)  # wrapped to INT32_MIN


@pytest.mark.parametrize("pid_base", PID_BASES)
def test_twin_split_matches_python_ints(pid_base):
    offs = torch.arange(BLOCK, dtype=torch.int64) + pid_base * BLOCK
    s, e = sample_element_torch(offs, PER, 2**31 + 3)
    _, s_ref, e_ref = _ref(pid_base, PER, 2**31 + 3)
    assert s.tolist() == s_ref and e.tolist() == e_ref


@needs_triton
@pytest.mark.parametrize("elem_base", [2**31 - BLOCK // 2, 2**32 - BLOCK])
def test_philox_element_counter_near_2_31_and_2_32_matches_twin(elem_base):
    """Element j of one sample keys Philox counter word c0 = j: the kernel's and the twin's noise agree for
    j around 2^31 (a sign boundary for int32) and up to 2^32 - 1 (the last admissible element)."""
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64, device=DEV)
    out = torch.empty(BLOCK, dtype=torch.float32, device=DEV)
    sample, step = 2**32 - 1, 7
    _keyed_normal_probe[(1,)](out, seed, sample, step, elem_base, STREAM=0, BLOCK=BLOCK)
    elem = torch.arange(BLOCK, dtype=torch.int64) + elem_base
    twin = philox.keyed_normal_torch(seed.cpu(), torch.tensor(sample), torch.tensor(step), elem, 0)
    # the same Philox words and uniforms; log / sqrt / cos rounding: a few ulp of |z| <= 5.8 (as test_kernels)
    torch.testing.assert_close(out.cpu(), twin, rtol=0, atol=8 * 5.8 * 2**-23)
    # counters are not truncated to 31 bits: element 2^31 + j is not element j
    low = philox.keyed_normal_torch(seed.cpu(), torch.tensor(sample), torch.tensor(step), elem - 2**31, 0)
    assert not torch.equal(twin, low)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("offset", [2**31 - 2, 2**32 - 4])
def test_keyed_noise_near_2_31_and_2_32_is_batch_invariant(backend, offset):
    """Sample offset + b near 2^31 and at the top of the 2^32 range: the noise of sample b drawn alone equals
    its row in the batch, bitwise, and differs from the noise of sample b - 2^31 (no 31-bit truncation)."""
    dev = DEV if backend == "triton" else "cpu"
    seed = torch.tensor([99], dtype=torch.int64, device=dev)
    step = torch.tensor([3], dtype=torch.int64, device=dev)
    batch = K.normal_(torch.empty(4, 5, device=dev), seed, step, sample_offset=offset, backend=backend)
    for b in range(4):
        one = K.normal_(torch.empty(1, 5, device=dev), seed, step, sample_offset=offset + b, backend=backend)
        assert torch.equal(one[0], batch[b])
        if offset + b >= 2**31:
            low = K.normal_(torch.empty(1, 5, device=dev), seed, step, sample_offset=offset + b - 2**31, backend=backend)
            assert not torch.equal(low[0], batch[b])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_sampler_noise_at_global_index_near_2_32_matches_the_batch(backend):
    """End to end: a stochastic sampler's sample with global index 2^32 - 1 is the same drawn alone or as the
    last row of a batch that starts at 2^32 - 3."""
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor([0.3, -0.2]), torch.tensor([0.9, 1.1]), path)
    model = fs.Model(prob.eps, path, predicts="eps")
    dev = DEV if backend == "triton" else "cpu"
    kw = dict(solver="euler_maruyama", steps=3, seed=5, backend=backend, device=dev)
    batch = fs.sample(model, (3, 2), sample_offset=2**32 - 3, **kw)
    last = fs.sample(model, (1, 2), sample_offset=2**32 - 1, **kw)
    assert torch.equal(last[0], batch[2])
