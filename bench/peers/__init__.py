"""Peer libraries for side-by-side benchmarks and agreement tests (optional: ``pip install -e ".[peers]"``).

Each peer module runs one library's own sampling loop on a benchmark problem, counting NFE by
wrapping the callable it is given (never from nominal steps).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["PeerSolver", "peer_solvers", "import_k_diffusion_sampling", "PEER_MODULES"]

# one module per library; each exposes ``solvers() -> list[PeerSolver]`` (empty when not installed)
PEER_MODULES = ("k_diffusion_peer", "diffusers_peer", "torchdiffeq_peer", "torchsde_peer")


def _default_t_start(problem) -> float:
    return problem.t_max


@dataclass
class PeerSolver:
    """One peer library's sampler, run through that library's own loop on a ``bench.problems.Problem``.

    ``run(problem, x_init, *, nfe=None, tol=None, seed=0) -> (x_end, nfe_counted)``: ``x_init`` is a
    float64 [B, D] batch of exact draws of p at ``t_start(problem)``; ``x_end`` is the peer's float64
    state at ``problem.t_min``; ``nfe`` is the NFE budget of a fixed-step peer (the runner picks its
    steps so that the counted NFE is <= nfe, as close as it can), ``tol`` the rtol = atol of an
    adaptive one. ``nfe_counted`` counts every call of the model callable the library was given.
    """

    name: str  # "<library>:<method>", e.g. "k-diffusion:heun", "torchdiffeq:dopri5"
    library: str
    stochastic: bool  # an SDE sampler: measured by its weak error against the exact marginals
    adaptive: bool  # swept over tolerances instead of NFE
    applies: Callable  # applies(problem) -> bool
    run: Callable  # see the class docstring
    t_start: Callable = _default_t_start  # t_start(problem) -> float: where the peer starts
    note: str = ""  # the convention, in one line (for the benchmark table)


class CountingFn:
    """Wraps a callable and counts its calls: the NFE a peer library actually made."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def check_run_args(peer_name: str, x_init, nfe, tol, adaptive: bool, min_nfe: int = 1):
    """Validate ``run``'s arguments with messages that name the argument, the value and the fix."""
    if not isinstance(x_init, torch.Tensor) or x_init.dtype != torch.float64 or x_init.dim() != 2:
        got = f"{x_init.dtype} {tuple(x_init.shape)}" if isinstance(x_init, torch.Tensor) else type(x_init).__name__
        raise ValueError(f"{peer_name}: x_init must be a float64 [B, D] tensor; got {got}. Use x.double().")
    if adaptive:
        if tol is None or not float(tol) > 0:
            raise ValueError(f"{peer_name} is adaptive: pass tol > 0 (rtol = atol); got tol={tol!r}.")
        if nfe is not None:
            raise ValueError(f"{peer_name} is adaptive: pass tol=, not nfe={nfe!r}.")
    else:
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < min_nfe:
            raise ValueError(f"{peer_name}: nfe={nfe!r} must be an int >= {min_nfe} (its smallest run).")
        if tol is not None:
            raise ValueError(f"{peer_name} takes a fixed NFE budget: pass nfe=, not tol={tol!r}.")


def peer_solvers(problem=None) -> list[PeerSolver]:
    """Every peer sampler of the installed libraries; with ``problem``, only those that apply to it."""
    out: list[PeerSolver] = []
    for mod in PEER_MODULES:
        out.extend(importlib.import_module(f"{__name__}.{mod}").solvers())
    if problem is not None:
        out = [p for p in out if p.applies(problem)]
    return out


def import_k_diffusion_sampling():
    """``k_diffusion.sampling``, or None when k-diffusion is not installed.

    k-diffusion's package ``__init__`` imports its training code (torchvision, kornia, wandb, ...),
    which a sampler comparison does not need and which would replace torch 2.13.0 if installed with
    its dependencies. The peers extra therefore installs it with ``--no-deps``; here the package's
    ``sampling`` module is loaded on its own, under a bare parent package whose ``utils`` provides the
    one helper it uses (``append_dims``). With k-diffusion's full dependencies installed, the real
    package is imported instead.
    """
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
        del sys.modules[name]  # a half-imported package from the failed attempt above
    location = list(spec.submodule_search_locations)[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [location]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        """Append singleton dimensions to ``x`` until it has ``target_dims`` dimensions."""
        extra = target_dims - x.ndim
        if extra < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * extra]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = package, utils
    sampling_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{location}/sampling.py")
    sampling = importlib.util.module_from_spec(sampling_spec)
    sys.modules["k_diffusion.sampling"] = sampling
    try:
        sampling_spec.loader.exec_module(sampling)
    except ImportError:  # torchdiffeq / torchsde / scipy missing
        for name in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling"):
            sys.modules.pop(name, None)
        return None
    package.sampling = sampling
    return sampling


def target_fn(problem, target: str):
    """``fn(x, t) -> target`` ("x0" | "eps" | "score" | "velocity") of the problem's own model (the
    benchmark's network: ``problem.model()``, e.g. an eps model on VP), converted with
    ``fs.Model.conversion`` (FORMULAS.md §2); ``t`` is a [B] or 0-d float64 tensor of path times."""
    model = problem.model()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        a, b = model.conversion(target, t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.to(x.dtype).view(shape) * x + b.to(x.dtype).view(shape) * model(x, t.to(x.dtype))

    return fn


def rf_t_start(problem, t_rf: float = 0.99) -> float:
    """Where a peer that needs alpha(t) > 0 starts: 0.99 on rectified flow (alpha(1) = 0), else t_max."""
    return t_rf if problem.path.name == "rectified_flow" else problem.t_max


def budget_steps(nfe: int, nfe_of_steps, name: str, max_steps: int = 100_000) -> int:
    """The largest step count in [1, max_steps] whose NFE (``nfe_of_steps(steps)``, nondecreasing) is <= ``nfe``."""
    if nfe_of_steps(1) > nfe:
        raise ValueError(f"{name}: nfe={nfe} is below its smallest run ({nfe_of_steps(1)} NFE for one step); raise nfe.")
    if nfe_of_steps(max_steps) <= nfe:
        return max_steps
    lo, hi = 1, max_steps  # invariant: nfe_of_steps(lo) <= nfe < nfe_of_steps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if nfe_of_steps(mid) <= nfe else (lo, mid)
    return lo
