"""Restart sampling (Xu, Deng, Cheng, Tian, Liu & Jaakkola 2023, "Restart Sampling for Improving Generative
Processes", NeurIPS 2023, Algorithm 1), with Heun's method (Karras et al. 2022, Alg. 1) as the ODE solver,
as in the paper.

Main backward process: Heun steps of the PF-ODE on the main grid t_0 > ... > t_N (exactly ``heun``). Each
restart interval [s_min, s_max] (noise levels s = sigma/alpha, EDM's sigma; the paper's [t_min, t_max])
is attached to the main grid point t_j whose noise level is nearest to s_min in log s among the points below
s_max (the paper's code snaps t_min onto the main grid to the nearest point; the s_max condition keeps the
interval non-empty on coarse grids). When the main process reaches t_j, repeat K times:

    restart forward (Alg. 1, line 7, any Gaussian path): the exact forward transition of the path from
        t_a = t_j to t_b = t(s_max),   x_b = (alpha_b/alpha_a) x_a + sqrt(sigma_b^2 - (alpha_b/alpha_a)^2 sigma_a^2) z
        = (alpha_b/alpha_a) x_a + alpha_b sqrt(s_b^2 - s_a^2) z    (on VE/EDM: x + sqrt(s_b^2 - s_a^2) z),
        times ``s_noise`` (the paper's S_noise: 1 on CIFAR-10, 1.003 on ImageNet);
    restart backward (line 8): ``steps`` Heun steps from t_b back to t_a on the EDM rho = 7 grid in s
        between s_b and s_a (Karras et al. 2022, eq. 5; the paper's code uses the same spacing),

then continue the main process from t_j. Each interval is given as (s_min, s_max, K, steps) with ``steps``
the Heun steps of one restart backward pass (the paper's code counts grid points, N = steps + 1). Default:
the paper's CIFAR-10 VP configuration, one interval (0.06, 0.30) with K = 2 and N = 3 points (2 Heun steps),
with 18 main steps (``Restart.paper_steps``; NFE 2 * 18 + 2 * 2 * 2 = 44 here: our last main step to t_min > 0
is a full Heun step).

Noise: repetition k of the interval at main step n draws its z on stream STREAM_STEP + 8 with step key
n * K_max + k (K_max the largest K): keyed by (seed, sample, key, stream) like every sampler here, so sample
b is the same in any batch. NFE = the Heun NFE of the main grid + sum over intervals of K * (Heun NFE of its
backward pass); ``Sampler.nfe`` and the run's counted NFE include them (from the plan's ``evals``). With K = 0
everywhere Restart is ``heun``. ``order`` 2: Heun's order in the step size when the restart backward
passes are refined with the main grid (with fixed restart steps their error does not vanish as the main
grid is refined).
"""
from __future__ import annotations

import math

import torch

from .. import grids as _grids
from ..kernels import STREAM_STEP, lincomb
from .base import Plan, Solver, SolverInfo, register
from .heun import heun_rows, heun_step

STREAM_RESTART = STREAM_STEP + 8  # the restart forward jumps (extra noise of a step: streams 8+)
PAPER_INTERVALS = ((0.06, 0.30, 2, 2),)  # Xu et al. 2023, CIFAR-10 VP: {"0": [N=3, K=2, 0.06, 0.30]}, 18 steps


def _attach_point(s_grid: list[float], s_min: float, s_max: float):
    """Index j >= 1 of the main grid point a restart interval is attached to: among the points with noise level
    below s_max, the nearest to s_min in log s (a point with s = 0, the end of a grid to sigma = 0, only when it
    is the sole candidate). None if no point qualifies."""
    cand = [j for j in range(1, len(s_grid)) if s_grid[j] < s_max]
    if not cand:
        return None
    dist = [abs(math.log(s_grid[j]) - math.log(s_min)) if s_grid[j] > 0 else math.inf for j in cand]
    return cand[min(range(len(cand)), key=lambda q: dist[q])]


