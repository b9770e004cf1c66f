"""UniPC (Zhao et al. 2023; flowsolve/solvers/unipc.py) against independent truth:

* one-step quadrature: the solved UniP/UniC coefficients reproduce the exact exponential-integrator
  step alpha int_0^h e^{-u} m(lambda_{i+1} - u) du (scipy) for x0 predictions m polynomial in lambda
  up to the degree they are built for, and no further; the rho = 1/2 shortcuts (UniP-2, UniC-1) are
  locally third order and equal the closed forms DPM-Solver++(2M) (bh2) and B(h) = h (bh1);
* whole runs against a float64 recursion of the paper's algorithm written here (its own phi
  functions by quadrature, its own linear solves, the analytic x0 instead of the model conversion);
* orders against the exact Gaussian flow map: UniPC-2 third order and UniP-2 second (the corrector
  raises the order), bh1 and bh2; UniPC-3 third order from t_max inside the path (its first warm-up
  step caps it) and its fourth-order tail from pure noise;
* NFE = steps, evaluations exactly at t_0..t_{N-1} (never at the last time, e.g. sigma = 0), errors.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

import flowsolve as fs
from flowsolve.solvers.unipc import UniPC, unipc_coefficients
from helpers import CountOps, Counting, fitted_order, gaussian_problem

VARIANTS = ("bh1", "bh2")
# non-uniform steps in lambda (VP): every step has a different h and different ratios r_k
GRID = torch.tensor([0.95, 0.8, 0.62, 0.5, 0.33, 0.2, 0.1], dtype=torch.float64)
POLY = (0.3, -0.7, 0.2, 0.05, -0.03)  # m(lambda) = sum_d POLY[d] lambda^d, truncated at the degree


def _poly(degree):
    return lambda l: sum(c * l**d for d, c in enumerate(POLY[: degree + 1]))  # noqa: E731


def _exact_step(path, grid, i, m):
    """alpha_{i+1} int_0^h e^{-u} m(lambda_{i+1} - u) du: the x0-part of the exact step (scipy)."""
    lam1 = float(path.lam(grid[i + 1]))
    h = lam1 - float(path.lam(grid[i]))
    integral, _ = integrate.quad(lambda u: math.exp(-u) * m(lam1 - u), 0.0, h, epsabs=1e-15, epsrel=1e-13)
    return float(path.alpha(grid[i + 1])) * integral


def _apply(path, grid, i, kind, pred, corr, k, m):
    """The x0-part of the solver's step i: pred/corr rows applied to m at the history lambdas."""
    lam = [float(v) for v in path.lam(grid)]
    hist = sum(float((pred if kind == "pred" else corr[:, 1:])[i, j]) * m(lam[i - j]) for j in range(k))
    return hist + (float(corr[i, 0]) * m(lam[i + 1]) if kind == "corr" else 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind,p,degree", [("pred", 3, 2), ("corr", 2, 2), ("corr", 3, 3)])
def test_solved_coefficients_are_exact_for_polynomial_x0(variant, kind, p, degree):
    """UniP-p with p - 1 solved coefficients is exact for m of degree <= p - 1, UniC-p (p solved) for
    degree <= p; one degree more is not exact (the test can fail). Where the system is solved B(h)
    cancels: bh1 and bh2 give the same coefficients."""
    path = fs.paths.VP()
    ratio, pred, corr, orders, use_c = unipc_coefficients(path, GRID, p, variant, lower_order_final=False)
    i = GRID.numel() - 3  # a full-order step that still has its corrector
    assert orders[i] == p and use_c[i]
    for d in range(degree + 2):
        m = _poly(d)
        got, want = _apply(path, GRID, i, kind, pred, corr, p, m), _exact_step(path, GRID, i, m)
        if d <= degree:
            assert got == pytest.approx(want, rel=1e-10, abs=1e-13), (d, got, want)
        else:
            assert abs(got - want) > 1e-6 * abs(want), (d, got, want)
    assert float(ratio[i]) == pytest.approx(float(path.sigma(GRID[i + 1]) / path.sigma(GRID[i])), rel=1e-14)
    _, pred2, corr2, _, _ = unipc_coefficients(path, GRID, p, "bh2" if variant == "bh1" else "bh1",
                                               lower_order_final=False)
    rows = (pred, pred2) if kind == "pred" else (corr, corr2)
    torch.testing.assert_close(rows[0][i], rows[1][i], rtol=1e-12, atol=1e-15)


def _uniform_lambda_grid(path, lam0, h, n):
    return path.t_of_lambda(lam0 + h * torch.arange(n + 1, dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["pred", "corr"])
def test_half_shortcuts_are_locally_third_order(variant, kind):
    """UniP-2 (rho^p = 1/2) and UniC-1 (rho^c = 1/2) are not exact for a linear m, but their one-step
    error for a smooth m is O(h^3): the local order that makes UniP-2 second and UniC-1 a
    second-order step. The next term is O(h) relative, so over h = 0.04..0.01 the fitted exponent is
    3 + O(0.04) (measured: 2.99-3.03)."""
    path = fs.paths.VP()
    m = lambda l: math.sin(l) + 0.3 * l * l  # noqa: E731
    p, i = (2, 1) if kind == "pred" else (1, 0)  # UniP-2 at the 2nd step; UniC-1 at the first
    hs, errors = [0.04, 0.02, 0.01], []
    for h in hs:
        grid = _uniform_lambda_grid(path, -1.0, h, 3)
        _, pred, corr, orders, use_c = unipc_coefficients(path, grid, p, variant, lower_order_final=False)
        assert orders[i] == p and use_c[i]
        errors.append(abs(_apply(path, grid, i, kind, pred, corr, p, m) - _exact_step(path, grid, i, m)))
    slope = float(np.polyfit(np.log(hs), np.log(errors), 1)[0])
    assert abs(slope - 3.0) < 0.1, (errors, slope)


def test_unip2_closed_forms():
    """UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2):
    alpha (1 - e^{-h}) ((1 + 1/(2 r0)) m_0 - m_1/(2 r0)), r0 = h_{i-1}/h_i; with B(h) = h the
    difference term is alpha h/(2 r0) (m_0 - m_1)."""
    path = fs.paths.VP()
    lam = [float(v) for v in path.lam(GRID)]
    a = [float(v) for v in path.alpha(GRID)]
    s = [float(v) for v in path.sigma(GRID)]
    for variant in VARIANTS:
        _, pred, _, orders, _ = unipc_coefficients(path, GRID, 2, variant, lower_order_final=False)
        for i in range(1, GRID.numel() - 1):
            assert orders[i] == 2
            h, r0 = lam[i + 1] - lam[i], (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            c1 = a[i + 1] * -math.expm1(-h)
            w = c1 / (2 * r0) if variant == "bh2" else a[i + 1] * h / (2 * r0)
            assert float(pred[i, 0]) == pytest.approx(c1 + w, rel=1e-13)
            assert float(pred[i, 1]) == pytest.approx(-w, rel=1e-13)
        assert float(pred[0, 0]) == pytest.approx(a[1] - s[1] / s[0] * a[0], rel=1e-13)  # DDIM first step


# ---------------------------------------------------------------- whole runs vs a recursion written here
def _g(z, j):
    """j! z phi_{j+1}(z) = z int_0^1 e^{(1 - s) z} s^j ds (quadrature: independent of the solver's series)."""
    return z * integrate.quad(lambda s: math.exp((1.0 - s) * z) * s**j, 0.0, 1.0, epsabs=0.0, epsrel=1e-12)[0]


def _reference_unipc(x0_fn, path, grid, x, p, variant, corrector):
    """UniPC-p in x0 form, step by step as the paper's algorithm reads, in float64: predictor from the
    history, model at the predicted point, corrector with it, that evaluation kept for the next step.
    Orders: warm-up min(p, i + 1); fewer than 15 steps lower the last two (lower_order_final); a step
    with infinite h (to sigma = 0 or from alpha = 0) is first order without corrector; no difference
    uses a point with lambda = -inf."""
    n = grid.numel() - 1
    lam = [float(v) for v in path.lam(grid)]
    al = [float(v) for v in path.alpha(grid)]
    si = [float(v) for v in path.sigma(grid)]
    t = lambda i: torch.full((x.shape[0],), float(grid[i]), dtype=torch.float64)  # noqa: E731
    ms = [x0_fn(x, t(0))]
    for i in range(n):
        h = lam[i + 1] - lam[i]
        k = min(p, i + 1, n - i) if n < 15 else min(p, i + 1)
        if not math.isfinite(h):
            k = 1
        while k > 1 and not all(math.isfinite(lam[i - j]) for j in range(k)):
            k -= 1
        ratio = si[i + 1] / si[i]
        x_hat = ratio * x + (al[i + 1] - ratio * al[i]) * ms[-1]
        if k == 1:
            x_pred = x_hat
        else:
            z = -h
            big_b = z if variant == "bh1" else math.expm1(z)
            r = [(lam[i - j] - lam[i]) / h for j in range(1, k)]
            d = [(ms[-1 - j] - ms[-1]) / r[j - 1] for j in range(1, k)]
            if k == 2:
                rho = [0.5]
            else:
                rho = np.linalg.solve(np.vander(r, increasing=True).T, [_g(z, j) / big_b for j in range(1, k)])
            x_pred = x_hat - al[i + 1] * big_b * sum(rj * dj for rj, dj in zip(rho, d))
        if i == n - 1:
            return x_pred
        m_t = x0_fn(x_pred, t(i + 1))
        if corrector and math.isfinite(h):
            z = -h
            big_b = z if variant == "bh1" else math.expm1(z)
            r = [(lam[i - j] - lam[i]) / h for j in range(1, k)] + [1.0]
            d = [(ms[-1 - j] - ms[-1]) / r[j - 1] for j in range(1, k)] + [m_t - ms[-1]]
            if k == 1:
                rho = [0.5]
            else:
                rho = np.linalg.solve(np.vander(r, increasing=True).T, [_g(z, j) / big_b for j in range(1, k + 1)])
            x = x_hat - al[i + 1] * big_b * sum(rj * dj for rj, dj in zip(rho, d))
        else:
            x = x_pred
        ms.append(m_t)
    return x


# (path, what the model predicts, grid, t_max, t_min): VP with an eps model on the logsnr grid; rectified
# flow with a velocity model from alpha = 0 to sigma = 0 (infinite h at both ends); EDM x0 model to sigma = 0
RUN_CASES = {
    "vp-eps": (fs.paths.VP, "eps", "logsnr", None, None),
    "rf-velocity": (fs.paths.RectifiedFlow, "velocity", "uniform", 1.0, 0.0),
    "edm-x0": (fs.paths.EDM, "x0", "edm", None, 0.0),
}


@pytest.mark.parametrize("steps", [1, 2, 4, 16])
@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_matches_reference_recursion(case, steps):
    """Every configuration (p = 2, 3; bh1, bh2; with and without corrector) on Gaussian-mixture data
    agrees with the recursion above to float64 rounding."""
    path_cls, predicts, grid_name, t_max, t_min = RUN_CASES[case]
    path = path_cls()
    g = torch.Generator().manual_seed(5)
    prob = fs.analytic.GaussianMixture(3 * torch.rand(3, 2, generator=g, dtype=torch.float64) - 1.5,
                                       0.2 + 0.6 * torch.rand(3, 2, generator=g, dtype=torch.float64),
                                       0.2 + torch.rand(3, generator=g, dtype=torch.float64), path)
    model = fs.Model(getattr(prob, predicts), path, predicts=predicts)
    grid = fs.grids.make_grid(grid_name, path, steps, t_max=t_max, t_min=t_min)
    x_T = prob.sample(16, float(grid[0]), generator=g, dtype=torch.float64)
    scale = float(x_T.abs().max())
    for p in (2, 3):
        for variant in VARIANTS:
            for corrector in (True, False):
                want = _reference_unipc(prob.x0, path, grid, x_T.clone(), p, variant, corrector)
                got = fs.sample(model, x_T, solver=UniPC(p, variant, corrector), grid=grid)
                assert bool(torch.isfinite(got).all())
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * scale,
                                           msg=lambda s: f"p={p} {variant} corrector={corrector}: {s}")


# ---------------------------------------------------------------- orders (exact Gaussian flow map)
ORDER_NFES = [128, 256, 512, 1024]


def _flow_error(key, mu, std, solver, nfe, t_max=None, t_min=None):
    path, prob, model = gaussian_problem(key, mu, std)
    if key == "rf-velocity":  # lambda is infinite at both ends of rectified flow
        t_max, t_min = t_max or 0.999, t_min or 1e-3
    t_max, t_min = t_max or path.t_max, t_min or path.t_min
    x_T = prob.sample(64, t_max, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = prob.flow(x_T, t_max, t_min)
    x = fs.sample(model, x_T, solver=solver, steps=nfe, grid="logsnr", t_max=t_max, t_min=t_min)
    return float((x - exact).pow(2).mean().sqrt())


@settings(max_examples=2)
@given(s0=st.floats(0.05, 0.25), mu=st.lists(st.floats(-3, 3), min_size=4, max_size=4),
       key=st.sampled_from(["vp-eps", "rf-velocity"]))
def test_corrector_raises_the_order(s0, mu, key):
    """UniP-2 alone is second order, UniPC-2 (UniP-2 + UniC-2, same NFE) third, for bh1 and bh2:
    slopes over NFE 128..1024 within +-0.15 (measured 1.998-2.021 and 2.955-3.021). Anisotropic data as
    in test_ode_solvers.gaussian_params (stds spread over a decade)."""
    std = [s0, 2 * s0, 4 * s0, 8 * s0]
    for variant in VARIANTS:
        for corrector, want in ((False, 2), (True, 3)):
            solver = UniPC(2, variant, corrector)
            assert solver.info.order == want
            errors = [_flow_error(key, mu, std, solver, nfe) for nfe in ORDER_NFES]
            assert abs(fitted_order(ORDER_NFES, errors) - want) <= 0.15, (variant, corrector, errors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unipc3_is_third_order_and_fourth_from_pure_noise(variant):
    """UniPC-3's first step (UniP-1 + UniC-1) has local error O(h^3): started inside the path (VP,
    t_max = 0.3) the global order is 3 (slope within +-0.15; measured 2.91 bh1, ratios 7.2, 7.5, 7.8
    rising to 8, and 3.04 bh2, ratios 8.4, 8.2, 8.1 falling to 8).
    Started from pure noise (t_max = 1, lambda = -5) that step's error is damped by ~e^{2 lambda} and
    the fourth-order tail shows (measured 3.93-3.94; the test asks > 3.75): why the generic order test
    on the paths' full range sees UniPC-3 above its order."""
    mu, std = [0.5, -1.0, 2.0, 0.3], [0.1, 0.2, 0.4, 0.8]
    solver = UniPC(3, variant)
    assert solver.info.order == 3
    inside = [_flow_error("vp-eps", mu, std, solver, nfe, t_max=0.3) for nfe in ORDER_NFES]
    assert abs(fitted_order(ORDER_NFES, inside) - 3.0) <= 0.15, inside
    full = [_flow_error("vp-eps", mu, std, solver, nfe) for nfe in ORDER_NFES]
    assert fitted_order(ORDER_NFES, full) > 3.75, full


# ---------------------------------------------------------------- NFE, evaluation times, sigma = 0, errors
class _Times(Counting):
    def __call__(self, x, t):
        self.times = getattr(self, "times", []) + [float(t[0])]
        assert bool((t == t[0]).all())
        return super().__call__(x, t)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("p,corrector", [(2, True), (3, True), (3, False)])
def test_nfe_is_steps_and_evaluations_are_at_the_grid(p, corrector, steps):
    """One evaluation per step, at t_0, t_1, ..., t_{N-1} in order, never at t_N: on VP with an eps model
    and t_min = 0 the model is never asked for sigma = 0 (Counting raises below t = 1e-300)."""
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0], [0.7, 1.2])
    counting = _Times(model.fn, 1e-300, path.t_max)
    m = fs.Model(counting, path, predicts="eps")
    grid = fs.grids.make_grid("edm", path, steps, t_min=0.0)
    x_T = prob.sample(8, 1.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, info = fs.sample(m, x_T, solver=UniPC(p, "bh2", corrector), grid=grid, return_info=True)
    assert bool(torch.isfinite(x).all())
    assert info["nfe"] == counting.calls == info["planned_nfe"] == steps
    assert counting.times == [float(v) for v in grid[:-1]]


@pytest.mark.parametrize("key", ["vp-eps", "rf-velocity"])
def test_one_step_to_sigma_zero_is_the_x0_prediction(key):
    """A single step to sigma = 0 is first order: x(0) = alpha(0) x0(x_T, t_max) = the x0 prediction."""
    path, prob, model = gaussian_problem(key, [0.5, -1.0], [0.7, 1.2])
    x_T = prob.sample(8, path.t_max, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("unipc2-bh1", "unipc3-bh2"):
        x = fs.sample(model, x_T, solver=name, steps=1, grid="uniform" if key == "rf-velocity" else "edm", t_min=0.0)
        want = float(path.alpha(torch.tensor(0.0, dtype=torch.float64))) * prob.x0(
            x_T, torch.full((8,), path.t_max, dtype=torch.float64))
        torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)


def test_x0_model_cannot_start_at_alpha_zero():
    """An x0 model on rectified flow says nothing at t = 1 (alpha = 0): planning names the time."""
    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(torch.tensor([0.5]), torch.tensor([0.7]), path)
    with pytest.raises(ValueError, match="t=1"):
        fs.Sampler(fs.Model(prob.x0, path, predicts="x0"), "unipc2-bh2", steps=4)
    fs.Sampler(fs.Model(prob.x0, path, predicts="x0"), "unipc2-bh2", steps=4, t_max=0.99)  # inside: fine


@pytest.mark.parametrize("kwargs,match", [
    ({"order": 4}, "order=4"), ({"order": True}, "order=True"), ({"order": 2.0}, "order=2.0"),
    ({"variant": "bh3"}, "variant='bh3'"), ({"corrector": "yes"}, "corrector='yes'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UniPC(**kwargs)


def test_registered_instances():
    infos = {s.name: s for s in fs.solvers()}
    for p in (2, 3):
        for variant in VARIANTS:
            info = infos[f"unipc{p}-{variant}"]
            assert (info.order, info.nfe_per_step, info.stochastic, info.needs, info.multistep) == (3, 1, False, "x0", True)
            solver = fs.get_solver(info.name)
            assert (solver.order, solver.variant, solver.corrector) == (p, variant, True)
    assert UniPC(3, "bh1", corrector=False).info.name == "unip3-bh1"
    assert UniPC(3, "bh1", corrector=False).info.order == 2  # its first step is DDIM (local O(h^2))




@pytest.mark.parametrize("solver", [UniPC(3, "bh1", corrector=False), UniPC(2, "bh2", lower_order_final=False)])
def test_unregistered_configurations_make_no_host_sync(solver):
    """The generic no-host-sync test covers the registered names; these are the other code paths."""
    path = fs.paths.VP()
    sampler = fs.Sampler(fs.Model(lambda x, t: x * path.sigma(t).to(x.dtype)[:, None], path, predicts="eps"),
                         solver, steps=6)
    with CountOps() as mode:
        sampler.sample((4, 3), seed=1)
    assert mode.counts["aten._local_scalar_dense"] == 0 and sum(mode.counts.values()) > 0
