"""Predictor-corrector sampling (Song et al. 2021, Sec. 4.2) against independent laws.

For Gaussian data N(mu, std^2) per dimension the marginal at t is N(alpha mu, C), C = alpha^2 std^2 +
sigma^2, and score(x, t) = -(x - alpha mu) / C (FORMULAS.md §3). Written out here without the library's
tables:

    corrector ("sigma" rule)  x <- x + eta score + sqrt(2 eta) z,  eta = 2 (snr sigma_n)^2
                              = AR(1): mean <- a mean + (1 - a) alpha mu, var <- a^2 var + 2 eta, a = 1 - eta/C
    Euler-Maruyama            x <- x + h (f x - g^2 score) + g sqrt(|h|) z
    DDIM                      x <- (sigma_1/sigma_0) x + (alpha_1 - sigma_1 alpha_0/sigma_0) E[x0 | x],
                              E[x0 | x] = mu + alpha_0 std^2 / C (x - alpha_0 mu)

so the whole "sigma"-rule scheme is an exactly Gaussian linear recursion (mean and variance per dimension
in float64). 20000 samples must match within C_SIGMA = 5 standard errors (FORMULAS.md §7: the sample
variance has variance 2 v^2 / (n - 1)). The per-sample "snr" rule makes the chain nonlinear; its
stationary law is derived in ``test_snr_rule_stationary_law``.
"""
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.solvers.base import AdaptiveSolver, Plan, Solver, SolverInfo
from flowsolve.solvers.predictor_corrector import PredictorCorrector
from helpers import Counting

C_SIGMA = 5.0
F64 = torch.float64
MU, STD = torch.tensor([0.7, -1.5], dtype=F64), torch.tensor([0.4, 1.3], dtype=F64)


def _t(v):
    return torch.tensor(float(v), dtype=F64)


def _marginal(path, mu, std, t):
    al, si = path.alpha(_t(t)), path.sigma(_t(t))
    return al * mu, al**2 * std**2 + si**2


def _check(x, mean, var):
    """Per-dimension sample mean and variance within 5 standard errors of a Gaussian law (mean, var)."""
    n = x.shape[0]
    assert bool(((x.mean(0) - mean).abs() <= C_SIGMA * (var / n).sqrt()).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() <= C_SIGMA * var * math.sqrt(2.0 / (n - 1))).all()), (x.var(0), var)


def _corrector_law(mean, var, m, c, eta, steps):
    a = 1.0 - eta / c
    for _ in range(steps):
        mean, var = a * mean + (1.0 - a) * m, a * a * var + 2.0 * eta
    return mean, var


def scheme_law(path, grid, mu, std, mean, var, corrector_steps, snr, predictor):
    """Exact per-dimension (mean, var) of PC with the "sigma" rule: corrector at t_n, then the predictor."""
    g = [float(v) for v in grid]
    for n in range(len(g) - 1):
        m, c = _marginal(path, mu, std, g[n])
        eta = 2.0 * (snr * float(path.sigma(_t(g[n])))) ** 2
        mean, var = _corrector_law(mean, var, m, c, eta, corrector_steps)
        h = g[n + 1] - g[n]
        if predictor == "euler_maruyama":
            f, g2 = float(path.f(_t(g[n]))), float(path.g2(_t(g[n])))
            a = 1.0 + h * (f + g2 / c)
            mean, var = a * mean - h * g2 * m / c, a * a * var + g2 * abs(h)
        elif predictor == "ddim":
            a0, s0 = path.alpha(_t(g[n])), path.sigma(_t(g[n]))
            a1, s1 = path.alpha(_t(g[n + 1])), path.sigma(_t(g[n + 1]))
            k = a1 - s1 * a0 / s0
            gain = a0 * std**2 / c
            mean = (s1 / s0) * mean + k * (mu + gain * (mean - a0 * mu))
            var = (s1 / s0 + k * gain) ** 2 * var
        else:
            raise AssertionError(predictor)
    return mean, var


class Hold(Solver):
    """A predictor that does nothing and evaluates nothing: PC with it is the corrector alone."""

    info = SolverInfo("hold", order=0, nfe_per_step=0, stochastic=False, needs="score")

    def plan(self, model, grid):
        n = grid.numel() - 1
        return Plan(grid, {}, torch.empty(n, 0, dtype=F64), [0] * n)

    def step(self, run, n):
        pass


