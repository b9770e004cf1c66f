"""Solver protocol, plans and the registry.

A solver is its coefficients as data plus a few lines (DESIGN.md, "Contracts"):

* ``plan(model, grid)`` computes, once and in float64, every coefficient of every step (with the
  model's parameterization conversion folded in), the times at which the model is evaluated, and
  every structural decision such as "the last step lands on sigma = 0 and skips its correction".
* ``step(run, n)`` performs step ``n`` with ``run.evaluate`` (one model call at a planned time) and
  ``run.combine`` (one fused kernel call reading its coefficient row by the device step index).
  ``n`` is a Python int used only for the plan's structural decisions; no number derived from
  device data enters the loop.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SolverInfo:
    """What ``fs.solvers()`` reports for each registered solver."""

    name: str
    order: int
    nfe_per_step: int
    stochastic: bool
    needs: str  # the model quantity the update is written in: "velocity" | "x0" | "eps" | "score"
    multistep: bool = False
    adaptive: bool = False
    paper: str = ""


@dataclass
class Plan:
    """Everything a run needs, computed before the loop (float64, on the host).

    tables: name -> ``[n_steps, K+1]`` coefficient table (last column: noise coefficient).
    t_eval: ``[n_steps, n_evals]`` model evaluation times (NaN where a step makes fewer evaluations).
    evals: number of model evaluations of each step (Python ints): NFE = sum(evals).
    flags: per-solver structural decisions (Python values).
    """

    grid: torch.Tensor
    tables: dict[str, torch.Tensor]
    t_eval: torch.Tensor
    evals: list[int]
    flags: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return int(sum(self.evals))

    @property
    def n_steps(self) -> int:
        return self.grid.numel() - 1


def table(*columns: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Stack per-step coefficient columns (float64 [N] each) into ``[N, K+1]`` with a noise column."""
    cols = [torch.as_tensor(c, dtype=torch.float64) for c in columns]
    n = max(c.numel() for c in cols)
    cols = [c.expand(n) if c.numel() == 1 else c for c in cols]
    cols.append(torch.zeros(n, dtype=torch.float64) if noise is None else noise.to(torch.float64).expand(n))
    return torch.stack(cols, dim=1)


class Solver:
    """Base class; subclasses set ``info`` and implement ``plan`` and ``step``."""

    info: SolverInfo

    def plan(self, model, grid: torch.Tensor) -> Plan:
        raise NotImplementedError

    def step(self, run, n: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: register a solver under ``cls.info.name``."""
    name = cls.info.name
    if name in _REGISTRY:
        raise ValueError(f"a solver named {name!r} is already registered.")
    _REGISTRY[name] = cls
    return cls


def get_solver(solver) -> Solver:
    """A solver instance from a name or an instance; unknown names list the choices."""
    if isinstance(solver, Solver):
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name such as 'heun' or a Solver instance; got {type(solver).__name__}.")
    if solver not in _REGISTRY:
        names = sorted(_REGISTRY)
        match = difflib.get_close_matches(solver, names, n=1)
        hint = f" Did you mean {match[0]!r}?" if match else ""
        raise ValueError(f"unknown solver {solver!r}; registered solvers: {', '.join(names)}.{hint}")
    return _REGISTRY[solver]()


def solvers() -> list[SolverInfo]:
    """Information on every registered solver, sorted by name."""
    return [_REGISTRY[k].info for k in sorted(_REGISTRY)]
