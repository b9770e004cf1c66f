"""Euler-Maruyama against the exact Gaussian law of the discretization itself (FORMULAS.md §3, §5),
keyed-noise invariances of the sampler, and the Triton path end to end."""
import math

import pytest
import torch

import flowsolve as fs
from flowsolve import kernels as K
from helpers import gaussian_problem

C = 5.0  # 5-sigma bounds: about 6e-7 false-alarm probability per check (FORMULAS.md §7)


def _assert_gaussian_law(x, mean, var):
    """Per-dimension sample mean / variance within C standard errors of the exact law."""
    n = x.shape[0]
    m_hat, v_hat = x.mean(0), x.var(0)
    assert bool(((m_hat - mean).abs() <= C * (var / n).sqrt()).all()), (m_hat, mean)
    assert bool(((v_hat - var).abs() <= C * var * math.sqrt(2.0 / (n - 1))).all()), (v_hat, var)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_euler_maruyama_on_ou_matches_exact_law_of_the_scheme(backend):
    """dx = theta (m - x) dt + s dw from a fixed x0, n EM steps of size h: the output is exactly
    N(m + a^n (x0 - m), s^2 h (1 - a^(2n)) / (1 - a^2)), a = 1 - theta h (FORMULAS.md §5)."""
    theta, m, s, h, n_steps, x0 = 1.5, 0.5, 0.8, 0.1, 12, 2.0
    n = 20000 if backend == "torch" else 2000  # the interpreter is slow; the bound scales with n
    x = torch.full((n, 2), x0, dtype=torch.float64)
    ou = fs.analytic.OU(theta, m, s)
    for k in range(n_steps):
        x = K.euler_maruyama_step(x, ou.drift(x, k * h), h, s, seed=42, step=k, backend=backend)
    a = 1 - theta * h
    mean = torch.full((2,), m + a**n_steps * (x0 - m), dtype=torch.float64)
    var = torch.full((2,), s * s * h * (1 - a ** (2 * n_steps)) / (1 - a * a), dtype=torch.float64)
    _assert_gaussian_law(x, mean, var)
    # and the library's own closed form for the scheme agrees with this one
    lm, lv = ou.euler_maruyama_law(x0, h, n_steps)
    assert abs(float(lm) - float(mean[0])) < 1e-12 and abs(float(lv) - float(var[0])) < 1e-12


@pytest.mark.parametrize("key", ["vp-eps", "ve-eps", "edm-x0"])
@pytest.mark.parametrize("steps", [3, 10, 25])
def test_reverse_sde_matches_exact_law_of_euler_maruyama(key, steps):
    """Gaussian data: the reverse SDE is linear, x_{n+1} = A_n x_n + B_n + g_n sqrt(|h_n|) z_n with
    A_n = 1 + h f + h g^2 / C_n, B_n = -h g^2 alpha_n mu / C_n. Run that recursion on the mean and
    the variance in float64 (FORMULAS.md §3) and compare with 20000 samples of fs.sample."""
    mu, std = torch.tensor([0.7, -1.5], dtype=torch.float64), torch.tensor([0.5, 1.3], dtype=torch.float64)
    path, prob, model = gaussian_problem(key, mu, std)
    n = 20000
    x_T = torch.tensor([0.3, -0.4], dtype=torch.float64) * float(path.sigma(torch.tensor(path.t_max)))
    x = fs.sample(model, x_T.expand(n, 2), solver="euler_maruyama", steps=steps, seed=7)
    grid = fs.grids.make_grid(None, path, steps)
    mean, var = x_T.clone(), torch.zeros(2, dtype=torch.float64)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        f, g2, al = path.f(t0), path.g2(t0), path.alpha(t0)
        c = al**2 * std**2 + path.sigma(t0) ** 2
        a_n = 1 + h * f + h * g2 / c
        b_n = -h * g2 * al * mu / c
        mean = a_n * mean + b_n
        var = a_n**2 * var + g2 * h.abs()
    _assert_gaussian_law(x, mean, var)


def test_reverse_sde_weak_error_is_first_order():
    """Variance error against the exact marginal p_{t_min} halves as the steps double (weak order 1),
    computed from the exact law of the scheme (no Monte-Carlo noise)."""
    mu, std = torch.tensor([0.7]), torch.tensor([0.5])
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(mu.double(), std.double(), path)
    errs = []
    for steps in (64, 128, 256, 512):
        grid = fs.grids.make_grid("uniform", path, steps)
        var = prob.var(path.t_max).double().clone()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = t1 - t0
            c = path.alpha(t0) ** 2 * std.double() ** 2 + path.sigma(t0) ** 2
            a_n = 1 + h * path.f(t0) + h * path.g2(t0) / c
            var = a_n**2 * var + path.g2(t0) * h.abs()
        errs.append(float((var - prob.var(path.t_min)).abs().max()))
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(abs(s - 1) < 0.15 for s in slopes), slopes


STOCHASTIC_FIXED = [s.name for s in fs.solvers() if s.stochastic and not s.adaptive]


@pytest.mark.parametrize("solver", STOCHASTIC_FIXED)
def test_sample_is_batch_invariant_bitwise(solver):
    """Every fixed-step stochastic solver: sample b of a batch of 64 is bitwise the sample drawn alone with
    sample_offset=b (per-sample keyed noise); the same seed repeats, another seed differs."""
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0, 0.2], [0.7, 1.2, 0.3])
    big = fs.sample(model, (64, 3), solver=solver, steps=5, seed=123)
    for b in (0, 5, 63):
        one = fs.sample(model, (1, 3), solver=solver, steps=5, seed=123, sample_offset=b)
        assert torch.equal(one[0], big[b])
    again = fs.sample(model, (64, 3), solver=solver, steps=5, seed=123)
    assert torch.equal(again, big)
    other = fs.sample(model, (64, 3), solver=solver, steps=5, seed=124)
    assert not torch.equal(other, big)


def test_torch_generator_is_accepted_as_seed():
    path, prob, model = gaussian_problem("vp-eps", [0.5], [0.7])
    a = fs.sample(model, (8, 1), solver="euler_maruyama", steps=3, seed=torch.Generator().manual_seed(3))
    b = fs.sample(model, (8, 1), solver="euler_maruyama", steps=3, seed=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("solver", ["euler_maruyama", "heun", "ddim", "euler", "restart", "sa-solver", "er-sde-3"])
def test_triton_backend_end_to_end_matches_twin(solver):
    path, prob, model = gaussian_problem("vp-eps", [0.5, -1.0, 0.2], [0.7, 1.2, 0.3])
    m32 = fs.Model(lambda x, t: prob.eps(x.double(), t.double()).float(), path, predicts="eps")
    a = fs.sample(m32, (6, 3), solver=solver, steps=4, seed=9, backend="triton")
    b = fs.sample(m32, (6, 3), solver=solver, steps=4, seed=9, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