def _problem(name, mu=MU, std=STD, predicts="eps"):
    path = {"vp": fs.paths.VP, "ve": fs.paths.VE, "rf": fs.paths.RectifiedFlow, "edm": fs.paths.EDM}[name]()
    prob = fs.analytic.Gaussian(mu, std, path)
    return path, prob, fs.Model(getattr(prob, predicts), path, predicts=predicts)


# ---------------------------------------------------------------------------------------------------
# (2) the exact law of the whole scheme, deterministic step rule
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name,predictor,steps,m", [
    ("vp", "euler_maruyama", 6, 2), ("ve", "euler_maruyama", 6, 2), ("vp", "ddim", 5, 3), ("ve", "ddim", 5, 3)])
def test_sigma_rule_matches_exact_law_of_the_whole_scheme(path_name, predictor, steps, m):
    """Corrector (eta_n = 2 (snr sigma_n)^2) then predictor, ODE or SDE, from a fixed x_T: 20000 samples
    against the float64 recursion. snr = 0.4 makes the corrector's share of the law large (eta/C up to
    0.32 per step), so a wrong coefficient, a corrector at the wrong level or noise shared with the
    predictor's stream would show."""
    path, prob, model = _problem(path_name)
    n, snr = 20000, 0.4
    x_T = torch.tensor([0.3, -0.4], dtype=F64) * float(path.sigma(_t(path.t_max)))
    pc = PredictorCorrector(predictor, corrector_steps=m, snr=snr, step_size="sigma")
    x, info = fs.sample(model, x_T.expand(n, 2), solver=pc, steps=steps, seed=3, return_info=True)
    assert info["nfe"] == steps * (1 + m)
    grid = fs.grids.make_grid(None, path, steps)
    mean, var = scheme_law(path, grid, MU, STD, x_T.clone(), torch.zeros(2, dtype=F64), m, snr, predictor)
    _check(x, mean, var)
    # the corrector really moved the law: without it the same predictor ends elsewhere (> 10 bands)
    m0, v0 = scheme_law(path, grid, MU, STD, x_T.clone(), torch.zeros(2, dtype=F64), 0, snr, predictor)
    shift = torch.maximum((m0 - mean).abs() / (var / n).sqrt(), (v0 - var).abs() / (var * math.sqrt(2.0 / (n - 1))))
    assert float(shift.max()) > 10 * C_SIGMA


