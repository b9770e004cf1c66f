"""The built-in benchmark problems: analytic data under a path, a model made from its closed forms,
an exact initial law, and an exact reference (flow-map endpoint for ODEs, marginal for SDEs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import flowsolve as fs


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

    def model(self) -> fs.Model:
        return fs.Model(getattr(self.prob, self.predicts), self.path, predicts=self.predicts)


def _gaussian_data(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    std = 0.2 + 1.3 * torch.rand(dim, generator=g, dtype=torch.float64)
    return mu, std


def problems(seed: int = 0) -> dict[str, Problem]:
    """Name -> Problem. Gaussian data (D=16, mu ~ N(0,1), std ~ U(0.2, 1.5), fixed seed)."""
    mu, std = _gaussian_data(16, seed)
    vp, rf = fs.paths.VP(), fs.paths.RectifiedFlow()
    out = [
        Problem("gaussian-vp", "Gaussian data, VP path (linear beta), eps model, t in [1e-3, 1]",
                fs.analytic.Gaussian(mu, std, vp), vp, "eps", vp.t_max, vp.t_min, 16),
        Problem("gaussian-rf", "Gaussian data, rectified-flow path, velocity model, t in [0, 1] "
                "(SDE solvers: t_max = 0.99, the reverse SDE is singular at t = 1)",
                fs.analytic.Gaussian(mu, std, rf), rf, "velocity", rf.t_max, rf.t_min, 16),
    ]
    return {p.name: p for p in out}
