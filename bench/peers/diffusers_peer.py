"""diffusers peers: its schedulers run by the standard pipeline loop

    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample

on the benchmark's VP problems, with an exact noise-prediction model (Ho et al. 2020's discrete
DDPM chain; the schedulers: Lu et al. 2022b DPM-Solver++(2M), Zhao et al. 2023 UniPC-2 (bh2),
Zhang & Chen 2023 DEIS-2, Karras et al. 2022 Euler / Heun in sigma space, Song et al. 2021 DDIM).

Conventions (docs/peers.md, "diffusers"):

* The discrete schedule equals our continuous VP at its knots: ``trained_betas`` with
  alphas_cumprod[i] = alpha(t_i)^2, t_i = (i + 1) / 1000 (t_0 = t_min = 1e-3, t_999 = t_max = 1), and
  the model at integer timestep i is the problem's exact eps at t_i. diffusers stores the betas and
  sigmas in float32 and upcasts the state to float32 inside ``step``: its runs carry float32 rounding.
* Every run starts at timestep 999 (t_max) and ends at timestep 0 (t_min), never at sigma = 0:
  final_sigmas_type="sigma_min" (DPM-Solver++, UniPC, Euler); DEIS always ends at alphas_cumprod[0];
  DDIM with set_alpha_to_one=False, timestep_spacing="trailing" (its "leading" default does not start
  at 999, "linspace" ends with a no-op step 0 -> 0), clip_sample=False (its default clips x0 to
  [-1, 1], wrong for non-image data); Heun (no final_sigmas_type: it always appends sigma = 0) is
  given the integer timesteps round(linspace(999, 0, N + 1)) and its loop stops before its last,
  first-order step to sigma = 0. Euler and Heun run in sigma space (x / alpha, sigma / alpha) with
  integer "trailing" timesteps (Euler's "linspace" gives fractional timesteps, where diffusers
  interpolates sigma linearly between knots and the exact model would see another noise level).
* DDIM steps from timestep t to t - 1000 // N: runs use N dividing 1000 (the largest <= the budget),
  where that lands on its next timestep; other N desynchronize state and timestep (DDIM_STEPS).
* lower_order_final: the schedulers' default (True: first order on the last step below 15 steps).
* NFE: counted by a wrapper around the model; the step count is the largest with NFE <= budget.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from . import CountingFn, PeerSolver, budget_steps, check_run_args, target_fn

LIBRARY = "diffusers"
N_TRAIN = 1000

# name -> (scheduler class, its config beyond the schedule, sigma-space state, Heun-style doubled loop)
SCHEDULERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler",
                dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min",
                     timestep_spacing="linspace"), False, False),
    "unipc": ("UniPCMultistepScheduler",
              dict(solver_order=2, solver_type="bh2", final_sigmas_type="sigma_min", timestep_spacing="linspace"),
              False, False),
    "deis": ("DEISMultistepScheduler", dict(solver_order=2, timestep_spacing="linspace"), False, False),
    "euler": ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min", timestep_spacing="trailing"), True, False),
    "heun": ("HeunDiscreteScheduler", dict(), True, True),
    "ddim": ("DDIMScheduler", dict(set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing"),
             False, False),
}


# DDIMScheduler.step goes from timestep t to t - 1000 // N, while its "trailing" (and "linspace") timesteps
# are round(1000 - k 1000 / N) - 1: unless N divides 1000 the state lands on another timestep than the next
# one it is evaluated at (N = 160: 999 -> 993, next evaluated at 992), and its error stops converging.
# (N = 1000 is left out: its last step goes from timestep 0 to alphas_cumprod[0] again, a no-op evaluation)
DDIM_STEPS = tuple(n for n in range(1, N_TRAIN) if N_TRAIN % n == 0)


def available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def applies(problem) -> bool:
    """VP problems whose range is the 1000-knot DDPM range: t_min = 1e-3, t_max = 1."""
    return problem.path.name == "vp" and abs(problem.t_min - 1e-3) < 1e-12 and problem.t_max == 1.0


def knot_times() -> torch.Tensor:
    """t_i = (i + 1) / 1000, i = 0..999 (float64)."""
    return torch.arange(1, N_TRAIN + 1, dtype=torch.float64) / N_TRAIN


def trained_betas(path) -> np.ndarray:
    """beta_i = 1 - abar_i / abar_{i-1} (abar_{-1} = 1) with abar_i = alpha(t_i)^2: the discrete chain
    whose alphas_cumprod are the continuous path's alpha^2 at the knots (up to diffusers' float32)."""
    log_abar = 2.0 * path.log_alpha(knot_times())
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar[:-1]])
    return (-torch.expm1(log_abar - prev)).numpy()


def make_scheduler(name: str, problem):
    import diffusers

    cls, config, _, _ = SCHEDULERS[name]
    return getattr(diffusers, cls)(num_train_timesteps=N_TRAIN, trained_betas=trained_betas(problem.path),
                                   prediction_type="epsilon", **config)


def _set_steps(sched, name: str, steps: int) -> None:
    if SCHEDULERS[name][3]:  # Heun: integer knots, the last one timestep 0 (t_min)
        ts = np.unique(np.round(np.linspace(N_TRAIN - 1, 0, steps + 1)))[::-1]
        if ts.size != steps + 1:
            raise ValueError(f"diffusers:{name}: steps={steps} exceeds the {N_TRAIN - 1} intervals of the schedule.")
        sched.set_timesteps(timesteps=[float(v) for v in ts])
    else:
        sched.set_timesteps(steps)


def _loop_length(sched, name: str) -> int:
    n = len(sched.timesteps)
    return n - 1 if SCHEDULERS[name][3] else n  # Heun: stop before the last entry (the step to sigma = 0)


def timestep_times(timesteps) -> torch.Tensor:
    """Path time of a (possibly fractional) diffusers timestep: t = (timestep + 1) / 1000."""
    return (torch.as_tensor(timesteps, dtype=torch.float64) + 1.0) / N_TRAIN


def run_scheduler(name: str, problem, x_init: torch.Tensor, *, nfe=None, tol=None, seed: int = 0,
                  steps: int | None = None):
    """Run one diffusers scheduler from x_init (exact draws of p at t_max) to t_min.

    Give ``nfe`` (the benchmark's budget) or ``steps`` (``set_timesteps(steps)``). Returns
    (x at t_min as float64, counted NFE).
    """
    if not available():
        raise ImportError("diffusers is not installed: pip install diffusers.")
    if not applies(problem):
        raise ValueError(f"diffusers:{name} runs on the VP problems (t in [1e-3, 1]); got {problem.name!r} "
                         f"(path {problem.path.name!r}).")
    pname = f"{LIBRARY}:{name}"
    sched = make_scheduler(name, problem)
    if steps is None and name == "ddim":
        check_run_args(pname, x_init, nfe, tol, adaptive=False, min_nfe=1)
        steps = max(d for d in DDIM_STEPS if d <= nfe)
    elif steps is None:
        def nfe_of(n):
            _set_steps(sched, name, n)
            return _loop_length(sched, name)

        check_run_args(pname, x_init, nfe, tol, adaptive=False, min_nfe=nfe_of(1))
        steps = budget_steps(nfe, nfe_of, pname, max_steps=N_TRAIN - 1)
    else:
        check_run_args(pname, x_init, 1, None, adaptive=False)
        if name == "ddim" and steps not in DDIM_STEPS:
            raise ValueError(f"diffusers:ddim: steps={steps} does not divide {N_TRAIN}; use one of {DDIM_STEPS}.")
    _set_steps(sched, name, steps)
    path = problem.path
    eps = target_fn(problem, "eps")
    model = CountingFn(lambda x, ts: eps(x, timestep_times(ts).reshape(1).expand(x.shape[0])))
    sigma_space = SCHEDULERS[name][2]
    alpha_max = float(path.alpha(torch.tensor(problem.t_max, dtype=torch.float64)))
    alpha_min = float(path.alpha(torch.tensor(problem.t_min, dtype=torch.float64)))
    x = x_init.to(torch.float64) / alpha_max if sigma_space else x_init.to(torch.float64).clone()
    timesteps = sched.timesteps[:_loop_length(sched, name)]
    for ts in timesteps:
        out = model(sched.scale_model_input(x, ts), ts)
        x = sched.step(out, ts, x).prev_sample
    x = x.to(torch.float64)
    return (alpha_min * x if sigma_space else x), model.calls


def solvers() -> list[PeerSolver]:
    """The diffusers peers, or [] when diffusers is not installed."""
    if not available():
        return []
    return [PeerSolver(name=f"{LIBRARY}:{n}", library=LIBRARY, stochastic=False, adaptive=False, applies=applies,
                       run=functools.partial(run_scheduler, n),
                       note=f"{SCHEDULERS[n][0]}, exact eps at t = (timestep + 1)/1000, ends at timestep 0 = t_min")
            for n in SCHEDULERS]


__all__ = ["SCHEDULERS", "solvers", "run_scheduler", "make_scheduler", "trained_betas", "timestep_times", "applies"]