# ---------------------------------------------------------------------------------------------------
# (1) enough corrector steps: the output is p(t_min) up to the corrector's O(eta) stationary bias
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp", "ve"])
def test_enough_corrector_steps_reach_p_tmin_up_to_the_derived_bias(path_name):
    """Three levels ending where sigma = 1 (VE) or 0.8 (VP), so that the "sigma" rule's step is a fair
    fraction of the target's variance (eta/C = 2 snr^2 sigma^2/C = 0.041 .. 0.049): x_T ~ N(0, sigma(t_0)^2)
    (wrong mean, wrong variance), two coarse Euler-Maruyama steps, M = 60 corrector steps per level, and a
    last level 1e-6 above t_min (so the final predictor step is an exact, nearly identity affine map: the
    corrector is what sets the law).

    Derived bias: at fixed eta the corrector's fixed point is N(alpha mu, C / (1 - eta/(2C)))
    (FORMULAS.md §5b in this form of the step), a relative variance bias eta/(2C) = 2.0-2.4 % here,
    0.42-0.50 of the 5-sigma band. So the samples are compared with p(t_min) with that bias put into the
    expected variance, and the rest (the EM steps' error left after 60 corrector steps, the last step)
    is shown, in float64, to be below a tenth of the band (measured: at most 0.05 of it). Euler-Maruyama
    alone on this grid ends 8 (VP) and 12 (VE) bands off p(t_min)."""
    path, prob, model = _problem(path_name, std=torch.tensor([0.3, 0.5], dtype=F64))
    n, m, snr = 20000, 60, 0.16
    s_end = 1.0 if path_name == "ve" else 0.8
    lam = lambda s: math.log(math.sqrt(1 - s * s) / s) if path_name == "vp" else -math.log(s)  # noqa: E731
    t_min = float(path.t_of_lambda(_t(lam(s_end))))
    t_max = float(path.t_of_lambda(_t(lam(2.0 if path_name == "ve" else 0.95))))
    grid = torch.tensor([t_max, (t_max + t_min) / 2, t_min + 1e-6, t_min], dtype=F64)
    pc = PredictorCorrector("euler_maruyama", corrector_steps=m, snr=snr, step_size="sigma")
    x = fs.sample(model, (n, 2), solver=pc, grid=grid, seed=5, dtype=F64)
    mean_T, var_T = torch.zeros(2, dtype=F64), torch.full((2,), float(path.sigma(_t(t_max))) ** 2, dtype=F64)
    mean, var = scheme_law(path, grid, MU, prob.std, mean_T, var_T, m, snr, "euler_maruyama")
    _check(x, mean, var)  # the implementation has the law of its scheme
    m_min, c_min = _marginal(path, MU, prob.std, t_min)
    eta = 2.0 * (snr * s_end) ** 2
    biased = c_min / (1.0 - eta / (2.0 * c_min))
    band_m, band_v = C_SIGMA * (c_min / n).sqrt(), C_SIGMA * c_min * math.sqrt(2.0 / (n - 1))
    bias = (biased - c_min) / band_v
    assert bool((bias > 0.2).all()) and bool((bias < 1).all()), bias  # there, and below the resolution
    # what is left besides the derived bias is far below the statistical resolution ...
    assert float(((mean - m_min).abs() / band_m).max()) < 0.1
    assert float(((var - biased).abs() / band_v).max()) < 0.1
    # ... while the predictor alone, on the same grid, ends several bands off p(t_min)
    m0, v0 = scheme_law(path, grid, MU, prob.std, mean_T, var_T, 0, snr, "euler_maruyama")
    assert float(torch.maximum((m0 - m_min).abs() / band_m, (v0 - c_min).abs() / band_v).max()) > 5
    _check(x, m_min, biased)  # so the samples match p(t_min) with the corrector's bias accounted for


# ---------------------------------------------------------------------------------------------------
# (3) more corrector steps at a fixed level converge to that level's marginal (the Langevin fixed point)
# ---------------------------------------------------------------------------------------------------
def test_corrector_alone_converges_to_the_level_marginal():
    """The corrector alone (predictor = Hold, evaluating nothing) on six levels 1e-9 apart (one marginal,
    to 1e-8), M = 20 steps each: the trajectory holds the state after 20, 40, ..., 120 corrector steps.
    x_T = 0 is far from the level's mean. snr = 0.5 (eta = 0.5, eta/C = 0.43 and 0.19) so that convergence
    is fast and the O(eta) bias of the fixed point is large enough to see: C / (1 - eta/(2C)) is 27 % and
    10 % above C, 4.3 and 1.9 times the 5-sigma band; it is resolved where it exceeds twice the band."""
    path, prob, model = _problem("ve")
    t_level = float(path.t_of_lambda(_t(0.0)))  # sigma = 1
    levels, m, snr, n = 6, 20, 0.5, 20000
    grid = torch.tensor([t_level - 1e-9 * i for i in range(levels + 1)], dtype=F64)
    pc = PredictorCorrector(Hold(), corrector_steps=m, snr=snr, step_size="sigma")
    x, traj, info = fs.sample(model, torch.zeros(n, 2, dtype=F64), solver=pc, grid=grid, seed=9,
                              return_trajectory=True, return_info=True)
    assert info["nfe"] == levels * m
    target_m, target_c = _marginal(path, MU, STD, t_level)
    eta = 2.0 * snr**2  # sigma = 1
    stationary = target_c / (1.0 - eta / (2.0 * target_c))
    mean, var = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    dist = []
    for k in range(1, levels + 1):
        mean, var = _corrector_law(mean, var, target_m, target_c, eta, m)
        _check(traj[k], mean, var)
        dist.append(float(((mean - target_m).abs() / target_c.sqrt() + (var - stationary).abs() / target_c).max()))
    assert all(b < a for a, b in zip(dist, dist[1:])) and dist[-1] < 1e-6, dist  # geometric convergence
    band = C_SIGMA * stationary * math.sqrt(2.0 / (n - 1))
    resolvable = (stationary - target_c) > 2 * band
    assert bool(resolvable.any())
    assert bool((x.var(0)[resolvable] - target_c[resolvable] > band[resolvable]).all())  # the O(eta) bias is there


