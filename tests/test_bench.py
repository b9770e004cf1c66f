"""The benchmark's own arithmetic, checked against independent answers."""
import math

import torch

import flowsolve as fs
from bench import steps as B
from bench.problems import problems


def test_ode_error_reproduces_closed_form_euler_error():
    """Euler on the linear PF-ODE of Gaussian data is an affine recursion with known factors:
    x_{n+1} = (1 + h_n a_n) x_n - h_n g2_n alpha_n mu / (2 C_n), a_n = f_n + g2_n / (2 C_n)
    (FORMULAS.md §2-3, written out here without the library's Model or kernels). The benchmark's
    error must equal the RMS distance of that recursion's output to the exact flow map."""
    p = problems()["gaussian-vp"]
    prob, path = p.prob, p.path
    x_T = prob.sample(64, p.t_max, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    steps = 7
    exact = prob.flow(x_T, p.t_max, p.t_min)
    measured = B.ode_error(fs.sample(p.model(), x_T, solver="euler", steps=steps), exact)
    grid = fs.grids.make_grid(None, path, steps)
    x = x_T.clone()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h, c = t1 - t0, path.alpha(t0) ** 2 * prob.std**2 + path.sigma(t0) ** 2
        x = (1 + h * (path.f(t0) + path.g2(t0) / (2 * c))) * x - h * path.g2(t0) * path.alpha(t0) * prob.mu / (2 * c)
    closed = float((x - exact).pow(2).mean().sqrt())
    assert measured > 1e-3  # a real discretization error, not rounding
    assert math.isclose(measured, closed, rel_tol=1e-9)


def test_w2_error_is_zero_for_matching_moments_and_exact_for_a_shift():
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # mean 1, unbiased var 2
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    assert B.w2_error(x, f64(1.0), f64(2.0)) == 0.0
    assert math.isclose(B.w2_error(x, f64(0.5), f64(2.0)), 0.5)
    assert math.isclose(B.w2_error(x, f64(1.0), f64(0.5)), math.sqrt(2) - math.sqrt(0.5))


def test_nfe_to_reach_uses_the_last_crossing():
    pts = [{"nfe": 4, "error": 0.05}, {"nfe": 8, "error": 0.2}, {"nfe": 16, "error": 0.1}, {"nfe": 32, "error": 0.01}]
    assert math.isclose(B.nfe_to_reach(pts, 0.1), 16.0)  # not 4: the error rises above 0.1 again at 8
    mid = B.nfe_to_reach(pts, math.sqrt(0.1 * 0.01))  # halfway in log between 16 and 32
    assert math.isclose(mid, math.sqrt(16 * 32))
    assert B.nfe_to_reach(pts, 1e-3) is None


def test_error_at_interpolates_in_log_log():
    pts = [{"nfe": 8, "error": 1e-2}, {"nfe": 12, "error": 1e-3}]
    assert B.error_at(pts, 8) == 1e-2
    w = math.log(10 / 8) / math.log(12 / 8)
    assert math.isclose(B.error_at(pts, 10), math.exp(math.log(1e-2) + w * math.log(0.1)))
    assert B.error_at(pts, 20) is None


def test_mixture_reference_matches_scipy_and_reports_its_error():
    """The Gaussian-mixture reference endpoint (float64 RK4, 4096 steps) against scipy's DOP853 at
    rtol 1e-12 on the same velocity field, and its halving-estimated error is of the size it claims."""
    import numpy as np
    from scipy.integrate import solve_ivp

    for name in ("mixture-vp", "mixture-rf"):
        p = problems()[name]
        x_T = p.prob.sample(3, p.t_max, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ref = p.reference(x_T, p.t_max)

        def rhs(t, y):
            x = torch.from_numpy(y).reshape(1, -1)
            return p.prob.velocity(x, torch.tensor([t], dtype=torch.float64)).reshape(-1).numpy()

        for i in range(3):
            sol = solve_ivp(rhs, (p.t_max, p.t_min), x_T[i].numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
            assert sol.success
            assert np.abs(sol.y[:, -1] - ref[i].numpy()).max() < 1e-8, (name, i)
        assert p.ref_error[p.t_max] < 1e-9


def test_speed_bench_measures_bytes_against_copy():
    """The speed bench's bookkeeping (timings themselves are never asserted): every case reports the
    bytes it moves (copy: 2 x 4 bytes per float32 element; the fused update: 3 x 4) and its fraction
    of the copy bandwidth at the same size."""
    from bench import speed

    rows, _ = speed.measure([10], torch.device("cpu"), repeats=2, noise_max=10, compile_twin=False)
    by = {r["case"]: r for r in rows}
    assert by["copy"]["bytes"] == 2 * 4 * 1024 and by["copy"]["frac_copy"] == 1.0
    assert by["lincomb"]["bytes"] == by["lincomb+noise"]["bytes"] == 3 * 4 * 1024
    for r in rows:
        assert math.isclose(r["GBps"], r["bytes"] / r["median_s"] / 1e9)
        assert math.isclose(r["frac_copy"], r["GBps"] / by["copy"]["GBps"])
    assert "| copy |" in speed.markdown(rows)


def test_reach_cell_says_when_the_first_point_is_already_below_the_level():
    pts = [{"nfe": 29, "error": 2e-3}, {"nfe": 40, "error": 1e-4}]
    assert B._reach_cell(pts, 1e-2) == "<= 29"  # never above 1e-2: reached at or before the first point
    mid = B._reach_cell(pts, 1e-3)
    assert mid == f"{B.nfe_to_reach(pts, 1e-3):.0f}" and 29 < float(mid) < 40
    assert B._reach_cell(pts, 1e-5) == "—"
