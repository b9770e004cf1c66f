"""Solver protocol, plans and the registry.

A solver is its coefficients as data plus a few lines (DESIGN.md, "Contracts"):

* ``plan(model, grid)`` computes, once and in float64, every coefficient of every step (with the
  model's parameterization conversion folded in), the times at which the model is evaluated, and
  every structural decision such as "the last step lands on sigma = 0 and skips its correction".
* ``step(run, n)`` performs step ``n`` with ``run.evaluate`` (one model call at a planned time) and
  ``run.combine`` (one fused kernel call reading its coefficient row by the device step index).
  ``n`` is a Python int used only for the plan's structural decisions; no number derived from
  device data enters the loop.

Two rules every ``step`` (and every adaptive ``integrate``) keeps:

* **Model outputs are borrowed.** ``run.evaluate`` returns the model's raw output, which the model may own and
  overwrite on its next call (one preallocated tensor returned every time: TensorRT / ONNX Runtime io-binding,
  a CUDA-graph-replayed network, an ``out=`` buffer). A step consumes each raw output in combines made before
  its next evaluation; whatever must outlive that evaluation lives in run-owned memory, preferably a tensor the
  step writes anyway and from which the later update can be written (a history push of the x0 prediction;
  Heun's predictor x' = x + h u(x), so x + h/2 u(x) = (x + x')/2; DPM-Solver's first stage u1), else a copy
  (``ggf``'s F, read by every attempt from the same point).
  ``tests/test_reused_outputs.py`` checks every registered solver against fresh outputs, bitwise.
* **Scratch belongs to the run.** One solver instance and its plan may serve concurrent runs (one ``Sampler``
  used from several threads): ``plan`` and ``step`` keep nothing on ``self`` or in module state; state-sized
  scratch comes from ``run.buffer`` / ``run.push`` (or the locals of ``integrate``).
  ``tests/test_threads.py`` samples every registered solver from 4 threads, bitwise the serial results.
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


def fused_x0_tables(cx, coef, a, b, max_order: int, noise=None) -> dict:
    """The tables of a data-prediction multistep step made in ONE launch (``Run.push_update``).

    The update ``x_{n+1} = cx x_n + sum_j coef[:, j] x0_{n-j} (+ noise)`` with the new prediction
    ``x0_n = a x_n + b F`` (F the raw model output) folded in: for order k, ``f{k}`` weighs the inputs
    (x_n, F, x0_{n-1}, ..., x0_{n-k+1}) with (cx + c_0 a, c_0 b, c_1, ..., c_{k-1}) and ``h{k}`` writes x0_n
    = (a, b, 0, ..., 0) over the same inputs into the history (no noise column). Folded in float64 here."""
    tables = {}
    for k in range(1, max_order + 1):
        c0 = coef[:, 0]
        tables[f"f{k}"] = table(cx + c0 * a, c0 * b, *[coef[:, j] for j in range(1, k)], noise=noise)
        zero = torch.zeros_like(a)
        tables[f"h{k}"] = table(a, b, *[zero] * (k - 1))[:, :-1]
    return tables


class Solver:
    """Base class; subclasses set ``info`` and implement ``plan`` and ``step``."""

    info: SolverInfo
    # True for a solver whose step n reuses a model evaluation made in step n-1 at the state it predicted
    # (UniPC): nothing may move the state between its steps (predictor_corrector.py refuses it).
    carries_evaluation: bool = False

    def plan(self, model, grid: torch.Tensor) -> Plan:
        raise NotImplementedError

    def step(self, run, n: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class X0Multistep(Solver):
    """A multistep update in data prediction, ``x_{n+1} = c_x x_n + sum_j c_j x0_{n-j} (+ s z)``: the shape
    shared by the stochastic DPM-Solver++(2M/3M) and ER-SDE solvers. A subclass's ``plan`` computes the
    coefficients and calls ``x0_plan``; ``step`` is one evaluation, one history push of the x0 prediction
    and one fused update of the planned order."""

    max_order: int

    def x0_plan(self, model, grid, cx, coef, orders, noise=None) -> Plan:
        """``coef``: ``[n, max_order]`` float64 weights of x0_n, x0_{n-1}, ...; ``orders``: the order used at
        each step (Python ints); ``noise``: the per-step noise coefficient (or None)."""
        t0 = grid[:-1]
        a, b = model.conversion("x0", t0)
        tables = fused_x0_tables(cx, coef, a, b, self.max_order, noise)
        return Plan(grid, tables, t0[:, None], [1] * t0.numel(), {"orders": orders})

    def step(self, run, n: int) -> None:
        x = run.x
        k = run.plan.flags["orders"][n]
        past = [run.past("x0", j) for j in range(k - 1)]  # x0_{n-1}, ... (read before the push)
        run.push_update("x0", self.max_order, x, [x, run.evaluate(x, 0), *past], f"f{k}", f"h{k}", noise=True)


class AdaptiveSolver(Solver):
    """A solver that chooses its own steps from tolerances (``info.adaptive = True``).

    It has no plan of coefficients: ``Sampler`` calls ``integrate`` once per run instead of
    ``plan``/``step``. An adaptive solver may read device memory from the host once per attempted
    step (the accept/reject decision) and must say so in its docstring.

    Args:
        rtol, atol: relative and absolute tolerance of the local error estimate (per-sample RMS norm
            of ``err / (atol + rtol * max(|x_n|, |x_{n+1}|))``, the norm of Hairer, Norsett & Wanner II.4).
        h0: first step size in path time (default: the solver's heuristic).
        max_steps: limit on attempted steps (accepted + rejected); reaching it raises and names the fix.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, h0: float | None = None, max_steps: int = 10_000):
        for name, v in (("rtol", rtol), ("atol", atol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or v == float("inf"):
                raise ValueError(f"{name}={v!r} must be a positive finite number.")
        if h0 is not None and (isinstance(h0, bool) or not isinstance(h0, (int, float)) or not (h0 > 0)):
            raise ValueError(f"h0={h0!r} must be a positive number or None (the solver's heuristic).")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} must be a positive int.")
        self.rtol, self.atol, self.h0, self.max_steps = float(rtol), float(atol), h0, max_steps

    def with_tolerances(self, rtol=None, atol=None) -> "AdaptiveSolver":
        """A copy with the given tolerances (None keeps the current one)."""
        import copy

        other = copy.copy(self)
        AdaptiveSolver.__init__(other, self.rtol if rtol is None else rtol, self.atol if atol is None else atol,
                                self.h0, self.max_steps)
        return other

    def plan(self, model, grid) -> Plan:
        raise TypeError(f"{self.info.name} is adaptive: it has no fixed plan; call integrate().")

    def step(self, run, n: int) -> None:
        raise TypeError(f"{self.info.name} is adaptive: it has no fixed steps; call integrate().")

    def integrate(self, model, x: torch.Tensor, t_max: float, t_min: float, *, seed: torch.Tensor, backend: str,
                  sample_offset: int, check_finite: bool, trajectory: list | None = None,
                  callback=None) -> dict:
        """Integrate ``x`` (the state at t_max, updated in place) down to t_min.

        ``seed`` is the one-element int64 device tensor that keys any noise; ``trajectory`` (if a list)
        receives a clone of the state after every accepted step; ``callback(step=n, t=t_next, x=x)`` is
        called after every accepted step. Returns a dict with at least ``nfe`` (model calls),
        ``steps`` (accepted), ``rejected`` and ``grid`` (the accepted times, float64, decreasing, from
        t_max to t_min).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rtol={self.rtol:g}, atol={self.atol:g})"


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