def test_snr_rule_stationary_law():
    """The per-sample "snr" rule eta_b = 2 snr^2 D / ||score(x_b)||^2 at a fixed level, isotropic
    Gaussian target N(m, c I) in D = 8, x_T exact samples of the target, 120 corrector steps (Hold predictor).

    Derivation. With delta = x - m, rho = ||delta||^2 / (c D), the step is eta = 2 snr^2 c / rho and
    E[rho' | rho] = rho - 4 snr^2 + (4 snr^4 + 4 snr^2) / rho. At stationarity E rho' = E rho, hence
    exactly E[1/rho] = 1 / (1 + snr^2), any D (for the true marginal E[1/rho] = D/(D - 2) = 4/3). As
    eta -> 0 a state-dependent step makes a time-changed Langevin chain whose fixed point is p / eta
    proportional to p ||score||^2: rho ~ chi^2_{D+2} / D; with the invariant that gives the variance
    c (1 + 2/D)(1 + snr^2) = 1.282 c (model error measured with 2e5 float64 chains: 0.4 %, a twentieth
    of the 5-sigma band here). By symmetry the mean is exact. So the batch-invariant rule is biased by ~2/D.
    8000 samples (the keyed noise is the cost); bounds from the sample's own standard errors."""
    d, n, snr, m = 8, 8000, 0.16, 120
    path = fs.paths.VE()
    mu, std = torch.linspace(-1.0, 1.0, d, dtype=F64), torch.full((d,), 0.6, dtype=F64)
    prob = fs.analytic.Gaussian(mu, std, path)
    model = fs.Model(prob.eps, path, predicts="eps")
    t_level = float(path.t_of_lambda(_t(math.log(2.0))))  # sigma = 0.5
    target_m, target_c = _marginal(path, mu, std, t_level)
    x_T = prob.sample(n, t_level, generator=torch.Generator().manual_seed(4), dtype=F64)
    grid = torch.tensor([t_level, t_level - 1e-9], dtype=F64)
    x = fs.sample(model, x_T, solver=PredictorCorrector(Hold(), corrector_steps=m, snr=snr, step_size="snr"),
                  grid=grid, seed=2)
    inv = float(target_c[0]) * d / (x - target_m).pow(2).sum(1)  # 1/rho (isotropic: c is one number)
    se = float(inv.std()) / math.sqrt(n)
    assert abs(float(inv.mean()) - 1.0 / (1.0 + snr**2)) <= C_SIGMA * se, (float(inv.mean()), se)
    assert float(inv.mean()) < d / (d - 2) - 10 * C_SIGMA * se  # not the marginal's law
    assert bool(((x.mean(0) - target_m).abs() <= C_SIGMA * (x.var(0) / n).sqrt()).all())
    expect = target_c * (1 + 2.0 / d) * (1 + snr**2)
    var = x.var(0)
    assert bool(((var - expect).abs() <= C_SIGMA * expect * math.sqrt(2.0 / (n - 1))).all()), (var, expect)
    assert float((var / target_c).mean()) > 1.2  # pooled over dims: the ~2/D bias is resolved


# ---------------------------------------------------------------------------------------------------
# (4) batch invariance, composition, NFE, parameterizations
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step_size", ["snr", "sigma"])
@pytest.mark.parametrize("predictor", ["euler_maruyama", "heun", "dpm++2m-sde"])
def test_sample_b_is_the_same_in_a_batch_of_1_and_of_17(step_size, predictor):
    mu, std = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.7, 1.2, 0.3])
    path, prob, model = _problem("vp", mu, std)
    pc = PredictorCorrector(predictor, corrector_steps=2, step_size=step_size)
    big = fs.sample(model, (17, 3), solver=pc, steps=5, seed=7)
    for b in (0, 5, 16):
        one = fs.sample(model, (1, 3), solver=pc, steps=5, seed=7, sample_offset=b)
        assert torch.equal(one[0], big[b]), (b, one[0], big[b])
    assert not torch.equal(big, fs.sample(model, (17, 3), solver=pc, steps=5, seed=8))


