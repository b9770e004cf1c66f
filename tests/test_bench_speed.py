"""The speed benchmarks' own arithmetic and plumbing (bench/speed.py, bench/loop.py, bench/compile_bench.py):
byte accounting, the interleaved timer, NFE counting, and that every loop timed side by side runs the
same method (its samples agree with the peers' to float32 rounding)."""
import math

import pytest
import torch

from bench import compile_bench, loop, speed
from bench.peers import import_k_diffusion_sampling

K = import_k_diffusion_sampling()


def test_bytes_moved_counts_reads_and_writes():
    """copy reads + writes one tensor; lincomb reads x, d and writes out; noise generators only write."""
    n = 1000
    assert speed.bytes_moved("copy", n) == 2 * 4 * n
    assert speed.bytes_moved("lincomb", n) == 3 * 4 * n
    assert speed.bytes_moved("lincomb+noise", n) == 3 * 4 * n  # z is generated in the kernel, never read
    assert speed.bytes_moved("keyed normal", n) == 4 * n
    assert speed.bytes_moved("randn", n) == 4 * n
    assert speed.bytes_moved("compiled lincomb+noise", n) == speed.bytes_moved("lincomb+noise", n)
    assert speed.bytes_moved("copy", n, itemsize=8) == 2 * 8 * n


def test_interleaved_runs_every_case_in_each_round_and_returns_medians():
    calls = {"a": 0, "b": 0}
    order = []

    def make(k):
        def f():
            calls[k] += 1
            order.append(k)
        return f

    res = speed.interleaved({"a": make("a"), "b": make("b")}, "cpu", repeats=5, min_time=0.0)
    # min_time 0: one call per sample; 2 calibration calls + 5 timed calls each
    assert calls == {"a": 7, "b": 7}
    assert order[4:] == ["a", "b"] * 5  # after calibration, rounds alternate the cases
    for r in res.values():
        assert r["inner"] == 1 and len(r["samples_s"]) == 5
        assert r["median_s"] == sorted(r["samples_s"])[2]


def test_measure_reports_gbps_from_bytes_and_median():
    rows, compile_rows = speed.measure([10], "cpu", repeats=1, noise_max=10, compile_twin=False, compile_noise_max=0,
                                       min_time=0.0)
    assert compile_rows == []
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {"copy", "lincomb", "randn", "lincomb+noise", "keyed normal"}
    for r in rows:
        assert r["bytes"] == speed.bytes_moved(r["case"], 1024)
        assert math.isclose(r["GBps"], r["bytes"] / r["median_s"] / 1e9, rel_tol=1e-12)
        assert math.isclose(r["ns_per_el"], 1e9 * r["median_s"] / 1024, rel_tol=1e-12)
        assert math.isclose(r["frac_copy"], r["GBps"] / cases["copy"]["GBps"], rel_tol=1e-12)


def test_measure_compile_path_runs():
    """The ``--compile`` path (compiled lincomb and randn twins; keyed noise excluded: its compile takes minutes)."""
    rows, compile_rows = speed.measure([10], "cpu", repeats=1, noise_max=0, compile_twin=True, compile_noise_max=0,
                                       min_time=0.0)
    assert {r["case"] for r in compile_rows} == {"compiled lincomb", "compiled randn"}
    assert all(r["first_call_s"] > 0 for r in compile_rows)
    assert {"compiled lincomb", "compiled randn"} <= {r["case"] for r in rows}


def test_karras_sigmas_end_at_zero_and_decrease():
    s = loop.karras_sigmas(10)
    assert s.dtype == torch.float64 and s.numel() == 11 and float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("solver", loop.SOLVERS)
def test_loops_count_the_same_nfe(solver):
    """Heun's last step lands on sigma = 0 and is an Euler step (Karras et al. 2022, Alg. 1): NFE = 2N - 1;
    dpm++2m and euler make one evaluation per step. Counted by wrapping the model, for every implementation."""
    pytest.importorskip("diffusers")
    steps = 5
    sigmas = loop.karras_sigmas(steps)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    expected = 2 * steps - 1 if solver == "heun" else steps
    names = loop.loops(loop.gaussian_denoiser, solver, sigmas, K)
    assert ("k-diffusion" in names) == (K is not None)
    for name in names:
        nfe, _ = loop.count_nfe(name, loop.gaussian_denoiser, solver, sigmas, K, x_T)
        assert nfe == expected, name


@pytest.mark.parametrize("solver", loop.SOLVERS)
def test_loop_implementations_give_the_same_samples(solver):
    """Same method, grid and model: ours (planned once or per call), k-diffusion and diffusers agree to
    float32 rounding. ~20 roundings of 2^-24 relative per step over 5 contracting steps: below 2e-5 of
    max |x| (measured at most 2e-6 at max |x| ~ 2); a different method or grid differs by O(1e-1) here."""
    pytest.importorskip("diffusers")
    sigmas = loop.karras_sigmas(5)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    runs = loop.loops(loop.gaussian_denoiser, solver, sigmas, K)
    ref = runs["ours Sampler"](x_T)
    assert not torch.equal(ref, x_T)
    for name, run in runs.items():
        out = run(x_T)
        assert float((out - ref).abs().max()) <= 2e-5 * float(ref.abs().max()), name
    # and the plain Euler recursion on the closed-form denoiser, written out here: x <- x + (s' - s)(x - D)/s
    if solver == "euler":
        x = x_T.double()
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            d = (x - loop.gaussian_denoiser(x.clone(), s0.expand(x.shape[0]))) / s0
            x = x + (s1 - s0) * d
        assert float((ref.double() - x).abs().max()) <= 2e-5 * float(x.abs().max())


def test_gaussian_denoiser_is_the_posterior_mean():
    """E[x0 | x] for x0 ~ N(mu, s2) and x = x0 + sigma eps, against the x0 prediction of fs.analytic.Gaussian."""
    import flowsolve as fs

    path = fs.paths.EDM()
    prob = fs.analytic.Gaussian(torch.full((3,), loop.MU, dtype=torch.float64), torch.full((3,), loop.S2**0.5, dtype=torch.float64),
                                path)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    assert torch.allclose(loop.gaussian_denoiser(x.clone(), sigma), prob.x0(x, sigma), rtol=1e-12, atol=1e-12)


def test_stochastic_stage_reports_a_timeout_instead_of_hanging():
    row = compile_bench.stochastic_stage("normal_", (4, 2), 0, threads=1, timeout=0.5)
    assert row["error"].startswith("did not finish")
