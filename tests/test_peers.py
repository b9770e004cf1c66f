"""Peer samplers (bench/peers): NFE counted by wrapping the model, agreement with flowsolve's
same-named solvers where the method is the same, and every peer ending at t_min.

Each library's tests skip when it is not installed (CI installs the peers extra). Sizes are small:
64 samples for ODE checks, 4000 for the one distributional check.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import flowsolve as fs
from bench.peers import PeerSolver, import_k_diffusion_sampling, peer_solvers
from bench.problems import Problem, problems

K = import_k_diffusion_sampling()
needs_kd = pytest.mark.skipif(K is None, reason="k-diffusion not installed")
needs = {name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} not installed")
         for name in ("diffusers", "torchdiffeq", "torchsde")}

# Two implementations of one float64 update differ only by rounding (eps = 2.2e-16) in a different order
# of operations, amplified by the times' round trip through sigma = e^-lambda and at most 20 steps: measured
# <= 3.5e-14 relative to max|x|; 1e-12 relative leaves a factor ~30 and still fails any O(h^p) difference.
F64_RTOL = 1e-12
# diffusers keeps its schedule in float32: alphas_cumprod is a float32 cumprod of 1000 factors (relative
# error <= 1000 * 2^-24 = 6e-5 at the last knot) and step() upcasts the state only to float32. The
# coefficients' relative error bounds the state's: 6e-5 relative to max|x| (measured: 4e-6).
F32_SCHEDULE_RTOL = 1000 * 2.0**-24


@pytest.fixture(scope="module")
def probs():
    return problems()


def _draw(problem, n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return problem.prob.sample(n, t, generator=g, dtype=torch.float64)


def _edm_problem(probs) -> Problem:
    """A benchmark problem on the EDM path (alpha = 1, sigma = t), where k-diffusion's sigma-space Heun
    and flowsolve's t-space Heun are the same method."""
    if "mixture-edm" in probs:
        return probs["mixture-edm"]
    edm, vp = fs.paths.EDM(), probs["gaussian-vp"]
    prob = fs.analytic.Gaussian(vp.prob.mu, vp.prob.std, edm)
    return Problem("gaussian-edm", "Gaussian data, EDM path", prob, edm, "x0", edm.t_max, edm.t_min, 16)


def _max_rel_diff(a, b):
    return float((a - b).abs().max()), float(b.abs().max().clamp(min=1.0))


# ----------------------------------------------------------------------------------- interface
def test_peer_solvers_interface(probs):
    vp = probs["gaussian-vp"]
    peers = peer_solvers(vp)
    assert all(isinstance(p, PeerSolver) and p.applies(vp) for p in peers)
    names = [p.name for p in peers]
    assert len(names) == len(set(names))
    for p in peers:
        assert p.name.startswith(p.library + ":")
    rf = probs["gaussian-rf"]
    for p in peer_solvers(rf):
        assert p.library not in ("diffusers", "torchsde")  # VP-only libraries
        assert p.t_start(rf) == (0.99 if p.library == "k-diffusion" else rf.t_max)


def test_bad_input_is_named(probs):
    vp = probs["gaussian-vp"]
    x = _draw(vp, 4, vp.t_max)
    peers = {p.name: p for p in peer_solvers(vp)}
    if "torchdiffeq:rk4" in peers:
        with pytest.raises(ValueError, match="nfe=0"):
            peers["torchdiffeq:rk4"].run(vp, x, nfe=0)
        with pytest.raises(ValueError, match="x_init must be a float64"):
            peers["torchdiffeq:rk4"].run(vp, x.float(), nfe=8)
    if "torchdiffeq:dopri5" in peers:
        with pytest.raises(ValueError, match="pass tol"):
            peers["torchdiffeq:dopri5"].run(vp, x, nfe=8)
    if "k-diffusion:heun" in peers:
        with pytest.raises(ValueError, match="nfe=1 must be an int >= 2"):
            peers["k-diffusion:heun"].run(vp, x, nfe=1)