@pytest.mark.parametrize("predicts", ["score", "x0", "v"])
def test_snr_rule_is_the_same_for_every_parameterization(predicts):
    """eps and score models take the short path (score = b raw, no score buffer), the others write the
    score with a fused conversion call first; both are the same update (float64, to rounding)."""
    mu, std = torch.linspace(-1, 1, 6, dtype=F64), torch.linspace(0.3, 1.0, 6, dtype=F64)
    path, prob, eps_model = _problem("vp", mu, std)
    other = fs.Model(getattr(prob, predicts), path, predicts=predicts)
    pc = PredictorCorrector("ddim", corrector_steps=2, step_size="snr")
    a = fs.sample(eps_model, (64, 6), solver=pc, steps=4, seed=1, dtype=F64)
    b = fs.sample(other, (64, 6), solver=pc, steps=4, seed=1, dtype=F64)
    plan_a, plan_b = fs.Sampler(eps_model, pc, steps=4).plan, fs.Sampler(other, pc, steps=4).plan
    assert plan_a.flags["pc_direct"] and (plan_b.flags["pc_direct"] == (predicts == "score"))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _fixed_step_solvers():
    """Every fixed-step solver that can predict after a corrector moved the state (not UniPC: it carries
    its model evaluation at the predicted point into the next step, which the corrector would make stale)."""
    return [s.name for s in fs.solvers() if not s.adaptive and s.name != "pc"
            and not getattr(fs.get_solver(s.name), "carries_evaluation", False)]


@pytest.mark.parametrize("predictor", ["unipc2-bh2", "unipc3-bh1"])
def test_a_predictor_that_carries_its_evaluation_is_refused(predictor):
    with pytest.raises(ValueError, match="carries its model evaluation"):
        PredictorCorrector(predictor)


@pytest.mark.parametrize("predictor", _fixed_step_solvers())
def test_every_fixed_step_solver_works_as_the_predictor(predictor):
    """The PC plan is the predictor's plan plus the corrector's: same tables and flags, t_eval columns
    appended, NFE = predictor's + M per step, counted by a wrapper that rejects times outside the range."""
    path, prob, model = _problem("vp")
    counting = Counting(model.fn, path.t_min, path.t_max)
    m = fs.Model(counting, path, predicts="eps")
    pc = PredictorCorrector(predictor, corrector_steps=2)
    alone = fs.Sampler(m, predictor, steps=4).plan
    plan = fs.Sampler(m, pc, steps=4).plan
    for name, tab in alone.tables.items():
        assert torch.equal(plan.tables[name], tab)
    assert {k: v for k, v in plan.flags.items() if not k.startswith("pc_")} == alone.flags
    assert plan.t_eval.shape[1] == alone.t_eval.shape[1] + 1
    torch.testing.assert_close(plan.t_eval[:, :-1], alone.t_eval, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(plan.t_eval[:, -1], plan.grid[:-1], rtol=0, atol=0)
    x, info = fs.sample(m, (8, 2), solver=pc, steps=4, seed=0, return_info=True)
    assert bool(torch.isfinite(x).all())
    assert info["nfe"] == counting.calls == alone.nfe + 2 * 4
    assert pc.info.nfe_per_step == fs.get_solver(predictor).info.nfe_per_step + 2 and pc.info.stochastic


def test_corrector_is_skipped_where_the_model_cannot_give_a_score():
    """Rectified flow with an x0 model: at t = 1 (alpha = 0) the x0 model cannot be evaluated, so the
    corrector skips that level at plan time (the model is never called there) and runs at the others."""
    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(MU, STD, path)
    counting = Counting(prob.x0, path.t_lo, 1.0 - 1e-12)  # raises if called at t = 1
    model = fs.Model(counting, path, predicts="x0")
    grid = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=F64)
    for step_size in ("snr", "sigma"):
        counting.calls = 0
        pc = PredictorCorrector(Hold(), corrector_steps=3, step_size=step_size)
        plan = fs.Sampler(model, pc, grid=grid).plan
        assert plan.flags["pc_correct"] == [False, True, True] and plan.evals == [0, 3, 3]
        x, info = fs.sample(model, torch.randn(16, 2, dtype=F64), solver=pc, grid=grid, seed=1, return_info=True)
        assert info["nfe"] == counting.calls == 6 and bool(torch.isfinite(x).all())


