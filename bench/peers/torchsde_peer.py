"""torchsde peers: ``torchsde.sdeint`` (Li et al. 2020, "Scalable Gradients for Stochastic Differential
Equations"; Kidger et al. 2021 for its Brownian interval) on the reverse-time SDE of a VP problem
(Anderson 1982; Song et al. 2021, eq. 6):

    dx = (f(t) x - g^2(t) score(x, t)) dt + g(t) dw_bar,   t from t_max down to t_min.

Conventions (docs/peers.md, "torchsde"):

* torchsde integrates forward in its time, so the SDE is written in s = -t (s from -t_max to -t_min):
  drift_s(s, y) = -(f(t) y - g^2(t) score(y, t)), diffusion_s(s, y) = g(t), t = -s; noise_type
  "diagonal", sde_type "ito". Euler on it is, step for step, flowsolve's Euler-Maruyama
  x + h (f x - g^2 score) + g sqrt(|h|) z (h = -ds < 0).
* Fixed dt = (t_max - t_min) / N with ts = [-t_max, -t_min]. torchsde accumulates its time (t + dt)
  and would add a spurious ~1e-16-long last step (torchsde #36) when the sum falls short of the end;
  dt is therefore enlarged by a relative 1e-12, which makes the N-th step end on the clipped end point.
* Methods: 'euler' (1 model call per step); ('milstein' equals Euler for this additive noise);
  'srk' (Rossler's SRI/SRA for diagonal noise, strong order 1.5; needs space-time Levy area).
  Noise: ``torchsde.BrownianInterval`` seeded with ``seed``.
* NFE: counted by a wrapper around the score model (the diffusion g(t) makes no model call); it
  includes the one drift call ``sdeint`` makes to check shapes before integrating (Euler: N + 1).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from . import CountingFn, PeerSolver, check_run_args, target_fn

LIBRARY = "torchsde"
DT_STRETCH = 1e-12  # relative enlargement of dt (see the module docstring)


def available() -> bool:
    return importlib.util.find_spec("torchsde") is not None


def applies(problem) -> bool:
    """VP problems (f and g^2 finite on [t_min, t_max])."""
    return problem.path.name == "vp"


class ReverseSDE(torch.nn.Module):
    """The reverse-time SDE of ``problem`` in forward time s = -t (torchsde's ``f``/``g`` protocol)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, problem, score):
        super().__init__()
        self.path, self.score = problem.path, score

    def f(self, s, y):
        t = (-s).to(torch.float64)
        return -(self.path.f(t).to(y.dtype) * y - self.path.g2(t).to(y.dtype) * self.score(y, t))

    def g(self, s, y):
        t = (-s).to(torch.float64)
        return self.path.g2(t).sqrt().to(y.dtype).expand_as(y)


def _nfe_model(method: str, problem, x_init) -> tuple[int, int]:
    """(model calls per step, fixed calls per run) of ``method``, counted on one-sample runs of 1 and 2
    steps (``sdeint`` calls the drift once more to check its shape before integrating)."""
    one = run_sdeint(method, problem, x_init[:1], steps=1)[1]
    two = run_sdeint(method, problem, x_init[:1], steps=2)[1]
    return two - one, 2 * one - two


def run_sdeint(method: str, problem, x_init: torch.Tensor, *, nfe=None, tol=None, seed: int = 0,
               steps: int | None = None):
    """``torchsde.sdeint`` from x_init (exact draws of p at t_max) to t_min with N uniform steps: N is
    ``steps``, or the largest with counted NFE <= ``nfe``. Returns (x at t_min, counted NFE)."""
    if not available():
        raise ImportError("torchsde is not installed: pip install torchsde.")
    import torchsde

    pname = f"{LIBRARY}:{method}"
    if steps is None:
        check_run_args(pname, x_init, nfe, tol, adaptive=False)
        per_step, fixed = _nfe_model(method, problem, x_init)
        if nfe < per_step + fixed:
            raise ValueError(f"{pname}: nfe={nfe} is below one step's {per_step + fixed} model calls; raise nfe.")
        steps = (nfe - fixed) // per_step
    else:
        check_run_args(pname, x_init, 1, None, adaptive=False)
    score = CountingFn(target_fn(problem, "score"))
    sde = ReverseSDE(problem, score)
    s0, s1 = -problem.t_max, -problem.t_min
    dt = (s1 - s0) / steps * (1.0 + DT_STRETCH)
    x0 = x_init.to(torch.float64)
    bm = torchsde.BrownianInterval(t0=s0, t1=s1, size=x0.shape, dtype=torch.float64, device=x0.device, entropy=seed,
                                   levy_area_approximation="space-time" if method == "srk" else "none")
    ts = torch.tensor([s0, s1], dtype=torch.float64)
    with torch.no_grad():
        xs = torchsde.sdeint(sde, x0, ts, bm=bm, method=method, dt=dt)
    return xs[-1], score.calls


def step_times(problem, steps: int) -> torch.Tensor:
    """The path times torchsde's Euler visits with ``steps`` steps (decreasing, ends at t_min): for the
    exact law of the discretization (FORMULAS.md §3)."""
    s0, s1 = -problem.t_max, -problem.t_min
    dt = (s1 - s0) / steps * (1.0 + DT_STRETCH)
    s = [s0]
    for _ in range(steps):
        s.append(min(s[-1] + dt, s1))  # the same float accumulation torchsde does
    return -torch.tensor(s, dtype=torch.float64)


def solvers() -> list[PeerSolver]:
    """The torchsde peers, or [] when torchsde is not installed."""
    if not available():
        return []
    return [PeerSolver(name=f"{LIBRARY}:{m}", library=LIBRARY, stochastic=True, adaptive=False, applies=applies,
                       run=functools.partial(run_sdeint, m), note="sdeint in s = -t, uniform dt, BrownianInterval")
            for m in ("euler", "srk")]


__all__ = ["solvers", "run_sdeint", "ReverseSDE", "step_times", "applies"]
