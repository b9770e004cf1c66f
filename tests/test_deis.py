"""DEIS-rhoAB, DEIS-tAB and iPNDM (Zhang & Chen 2023) against independent truth.

In rho = sigma/alpha and y = x/alpha the PF-ODE is dy/drho = eps (FORMULAS.md §2). The truths used:
- the Adams-Bashforth constants of the uniform-step method and scipy quadrature of the Lagrange basis;
- a synthetic model whose eps output is a known polynomial p(rho(t)), independent of x, offered in every
  parameterization (x0, v, velocity, score built here from x and eps by FORMULAS.md §2): then each step
  must satisfy y_{i+1} - y_i = P(rho_{i+1}) - P(rho_i), P the antiderivative (numpy), exactly whenever
  deg p < the step's order; for DEIS-tAB, eps = p(t) and the increment int p(t) rho'(t) dt by parts and scipy;
- point-mass data: along the exact path y - mu = K rho, so eps = (y - mu)/rho = K is constant in rho and
  every method of the family (any order, warm-up included, iPNDM too) follows the exact flow map;
- DDIM (= DEIS order 1, an algebraic identity), the exact Gaussian flow map (FORMULAS.md §3) for orders,
  and an RK4 reference on mixture data.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

import flowsolve as fs
from flowsolve.solvers.deis import DEIS, DEIS2, DEISTAB, IPNDM, lagrange_integrals, t_lagrange_integrals
from helpers import PATH_MODELS, Counting, fitted_order, gaussian_problem

F64 = torch.float64


def _f64(v):
    return torch.as_tensor(v, dtype=F64)


# ----------------------------------------------------------------------------- the quadrature weights
@given(nodes=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=4, unique=True), a=st.floats(-3.0, 3.0),
       width=st.floats(0.05, 2.0))
def test_lagrange_integrals_match_scipy_quadrature(nodes, a, width):
    """int_a^b L_j against scipy.quad of the product formula, for nodes at least 0.1 apart."""
    nodes = sorted(nodes)
    if any(q - p < 0.1 for p, q in zip(nodes, nodes[1:])):
        nodes = [nodes[0] + 0.3 * j for j in range(len(nodes))]
    b = a - width  # sampling runs towards smaller rho

    def basis(j, r):
        return math.prod((r - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j)

    got = lagrange_integrals(nodes, a, b)
    for j in range(len(nodes)):
        want = -integrate.quad(lambda r: basis(j, r), b, a, epsabs=1e-13, epsrel=1e-12)[0]
        assert got[j] == pytest.approx(want, rel=1e-9, abs=1e-10)
    assert math.fsum(got) == pytest.approx(b - a, rel=1e-12)  # the basis sums to 1


def test_equal_steps_give_the_adams_bashforth_constants():
    """On equal steps the variable-step weights are the textbook AB weights (what iPNDM uses)."""
    want = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for k, w in want.items():
        # nodes rho_i = 5, rho_{i-1} = 5.7, ...: step from 5 down to 4.3 (h = -0.7)
        got = lagrange_integrals([5.0 + 0.7 * j for j in range(k)], 5.0, 4.3)
        np.testing.assert_allclose(got, [-0.7 * c for c in w], rtol=1e-13)


def test_ipndm_equals_deis_on_a_grid_uniform_in_rho():
    """A grid with equal rho-steps: the fixed and the variable-step weights coincide (tables to 1e-9: the grid's
    times come back from t(rho), so its rho-steps are equal only to rounding)."""
    path = fs.paths.VP()
    rho = torch.linspace(40.0, 0.05, 13, dtype=F64)
    grid = path.t_of_lambda(-torch.log(rho))
    model = fs.Model(lambda x, t: x, path, predicts="eps")
    for k in (2, 3):
        a, b = DEIS(order=k).plan(model, grid), IPNDM(order=k).plan(model, grid)
        assert a.flags["orders"] == b.flags["orders"]
        for name in a.tables:
            torch.testing.assert_close(a.tables[name], b.tables[name], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- exactness on polynomial eps
PATHS = {"vp": (fs.paths.VP, 1.0), "ve": (fs.paths.VE, 1.0), "edm": (fs.paths.EDM, 80.0),
         "subvp": (fs.paths.SubVP, 1.0), "rf": (fs.paths.RectifiedFlow, 0.995)}


def _polynomial_eps_model(path, coeffs, scale, predicts):
    """eps(x, t) = sum_d coeffs[d] (rho(t)/scale)^d per dimension, returned as a ``predicts`` output."""
    c = torch.as_tensor(coeffs, dtype=F64)  # [deg+1, D]

    def fn(x, t):
        al, si = path.alpha(t)[:, None], path.sigma(t)[:, None]
        r = (si / al) / scale
        eps = sum(c[d] * r**d for d in range(c.shape[0])).expand_as(x)
        x0 = (x - si * eps) / al
        if predicts == "eps":
            return eps
        if predicts == "score":
            return -eps / si
        if predicts == "x0":
            return x0
        if predicts == "v":
            return al * eps - si * x0
        return path.d_alpha(t)[:, None] * x0 + path.d_sigma(t)[:, None] * eps  # velocity

    return fn


@given(key=st.sampled_from(sorted(PATHS)), predicts=st.sampled_from(["eps", "x0", "velocity", "v", "score"]),
       order=st.sampled_from([1, 2, 3, "3s"]), deg=st.integers(0, 2), steps=st.integers(1, 9),
       spacing=st.lists(st.floats(0.3, 1.0), min_size=9, max_size=9), to_zero=st.booleans(),
       seed=st.integers(0, 2**16))
def test_each_step_is_exact_when_eps_is_a_polynomial_in_rho(key, predicts, order, deg, steps, spacing, to_zero, seed):
    """Every step i of DEIS-k satisfies y_{i+1} = y_i + int p drho to 1e-10 when deg p < min(k, i + 1) (its
    warm-up order): the Lagrange weights, the conversion folded into the tables and the history lags all at
    once. "3s" is order 3 with warmup="singlestep": its first step is the midpoint rule in rho (exact for
    deg <= 1, one more evaluation, inside the step). The grid is irregular; with ``to_zero`` it ends at
    sigma = 0 (rho = 0), never evaluated there."""
    path_cls, t_max = PATHS[key]
    path = path_cls()
    t_min = 0.0 if to_zero else path.t_min  # sigma(0) = 0 except on VE
    frac = torch.tensor([0.0] + list(np.cumsum(spacing[:steps])), dtype=F64)
    grid = t_max + (frac / frac[-1]) * (t_min - t_max)
    grid[-1] = t_min
    single = order == "3s"
    order = 3 if single else order
    solver = DEIS(order=3, warmup="singlestep") if single else DEIS(order=order)
    step_orders = [2 if (single and i == 0 and steps >= 2) else min(order, i + 1) for i in range(steps)]
    deg = min(deg, step_orders[-1] - 1)  # the last step at least is checked
    g = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(deg + 1, 3, generator=g, dtype=F64)
    rho = (path.sigma(grid) / path.alpha(grid)).tolist()
    scale = max(rho)
    counting = Counting(_polynomial_eps_model(path, coeffs, scale, predicts), t_lo=float(grid[-2]), t_hi=t_max)
    model = fs.Model(counting, path, predicts=predicts)
    x_T = torch.randn(4, 3, generator=g, dtype=F64) * float(path.sigma(_f64(t_max)))
    x, traj, info = fs.sample(model, x_T, solver=solver, grid=grid, return_trajectory=True, return_info=True)
    # one evaluation per step (two on a singlestep first step), none at t_min (sigma = 0 there if to_zero)
    assert info["nfe"] == counting.calls == steps + (single and steps >= 2)
    antideriv = [np.polynomial.Polynomial(coeffs[:, d].numpy()).integ() for d in range(3)]
    alpha = path.alpha(grid)
    checked = 0
    for i in range(steps):
        if deg >= step_orders[i]:
            continue
        r0, r1 = rho[i] / scale, rho[i + 1] / scale
        incr = torch.tensor([scale * (P(r1) - P(r0)) for P in antideriv], dtype=F64)
        want = alpha[i + 1] * (traj[i] / alpha[i] + incr)
        tol = 1e-10 * (1.0 + float(want.abs().max()) + float(traj[i].abs().max()) * float(alpha[i + 1] / alpha[i]))
        assert float((traj[i + 1] - want).abs().max()) <= tol, (i, traj[i + 1], want)
        checked += 1
    assert checked == sum(deg < k for k in step_orders) >= 1


def test_warm_up_orders_are_as_planned():
    """Step i of DEIS-3 takes order min(3, i + 1): exact for p of degree min(3, i + 1) - 1, not for one degree
    more (all nodes lie on one side of the step, so the quadrature error of the next degree is nonzero)."""
    path = fs.paths.VP()
    grid = _f64([0.9, 0.7, 0.45, 0.3, 0.12, 0.05])
    rho = (path.sigma(grid) / path.alpha(grid)).tolist()
    scale = rho[0]
    alpha = path.alpha(grid)
    assert DEIS().plan(fs.Model(lambda x, t: x, path), grid).flags["orders"] == [1, 2, 3, 3, 3]
    x_T = torch.ones(1, 1, dtype=F64)
    for deg in range(4):
        coeffs = torch.zeros(deg + 1, 1, dtype=F64)
        coeffs[deg] = 1.0  # p = (rho/scale)^deg
        model = fs.Model(_polynomial_eps_model(path, coeffs, scale, "eps"), path, predicts="eps")
        _, traj = fs.sample(model, x_T, solver=DEIS(), grid=grid, return_trajectory=True)
        for i in range(grid.numel() - 1):
            incr = scale * ((rho[i + 1] / scale) ** (deg + 1) - (rho[i] / scale) ** (deg + 1)) / (deg + 1)
            want = float(alpha[i + 1] * (traj[i] / alpha[i] + incr))
            err = abs(float(traj[i + 1]) - want)
            if deg < min(3, i + 1):
                assert err <= 1e-12 * max(1.0, abs(want)), (deg, i, err)
            else:
                assert err >= 1e-6 * abs(float(alpha[i + 1]) * incr), (deg, i, err)


@settings(max_examples=8)
@given(key=st.sampled_from(sorted(PATHS)), order=st.sampled_from([1, 2, 3, "3m"]), deg=st.integers(0, 2),
       steps=st.integers(1, 8), spacing=st.lists(st.floats(0.3, 1.0), min_size=8, max_size=8),
       seed=st.integers(0, 2**16))
def test_tab_steps_are_exact_when_eps_is_a_polynomial_in_t(key, order, deg, steps, spacing, seed):
    """DEIS-tAB: with eps = p(t) (deg p < the step's order in t) each step adds int p(t) rho'(t) dt, computed
    here by parts, p(t1) rho1 - p(t0) rho0 - int p'(t) rho(t) dt, with scipy.quad in t (no t(rho) needed).
    Order 3 starts by default with the midpoint rule in rho (exact in t for constants only); "3m" is
    the multistep start. Grids end at t_min with sigma > 0 here (rho(t) smooth at both ends)."""
    path_cls, t_max = PATHS[key]
    path = path_cls()
    frac = torch.tensor([0.0] + list(np.cumsum(spacing[:steps])), dtype=F64)
    t_min = max(path.t_min, 1e-3)
    grid = t_max + (frac / frac[-1]) * (t_min - t_max)
    grid[-1] = t_min
    solver = DEISTAB(order=3, warmup="multistep") if order == "3m" else DEISTAB(order=order)
    order = solver.order
    single = solver.warmup == "singlestep" and steps >= 2
    step_orders = [1 if (single and i == 0) else min(order, i + 1) for i in range(steps)]
    deg = min(deg, step_orders[-1] - 1)  # the last step at least is checked
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(deg + 1, 2, generator=g, dtype=F64).numpy()

    def fn(x, t):  # an eps model: p(t / t_max) per dimension
        u = (t / t_max)[:, None]
        return sum(torch.as_tensor(c[d]) * u**d for d in range(deg + 1)).expand_as(x).clone()

    model = fs.Model(fn, path, predicts="eps")
    x_T = torch.randn(3, 2, generator=g, dtype=F64)
    _, traj = fs.sample(model, x_T, solver=solver, grid=grid, return_trajectory=True)
    rho = lambda t: float(path.sigma(_f64(t)) / path.alpha(_f64(t)))  # noqa: E731
    alpha = path.alpha(grid)
    checked = 0
    for i in range(steps):
        if deg >= step_orders[i]:
            continue
        t0, t1 = float(grid[i]), float(grid[i + 1])
        incr = []
        for d in range(2):
            P = np.polynomial.Polynomial(c[:, d])
            dP = P.deriv()
            by_parts = integrate.quad(lambda t: float(dP(t / t_max)) / t_max * rho(t), t1, t0, epsabs=1e-13,
                                      epsrel=1e-12, limit=200)[0]
            incr.append(float(P(t1 / t_max)) * rho(t1) - float(P(t0 / t_max)) * rho(t0) + by_parts)
        want = alpha[i + 1] * (traj[i] / alpha[i] + torch.tensor(incr, dtype=F64))
        tol = 1e-10 * (1.0 + float(want.abs().max()) + float(traj[i].abs().max()) * float(alpha[i + 1] / alpha[i]))
        assert float((traj[i + 1] - want).abs().max()) <= tol, (i, traj[i + 1], want)
        checked += 1
    assert checked >= 1


def test_tab_is_rhoab_where_t_is_rho():
    """On EDM, t = sigma = rho: the t-polynomial is the rho-polynomial, and the composite Gauss-Legendre
    weights equal the closed-form ones (to 1e-12)."""
    path = fs.paths.EDM()
    model = fs.Model(lambda x, t: x, path, predicts="eps")
    for steps in (3, 10):
        grid = fs.grids.make_grid("edm", path, steps)
        a, b = DEIS(order=3).plan(model, grid), DEISTAB(order=3, warmup="multistep").plan(model, grid)
        for name in a.tables:
            torch.testing.assert_close(a.tables[name], b.tables[name], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t_lagrange_integrals(path, [5.0, 5.7, 6.4], 5.0, 0.0),
                               lagrange_integrals([5.0, 5.7, 6.4], 5.0, 0.0), rtol=1e-12)


# ----------------------------------------------------------------------------- exact cases
@given(mu=st.lists(st.floats(-3, 3), min_size=1, max_size=3), steps=st.integers(1, 12),
       key=st.sampled_from(["vp-eps", "rf-velocity", "edm-x0", "ve-eps", "vp_cosine-eps", "subvp-score"]),
       to_zero=st.booleans())
def test_point_mass_data_is_exact_for_every_order(mu, steps, key, to_zero):
    """Data = one point mu: on the exact path y - mu = K rho, so eps = K is constant in rho and every
    update (weights summing to the step) is exact, warm-up included; iPNDM's weights also sum to 1."""
    path, prob, model = gaussian_problem(key, mu, [0.0] * len(mu))
    t_max = 0.99 if key == "rf-velocity" else path.t_max
    t_min = 0.0 if (to_zero and key in ("vp-eps", "rf-velocity", "edm-x0")) else path.t_min
    grid = "edm" if key in ("vp-eps", "edm-x0") and t_min == 0.0 else None
    x_T = prob.sample(16, t_max, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = prob.flow(x_T, t_max, t_min)
    for solver in (DEIS(), DEIS2(), DEIS(warmup="singlestep"), IPNDM(), IPNDM(order=3), DEISTAB()):
        x = fs.sample(model, x_T, solver=solver, steps=steps, grid=grid, t_max=t_max, t_min=t_min)
        assert float((x - exact).abs().max()) <= 1e-10 * max(1.0, float(exact.abs().max())), solver


@pytest.mark.parametrize("key", ["vp-eps", "edm-x0", "rf-velocity"])
def test_order_one_is_ddim(key):
    """DEIS-1 (and iPNDM-1) is DDIM: (alpha_1/alpha_0) x + (sigma_1 - alpha_1 rho_0) eps = (sigma_1/sigma_0) x +
    (alpha_1 - sigma_1 alpha_0/sigma_0) x0. Checked on nonlinear mixture data, 7 steps of the default grid."""
    path_cls, predicts = PATH_MODELS[key]
    path = path_cls()
    prob = fs.analytic.GaussianMixture(_f64([[-1.0, 0.5], [1.5, -0.5]]), _f64([[0.3, 0.6], [0.5, 0.2]]),
                                       _f64([0.4, 0.6]), path)
    model = fs.Model(getattr(prob, predicts), path, predicts=predicts)
    t_max = 0.99 if key == "rf-velocity" else None
    x_T = prob.sample(32, t_max or path.t_max, generator=torch.Generator().manual_seed(2), dtype=F64)
    want = fs.sample(model, x_T, solver="ddim", steps=7, t_max=t_max)
    for solver in (DEIS(order=1), IPNDM(order=1)):
        got = fs.sample(model, x_T, solver=solver, steps=7, t_max=t_max)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- orders
ORDER_NFES = [128, 256, 512, 1024]
# (solver, expected global order): iPNDM's fixed weights on grids not uniform in rho are second order
# (the registered deis, deis2, ipndm also run in tests/test_ode_solvers.py on the logsnr grid)
VARIANTS = [(DEIS(order=2), 2), (DEIS(order=3), 3), (IPNDM(order=3), 2), (DEISTAB(), 3)]


@pytest.mark.parametrize("key,t_max,t_min,grid", [("vp-eps", None, None, None), ("edm-x0", None, None, None),
                                                   ("rf-velocity", 0.99, 1e-3, "logsnr")])
def test_measured_orders_on_gaussian_data(key, t_max, t_min, grid):
    """Slope of the endpoint error against the exact flow map over 128..1024 steps (NFE = steps, + 1 for
    DEISTAB's singlestep start), anisotropic data in D = 4:
    within 0.15 of the expected order. VP and EDM on their default grids (logsnr, edm); rectified flow cut to
    [1e-3, 0.99] on the logsnr grid (its default uniform grid is pre-asymptotic in rho below NFE ~
    1/(1 - t_max): deis.py's docstring)."""
    path, prob, model = gaussian_problem(key, [1.0, -2.0, 0.5, 2.5], [0.15, 0.3, 0.6, 1.2])
    t_max = path.t_max if t_max is None else t_max
    t_min = path.t_min if t_min is None else t_min
    x_T = prob.sample(64, t_max, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = prob.flow(x_T, t_max, t_min)
    for solver, order in VARIANTS:
        errors = [float((fs.sample(model, x_T, solver=solver, steps=n, grid=grid, t_max=t_max, t_min=t_min) - exact)
                        .pow(2).mean().sqrt()) for n in ORDER_NFES]
        slope = fitted_order(ORDER_NFES, errors)
        assert abs(slope - order) <= 0.15, (solver, errors, slope)


def test_order_two_and_three_on_gaussian_mixture():
    """Nonlinear 2-D mixture on VP: deis2 and deis3 at their orders, against RK4 with 1024 logsnr steps whose
    own error (against 512 steps, so ~16x its true error) is kept 10x below every error measured."""
    path = fs.paths.VP()
    prob = fs.analytic.GaussianMixture(_f64([[-1.0, 0.5], [1.2, -0.7], [0.2, 1.3]]),
                                       _f64([[0.3, 0.6], [0.5, 0.25], [0.4, 0.4]]), _f64([0.3, 0.5, 0.2]), path)
    model = fs.Model(prob.eps, path, predicts="eps")
    x_T = prob.sample(32, path.t_max, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = fs.sample(model, x_T, solver="rk4", steps=1024, grid="logsnr")
    ref_err = float((ref - fs.sample(model, x_T, solver="rk4", steps=512, grid="logsnr")).pow(2).mean().sqrt())
    for solver, order in ((DEIS(order=2), 2), (DEIS(order=3), 3)):
        errors = [float((fs.sample(model, x_T, solver=solver, steps=n) - ref).pow(2).mean().sqrt()) for n in ORDER_NFES]
        assert min(errors) > 10 * ref_err, (solver, errors, ref_err)
        assert abs(fitted_order(ORDER_NFES, errors) - order) <= 0.15, (solver, errors)


# ----------------------------------------------------------------------------- NFE, history, final step
@pytest.mark.parametrize("solver", [DEIS(), DEIS2(), IPNDM(), DEISTAB()])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_nfe_and_sigma_zero_is_never_evaluated(solver, steps):
    """One evaluation per step, warm-up included (plus one on a singlestep first step: DEISTAB's default), none
    at t = 0 where sigma = 0 for this eps model, none outside the grid; the state stays finite, converges to
    the exact flow map at t = 0 (256 steps 4x closer than ``steps``), and the last step stores no history."""
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0], [0.7, 1.2])
    counting = Counting(model.fn, 1e-300, path.t_max)
    m = fs.Model(counting, path, predicts="eps")
    x_T = prob.sample(64, path.t_max, generator=torch.Generator().manual_seed(0), dtype=F64)
    x, info = fs.sample(m, x_T, solver=solver, steps=steps, grid="edm", t_min=0.0, return_info=True)
    single = solver.warmup == "singlestep" and steps >= 2
    assert info["nfe"] == counting.calls == info["planned_nfe"] == steps + single
    assert bool(torch.isfinite(x).all())
    exact = prob.flow(x_T, path.t_max, 0.0)
    fine = fs.sample(model, x_T, solver=solver, steps=256, grid="edm", t_min=0.0)
    assert float((fine - exact).pow(2).mean().sqrt()) < float((x - exact).pow(2).mean().sqrt()) / 4
    flags = fs.Sampler(m, solver, steps=steps, grid="edm", t_min=0.0).plan.flags
    assert flags["orders"] == [min(solver.order, i + 1) for i in range(steps)]
    assert flags["push"] == [i < steps - 1 and solver.order > 1 for i in range(steps)]


@pytest.mark.parametrize("key,t_max", [("vp-eps", None), ("ve-eps", None), ("rf-velocity", 0.999)])
def test_fp32_state_stays_within_rounding_of_fp64(key, t_max):
    """fp32 state and coefficients (fp32 accumulation): each step's fused combination rounds its result with
    unit roundoff u = 2^-24 relative to |x| (coefficients of moderate size, no cancellation), and these
    errors at most add up over the steps: max |x32 - x64| <= 2 u steps max |x64|. A coefficient table with
    cancelling huge entries (1/alpha near alpha = 0) would miss this by orders of magnitude."""
    path, prob, model = gaussian_problem(key, [0.5, -1.0], [0.7, 1.2])
    t_max = path.t_max if t_max is None else t_max
    x_T = prob.sample(256, t_max, generator=torch.Generator().manual_seed(0), dtype=F64)
    steps, u = 20, 2.0**-24
    for solver in (DEIS(), IPNDM()):
        x64 = fs.sample(model, x_T, solver=solver, steps=steps, t_max=t_max)
        x32 = fs.sample(model, x_T.float(), solver=solver, steps=steps, t_max=t_max)
        assert x32.dtype == torch.float32
        assert float((x32.double() - x64).abs().max()) <= 2 * u * steps * float(x64.abs().max()), solver


@pytest.mark.parametrize("solver", [DEISTAB(), DEIS(warmup="singlestep"), IPNDM(order=3)])
def test_unregistered_variants_make_no_host_sync(solver):
    """tests/test_no_host_sync.py covers the registered names; the same check for the options it cannot see."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountLocalScalar(TorchDispatchMode):
        calls, ops = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            self.calls += str(func.overloadpacket) == "aten._local_scalar_dense"
            return func(*args, **(kwargs or {}))

    path = fs.paths.VP()
    sampler = fs.Sampler(fs.Model(lambda x, t: x * path.sigma(t).to(x.dtype)[:, None], path), solver, steps=6)
    with CountLocalScalar() as mode:
        sampler.sample((4, 3), seed=1)
    assert mode.calls == 0 and mode.ops > 0


# ----------------------------------------------------------------------------- errors
def test_alpha_zero_start_raises_a_clear_error():
    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(_f64([0.5]), _f64([0.7]), path)
    for predicts in ("velocity", "eps"):
        model = fs.Model(getattr(prob, predicts), path, predicts=predicts)
        with pytest.raises(ValueError, match=r"rho = sigma/alpha.*t=1.*t_max"):
            fs.Sampler(model, "deis", steps=4)
        fs.Sampler(model, "deis", steps=4, t_max=0.999)  # fine below it
    with pytest.raises(ValueError, match="cannot be turned into the eps"):  # the library's conversion error
        fs.Sampler(fs.Model(prob.x0, path, predicts="x0"), "ipndm", steps=4)


def test_singlestep_warm_up_adds_one_evaluation_inside_the_first_step():
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0], [0.7, 1.2])
    for steps in (1, 2, 5):
        counting = Counting(model.fn, 1e-300, path.t_max)
        m = fs.Model(counting, path, predicts="eps")
        sampler = fs.Sampler(m, DEIS(warmup="singlestep"), steps=steps, grid="edm", t_min=0.0)
        plan = sampler.plan
        assert plan.flags["singlestep_first"] == (steps >= 2) and plan.nfe == steps + (steps >= 2)
        if steps >= 2:
            assert float(plan.grid[1]) < float(plan.t_eval[0, 1]) < float(plan.grid[0])
        _, info = sampler.sample((8, 2), seed=0, dtype=F64, return_info=True)
        assert info["nfe"] == counting.calls == plan.nfe
    with pytest.raises(ValueError, match="warmup='singlestep' applies to order >= 3"):
        DEIS(order=2, warmup="singlestep")
    with pytest.raises(ValueError, match="warmup='rk'"):
        DEIS(warmup="rk")


@pytest.mark.parametrize("cls,order", [(DEIS, 0), (DEIS, 4), (IPNDM, 5), (DEIS, 2.0), (DEIS, True), (IPNDM, "4")])
def test_bad_order_names_the_argument(cls, order):
    with pytest.raises(ValueError, match=r"order=.*must be an int in 1\.\."):
        cls(order=order)


def test_registry_and_info():
    infos = {s.name: s for s in fs.solvers()}
    for name, order in (("deis", 3), ("deis2", 2), ("ipndm", 2)):
        s = infos[name]
        assert (s.order, s.nfe_per_step, s.needs, s.multistep, s.stochastic) == (order, 1, "eps", True, False)
    assert (DEIS(order=1).info.name, DEIS(order=1).info.order) == ("deis1", 1)
    assert (IPNDM(order=3).info.name, IPNDM(order=3).info.order) == ("ipndm3", 2)
    assert DEIS2().order == 2 and DEIS().order == 3 and IPNDM().order == 4