def test_registered_default_and_info():
    info = {s.name: s for s in fs.solvers()}["pc"]
    assert fs.get_solver("pc").info == info
    assert (info.nfe_per_step, info.stochastic, info.needs) == (2, True, "score")
    pc = PredictorCorrector()
    assert (pc.corrector_steps, pc.snr, pc.step_size, pc.predictor.info.name) == (1, 0.16, "sigma", "euler_maruyama")
    assert "euler_maruyama" in pc.info.paper and "Song et al. 2021" in pc.info.paper
    assert repr(pc).startswith("PredictorCorrector(predictor=EulerMaruyama()")


# ---------------------------------------------------------------------------------------------------
# (5) bad arguments
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"predictor": "eulr_maruyama"}, ValueError, "unknown solver 'eulr_maruyama'.*Did you mean 'euler_maruyama'"),
    ({"predictor": 3}, TypeError, "solver must be a name"),
    ({"predictor": PredictorCorrector}, TypeError, "instantiate it"),
    ({"predictor": "pc"}, ValueError, "nest"),
    ({"predictor": PredictorCorrector()}, ValueError, "must not itself be a PredictorCorrector"),
    ({"corrector_steps": 0}, ValueError, "corrector_steps=0 must be a positive int"),
    ({"corrector_steps": 2.0}, ValueError, "corrector_steps=2.0"),
    ({"corrector_steps": True}, ValueError, "corrector_steps=True"),
    ({"snr": 0.0}, ValueError, r"snr=0.0 must be a number in \(0, 1\)"),
    ({"snr": 1.0}, ValueError, "snr=1.0"),
    ({"snr": float("nan")}, ValueError, "snr=nan"),
    ({"snr": "0.1"}, ValueError, "snr='0.1'"),
    ({"step_size": "fixed"}, ValueError, "step_size='fixed' must be one of"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PredictorCorrector(**kwargs)


class _Adaptive(AdaptiveSolver):
    info = SolverInfo("adaptive-test", order=2, nfe_per_step=1, stochastic=False, needs="velocity", adaptive=True)


def test_adaptive_predictor_is_rejected():
    with pytest.raises(ValueError, match="is adaptive; a predictor-corrector sampler needs a fixed-step predictor"):
        PredictorCorrector(_Adaptive())


@pytest.mark.parametrize("step_size", ["snr", "sigma"])
@pytest.mark.parametrize("predicts", ["eps", "x0"])
def test_triton_backend_matches_the_torch_twin(step_size, predicts):
    """The Triton kernels (under TRITON_INTERPRET=1 on CPU) and the torch twins give the same samples to
    fp32 rounding: the corrector's keyed noise (stream 3, key n M + k) and its conversion call included."""
    mu, std = [0.5, -1.0, 0.2], [0.7, 1.2, 0.3]
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor(mu, dtype=F64), torch.tensor(std, dtype=F64), path)
    fn = getattr(prob, predicts)
    m32 = fs.Model(lambda x, t: fn(x.double(), t.double()).float(), path, predicts=predicts)
    pc = PredictorCorrector("euler_maruyama", corrector_steps=2, step_size=step_size)
    a = fs.sample(m32, (6, 3), solver=pc, steps=4, seed=9, backend="triton")
    b = fs.sample(m32, (6, 3), solver=pc, steps=4, seed=9, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step_size", ["snr", "sigma"])
@pytest.mark.parametrize("predicts", ["eps", "v"])
def test_corrector_loop_makes_no_host_sync(step_size, predicts):
    """M > 1 (device step keys n M + k), both rules, the short (eps) and the buffered (v) score path:
    no aten._local_scalar_dense inside Sampler.sample (the generic test covers the registered default)."""
    from helpers import CountOps

    path = fs.paths.VP()
    fn = (lambda x, t: x * path.sigma(t).to(x.dtype)[:, None]) if predicts == "eps" else (
        lambda x, t: x * path.alpha(t).to(x.dtype)[:, None])
    pc = PredictorCorrector("dpm++2m", corrector_steps=3, step_size=step_size)
    sampler = fs.Sampler(fs.Model(fn, path, predicts=predicts), pc, steps=4)
    with CountOps() as mode:
        x = sampler.sample((4, 3), seed=1)
    assert mode.counts["aten._local_scalar_dense"] == 0
    assert mode.counts["aten.linalg_vector_norm"] == (12 if step_size == "snr" else 0)
    assert x.shape == (4, 3) and bool(torch.isfinite(x).all())
