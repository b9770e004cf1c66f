"""Sampling-loop benchmarks: heun and dpm++2m loops on the closed-form Gaussian denoiser, and a small
Hutchinson log-likelihood. Each checks the result it timed against an independent answer."""
import pytest
import torch

import flowsolve as fs
from bench.loop import edm_model, gaussian_denoiser, k_diffusion_loop, karras_sigmas
from bench.peers import import_k_diffusion_sampling

STEPS = 10


@pytest.mark.parametrize("solver", ["heun", "dpm++2m"])
def test_loop_4096x64(benchmark, solver, gen):
    """10 steps on diffusers' Karras sigmas (157 -> 0.01 -> 0) for 4096 x 64 samples of N(0.5, 0.25) data."""
    sigmas = karras_sigmas(STEPS)
    sampler = fs.Sampler(edm_model(gaussian_denoiser), solver, grid=sigmas.tolist())
    x_T = torch.randn(4096, 64, generator=gen) * float(sigmas[0])
    benchmark.extra_info.update(shape=[4096, 64], nfe=sampler.nfe, steps=STEPS)
    x = benchmark(sampler.sample, x_T)
    K = import_k_diffusion_sampling()
    if K is None:
        pytest.skip("k-diffusion not installed: timed, but not compared")
    ref = k_diffusion_loop(K, gaussian_denoiser, solver, sigmas)(x_T)
    # same method, grid and model in float32, summed in another order: ~20 roundings of 2^-24 relative per step
    # over 10 contracting steps, below 2e-5 of max |x| (measured 1.7e-6 / 1.9e-6 at max |x| ~ 3)
    assert float((x - ref).abs().max()) <= 2e-5 * float(ref.abs().max())


def test_hutchinson_likelihood_small(benchmark):
    """log p of 64 points in D = 8 under N(0.5, 0.25) data on EDM, one Rademacher probe, heun with 16 steps."""
    model = edm_model(gaussian_denoiser)
    x0 = 0.5 + 0.5 * torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    benchmark.extra_info.update(shape=[64, 8], steps=16, probes=1)
    logp, _ = benchmark(fs.log_likelihood, model, x0, solver="heun", steps=16, divergence="hutchinson", probes=1, seed=0)
    exact, _ = fs.log_likelihood(model, x0, solver="heun", steps=16, divergence="exact")
    # the velocity of Gaussian data has a diagonal Jacobian (FORMULAS.md §3), where a Rademacher probe's
    # z^T J z = sum_i J_ii z_i^2 is the exact trace (variance 0, §7): only float64 rounding separates the two
    assert float((logp - exact).abs().max()) <= 1e-9 * float(exact.abs().max())
