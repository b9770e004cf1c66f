"""Time grids for sampling: decreasing float64 tensors from t_max down to t_min.

Names:
    "uniform"    t_i = t_max + (i/N)(t_min - t_max)
    "logsnr"     uniform in lambda = log(alpha/sigma) (DPM-Solver, Lu et al. 2022, Sec. 3.3)
    "edm"        Karras et al. 2022, eq. 5: noise level s = sigma/alpha spaced as
                 s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7
    "quadratic"  t_i = t_min + (t_max - t_min)(1 - i/N)^2 (denser near the data; DDIM's "quad")

Points are computed as fractions of the interval (never by accumulating dt) and the ends are set
exactly to t_max and t_min. A user grid (sequence or tensor) is validated: 1-D, finite, strictly
monotone, inside the path's range; an increasing one is an error here, since ``fs.sample`` runs
from noise (large t) to data (small t).
"""
from __future__ import annotations

import difflib

import torch

from .checks import as_int, as_real, as_times
from .paths import GaussianPath

GRIDS = ("uniform", "logsnr", "edm", "quadratic")


def time_range(path: GaussianPath, t_max=None, t_min=None) -> tuple[float, float]:
    """Validated (t_max, t_min) as floats, defaulting to the path's sampling range. Each may be an int, a float,
    a numpy scalar or a one-element real tensor (``flowsolve.checks.as_real``)."""
    t_max = as_real("t_max", path.t_max if t_max is None else t_max)
    t_min = as_real("t_min", path.t_min if t_min is None else t_min)
    if not path.t_lo <= t_min < t_max <= path.t_hi:
        raise ValueError(
            f"need {path.t_lo} <= t_min < t_max <= {path.t_hi} for {type(path).__name__}; got t_min={t_min}, t_max={t_max}."
        )
    return t_max, t_min


def make_grid(grid, path: GaussianPath, steps: int | None = None, t_max=None, t_min=None, rho: float = 7.0) -> torch.Tensor:
    """A decreasing float64 grid of ``steps + 1`` times from t_max to t_min (or the user's grid, validated).

    Always a CPU tensor: grids are planned on the host, whatever ``torch.set_default_device`` says."""
    with torch.device("cpu"):
        return _make_grid(grid, path, steps, t_max, t_min, rho)


def _make_grid(grid, path, steps, t_max, t_min, rho) -> torch.Tensor:
    if grid is None:
        grid = path.default_grid
    if not isinstance(grid, str):
        return _validate_user_grid(grid, path, steps)
    if grid not in GRIDS:
        match = difflib.get_close_matches(grid, GRIDS, n=1)
        hint = f" Did you mean {match[0]!r}?" if match else ""
        raise ValueError(f"grid={grid!r} is not one of {GRIDS} (or pass a decreasing sequence of times).{hint}")
    steps = as_int("steps", steps, lo=1, what="a positive int")
    hi, lo = time_range(path, t_max, t_min)
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    if grid == "uniform":
        t = hi + frac * (lo - hi)
    elif grid == "quadratic":
        t = lo + (hi - lo) * (1.0 - frac) ** 2
    elif grid == "logsnr":
        l_hi, l_lo = path.lam(f64(hi)), path.lam(f64(lo))
        if not (torch.isfinite(l_hi) and torch.isfinite(l_lo)):
            raise ValueError(
                f"grid='logsnr' needs a finite log-SNR at both ends, but lambda(t_max={hi})={float(l_hi)} and "
                f"lambda(t_min={lo})={float(l_lo)} on {type(path).__name__}: choose t_min with sigma > 0 and t_max with "
                f"alpha > 0, or use grid='uniform' / 'edm'."
            )
        t = path.t_of_lambda(l_hi + frac * (l_lo - l_hi))
    else:  # edm
        s_hi, s_lo = torch.exp(-path.lam(f64(hi))), torch.exp(-path.lam(f64(lo)))
        if not torch.isfinite(s_hi):
            raise ValueError(
                f"grid='edm' needs a finite noise level sigma/alpha at t_max={hi} on {type(path).__name__} "
                f"(alpha(t_max) = 0): lower t_max or use grid='uniform'."
            )
        s = (s_hi ** (1 / rho) + frac * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        t = path.t_of_lambda(-torch.log(s))
    t[0], t[-1] = hi, lo
    t = torch.minimum(torch.maximum(t, f64(lo)), f64(hi))
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(
            f"grid={grid!r} with steps={steps} between t_max={hi} and t_min={lo} has repeated times after rounding; "
            f"use fewer steps or a wider range."
        )
    return t


def _validate_user_grid(grid, path: GaussianPath, steps) -> torch.Tensor:
    t = as_times("grid", grid, f"a name in {GRIDS} or a 1-D sequence of times")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"a grid of times must be 1-D with at least 2 points; got shape {tuple(t.shape)}.")
    if steps is not None and as_int("steps", steps, lo=1, what="a positive int") != t.numel() - 1:
        raise ValueError(f"steps={steps} but the grid has {t.numel()} points ({t.numel() - 1} steps); pass steps=None.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("the grid contains NaN or inf times.")
    if not bool((t[1:] < t[:-1]).all()):
        if bool((t[1:] > t[:-1]).all()):
            raise ValueError(
                "the grid is increasing; fs.sample runs from noise (large t) to data (small t): pass it reversed "
                "(grid.flip(0)). For a model trained with t=0 noise use fs.Model(..., time_convention='flow')."
            )
        raise ValueError("the grid must be strictly decreasing (no repeated or out-of-order times).")
    if t[-1] < path.t_lo or t[0] > path.t_hi:
        raise ValueError(
            f"grid spans [{float(t[-1])}, {float(t[0])}] but {type(path).__name__} is defined on [{path.t_lo}, {path.t_hi}]."
        )
    return t


from .grid_optimize import clear_cache, optimize  # noqa: E402,F401  (optimized grids for a budget: grid_optimize.py)
