"""The benchmark's own arithmetic, checked against independent answers."""
import math
import re

import pytest
import torch

import flowsolve as fs
from bench import steps as B
from bench.problems import REF_TOL, problems


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


@pytest.fixture
def one_thread():
    """Tiny tensors (3 x 2): one intra-op thread (two are 10x slower on a loaded 2-core machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mixture_reference_matches_scipy_and_reports_its_error(one_thread):
    """The Gaussian-mixture reference endpoint (float64 RK4, steps doubled until its halving estimate is
    <= REF_TOL = 1e-10) against scipy's DOP853 at rtol 1e-12 on the same velocity field, VP, rectified flow and
    EDM (from sigma = 80). The 1e-8 bound: DOP853's own error at rtol = atol = 1e-12 over these ranges is
    ~1e-10, and the reference claims 1e-10 RMS; 100x covers the max over 2 coordinates vs an RMS."""
    import numpy as np
    from scipy.integrate import solve_ivp

    for name in ("mixture-vp", "mixture-rf", "mixture-edm"):
        p = problems()[name]
        x_T = p.prob.sample(3, p.t_max, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ref = p.reference(x_T, p.t_max, cache=False)

        def rhs(t, y):
            x = torch.from_numpy(y).reshape(1, -1)
            return p.prob.velocity(x, torch.tensor([t], dtype=torch.float64)).reshape(-1).numpy()

        for i in range(3):
            sol = solve_ivp(rhs, (p.t_max, p.t_min), x_T[i].numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
            assert sol.success
            assert np.abs(sol.y[:, -1] - ref[i].numpy()).max() < 1e-8, (name, i)
        assert p.ref_error[p.t_max] <= REF_TOL


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
    assert B._reach_cell(pts, 1e-5) == "> 40"  # never reached within the sweep: beyond its largest NFE


def _c4(n):
    """E[s] / sigma for the sample standard deviation (unbiased variance) of n Gaussian draws."""
    return math.sqrt(2.0 / (n - 1)) * math.exp(math.lgamma(n / 2) - math.lgamma((n - 1) / 2))


def test_w2_statistic_of_exact_samples_sits_at_its_closed_form_floor():
    """Exact samples of a Gaussian marginal N(m, v) have zero bias, so E[w2_error^2] is pure Monte-Carlo noise,
    in closed form: per dimension E[(m_hat - m)^2] = v / n and E[(s_hat - s)^2] = 2 v (1 - c4(n)). The floor
    ``mc_floor_stats`` reports (RMS over R replicates) must match it; tolerance 5 standard errors of the
    replicates' mean square (FORMULAS.md §7, c = 5). A sampler biased by delta in the mean then lies
    sqrt(delta^2 + floor^2) away, distinguishable once delta >~ floor."""
    p = problems()["gaussian-vp"]
    mean = p.prob.mean(p.t_min).expand(p.dim).to(torch.float64)
    var = p.prob.var(p.t_min).expand(p.dim).to(torch.float64)
    n, reps = 64, 400
    closed_sq = float((var * (1.0 / n + 2.0 * (1.0 - _c4(n)))).mean())
    g = torch.Generator().manual_seed(11)
    sq = torch.tensor([B.w2_error(p.prob.sample(n, p.t_min, generator=g, dtype=torch.float64), mean, var) ** 2
                       for _ in range(reps)], dtype=torch.float64)
    assert abs(float(sq.mean()) - closed_sq) < 5 * float(sq.std()) / math.sqrt(reps)
    floor, sd = B.mc_floor_stats(p.prob, p.t_min, n, mean, var, torch.Generator().manual_seed(12), replicates=reps)
    assert abs(floor**2 - closed_sq) < 5 * float(sq.std()) / math.sqrt(reps)
    assert 0 < sd < floor  # the replicates' spread: the statistic's standard error at zero bias
    shifted = p.prob.sample(20000, p.t_min, generator=g, dtype=torch.float64) + 0.3  # a bias of 0.3 in every mean
    floor_big = math.sqrt(float((var * (1.0 / 20000 + 2.0 * (1.0 - _c4(20000)))).mean()))
    assert abs(B.w2_error(shifted, mean, var) - math.sqrt(0.09 + floor_big**2)) < 5 * floor_big


def test_recommendation_and_summary_are_computed_from_the_rows():
    rows = []
    for prob, errs in (("mixture-a", {"x": (0.1, 0.01), "y": (0.2, 0.001), "k:z": (0.05, 0.02)}),
                       ("mixture-b", {"x": (0.1, 0.01), "y": (0.4, 0.004), "k:z": (0.5, 0.5)})):
        for s, (e10, e20) in errs.items():
            lib = "k" if ":" in s else "flowsolve"
            rows += [{"problem": prob, "solver": s, "library": lib, "family": "ode", "nfe": n, "error": e}
                     for n, e in ((10, e10), (20, e20))]
    recs = {r["budget"]: r["ranking"] for r in B.recommend(rows, budgets=(10, 20))}
    # NFE 10: best per problem 0.05 (peer) and 0.1: x scores sqrt(2 * 1) = 1.41, y sqrt(4 * 4) = 4
    assert [r["solver"] for r in recs[10]] == ["x", "y"]
    assert math.isclose(recs[10][0]["geomean_over_best"], math.sqrt(2.0))
    # NFE 20: best 0.001 and 0.004: y scores 1, x sqrt(10 * 2.5) = 5
    assert recs[20][0]["solver"] == "y" and math.isclose(recs[20][1]["geomean_over_best"], 5.0)
    summary = {r["problem"]: r for r in B.accuracy_summary(rows, ["mixture-a", "mixture-b"])}
    assert summary["mixture-a"]["ours"] == ("x", 0.1) and summary["mixture-a"]["peer"] == ("k:z", 0.05)
    assert math.isclose(summary["mixture-b"]["peer_over_ours"], 5.0)


def test_quick_run_writes_table_png_and_json(tmp_path, monkeypatch, one_thread):
    """``python -m bench steps --quick`` end to end on tiny sizes: the markdown (summary, recommendation, table),
    a PNG and a JSON with the machine, sizes, dtype, seed, package versions and counted NFE per row."""
    import json

    from bench.__main__ import main
    from bench.peers import import_k_diffusion_sampling

    monkeypatch.setenv("FLOWSOLVE_BENCH_CACHE", str(tmp_path / "cache"))
    solvers = "euler,heun,euler_maruyama,rk4" + (",k-diffusion:euler" if import_k_diffusion_sampling() else "")
    out = tmp_path / "out"
    assert main(["steps", "--quick", "--no-progress", "--problems", "gaussian-vp,mixture-rf,loglik-mixture-vp",
                 "--solvers", solvers, "--nfe", "4,10,20", "--out", str(out)]) == 0
    md = (out / "steps.md").read_text()
    for needle in ("## Accuracy at NFE 10", "## Which solver to pick", "| problem | solver | library | metric | err @ NFE 10",
                   "| gaussian-vp | euler | flowsolve | rms_flow_map", "| mixture-rf | rk4 | flowsolve | rms_reference",
                   "| gaussian-vp | euler_maruyama | flowsolve | w2_marginal (MC floor", "| loglik-mixture-vp | rk4 |"):
        assert needle in md, needle
    assert (out / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "steps.json").read_text())
    env = meta["environment"]
    assert env["machine"] and env["cpus"] and env["versions"]["torch"] == torch.__version__
    assert {"numpy", "diffusers", "torchdiffeq", "torchsde", "k-diffusion"} <= set(env["versions"])
    assert meta["dtype"] == "float64" and meta["seed"] == 0 and meta["quick"] is True
    assert meta["problems"]["gaussian-vp"]["ode_samples"] == B.QUICK_ODE_SAMPLES
    assert meta["problems"]["gaussian-vp"]["mc_floor"] > 0
    assert meta["problems"]["mixture-rf"]["reference_error"]
    rows = [r for r in meta["rows"] if r.get("error") is not None]
    euler = sorted(r["nfe"] for r in rows if r["problem"] == "gaussian-vp" and r["solver"] == "euler")
    assert euler == [4, 10, 20]  # counted NFE: one model call per Euler step
    assert {r["family"] for r in rows} == {"ode", "sde", "likelihood"}


def test_reference_cache_returns_the_same_endpoint(tmp_path, monkeypatch, one_thread):
    """A cached mixture reference is the computed one (bitwise), with its error estimate, and a different start
    point misses the cache (the key hashes x_T)."""
    monkeypatch.setenv("FLOWSOLVE_BENCH_CACHE", str(tmp_path))
    p = problems()["mixture-rf"]
    x_T = p.prob.sample(2, p.t_max, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    first = p.reference(x_T, p.t_max, tol=1e-8)
    err, hits = p.ref_error[p.t_max], p.cache_hits
    again = p.reference(x_T, p.t_max, tol=1e-8)
    assert p.cache_hits == hits + 1 and torch.equal(first, again) and p.ref_error[p.t_max] == err <= 1e-8
    p.reference(x_T + 1e-3, p.t_max, tol=1e-8)
    assert p.cache_hits == hits + 1


def _no_sweep(monkeypatch):
    """The checks must come before any work: a sweep or a problem build fails the test."""
    def boom(*a, **k):
        raise AssertionError("the sweep started before the arguments were checked")

    for name in ("sweep_ours", "sweep_peer", "sweep_likelihood", "problems"):
        monkeypatch.setattr(B, name, boom)


@pytest.mark.parametrize("bad", ["file", "under-file"])
def test_steps_cli_checks_out_before_the_sweep(tmp_path, monkeypatch, capsys, bad):
    """--out that cannot be a folder (an existing file, or a path under one; root ignores permission bits, so
    these are the portable cases): exit code 2 and a message naming --out, before any sweep, no traceback."""
    from bench.__main__ import main

    _no_sweep(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker if bad == "file" else blocker / "results"
    with pytest.raises(SystemExit) as e:
        main(["steps", "--quick", "--no-progress", "--problems", "gaussian-vp", "--solvers", "euler", "--out", str(out)])
    assert e.value.code == 2
    assert re.search(r"--out=.*a-file.*(not|cannot)", capsys.readouterr().err)


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_steps_cli_rejects_non_positive_threads(tmp_path, monkeypatch, capsys, threads):
    from bench.__main__ import main

    _no_sweep(monkeypatch)
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        main(["steps", "--quick", "--no-progress", "--threads", threads, "--out", str(tmp_path)])
    assert e.value.code == 2 and f"--threads={threads}" in capsys.readouterr().err
    assert torch.get_num_threads() == before
