"""fs.sdeint against the exact law of its schemes and the exact Ornstein-Uhlenbeck marginal (FORMULAS.md §5).

Every check on numbers compares with a recursion derived here from the schemes' formulas (the exact Gaussian
law of a linear scheme, or the exact moment recursion of a multiplicative one) or with the closed-form /
quadrature marginal of the SDE; statistical checks use c = 5 standard errors of a sample mean (var / n) and of a
sample variance (var sqrt(2 / (n - 1))), FORMULAS.md §7, with fixed seeds.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

import flowsolve as fs
from helpers import CountOps
from flowsolve.sdeint import sdeint

C = 5.0
N_PATHS = 20000
THETA, M, S = 1.5, 0.3, 0.8
X0 = torch.tensor([1.2, -0.7], dtype=torch.float64)  # two independent coordinates, two starting points
OU = fs.analytic.OU(THETA, M, S)


def _assert_law(x, mean, var, n=None):
    """Sample mean and variance of x ([n, ...]) within C standard errors of the exact (mean, var)."""
    n = x.shape[0] if n is None else n
    mean, var = torch.as_tensor(mean, dtype=x.dtype), torch.as_tensor(var, dtype=x.dtype)
    d_mean = (x.mean(0) - mean).abs()
    d_var = (x.var(0) - var).abs()
    assert bool((d_mean <= C * (var / n).sqrt()).all()), (x.mean(0), mean, d_mean / (var / n).sqrt())
    assert bool((d_var <= C * var * math.sqrt(2.0 / (n - 1))).all()), (x.var(0), var)


def _ou_em_recursion(x0, grid, s_of_t=lambda t: S):
    """EM on OU, stepping in the direction of the grid (drift theta (m - x) per unit of |t|): exact law."""
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = abs(t1 - t0)
        a = 1.0 - THETA * h
        mean = M + a * (mean - M)
        var = a * a * var + s_of_t(t0) ** 2 * h
    return mean, var


def _ou_heun_recursion(x0, grid, s_of_t=lambda t: S):
    """The additive-noise Heun scheme on OU, derived from its two stages (z shared):
    x~ - m = (1 - u)(x - m) + g dW,  x' - m = (x - m) + h/2 [theta(m - x) + theta(m - x~)] + g dW
           = (1 - u + u^2/2)(x - m) + (1 - u/2) g dW,   u = theta h,  g = s(t + h/2)."""
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = abs(t1 - t0)
        u = THETA * h
        a = 1.0 - u + 0.5 * u * u
        mean = M + a * (mean - M)
        var = a * a * var + (1.0 - 0.5 * u) ** 2 * s_of_t(0.5 * (t0 + t1)) ** 2 * h
    return mean, var


def _drift(direction):
    # in the grid's own time: a decreasing grid has h < 0, so the OU drift in |t| is -theta (m - x)
    sign = 1.0 if direction == "increasing" else -1.0
    return lambda x, t: sign * THETA * (M - x)


def _grid(direction, kind, n):
    u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    g = u if kind == "uniform" else u * u  # a non-uniform grid: small steps first
    return g if direction == "increasing" else 1.0 - g


G_KINDS = {
    "number": lambda x, t: S,  # noise drawn in the fused kernel
    "tensor0": lambda x, t: torch.tensor(S, dtype=x.dtype),
    "elementwise": lambda x, t: torch.full_like(x, S),  # keyed normal buffer times g
    "per_sample": lambda x, t: torch.full((x.shape[0],), S, dtype=x.dtype),
}


# ------------------------------------------------------------------------------------------------ EM on OU
@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
@pytest.mark.parametrize("grid_kind", ["uniform", "squared"])
def test_em_on_ou_matches_the_exact_law_of_the_scheme(direction, grid_kind):
    n_steps = 20
    grid = _grid(direction, grid_kind, n_steps)
    xs, info = sdeint(_drift(direction), G_KINDS["number"], X0.expand(N_PATHS, 2), grid, seed=3, return_info=True)
    assert xs.shape == (n_steps + 1, N_PATHS, 2) and info["nfe"] == n_steps and info["nfe_g"] == n_steps
    torch.testing.assert_close(xs[0], X0.expand(N_PATHS, 2), rtol=0, atol=0)
    mean, var = _ou_em_recursion(X0, grid.tolist())
    if grid_kind == "uniform":  # the closed form of FORMULAS.md §5 agrees with the recursion (sanity of the truth)
        m_cf, v_cf = OU.euler_maruyama_law(X0, 1.0 / n_steps, n_steps)
        torch.testing.assert_close(mean, m_cf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, v_cf, rtol=1e-12, atol=1e-12)
    _assert_law(xs[-1], mean, var)
    # an intermediate time too: the returned states are the states at every time of t
    mean_h, var_h = _ou_em_recursion(X0, grid.tolist()[: n_steps // 2 + 1])
    _assert_law(xs[n_steps // 2], mean_h, var_h)


@pytest.mark.parametrize("g_kind", ["tensor0", "elementwise", "per_sample"])
def test_every_kind_of_g_gives_the_same_paths(g_kind):
    """In-kernel noise (a number g) and the keyed-buffer path (tensor g) use the same keys: same paths."""
    grid = _grid("increasing", "uniform", 7)
    ref = sdeint(_drift("increasing"), G_KINDS["number"], X0.expand(64, 2), grid, seed=5)
    other = sdeint(_drift("increasing"), G_KINDS[g_kind], X0.expand(64, 2), grid, seed=5)
    torch.testing.assert_close(other, ref, rtol=1e-13, atol=1e-13)


def test_em_weak_order_one_against_the_true_ou_marginal():
    """The scheme's exact law (no Monte Carlo) at T = 1 against the OU transition law: weak order 1."""
    steps = [16, 32, 64, 128, 256]
    errs = []
    for n in steps:
        mean, var = _ou_em_recursion(X0, _grid("increasing", "uniform", n).tolist())
        errs.append(float(torch.cat([(mean - OU.transition_mean(X0, 1.0)).abs(), (var - OU.transition_var(1.0)).abs()]).max()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - 1.0) <= 0.15, (errs, slope)


# ------------------------------------------------------------------------------------------------ Heun
def _s_t(t):
    return S * (1.0 + float(t))  # a time-dependent additive noise: the mid-step g matters for order 2


def _ou_marginal_time_dependent(x0, T):
    """dv/dt = -2 theta v + s(t)^2, v(0) = 0: v(T) = int_0^T exp(-2 theta (T - u)) s(u)^2 du (quadrature)."""
    v, _ = integrate.quad(lambda u: math.exp(-2 * THETA * (T - u)) * _s_t(u) ** 2, 0.0, T, epsabs=1e-14, epsrel=1e-14)
    return OU.transition_mean(x0, T), torch.full_like(x0, v)


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
@pytest.mark.parametrize("g_kind", ["number", "elementwise"])
def test_heun_on_ou_matches_the_exact_law_of_the_scheme(direction, g_kind):
    n_steps = 12
    grid = _grid(direction, "squared", n_steps)
    # time-dependent additive noise s(tau), tau = the elapsed |t| (so both directions see the same SDE)
    tau = (lambda t: t) if direction == "increasing" else (lambda t: 1.0 - t)
    if g_kind == "number":
        g = lambda x, t: _s_t(tau(float(t)))  # noqa: E731  (a number per step; reads t on the host: test only)
    else:
        g = lambda x, t: S * (1.0 + tau(t)) * torch.ones_like(x)  # noqa: E731
    xs, info = sdeint(_drift(direction), g, X0.expand(N_PATHS, 2), grid, solver="heun", seed=8, return_info=True)
    assert info["nfe"] == 2 * n_steps and info["nfe_g"] == n_steps
    mean, var = _ou_heun_recursion(X0, grid.tolist(), s_of_t=lambda t: _s_t(tau(t)))
    _assert_law(xs[-1], mean, var)


@pytest.mark.parametrize("noise", ["constant", "time_dependent"])
def test_heun_weak_order_two_against_the_true_ou_marginal(noise):
    s_of_t = (lambda t: S) if noise == "constant" else _s_t
    if noise == "constant":
        m_true, v_true = OU.transition_mean(X0, 1.0), OU.transition_var(1.0).expand(2)
    else:
        m_true, v_true = _ou_marginal_time_dependent(X0, 1.0)
    steps, errs = [16, 32, 64, 128, 256], []
    for n in steps:
        mean, var = _ou_heun_recursion(X0, _grid("increasing", "uniform", n).tolist(), s_of_t=s_of_t)
        errs.append(float(torch.cat([(mean - m_true).abs(), (var - v_true).abs()]).max()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - 2.0) <= 0.15, (errs, slope)


def test_heun_is_ito_for_multiplicative_noise():
    """Geometric Brownian motion dx = mu x dt + s x dW. The scheme (g at the left state) has, exactly,
    E[x'|x] = x (1 + mu h + (mu h)^2 / 2) and E[x'^2|x] = x^2 [(1 + mu h + (mu h)^2/2)^2 + s^2 h (1 + mu h/2)^2]:
    the Ito mean x0 e^(mu T) to O(h^2), not the Stratonovich one x0 e^((mu + s^2/2) T) (13% larger here)."""
    mu, s, n_steps, x0 = 0.4, 0.5, 20, 1.0
    h = 1.0 / n_steps
    a = 1 + mu * h + 0.5 * (mu * h) ** 2
    m1, m2 = x0 * a**n_steps, x0**2 * (a * a + s * s * h * (1 + 0.5 * mu * h) ** 2) ** n_steps
    var = m2 - m1 * m1
    grid = _grid("increasing", "uniform", n_steps)
    xs = sdeint(lambda x, t: mu * x, lambda x, t: s * x, torch.full((N_PATHS, 1), x0, dtype=torch.float64), grid,
                solver="heun", seed=2)
    _assert_law(xs[-1], torch.tensor([m1]), torch.tensor([var]))
    assert abs(m1 - math.exp(mu)) < 2e-3 and math.exp(mu + s * s / 2) - m1 > 0.1  # Ito, far from Stratonovich
    # and EM: E[x_N] = x0 (1 + mu h)^N exactly, second moment x0^2 ((1 + mu h)^2 + s^2 h)^N
    xs = sdeint(lambda x, t: mu * x, lambda x, t: s * x, torch.full((N_PATHS, 1), x0, dtype=torch.float64), grid, seed=2)
    m1, m2 = (1 + mu * h) ** n_steps, ((1 + mu * h) ** 2 + s * s * h) ** n_steps
    _assert_law(xs[-1], torch.tensor([m1]), torch.tensor([m2 - m1 * m1]))


# ------------------------------------------------------------------------------------------------ noise
def test_scalar_noise_shares_one_brownian_motion_per_sample():
    grid = _grid("increasing", "uniform", 10)
    x0 = torch.full((N_PATHS, 3), 1.2, dtype=torch.float64)
    for g_kind in ("number", "elementwise", "per_sample"):
        xs = sdeint(_drift("increasing"), G_KINDS[g_kind], x0, grid, seed=4, noise="scalar")
        torch.testing.assert_close(xs[-1][:, 1], xs[-1][:, 0], rtol=0, atol=1e-14)  # one noise per sample
        torch.testing.assert_close(xs[-1][:, 2], xs[-1][:, 0], rtol=0, atol=1e-14)
        mean, var = _ou_em_recursion(x0[0], grid.tolist())
        _assert_law(xs[-1], mean, var)
    # diagonal noise: independent coordinates, sample correlation within 5 / sqrt(n) of 0
    xs = sdeint(_drift("increasing"), G_KINDS["number"], x0, grid, seed=4)
    r = np.corrcoef(xs[-1].T.numpy())
    assert np.abs(r[np.triu_indices(3, 1)]).max() <= C / math.sqrt(N_PATHS), r


@pytest.mark.parametrize("noise", ["diagonal", "scalar"])
@pytest.mark.parametrize("solver", ["euler_maruyama", "heun"])
def test_sample_b_is_the_same_in_any_batch(noise, solver):
    grid = _grid("decreasing", "squared", 6)
    x0 = torch.randn(9, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = lambda x, t: -x * t  # noqa: E731
    for g_kind in ("number", "elementwise"):
        full = sdeint(f, G_KINDS[g_kind], x0, grid, seed=7, noise=noise, solver=solver)
        part = sdeint(f, G_KINDS[g_kind], x0[4:7], grid, seed=7, noise=noise, solver=solver, sample_offset=4)
        torch.testing.assert_close(part, full[:, 4:7], rtol=0, atol=0)
        one = sdeint(f, G_KINDS[g_kind], x0[5:6], grid, seed=7, noise=noise, solver=solver, sample_offset=5)
        torch.testing.assert_close(one, full[:, 5:6], rtol=0, atol=0)
    other_seed = sdeint(f, G_KINDS["number"], x0, grid, seed=8, noise=noise, solver=solver)
    assert not torch.allclose(other_seed[-1], full[-1])


@pytest.mark.parametrize("solver", ["euler_maruyama", "heun"])
@pytest.mark.parametrize("g_kind", ["number", "elementwise"])
def test_triton_kernel_matches_the_torch_twin(solver, g_kind):
    """The Triton kernels (under TRITON_INTERPRET=1 on CPU) against the twins: fp32 rounding."""
    pytest.importorskip("triton")
    if not fs.kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    x0 = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    grid = [0.0, 0.1, 0.35, 0.5]
    f = lambda x, t: torch.sin(x) - t  # noqa: E731
    a = sdeint(f, G_KINDS[g_kind], x0, grid, solver=solver, seed=3, backend="triton")
    b = sdeint(f, G_KINDS[g_kind], x0, grid, solver=solver, seed=3, backend="torch")
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------ loop


@pytest.mark.parametrize("solver", ["euler_maruyama", "heun"])
@pytest.mark.parametrize("g_kind", ["number", "tensor0", "elementwise", "per_sample"])
def test_the_loop_makes_no_host_sync(solver, g_kind):
    """From the first drift evaluation on (planning and validation happen before), no device read."""
    seen = {}

    def f(x, t):
        seen.setdefault("at_first_f", mode.counts["aten._local_scalar_dense"])
        return -x * t

    with CountOps() as mode:
        xs = sdeint(f, G_KINDS[g_kind], torch.randn(4, 3), [1.0, 0.7, 0.4, 0.2, 0.0], solver=solver, seed=1)
    assert xs.shape == (5, 4, 3)
    assert mode.counts["aten._local_scalar_dense"] - seen["at_first_f"] == 0
    assert sum(mode.counts.values()) > 0


def test_float32_state_and_counting():
    calls = {"f": 0, "g": 0}

    def f(x, t):
        calls["f"] += 1
        assert t.dim() == 0 and t.dtype == x.dtype  # t: a 0-d tensor, as in fs.odeint
        return -x

    def g(x, t):
        calls["g"] += 1
        return 0.5

    xs, info = sdeint(f, g, torch.zeros(5, 2, dtype=torch.float16), [0.0, 0.5, 1.0], solver="heun", return_info=True)
    assert xs.dtype == torch.float32 and calls == {"f": 4, "g": 2} and info["nfe"] == 4 and info["nfe_g"] == 2
    assert info["grid"].dtype == torch.float64 and info["steps"] == 2


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_the_argument_and_the_fix():
    f, g, x0, t = (lambda x, t: -x), (lambda x, t: 1.0), torch.zeros(4, 2), [0.0, 0.5, 1.0]
    with pytest.raises(TypeError, match="f must be callable"):
        sdeint(1.0, g, x0, t)
    with pytest.raises(TypeError, match="g must be callable"):
        sdeint(f, None, x0, t)
    with pytest.raises(ValueError, match="not one of.*Did you mean 'heun'"):
        sdeint(f, g, x0, t, solver="huen")
    with pytest.raises(ValueError, match="noise='diag' is not one of.*Did you mean 'diagonal'"):
        sdeint(f, g, x0, t, noise="diag")
    with pytest.raises(ValueError, match="strictly monotone.*index 2"):
        sdeint(f, g, x0, [0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="strictly monotone"):
        sdeint(f, g, x0, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="at least 2 times"):
        sdeint(f, g, x0, [0.0])
    with pytest.raises(ValueError, match="finite"):
        sdeint(f, g, x0, [0.0, float("nan"), 1.0])
    with pytest.raises(TypeError, match="t must be a 1-D sequence"):
        sdeint(f, g, x0, "0 to 1")
    with pytest.raises(TypeError, match="floating-point"):
        sdeint(f, g, torch.zeros(4, 2, dtype=torch.int64), t)
    with pytest.raises(ValueError, match="batch-first"):
        sdeint(f, g, torch.tensor(1.0), t)
    with pytest.raises(TypeError, match="x0 must be a batch-first tensor"):
        sdeint(f, g, [[0.0]], t)
    with pytest.raises(ValueError, match=r"f\(x, t\) returned shape \(4,\) at step 0"):
        sdeint(lambda x, t: x[:, 0], g, x0, t)
    with pytest.raises(TypeError, match=r"f\(x, t\) returned float"):
        sdeint(lambda x, t: 1.0, g, x0, t)
    with pytest.raises(ValueError, match=r"g\(x, t\) returned shape \(4, 1\).*\[B\] = \[4\]"):
        sdeint(f, lambda x, t: torch.ones(4, 1), x0, t)
    with pytest.raises(TypeError, match=r"g\(x, t\) returned str"):
        sdeint(f, lambda x, t: "1", x0, t)
    with pytest.raises(ValueError, match="sample_offset=-1"):
        sdeint(f, g, x0, t, sample_offset=-1)
    with pytest.raises(TypeError, match="seed"):
        sdeint(f, g, x0, t, seed=1.5)
    with pytest.raises(ValueError, match="backend='cuda'"):
        sdeint(f, g, x0, t, backend="cuda")


@pytest.mark.parametrize("solver", ["euler_maruyama", "heun"])
def test_drift_and_diffusion_may_return_one_reused_buffer(solver):
    """f and g writing into one preallocated buffer (an io-binding engine) give bitwise the fresh-output result:
    sdeint owns the drift before it calls g or f again."""
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.0, 1.0, 6)
    buf = torch.empty(4, 3)

    def f(x, t):
        return -0.7 * x + torch.sin(t)

    def g(x, t):
        return 0.3 + 0.1 * torch.cos(x)

    fresh = sdeint(f, g, x0, t, solver=solver, seed=3)
    reused = sdeint(lambda x, t: buf.copy_(f(x, t)), lambda x, t: buf.copy_(g(x, t)), x0, t, solver=solver, seed=3)
    assert torch.equal(fresh, reused)