# ----------------------------------------------------------------------------------- NFE counting
@needs_kd
@pytest.mark.parametrize("name,nfe,expected", [
    ("euler", 7, 7), ("heun", 9, 8), ("dpm_2", 10, 10), ("lms", 5, 5), ("dpmpp_2m", 6, 6),
    ("euler_ancestral", 5, 5), ("dpmpp_2s_ancestral", 7, 6), ("dpmpp_2m_sde", 5, 5),
])
def test_k_diffusion_nfe(probs, name, nfe, expected):
    """One model call per sigma (two for Heun / DPM-2 / 2S: no step lands on sigma = 0, so none is an
    Euler step): the counted NFE is the budget rounded down to the method's multiple."""
    from bench.peers.k_diffusion_peer import run_sampler

    vp = probs["gaussian-vp"]
    x_end, counted = run_sampler(name, vp, _draw(vp, 8, vp.t_max), nfe=nfe)
    assert counted == expected
    assert x_end.shape == (8, vp.dim) and x_end.dtype == torch.float64


@needs["diffusers"]
@pytest.mark.parametrize("name,nfe,expected", [
    ("dpm++2m", 6, 6), ("unipc", 5, 5), ("deis", 4, 4), ("euler", 7, 7), ("heun", 7, 6), ("ddim", 9, 8),
])
def test_diffusers_nfe(probs, name, nfe, expected):
    """One call per timestep; Heun two per interval (its loop stops before the step to sigma = 0); DDIM
    runs step counts dividing 1000 (8 <= 9)."""
    from bench.peers.diffusers_peer import run_scheduler

    vp = probs["gaussian-vp"]
    _, counted = run_scheduler(name, vp, _draw(vp, 8, vp.t_max), nfe=nfe)
    assert counted == expected


@needs["torchdiffeq"]
def test_torchdiffeq_nfe(probs):
    from bench.peers.torchdiffeq_peer import run_odeint

    vp = probs["mixture-vp"]
    x = _draw(vp, 8, vp.t_max)
    assert run_odeint("rk4", vp, x, nfe=10)[1] == 8  # 2 steps x 4 stages
    assert run_odeint("midpoint", vp, x, nfe=7)[1] == 6
    _, n_loose = run_odeint("dopri5", vp, x, tol=1e-2)
    _, n_tight = run_odeint("dopri5", vp, x, tol=1e-6)
    assert 0 < n_loose < n_tight


@needs["torchsde"]
def test_torchsde_nfe(probs):
    """Euler: one score call per step plus the one drift call sdeint makes to check shapes."""
    from bench.peers.torchsde_peer import run_sdeint

    vp = probs["gaussian-vp"]
    _, counted = run_sdeint("euler", vp, _draw(vp, 8, vp.t_max), nfe=10)
    assert counted == 10
    _, counted = run_sdeint("euler", vp, _draw(vp, 8, vp.t_max), steps=6)
    assert counted == 7


# ----------------------------------------------------------------------------------- agreement
@needs_kd
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
def test_k_diffusion_heun_equals_ours_on_edm(probs, steps):
    """On EDM (alpha = 1, sigma = t) k-diffusion's Heun (Karras Alg. 1 in sigma) is flowsolve's heun on
    the same times; the last step lands on sigma_min > 0, so both keep its correction."""
    from bench.peers import k_diffusion_peer as kp

    p = _edm_problem(probs)
    x = _draw(p, 64, p.t_max)
    sigmas = kp.karras_sigmas(K, p, steps, p.t_max)
    theirs, n = kp.run_sampler("heun", p, x, sigmas=sigmas)
    ours = fs.sample(p.model(), x, solver="heun", grid=kp.times_of_sigmas(p, sigmas, p.t_max), dtype=torch.float64)
    diff, scale = _max_rel_diff(theirs, ours)
    assert n == 2 * steps
    assert diff <= F64_RTOL * scale, f"max |k-diffusion - flowsolve| = {diff:.3g} (scale {scale:.3g})"


