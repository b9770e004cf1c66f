"""``fs.sample``: the sampling loop.

The loop is the same for every solver: plan (float64, host, once), move the tables to the device
in the accumulation dtype, then for each step call ``solver.step(run, n)``, which evaluates the
model at planned times and combines tensors with the fused kernel, reading coefficients by a step
index that lives in device memory. Nothing inside the loop reads device memory from the host:
no ``.item()``, no Python float computed per step (tested with a TorchDispatchMode).
"""
from __future__ import annotations

import torch

from . import grids as _grids
from .kernels import STREAM_INIT, STREAM_STEP, lincomb, normal_, resolve_backend, seed_tensor
from .model import Model
from .solvers.base import AdaptiveSolver, Plan, get_solver


class Run:
    """The state of one sampling run: device tables, buffers, step index, seed, NFE count."""

    def __init__(self, model: Model, plan: Plan, x: torch.Tensor, seed: torch.Tensor, backend: str,
                 sample_offset: int, check_finite: bool):
        self.model, self.plan, self.x = model, plan, x
        self.backend, self.sample_offset, self.check_finite = backend, sample_offset, check_finite
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.tables = {k: v.to(device=x.device, dtype=acc) for k, v in plan.tables.items()}
        self.t_eval = plan.t_eval.to(device=x.device, dtype=x.dtype)
        self.step_index = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.seed = seed
        self.nfe = 0
        self._buffers: dict[str, torch.Tensor] = {}
        self._history: dict[str, list[torch.Tensor]] = {}
        self._n = 0

    def buffer(self, name: str) -> torch.Tensor:
        """A state-shaped scratch tensor, allocated once per run."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty_like(self.x)
        return self._buffers[name]

    def push(self, key: str, depth: int, inputs, table: str) -> torch.Tensor:
        """Write ``combine(inputs, table)`` into history ``key`` as its newest entry (lag 0), keeping
        ``depth`` entries: the oldest buffer is reused, so a multistep history allocates once."""
        hist = self._history.setdefault(key, [])
        slot = hist.pop() if len(hist) >= depth else torch.empty_like(self.x)
        self.combine(slot, inputs, table)
        hist.insert(0, slot)
        return slot

    def past(self, key: str, lag: int) -> torch.Tensor:
        """History entry ``lag`` steps back (0 = newest)."""
        return self._history[key][lag]

    def evaluate(self, x: torch.Tensor, col: int) -> torch.Tensor:
        """The raw model output at the planned time ``t_eval[step, col]``, as a [B] time tensor."""
        t = self.t_eval.index_select(0, self.step_index).select(1, col).expand(x.shape[0])
        out = self.model(x, t)
        self.nfe += 1
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"the model returned NaN/inf at step {self._n} (t={self.plan.t_eval[self._n, col].item():.6g}, "
                f"evaluation {col}); check the model at this time or raise t_min."
            )
        return out

    def combine(self, out: torch.Tensor, inputs, table: str, noise: bool = False, stream: int = STREAM_STEP) -> torch.Tensor:
        """``out = sum_i C[step, i] inputs[i] (+ C[step, K] z)`` with the fused kernel; a solver drawing
        several noises in one step gives each its own ``stream`` (STREAM_STEP + 8, + 9, ...)."""
        return lincomb(out, inputs, self.tables[table], self.step_index, self.seed if noise else None,
                       sample_offset=self.sample_offset, stream=stream, backend=self.backend)

    def advance(self):
        self.step_index.add_(1)
        self._n += 1


def _initial_state(noise_or_shape, prior_std: float, seed, dtype, device, backend, sample_offset):
    if isinstance(noise_or_shape, torch.Tensor):
        x = noise_or_shape
        if not x.is_floating_point():
            raise TypeError(f"the initial state has dtype {x.dtype}; pass a floating-point tensor (float32 or float64).")
        if x.dim() == 0:
            raise ValueError("the initial state must be batch-first [B, ...]; got a 0-d tensor.")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # the solver state is fp32 (fp64 for verification); the model may cast inside
        return x.clone(memory_format=torch.contiguous_format)
    try:
        shape = tuple(int(s) for s in noise_or_shape)
    except TypeError as e:
        raise TypeError(f"noise_or_shape must be a tensor x(t_max) or a shape like (B, D); got {noise_or_shape!r}.") from e
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"shape {shape} must be batch-first with positive sizes, e.g. (16, 2).")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype={dtype}: the solver state must be torch.float32 or torch.float64.")
    x = torch.empty(shape, dtype=dtype, device=device)
    normal_(x, seed, torch.zeros(1, dtype=torch.int64, device=device), sample_offset=sample_offset,
            stream=STREAM_INIT, backend=backend)
    return x.mul_(prior_std)


class Sampler:
    """A planned sampler: solver + model + time grid, with every coefficient computed once.

    ``fs.sample(model, x, ...)`` is ``Sampler(model, ...).sample(x, ...)``. Build a Sampler yourself
    to plan once and sample many batches; nothing in ``Sampler.sample`` reads device memory from the host.

    Args:
        model: a ``fs.Model``.
        solver: a registered name (``fs.solvers()``) or a Solver instance.
        steps: number of steps (not NFE: see ``nfe``); default 10 with a named grid, the grid's
            length with a sequence of times.
        grid: "uniform" | "logsnr" | "edm" | "quadratic" | a decreasing sequence of path times;
            None takes the path's default (``path.default_grid``).
        t_max, t_min: the time range (default: the path's sampling range).
    """

    def __init__(self, model: Model, solver="heun", steps: int | None = None, grid=None, *, t_max=None, t_min=None,
                 rtol: float | None = None, atol: float | None = None):
        if not isinstance(model, Model):
            if callable(model):
                raise TypeError("model must be a fs.Model; wrap your callable: fs.Model(fn, path, predicts='eps').")
            raise TypeError(f"model must be a fs.Model; got {type(model).__name__}.")
        self.model = model
        self.solver = get_solver(solver)
        path = model.path
        if isinstance(self.solver, AdaptiveSolver):
            if steps is not None or grid is not None:
                raise ValueError(
                    f"solver={self.solver.info.name!r} is adaptive: it chooses its own steps from rtol/atol; do not pass "
                    f"steps or grid (or use a fixed-step solver such as 'rk4' or 'dpm++3m')."
                )
            self.solver = self.solver.with_tolerances(rtol, atol)
            self.t_max, self.t_min = _grids.time_range(path, t_max, t_min)
            self.plan = None
            self.times = None
            self.prior_std = float(path.sigma(torch.tensor(self.t_max, dtype=torch.float64)))
            return
        if rtol is not None or atol is not None:
            raise ValueError(
                f"rtol/atol apply to adaptive solvers ({', '.join(s.name for s in _adaptive_infos())}); "
                f"{self.solver.info.name!r} takes steps= and grid= instead."
            )
        if isinstance(grid, str) or grid is None:
            t_grid = _grids.make_grid(grid, path, 10 if steps is None else steps, t_max=t_max, t_min=t_min)
        else:
            if t_max is not None or t_min is not None:
                raise ValueError("pass either a grid of times or t_max/t_min, not both.")
            t_grid = _grids.make_grid(grid, path, steps)
        self.plan = self.solver.plan(model, t_grid)
        for name, tab in self.plan.tables.items():
            bad = ~torch.isfinite(tab).all(dim=1)
            if bool(bad.any()):
                n = int(bad.nonzero()[0])
                raise ValueError(
                    f"the {name!r} coefficients of {self.solver.info.name} at step {n} (t={float(t_grid[n]):.6g} -> "
                    f"{float(t_grid[n + 1]):.6g}) are not finite on {type(path).__name__}: the path's ODE/SDE is "
                    f"singular there. Move t_max/t_min inside the path's range (e.g. t_max < 1 for an SDE on "
                    f"rectified flow)."
                )
        self.times = t_grid.tolist()
        self.t_max, self.t_min = self.times[0], self.times[-1]
        self.prior_std = float(path.sigma(t_grid[0]))

    @property
    def nfe(self) -> int | None:
        """Model evaluations one run makes (exact, from the plan); None for an adaptive solver (see
        ``return_info``: its NFE is known only after the run)."""
        return None if self.plan is None else self.plan.nfe

    def sample(self, noise_or_shape, *, seed=0, dtype=torch.float32, device=None, backend=None, sample_offset: int = 0,
               return_trajectory: bool = False, return_info: bool = False, progress: bool = False, callback=None,
               check_finite: bool | None = None):
        """Run the planned sampler. See ``fs.sample`` for the arguments and the return value."""
        if isinstance(noise_or_shape, torch.Tensor):
            device = noise_or_shape.device
        device = torch.device("cpu") if device is None else torch.device(device)
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
            raise ValueError(f"sample_offset={sample_offset!r} must be a non-negative int (the global index of x[0]).")
        seed_t = seed_tensor(seed, device)
        be = resolve_backend(backend, device)
        x = _initial_state(noise_or_shape, self.prior_std, seed_t, dtype, device, be, sample_offset)
        model, plan, solv = self.model, self.plan, self.solver
        if plan is None:
            return self._sample_adaptive(x, seed_t, be, sample_offset, return_trajectory, return_info, progress,
                                         callback, model.check_finite if check_finite is None else check_finite)
        run = Run(model, plan, x, seed_t, be, sample_offset, model.check_finite if check_finite is None else check_finite)
        trajectory = [x.clone()] if return_trajectory else None
        steps_iter = range(plan.n_steps)
        if progress:
            from tqdm.auto import tqdm

            steps_iter = tqdm(steps_iter, desc=f"flowsolve {solv.info.name}", total=plan.n_steps)
        for n in steps_iter:
            solv.step(run, n)
            run.advance()
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(step=n, t=self.times[n + 1], x=x)
        result = [x]
        if return_trajectory:
            result.append(trajectory)
        if return_info:
            result.append({"nfe": run.nfe, "planned_nfe": plan.nfe, "grid": plan.grid, "solver": solv.info.name})
        return result[0] if len(result) == 1 else tuple(result)

    def _sample_adaptive(self, x, seed_t, backend, sample_offset, return_trajectory, return_info, progress, callback,
                         check_finite):
        solv = self.solver
        trajectory = [x.clone()] if return_trajectory else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"flowsolve {solv.info.name} (accepted steps)")
        user_callback = callback

        def on_step(step, t, x):
            if bar is not None:
                bar.update(1)
            if user_callback is not None:
                user_callback(step=step, t=t, x=x)

        try:
            stats = solv.integrate(self.model, x, self.t_max, self.t_min, seed=seed_t, backend=backend,
                                   sample_offset=sample_offset, check_finite=check_finite, trajectory=trajectory,
                                   callback=on_step if (bar is not None or user_callback is not None) else None)
        finally:
            if bar is not None:
                bar.close()
        result = [x]
        if return_trajectory:
            result.append(trajectory)
        if return_info:
            info = {"planned_nfe": None, "solver": solv.info.name, "rtol": solv.rtol, "atol": solv.atol}
            info.update(stats)
            result.append(info)
        return result[0] if len(result) == 1 else tuple(result)


def _adaptive_infos():
    from .solvers.base import solvers

    return [s for s in solvers() if s.adaptive]


def sample(model: Model, noise_or_shape, solver="heun", steps: int | None = None, grid=None, *, seed=0,
           t_max=None, t_min=None, dtype=torch.float32, device=None, backend=None, sample_offset: int = 0,
           return_trajectory: bool = False, return_info: bool = False, progress: bool = False, callback=None,
           check_finite: bool | None = None, rtol: float | None = None, atol: float | None = None):
    """Sample from a model by integrating its PF-ODE or reverse SDE from t_max down to t_min.

    Args:
        model: a ``fs.Model``.
        noise_or_shape: the initial state x(t_max), used as is (scale unit noise by
            ``path.sigma(t_max)`` yourself, as in k-diffusion); or a batch-first shape, in which case
            x(t_max) is drawn from N(0, sigma(t_max)^2 I) with keyed noise (stream 1) from ``seed``.
            A float16/bfloat16 tensor is promoted to float32 (the solver state is fp32, or fp64).
        solver: a registered name (``fs.solvers()``) or a Solver instance.
        steps: number of steps (not NFE; see ``return_info``); default 10 with a named grid, the grid's
            length with a sequence of times.
        grid: "uniform" | "logsnr" | "edm" | "quadratic" | a decreasing sequence of path times;
            None takes the path's default (``path.default_grid``).
        seed: int, torch.Generator or one-element int64 tensor: keys all noise per global sample, so
            sample b is the same in any batch.
        t_max, t_min: the time range (default: the path's sampling range).
        dtype, device: of the state when a shape is given (float32 default; float64 for verification).
        backend: "auto" | "torch" | "triton" (see ``flowsolve.kernels.backend``).
        sample_offset: global index of the first sample of this batch (for sharding).
        return_trajectory: also return the list of states at every grid point.
        return_info: also return a dict with ``nfe`` (counted model calls), ``grid`` and ``solver``.
        progress: show a tqdm progress bar.
        callback: ``callback(step=n, t=t_next, x=x)`` after each step (x is the live state: clone to keep it).
        check_finite: check model outputs for NaN/inf (syncs once per evaluation); default: the model's flag.
        rtol, atol: tolerances of an adaptive solver (``fs.solvers()`` marks them ``adaptive``); an error
            for fixed-step solvers. Default: the solver's own (1e-5).

    Returns: x(t_min) [, trajectory] [, info], in that order. For an adaptive solver ``info`` also has
    ``steps`` (accepted), ``rejected`` and ``grid`` (the accepted times).
    """
    sampler = Sampler(model, solver, steps, grid, t_max=t_max, t_min=t_min, rtol=rtol, atol=atol)
    return sampler.sample(noise_or_shape, seed=seed, dtype=dtype, device=device, backend=backend,
                          sample_offset=sample_offset, return_trajectory=return_trajectory, return_info=return_info,
                          progress=progress, callback=callback, check_finite=check_finite)