def _check_interval(iv, i):
    if not (isinstance(iv, (tuple, list)) and len(iv) == 4):
        raise ValueError(f"intervals[{i}]={iv!r} must be a tuple (s_min, s_max, K, steps), e.g. (0.06, 0.30, 2, 2).")
    s_min, s_max, k, steps = iv
    for name, v in (("s_min", s_min), ("s_max", s_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v < math.inf):
            raise ValueError(f"intervals[{i}]: {name}={v!r} must be a positive finite noise level sigma/alpha.")
    if not s_min < s_max:
        raise ValueError(f"intervals[{i}]: s_min={s_min} must be below s_max={s_max} (restart jumps up in noise).")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"intervals[{i}]: K={k!r} must be an int >= 0 (restart repetitions; 0 disables the interval).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"intervals[{i}]: steps={steps!r} must be an int >= 1 (Heun steps of each restart "
                         f"backward pass).")
    return float(s_min), float(s_max), k, steps


@register
class Restart(Solver):
    """Restart sampling (Xu et al. 2023, Alg. 1) with Heun steps; see the module docstring.

    Args:
        intervals: sequence of (s_min, s_max, K, steps): noise-level interval, repetitions, Heun steps per
            restart backward pass. Default: the paper's CIFAR-10 VP setting ((0.06, 0.30, 2, 2),).
        s_noise: scale of the restart forward noise (the paper's S_noise; 1.0 for CIFAR-10).
        rho: exponent of the EDM spacing of the restart backward grid (7, as in the paper's code).
    """

    info = SolverInfo("restart", order=2, nfe_per_step=2, stochastic=True, needs="velocity",
                      paper="Xu et al. 2023, Restart sampling, Alg. 1 (Heun ODE steps; CIFAR-10 VP defaults)")
    paper_steps = 18  # main Heun steps of the paper's CIFAR-10 configuration

    def __init__(self, intervals=PAPER_INTERVALS, s_noise: float = 1.0, rho: float = 7.0):
        try:
            ivs = list(intervals)
        except TypeError as e:
            raise TypeError(f"intervals must be a sequence of (s_min, s_max, K, steps) tuples; got {intervals!r}.") from e
        self.intervals = tuple(_check_interval(iv, i) for i, iv in enumerate(ivs))
        if isinstance(s_noise, bool) or not isinstance(s_noise, (int, float)) or not (0.0 <= s_noise < math.inf):
            raise ValueError(f"s_noise={s_noise!r} must be a finite number >= 0 (1.0: the exact forward transition).")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0.0 < rho < math.inf):
            raise ValueError(f"rho={rho!r} must be a positive number (7: Karras et al. 2022).")
        self.s_noise, self.rho = float(s_noise), float(rho)
        self.k_max = max([k for _, _, k, _ in self.intervals] + [1])

    def __repr__(self) -> str:
        return f"Restart(intervals={self.intervals!r}, s_noise={self.s_noise:g})"

    def plan(self, model, grid) -> Plan:
        path = model.path
        t0, t1 = grid[:-1], grid[1:]
        n = t0.numel()
        euler, heun, correct = heun_rows(model, t0, t1)
        main_correct = [bool(c) for c in correct]
        s_grid = torch.exp(-path.lam(grid))
        restarts: dict[int, tuple] = {}
        for i, (s_min, s_max, k, steps) in enumerate(self.intervals):
            if k == 0:
                continue
            j = _attach_point([float(v) for v in s_grid], s_min, s_max)
            if j is None:
                raise ValueError(f"intervals[{i}]: no point of the main grid after t_max has a noise level sigma/alpha "
                                 f"below s_max={s_max} to restart from; raise s_max or use more main steps.")
            t_a, s_a = float(grid[j]), float(s_grid[j])
            t_b = float(path.t_of_lambda(torch.tensor(-math.log(s_max), dtype=torch.float64)))
            t_b = min(t_b, float(grid[0]))
            if not t_b > t_a:
                raise ValueError(f"intervals[{i}]: the restart from t={t_a:.4g} (noise level {s_a:.4g}) up to "
                                 f"s_max={s_max} is empty on {type(path).__name__} (t(s_max) = {t_b:.4g}); raise s_max.")
            if j - 1 in restarts:
                raise ValueError(f"intervals[{i}] attaches to the same main grid point t={t_a:.4g} as another interval; "
                                 f"merge them or use more main steps.")
            inner = _grids.make_grid("edm", path, steps, t_max=t_b, t_min=t_a, rho=self.rho)
            restarts[j - 1] = (k, inner)
        n_max = max([g.numel() - 1 for _, g in restarts.values()] + [0])
        tables = {"euler": euler, "heun": heun}
        t_eval = torch.full((n, 2 + 2 * n_max), float("nan"), dtype=torch.float64)
        t_eval[:, 0] = t0
        t_eval[:, 1] = t1.where(correct, float("nan"))
        jump = torch.zeros(n, self.k_max, 2, dtype=torch.float64)
        jump[:, :, 0] = 1.0
        r_euler = [torch.zeros(n, 3, dtype=torch.float64) for _ in range(n_max)]
        r_heun = [torch.zeros(n, 4, dtype=torch.float64) for _ in range(n_max)]
        flags_restart = [None] * n
        evals = [1 + c for c in main_correct]
        for m, (k, inner) in restarts.items():
            ta, tb = inner[-1:], inner[:1]
            aa, ab = path.alpha(ta), path.alpha(tb)
            sa, sb = path.sigma(ta), path.sigma(tb)
            ratio = ab / aa
            jump[m, :, 0] = float(ratio)
            jump[m, :, 1] = float(torch.sqrt(torch.clamp(sb**2 - (ratio * sa) ** 2, min=0.0))) * self.s_noise
            e_rows, h_rows, corr = heun_rows(model, inner[:-1], inner[1:])
            for q in range(inner.numel() - 1):
                r_euler[q][m] = e_rows[q]
                r_heun[q][m] = h_rows[q]
                t_eval[m, 2 + 2 * q] = inner[q]
                if bool(corr[q]):
                    t_eval[m, 3 + 2 * q] = inner[q + 1]
            flags_restart[m] = (k, [bool(c) for c in corr])
            evals[m] += k * sum(1 + int(c) for c in corr)
        tables["r_jump"] = jump.reshape(n * self.k_max, 2)  # row n * K_max + k: repetition k at main step n
        for q in range(n_max):
            tables[f"r_euler{q}"], tables[f"r_heun{q}"] = r_euler[q], r_heun[q]
        flags = {"correct": main_correct, "restart": flags_restart,
                 "attach": {m: float(g[-1]) for m, (_, g) in restarts.items()},
                 "restart_nfe": sum(evals) - sum(1 + c for c in main_correct)}  # evaluations beyond heun's
        return Plan(grid, tables, t_eval, evals, flags)

    def step(self, run, n: int) -> None:
        x, flags = run.x, run.plan.flags
        heun_step(run, x, x, 0, "euler", "heun", flags["correct"][n])
        restart = flags["restart"][n]
        if restart is None:
            return
        k_rep, corr = restart
        for k in range(k_rep):
            key = run.step_index * self.k_max + k  # device arithmetic: no host sync
            lincomb(x, [x], run.tables["r_jump"], key, run.seed, sample_offset=run.sample_offset,
                    stream=STREAM_RESTART, backend=run.backend)
            for q, c in enumerate(corr):
                heun_step(run, x, x, 2 + 2 * q, f"r_euler{q}", f"r_heun{q}", c)