@needs_kd
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
def test_k_diffusion_dpmpp_2m_equals_ours(probs, steps):
    """DPM-Solver++(2M) is invariant under x -> x / alpha, so k-diffusion's (sigma space) and ours (VP)
    coincide on the same lambda grid; k-diffusion lowers the order only on a step to sigma = 0, hence
    lower_order_final=False on our side."""
    from bench.peers import k_diffusion_peer as kp
    from flowsolve.solvers.dpm_solver_pp import DPMSolverPP2M

    p = probs["gaussian-vp"]
    x = _draw(p, 64, p.t_max)
    sigmas = kp.karras_sigmas(K, p, steps, p.t_max)
    theirs, n = kp.run_sampler("dpmpp_2m", p, x, sigmas=sigmas)
    ours = fs.sample(p.model(), x, solver=DPMSolverPP2M(lower_order_final=False),
                     grid=kp.times_of_sigmas(p, sigmas, p.t_max), dtype=torch.float64)
    diff, scale = _max_rel_diff(theirs, ours)
    assert n == steps
    assert diff <= F64_RTOL * scale, f"max |k-diffusion - flowsolve| = {diff:.3g} (scale {scale:.3g})"


@needs["torchdiffeq"]
@pytest.mark.parametrize("key", ["gaussian-vp", "mixture-rf"])
def test_torchdiffeq_fixed_grid_equals_ours(probs, key):
    """torchdiffeq's 'rk4' is Kutta's 3/8 rule: it equals flowsolve's generic Runge-Kutta run with the
    3/8 tableau, and its 'midpoint' equals our midpoint, on the same grid. Its difference from our
    classical rk4 is a discretization difference: O(h^4), checked to shrink."""
    from bench.peers.torchdiffeq_peer import run_odeint
    from flowsolve.solvers.base import SolverInfo
    from flowsolve.solvers.runge_kutta import RungeKutta
    from flowsolve.tableaus import MIDPOINT, Tableau

    class RK38(RungeKutta):
        info = SolverInfo("rk38", order=4, nfe_per_step=4, stochastic=False, needs="velocity",
                          paper="Kutta 1901, 3/8 rule (Hairer, Norsett & Wanner, Table II.1.2)")
        tableau = Tableau(a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
                          c=(0.0, 1 / 3, 2 / 3, 1.0), order=4, name="rk38")
        fallback = MIDPOINT

    p = probs[key]
    x = _draw(p, 64, p.t_max)
    model = p.model()
    diffs = []
    for steps in (3, 12):
        grid = fs.grids.make_grid(None, p.path, steps)
        for method, ours_solver in (("rk4", RK38()), ("midpoint", "midpoint")):
            theirs, n = run_odeint(method, p, x, grid=grid)
            ours = fs.sample(model, x, solver=ours_solver, grid=grid, dtype=torch.float64)
            diff, scale = _max_rel_diff(theirs, ours)
            assert n == (4 if method == "rk4" else 2) * steps
            assert diff <= F64_RTOL * scale, f"{method}, {steps} steps: max diff {diff:.3g} (scale {scale:.3g})"
        classical = fs.sample(model, x, solver="rk4", grid=grid, dtype=torch.float64)
        diffs.append(float((run_odeint("rk4", p, x, grid=grid)[0] - classical).abs().max()))
    # two fourth-order methods differ by O(h^4): 4x the steps shrinks it by ~256; ask for 16x at least
    assert diffs[1] < diffs[0] / 16, diffs


@needs["diffusers"]
@pytest.mark.parametrize("steps", [1, 2, 5, 14, 20])
def test_diffusers_dpm_equals_ours(probs, steps):
    """DPMSolverMultistepScheduler (2M, dpmsolver++, final sigma_min) is our dpm++2m on the same times
    t = (timestep + 1) / 1000 followed by t_min; both lower the last step's order below 15 steps."""
    from bench.peers import diffusers_peer as dp

    p = probs["gaussian-vp"]
    x = _draw(p, 64, p.t_max)
    theirs, n = dp.run_scheduler("dpm++2m", p, x, steps=steps)
    sched = dp.make_scheduler("dpm++2m", p)
    sched.set_timesteps(steps)
    times = torch.cat([dp.timestep_times(sched.timesteps), torch.tensor([p.t_min], dtype=torch.float64)])
    assert float(times[0]) == p.t_max
    ours = fs.sample(p.model(), x, solver="dpm++2m", grid=times, dtype=torch.float64)
    diff, scale = _max_rel_diff(theirs, ours)
    assert n == steps
    assert diff <= F32_SCHEDULE_RTOL * scale, f"max |diffusers - flowsolve| = {diff:.3g} (scale {scale:.3g})"


