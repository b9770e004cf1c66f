"""The built-in benchmark problems: analytic data under a path, a model made from its closed forms,
an exact initial law, and a reference endpoint (the exact flow map for Gaussian data; a float64
RK4 solve on a fine grid, its own error estimated by step halving, for Gaussian mixtures) and the
exact marginal moments for SDE solvers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import flowsolve as fs

# Gaussian-mixture reference: RK4 with REF_STEPS steps on the path's reference grid, and half as many
# steps to estimate its error (RK4 is fourth order: err(REF_STEPS) ~ |x_ref - x_half| / 15).
REF_STEPS = 4096


@dataclass
class Problem:
    name: str
    description: str
    prob: object  # a fs.analytic problem
    path: object
    predicts: str
    t_max: float
    t_min: float
    dim: int
    ref_grid: str | None = None  # the grid of the float64 reference solve (mixtures only)
    ref_error: dict = field(default_factory=dict)  # t_max -> estimated RMS error of the reference

    def model(self) -> fs.Model:
        return fs.Model(getattr(self.prob, self.predicts), self.path, predicts=self.predicts)

    @property
    def exact_flow(self) -> bool:
        return isinstance(self.prob, fs.analytic.Gaussian)

    def reference(self, x_T: torch.Tensor, t_max: float) -> torch.Tensor:
        """The endpoint at t_min of the ODE started from x_T at t_max: exact for Gaussian data, else a
        float64 RK4 solve with REF_STEPS steps (its estimated error is kept in ``ref_error[t_max]``)."""
        if self.exact_flow:
            return self.prob.flow(x_T, t_max, self.t_min)
        model = self.model()
        kw = dict(solver="rk4", grid=self.ref_grid, t_max=t_max, t_min=self.t_min)
        ref = fs.sample(model, x_T, steps=REF_STEPS, **kw)
        half = fs.sample(model, x_T, steps=REF_STEPS // 2, **kw)
        self.ref_error[t_max] = float((ref - half).pow(2).mean().sqrt()) / 15.0
        return ref


def _gaussian_data(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    std = 0.2 + 1.3 * torch.rand(dim, generator=g, dtype=torch.float64)
    return mu, std


def _mixture_data(seed: int, components: int = 4, dim: int = 2):
    """Well-separated anisotropic 2-D mixture: means ~ U[-2, 2]^2, stds ~ U(0.15, 0.6) per dimension."""
    g = torch.Generator().manual_seed(1000 + seed)
    means = 4.0 * torch.rand(components, dim, generator=g, dtype=torch.float64) - 2.0
    stds = 0.15 + 0.45 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return means, stds, weights


def problems(seed: int = 0) -> dict[str, Problem]:
    """Name -> Problem. Gaussian data (D=16, mu ~ N(0,1), std ~ U(0.2, 1.5)) and a 4-component 2-D
    Gaussian mixture, each under VP (eps model) and rectified flow (velocity model); fixed seed."""
    mu, std = _gaussian_data(16, seed)
    means, stds, weights = _mixture_data(seed)
    vp, rf = fs.paths.VP(), fs.paths.RectifiedFlow()
    out = [
        Problem("gaussian-vp", "Gaussian data, VP path (linear beta), eps model, t in [1e-3, 1]",
                fs.analytic.Gaussian(mu, std, vp), vp, "eps", vp.t_max, vp.t_min, 16),
        Problem("gaussian-rf", "Gaussian data, rectified-flow path, velocity model, t in [0, 1] "
                "(SDE solvers: t_max = 0.99, the reverse SDE is singular at t = 1)",
                fs.analytic.Gaussian(mu, std, rf), rf, "velocity", rf.t_max, rf.t_min, 16),
        Problem("mixture-vp", "4-component anisotropic Gaussian mixture in 2-D, VP path, eps model, t in [1e-3, 1]; "
                f"ODE reference: float64 RK4, {REF_STEPS} logsnr steps",
                fs.analytic.GaussianMixture(means, stds, weights, vp), vp, "eps", vp.t_max, vp.t_min, 2,
                ref_grid="logsnr"),
        Problem("mixture-rf", "4-component anisotropic Gaussian mixture in 2-D, rectified flow, velocity model, "
                f"t in [0, 1]; ODE reference: float64 RK4, {REF_STEPS} uniform steps",
                fs.analytic.GaussianMixture(means, stds, weights, rf), rf, "velocity", rf.t_max, rf.t_min, 2,
                ref_grid="uniform"),
    ]
    return {p.name: p for p in out}
