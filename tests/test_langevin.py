"""Langevin dynamics against the exact law of the scheme (FORMULAS.md §5b)."""
import math

import pytest
import torch

import flowsolve as fs

C = 5.0


def _check(x, mean, var):
    n = x.shape[0]
    assert bool(((x.mean(0) - mean).abs() <= C * (var / n).sqrt()).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() <= C * var * math.sqrt(2.0 / (n - 1))).all()), (x.var(0), var)


@pytest.mark.parametrize("eta,n_steps", [(0.05, 10), (0.05, 400), (0.3, 200)])
def test_ula_on_gaussian_target_matches_exact_law_including_its_bias(eta, n_steps):
    """Target N(m, s^2): a = 1 - eta/(2 s^2), mean m + a^n (x0 - m), var eta (1 - a^(2n)) / (1 - a^2),
    which tends to s^2 / (1 - eta/(4 s^2)): at eta = 0.3, s = 0.8 the bias is +13 %, resolved here."""
    m = torch.tensor([1.0, -0.5], dtype=torch.float64)
    s = torch.tensor([0.8, 1.5], dtype=torch.float64)
    x0 = torch.tensor([3.0, 2.0], dtype=torch.float64)
    n = 20000
    x = fs.langevin(lambda v: -(v - m) / s**2, x0.expand(n, 2), eta, n_steps, seed=5)
    a = 1 - eta / (2 * s**2)
    mean = m + a**n_steps * (x0 - m)
    var = eta * (1 - a ** (2 * n_steps)) / (1 - a**2)
    _check(x, mean, var)
    if float((a ** (2 * n_steps)).max()) < 1e-9:  # stationary: the O(eta) bias of §5b is really there
        stationary = s**2 / (1 - eta / (4 * s**2))
        torch.testing.assert_close(var, stationary, rtol=1e-6, atol=0)
        # where the bias exceeds twice the 5-sigma band, the sample variance resolves it: above s^2
        band = C * stationary * math.sqrt(2.0 / (n - 1))
        resolvable = (stationary - s**2) > 2 * band
        assert bool(resolvable.any())
        assert bool((x.var(0)[resolvable] - s[resolvable] ** 2 > band[resolvable]).all())


def test_annealed_langevin_matches_the_scheme_law_and_the_marginal():
    """Gaussian data on VE: per level the chain is AR(1) toward N(mu, C_i); recursion in float64.
    With enough steps at the last level the output's law is the scheme's stationary law, within
    O(eta_L) of the true marginal p(t_L)."""
    path = fs.paths.VE()
    mu, std = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64)
    prob = fs.analytic.Gaussian(mu, std, path)
    model = fs.Model(prob.eps, path, predicts="eps")
    # sigma from 9.1 down to 0.30; eps sets eta_L / (2 C_L) = 0.05, 0.016 and eta_1 / (2 C_1) ~ 0.1 (stable);
    # 400 steps leave 0.984^400 = 2e-3 of the last level's start
    levels = torch.tensor([0.8, 0.6, 0.4], dtype=torch.float64)
    eps, per = 0.018, 400
    n = 20000
    x_T = torch.zeros(n, 2, dtype=torch.float64)
    x = fs.annealed_langevin(model, x_T, levels, per, eps, seed=2)
    sig = path.sigma(levels)
    mean, var = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for i in range(levels.numel()):
        eta = eps * sig[i] ** 2 / sig[-1] ** 2
        c = std**2 + sig[i] ** 2  # VE: alpha = 1
        a = 1 - eta / (2 * c)
        for _ in range(per):
            mean = a * mean + eta / (2 * c) * mu
            var = a * a * var + eta
    _check(x, mean, var)
    # and the scheme's law is close to the true marginal at the last level (bias O(eta_L / C_L))
    assert float((var / prob.var(levels[-1]) - 1).abs().max()) < 0.05


def test_langevin_bad_input():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="step_size"):
        fs.langevin(lambda v: v, x, -1.0, 3)
    with pytest.raises(ValueError, match="n_steps"):
        fs.langevin(lambda v: v, x, 0.1, 0)
    with pytest.raises(TypeError, match="score must be callable"):
        fs.langevin(3, x, 0.1, 2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fs.annealed_langevin(fs.Model(lambda v, t: v, fs.paths.VE()), x, [0.2, 0.5])
    with pytest.raises(ValueError, match="sigma\\(t\\) > 0"):
        fs.annealed_langevin(fs.Model(lambda v, t: v, fs.paths.VP()), x, [0.5, 0.0])