@needs["torchsde"]
def test_torchsde_euler_matches_euler_maruyama_law(probs):
    """torchsde's Euler on the reverse SDE and our euler_maruyama on the same grid both have the exact
    Gaussian law of the discretization (FORMULAS.md §3): per dimension, mean m and variance v by the
    recursion m' = (1 + a h) m + b h, v' = (1 + a h)^2 v + g^2 |h|, with score = a x + b the closed
    form -(x - alpha mu) / C(t). Tolerances: 5 sigma of the sample mean (sqrt(v / n)) and of the sample
    variance (sqrt(2 v^2 / (n - 1))), about 6e-7 false alarms per check."""
    from bench.peers import torchsde_peer as sp

    p = probs["gaussian-vp"]
    n, steps = 4000, 12
    x = _draw(p, n, p.t_max, seed=1)
    theirs, _ = sp.run_sdeint("euler", p, x, steps=steps, seed=3)
    grid = sp.step_times(p, steps)
    ours = fs.sample(p.model(), x, solver="euler_maruyama", grid=grid, dtype=torch.float64, seed=4)
    path, mu, var0 = p.path, p.prob.mu, p.prob.std**2
    m, v = path.alpha(grid[0]) * mu, path.alpha(grid[0]) ** 2 * var0 + path.sigma(grid[0]) ** 2
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        al, c = path.alpha(t0), path.alpha(t0) ** 2 * var0 + path.sigma(t0) ** 2
        a, b = -1.0 / c, al * mu / c
        f, g2 = path.f(t0), path.g2(t0)
        m, v = (1 + h * (f - g2 * a)) * m - h * g2 * b, (1 + h * (f - g2 * a)) ** 2 * v + g2 * h.abs()
    for name, y in (("torchsde", theirs), ("flowsolve", ours)):
        assert ((y.mean(0) - m).abs() <= 5 * (v / n).sqrt()).all(), name
        assert ((y.var(0) - v).abs() <= 5 * (2 * v * v / (n - 1)).sqrt()).all(), name
    # the test can tell the discretization's law from the continuous marginal p_{t_min}: the variance bias
    # of 12 steps, in units of the sample variance's standard deviation, has a sum of squares over the 16
    # dimensions far beyond chi^2_16's 1 - 1e-6 quantile (~ 55): the check above is about the discretization
    z = (v - p.prob.var(p.t_min)) / (2 * v * v / (n - 1)).sqrt()
    assert float(z.pow(2).sum()) > 100, float(z.pow(2).sum())


# ----------------------------------------------------------------------------------- ends at t_min
def _errors(peer, p, x, ref, budgets):
    return [float((peer.run(p, x, nfe=nfe)[0] - ref).pow(2).mean().sqrt()) for nfe in budgets]


@pytest.mark.parametrize("key", ["gaussian-vp", "gaussian-rf"])
def test_peers_end_at_t_min(probs, key):
    """For Gaussian data (exact flow map) each deterministic fixed-step peer's error against the exact
    endpoint at t_min shrinks as NFE grows, at least like first order (4x the NFE, 20 -> 80: error / 2 at least, and below 0.05 at 80);
    a peer that stopped anywhere but t_min would plateau at the flow's displacement there instead.
    Adaptive peers: error below 10 x tol at tol = 1e-5."""
    p = probs[key]
    peers = [q for q in peer_solvers(p) if not q.stochastic]
    if not peers:
        pytest.skip("no peer library installed")
    for peer in peers:
        t0 = peer.t_start(p)
        x = _draw(p, 32, t0)
        ref = p.reference(x, t0)
        if peer.adaptive:
            err = float((peer.run(p, x, tol=1e-5)[0] - ref).pow(2).mean().sqrt())
            assert err < 1e-4, (peer.name, err)
            continue
        e20, e80 = _errors(peer, p, x, ref, [20, 80])
        assert e80 < e20 / 2 and e80 < 0.05, (peer.name, e20, e80)
