"""Kernel benchmarks: the fused lincomb update and the keyed noise against a plain copy (bytes in extra_info)."""
import torch

from flowsolve.kernels import lincomb, normal_, seed_tensor

N20 = 1 << 20


def _shape(n):
    return (n // 64, 64)


def test_copy_2p20(benchmark, gen):
    """``out.copy_(x)``: the copy bandwidth every elementwise kernel is measured against (8 bytes/element)."""
    x = torch.randn(_shape(N20), generator=gen)
    out = torch.empty_like(x)
    benchmark.extra_info.update(numel=N20, bytes=8 * N20)
    benchmark(out.copy_, x)
    assert torch.equal(out, x)


def test_lincomb_eager_2p20(benchmark, gen):
    """``out = c0 x + c1 d`` with the torch twin (12 bytes/element)."""
    x, d = torch.randn(_shape(N20), generator=gen), torch.randn(_shape(N20), generator=gen)
    out = torch.empty_like(x)
    coef = torch.tensor([[1.0, -0.01, 0.0]])
    step = torch.zeros(1, dtype=torch.int64)
    benchmark.extra_info.update(numel=N20, bytes=12 * N20)
    benchmark(lincomb, out, [x, d], coef, step)
    # float32 sum of two products, each rounded once: within 2 ulp of the float64 value
    ref = x.double() - 0.01 * d.double()
    assert float((out.double() - ref).abs().max()) <= 2 * 2**-23 * float(ref.abs().max())


def test_keyed_normal_2p16(benchmark):
    """``flowsolve.kernels.normal_``: keyed Philox4x32-10 + Box-Muller (4 bytes/element written)."""
    n = 1 << 16
    out = torch.empty(_shape(n))
    seed, step = seed_tensor(0, "cpu"), torch.zeros(1, dtype=torch.int64)
    benchmark.extra_info.update(numel=n, bytes=4 * n)
    benchmark(normal_, out, seed, step)
    # a standard normal sample of 65536: mean within 5 sd (sd = 1/256) of 0, variance within 5 sd
    # (sd = sqrt(2/(n-1)) ~ 0.0055) of 1 (FORMULAS.md §7, c = 5)
    assert abs(float(out.mean())) < 5 / 256 and abs(float(out.var()) - 1) < 5 * (2 / (n - 1)) ** 0.5
