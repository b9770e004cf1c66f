"""torchdiffeq peers: ``torchdiffeq.odeint`` (Chen et al. 2018, "Neural Ordinary Differential
Equations") on the probability-flow ODE dx/dt = u(x, t) of the problem (Song et al. 2021, eq. 13;
the velocity itself on rectified flow), with u from the problem's own model by fs.Model's velocity
conversion (FORMULAS.md §2).

Conventions (docs/peers.md, "torchdiffeq"):

* Fixed-step 'euler', 'midpoint', 'rk4': the time grid (the path's default grid, ``fs.grids.make_grid``,
  the one the benchmark gives flowsolve's solvers) is passed as ``t``; torchdiffeq's fixed-grid solvers
  then take exactly one step per interval of ``t`` (its ``step_size`` / ``grid_constructor`` options
  only subdivide ``t`` further). torchdiffeq's 'rk4' is Kutta's 3/8 rule (``rk4_alt_step_func``),
  not the classical RK4 of flowsolve's ``rk4``: both fourth order, not the same numbers.
* Adaptive 'dopri5', 'bosh3': ``t = [t_max, t_min]``, rtol = atol = tol, ``options=dict(step_t=t)``
  (without it the last step overshoots t_min and is interpolated back, evaluating the field outside
  the path's range: t < 0 on VP); torchdiffeq's error norm is the RMS over the whole batch (flowsolve's
  adaptive solvers use a per-sample norm).
* The grid decreases (noise to data); torchdiffeq integrates backwards in time itself.
* NFE: counted by a wrapper around the vector field (torchdiffeq's initial-step selection included).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

import flowsolve as fs

from . import CountingFn, PeerSolver, budget_steps, check_run_args, target_fn

LIBRARY = "torchdiffeq"
FIXED = {"euler": 1, "midpoint": 2, "rk4": 4}  # method -> NFE per step
ADAPTIVE = ("dopri5", "bosh3")


def available() -> bool:
    return importlib.util.find_spec("torchdiffeq") is not None


def applies(problem) -> bool:
    """Every problem: the PF-ODE's velocity is defined on the whole grid of each benchmark path."""
    return True


def run_odeint(method: str, problem, x_init: torch.Tensor, *, nfe=None, tol=None, seed: int = 0,
               grid: torch.Tensor | None = None, max_num_steps: int = 100_000):
    """``torchdiffeq.odeint`` from x_init at t_max to t_min. Fixed methods: ``nfe`` (budget; the path's
    default grid with nfe // NFE-per-step steps) or ``grid`` (a decreasing float64 tensor of times);
    adaptive ones: ``tol``. Returns (x at t_min, counted NFE)."""
    if not available():
        raise ImportError("torchdiffeq is not installed: pip install torchdiffeq.")
    from torchdiffeq import odeint

    pname = f"{LIBRARY}:{method}"
    adaptive = method in ADAPTIVE
    if grid is not None:
        if adaptive:
            raise ValueError(f"{pname} is adaptive: pass tol=, not grid=.")
        check_run_args(pname, x_init, 1, None, adaptive=False)
        t = torch.as_tensor(grid, dtype=torch.float64)
    elif adaptive:
        check_run_args(pname, x_init, nfe, tol, adaptive=True)
        t = torch.tensor([problem.t_max, problem.t_min], dtype=torch.float64)
    else:
        check_run_args(pname, x_init, nfe, tol, adaptive=False, min_nfe=FIXED[method])
        steps = budget_steps(nfe, lambda n: FIXED[method] * n, pname)
        t = fs.grids.make_grid(None, problem.path, steps, t_max=problem.t_max, t_min=problem.t_min)
    u = target_fn(problem, "velocity")
    field = CountingFn(lambda s, x: u(x, s))
    # step_t: without it torchdiffeq's adaptive steps run past t_min (then interpolate back), evaluating
    # the field outside the path's range (t < 0 on VP, where an eps model is undefined)
    options = {"max_num_steps": max_num_steps, "step_t": t}
    kwargs = dict(rtol=float(tol), atol=float(tol), options=options) if adaptive else {}
    xs = odeint(field, x_init.to(torch.float64), t, method=method, **kwargs)
    return xs[-1], field.calls


def solvers() -> list[PeerSolver]:
    """The torchdiffeq peers, or [] when torchdiffeq is not installed."""
    if not available():
        return []
    out = [PeerSolver(name=f"{LIBRARY}:{m}", library=LIBRARY, stochastic=False, adaptive=False, applies=applies,
                      run=functools.partial(run_odeint, m), note="odeint on the path's default grid (t = grid)")
           for m in FIXED]
    out += [PeerSolver(name=f"{LIBRARY}:{m}", library=LIBRARY, stochastic=False, adaptive=True, applies=applies,
                       run=functools.partial(run_odeint, m), note="odeint, rtol = atol = tol, batch RMS norm")
            for m in ADAPTIVE]
    return out


__all__ = ["FIXED", "ADAPTIVE", "solvers", "run_odeint", "applies"]
