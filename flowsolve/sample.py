"""``fs.sample``: the sampling loop.

The loop is the same for every solver: plan (float64, host, once), move the tables to the device
in the accumulation dtype, then for each step call ``solver.step(run, n)``, which evaluates the
model at planned times and combines tensors with the fused kernel, reading coefficients by a step
index that lives in device memory. Nothing inside the loop reads device memory from the host:
no ``.item()``, no Python float computed per step (tested with a TorchDispatchMode).
"""
from __future__ import annotations

import torch

from . import checks as _checks
from . import grids as _grids
from .kernels import STREAM_INIT, STREAM_STEP, lincomb, lincomb_torch, normal_, resolve_backend
from .kernels.seed import resolve_seed, seed_tensor, seed_value
from .model import GuardedModel, Model, host_default, user_default_device
from .solvers.base import AdaptiveSolver, Plan, get_solver


class Run:
    """The state of one sampling run: device tables, buffers, step index, seed, NFE count."""

    def __init__(self, model: Model, plan: Plan, x: torch.Tensor, seed: torch.Tensor, backend: str,
                 sample_offset: int, check_finite: bool, denoise: bool = False, host_coefficients: bool = True):
        self.model, self.plan, self.x = model, plan, x
        self.backend, self.sample_offset, self.check_finite = backend, sample_offset, check_finite
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.tables = {k: v.to(device=x.device, dtype=acc) for k, v in plan.tables.items()}
        self.t_eval = plan.t_eval.to(device=x.device, dtype=x.dtype)
        # the model's [B] time vector of every evaluation, laid out once: step n, column c is a view
        # (no index_select, no fill per evaluation; a model that writes into t changes only its own row)
        b = x.shape[0] if x.dim() > 0 else 1
        self._t_rows = self.t_eval.unsqueeze(-1).expand(*self.t_eval.shape, b).contiguous()
        self.step_index = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.seed = seed
        self.nfe = 0
        self._buffers: dict[str, torch.Tensor] = {}
        self._history: dict[str, list[torch.Tensor]] = {}
        self._n = 0
        # CPU tensors on the torch twin: host and device memory are one, so the step's coefficients and times are
        # read as Python floats by the Python step number instead of through the device step index (same values;
        # a few tensor ops fewer per step, most of a small batch's cost). CUDA, Triton and torch.compile keep the
        # device-index path that CUDA graphs and fullgraph tracing need.
        self._host_rows = None
        if host_coefficients and x.device.type == "cpu" and backend == "torch" and not torch.compiler.is_compiling():
            self._host_rows = {k: v.tolist() for k, v in self.tables.items()}
        # the x0 prediction of the first evaluation of each step, for callback(..., denoised=): planned only when
        # a callback asks for it (float64 conversion rows per evaluation column, moved to the device once)
        self.denoised: torch.Tensor | None = None
        self._x0_rows, self._x0_ok = None, None
        if denoise:
            n, cols = plan.t_eval.shape
            flat = plan.t_eval.reshape(-1)
            ok = torch.isfinite(flat)
            ok[ok.clone()] = model.can_convert("x0", flat[ok])
            a, b = model._raw_conversion("x0", torch.where(ok, flat, torch.zeros_like(flat)))
            rows = torch.stack([a.where(ok, torch.zeros_like(a)), b.where(ok, torch.zeros_like(b))], 1)
            self._x0_rows = rows.reshape(n, cols, 2).to(device=x.device, dtype=acc)
            self._x0_ok = ok.reshape(n, cols).tolist()

    def buffer(self, name: str) -> torch.Tensor:
        """A state-shaped scratch tensor, allocated once per run."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty_like(self.x)
        return self._buffers[name]

    def _slot(self, key: str, depth: int) -> torch.Tensor:
        hist = self._history.setdefault(key, [])
        return hist.pop() if len(hist) >= depth else torch.empty_like(self.x)

    def push(self, key: str, depth: int, inputs, table: str) -> torch.Tensor:
        """Write ``combine(inputs, table)`` into history ``key`` as its newest entry (lag 0), keeping
        ``depth`` entries: the oldest buffer is reused, so a multistep history allocates once."""
        slot = self._slot(key, depth)
        self.combine(slot, inputs, table)
        self._history[key].insert(0, slot)
        return slot

    def push_update(self, key: str, depth: int, out: torch.Tensor, inputs, table: str, push_table: str,
                    noise: bool = False, stream: int = STREAM_STEP) -> torch.Tensor:
        """One launch for a multistep step: ``out = combine(inputs, table)`` (with noise if asked) and, in the
        same pass, the new history entry ``combine(inputs, push_table)`` of ``key`` (``push_table`` has no noise
        column). ``inputs`` may hold history entries (read before the push) but never the slot the push reuses
        (the oldest of ``depth``): callers read lags up to ``depth - 2``. Returns the new entry."""
        slot = self._slot(key, depth)
        self.combine(out, inputs, table, noise=noise, stream=stream, out2=slot, table2=push_table)
        self._history[key].insert(0, slot)
        return slot

    def past(self, key: str, lag: int) -> torch.Tensor:
        """History entry ``lag`` steps back (0 = newest)."""
        return self._history[key][lag]

    def evaluate(self, x: torch.Tensor, col: int) -> torch.Tensor:
        """The raw model output at the planned time ``t_eval[step, col]``, as a [B] time tensor."""
        t = self._t_rows[self._n, col]
        if t.shape[0] != x.shape[0]:  # an evaluation at a batch other than the state's (guidance doubles it)
            t = t[:1].expand(x.shape[0])
        try:
            out = self.model(x, t)  # Model.__call__ casts a half-precision output to x's (the state's) dtype
        except Exception as e:  # the same exception, with where it happened (a RuntimeError on Python 3.10)
            _checks.reraise_with_note(e, f"flowsolve: raised by the model at step {self._n} of {self.plan.n_steps} "
                                         f"(t={float(self.plan.t_eval[self._n, col]):.6g}, evaluation {col} of the step)")
        self.nfe += 1
        if self._x0_ok is not None and self.denoised is None and self._x0_ok[self._n][col]:
            row = self._x0_rows.index_select(0, self.step_index)[0, col]
            self.denoised = x.to(row.dtype) * row[0] + out.to(row.dtype) * row[1]
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"the model returned NaN/inf at step {self._n} (t={self.plan.t_eval[self._n, col].item():.6g}, "
                f"evaluation {col}); check the model at this time or raise t_min."
            )
        return out

    def combine(self, out: torch.Tensor, inputs, table: str, noise: bool = False, stream: int = STREAM_STEP,
                out2: torch.Tensor | None = None, table2: str | None = None) -> torch.Tensor:
        """``out = sum_i C[step, i] inputs[i] (+ C[step, K] z)`` with the fused kernel; a solver drawing
        several noises in one step gives each its own ``stream`` (STREAM_STEP + 8, + 9, ...). ``out2``/``table2``:
        a second, noise-free output of the same inputs, written in the same launch."""
        c2 = None if table2 is None else self.tables[table2]
        if self._host_rows is not None and not torch.compiler.is_compiling():
            return lincomb_torch(out, inputs, self.tables[table], self.step_index, self.seed if noise else None,
                                 sample_offset=self.sample_offset, stream=stream,
                                 host_row=self._host_rows[table][self._n], out2=out2, coef2=c2,
                                 host_row2=None if table2 is None else self._host_rows[table2][self._n])
        return lincomb(out, inputs, self.tables[table], self.step_index, self.seed if noise else None,
                       sample_offset=self.sample_offset, stream=stream, backend=self.backend, out2=out2, coef2=c2)

    def advance(self):
        self.step_index.add_(1)
        self._n += 1
        self.denoised = None


def _initial_state(noise_or_shape, prior_std: float, seed, dtype, device, backend, sample_offset):
    if isinstance(noise_or_shape, torch.Tensor):
        x = noise_or_shape
        if not x.is_floating_point():
            raise TypeError(f"the initial state has dtype {x.dtype}; pass a floating-point tensor (float32 or float64).")
        _checks.check_state(x)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # the solver state is fp32 (fp64 for verification); the model may cast inside
        return x.clone(memory_format=torch.contiguous_format)
    shape = _checks.as_shape(noise_or_shape)
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
        with torch.device("cpu"):  # planning is host float64 work, whatever torch.set_default_device says
            self._plan(model, solver, steps, grid, t_max, t_min, rtol, atol)

    def _plan(self, model, solver, steps, grid, t_max, t_min, rtol, atol):
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
            ends = torch.tensor([self.t_max, self.t_min], dtype=torch.float64)
            a, b = model._raw_conversion("velocity", ends)
            self._f32_problem = _f32_problem({"velocity conversion": torch.stack([a, b], 1)}, ends.reshape(2, 1),
                                             self.solver.info.name, [self.t_max, self.t_min])
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
        try:
            self.plan = self.solver.plan(model, t_grid)
        except (ZeroDivisionError, OverflowError) as e:  # steps that collapse in the solver's own time variable
            raise ValueError(
                f"{self.solver.info.name} cannot plan the grid {_short(t_grid)} on {type(path).__name__}: two of its "
                f"points coincide in the solver's time variable (log-SNR / noise level) after rounding ({e}). Use a "
                f"wider t_max - t_min, fewer steps, or another grid."
            ) from e
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
        self._f32_problem = _f32_problem(self.plan.tables, self.plan.t_eval, self.solver.info.name, self.times)

    @property
    def nfe(self) -> int | None:
        """Model evaluations one run makes (exact, from the plan); None for an adaptive solver (see
        ``return_info``: its NFE is known only after the run)."""
        return None if self.plan is None else self.plan.nfe

    @torch.no_grad()  # the loop updates buffers in place; a model with parameters must not build a graph here
    def sample(self, noise_or_shape, *, seed=None, generator=None, dtype=torch.float32, device=None, backend=None,
               sample_offset: int = 0, return_trajectory: bool = False, return_info: bool = False, progress=False,
               callback=None, check_finite: bool | None = None, check_independence: bool = False,
               check_inplace: bool = False, cuda_graph: bool = False):
        """Run the planned sampler under ``torch.no_grad()``. See ``fs.sample`` for the arguments and the return value."""
        for name, v in (("return_trajectory", return_trajectory), ("return_info", return_info),
                        ("check_independence", check_independence), ("check_inplace", check_inplace),
                        ("cuda_graph", cuda_graph)):
            _checks.check_bool(name, v)
        if check_finite is not None:
            _checks.check_bool("check_finite", check_finite)
        if not isinstance(progress, (bool, dict)):
            raise TypeError(f"progress={progress!r} must be True, False or a dict of tqdm keyword arguments "
                            f"(e.g. {{'file': sys.stdout}}).")
        _checks.check_callback(callback)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}. "
                                f"For an int seed pass seed= instead.")
            if seed is not None:
                raise ValueError("pass either seed= or generator=, not both (generator= is seed=<torch.Generator>).")
            seed = generator
        if isinstance(noise_or_shape, torch.Tensor):
            if device is not None:
                want = _checks.check_device(device)
                have = noise_or_shape.device
                if want.type != have.type or (want.index is not None and want.index != have.index):
                    raise ValueError(f"device={device!r} but the initial state is on {have}; the state's device is used: "
                                     f"drop device= or move the tensor (x.to({str(want)!r})).")
            device = noise_or_shape.device
        device = _checks.check_device(device)  # None: torch's default device, where torch.randn would sample
        sample_offset = _checks.check_sample_offset(sample_offset)
        be = resolve_backend(backend, device)
        # None / a Generator: a 64-bit key drawn here, after the argument checks (a refused call draws nothing);
        # seed=None and a run that draws no noise (a deterministic solver from a given x(t_max)): no key at all
        draws = not isinstance(noise_or_shape, torch.Tensor) or self.solver.info.stochastic
        seed = None if (seed is None and not draws) else resolve_seed(seed)
        seed_t = seed_tensor(0 if seed is None else seed, device)
        if cuda_graph:
            return self._sample_graphed(noise_or_shape, seed, seed_t, dtype, device, be, sample_offset,
                                        return_trajectory, return_info, progress, callback, check_finite,
                                        check_independence, check_inplace)
        user_device = user_default_device()  # None unless torch.set_default_device moved it off the CPU
        with host_default(user_device):  # our code assumes the CPU default device; the model gets the user's
            x = _initial_state(noise_or_shape, self.prior_std, seed_t, dtype, device, be, sample_offset)
            if x.dtype == torch.float32 and self._f32_problem is not None:
                raise ValueError(self._f32_problem)
            check_finite = self.model.check_finite if check_finite is None else check_finite
            if check_finite:
                _checks.check_finite_state(x)
            if check_independence:  # two model calls at t_max, before the loop (not counted in nfe); also in place
                _checks.check_model(self.model if user_device is None else GuardedModel(self.model, device=user_device),
                                    x, self.t_max)
            adaptive = self.plan is None
            model = self.model
            if check_inplace or user_device is not None or adaptive:
                # fixed-step runs say the step of a model error in Run.evaluate; adaptive ones here, by time
                where = (lambda t, k: f"flowsolve: raised by the model at t={float(t.reshape(-1)[0]):.6g} (model "
                                      f"evaluation {k} of the adaptive {self.solver.info.name} solve)") if adaptive else None
                model = GuardedModel(model, device=user_device, check_inplace=check_inplace, where=where)
            denoise = callback is not None and _checks.callback_wants_denoised(callback)
            if adaptive:
                result = self._sample_adaptive(model, x, seed_t, be, sample_offset, return_trajectory, progress,
                                               callback, check_finite, denoise)
            else:
                result = self._sample_fixed(model, x, seed_t, be, sample_offset, return_trajectory, progress,
                                            callback, check_finite, denoise)
        info = result.pop()
        if return_info:
            info["seed"] = None if seed is None else seed_value(seed)  # a tensor seed is read here, after the loop
            result.append(info)
        return result[0] if len(result) == 1 else tuple(result)

    def _sample_fixed(self, model, x, seed_t, backend, sample_offset, return_trajectory, progress, callback,
                      check_finite, denoise):
        """The fixed-step loop; returns [x, trajectory?, info] (info always: ``sample`` drops it if not asked)."""
        plan, solv = self.plan, self.solver
        run = Run(model, plan, x, seed_t, backend, sample_offset, check_finite, denoise=denoise)
        trajectory = [x.clone()] if return_trajectory else None
        bar = _progress_bar(progress, f"flowsolve {solv.info.name}", plan.n_steps)
        try:
            for n in range(plan.n_steps):
                solv.step(run, n)
                denoised = run.denoised
                run.advance()
                if trajectory is not None:
                    trajectory.append(x.clone())
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    if denoise:
                        callback(step=n, t=self.times[n + 1], x=x, denoised=denoised)
                    else:
                        callback(step=n, t=self.times[n + 1], x=x)
        finally:
            if bar is not None:
                bar.close()
        info = {"nfe": run.nfe, "planned_nfe": plan.nfe, "grid": plan.grid, "solver": solv.info.name}
        return [x] + ([trajectory] if return_trajectory else []) + [info]

    def _sample_graphed(self, noise_or_shape, seed, seed_t, dtype, device, backend, sample_offset, return_trajectory,
                        return_info, progress, callback, check_finite, check_independence, check_inplace):
        """``cuda_graph=True``: record the whole loop once per (shape, dtype, device, backend, sample_offset)
        and replay it (``flowsolve.cuda_graph.GraphedSampler``; the recordings are kept on this Sampler)."""
        from .cuda_graph import GraphedSampler

        extras = {"return_trajectory": return_trajectory, "progress": progress, "callback": callback is not None,
                  "check_finite": bool(check_finite), "check_independence": check_independence,
                  "check_inplace": check_inplace}
        used = [k for k, v in extras.items() if v]
        if used:
            raise ValueError(f"cuda_graph=True replays a recorded loop with no host code between steps; drop "
                             f"{', '.join(used)} (or sample without cuda_graph).")
        if isinstance(noise_or_shape, torch.Tensor):  # the eager path's checks: floating point, batch-first, finite size
            noise = _initial_state(noise_or_shape, self.prior_std, seed_t, dtype, device, backend, sample_offset)
            shape, dtype = tuple(noise.shape), noise.dtype
        else:
            noise = None
            shape = _checks.as_shape(noise_or_shape)
        if dtype == torch.float32 and self._f32_problem is not None:
            raise ValueError(self._f32_problem)
        key = (shape, dtype, str(device), backend, sample_offset)
        graphs = self.__dict__.setdefault("_graphed", {})
        if key not in graphs:
            graphs[key] = GraphedSampler(self, shape, dtype=dtype, device=device, backend=backend,
                                         sample_offset=sample_offset)
        x = graphs[key].sample(noise, seed=seed_t)
        if return_info:
            return x, {"nfe": self.plan.nfe, "planned_nfe": self.plan.nfe, "grid": self.plan.grid,
                       "solver": self.solver.info.name, "cuda_graph": True,
                       "seed": None if seed is None else seed_value(seed)}
        return x

    def _sample_adaptive(self, model, x, seed_t, backend, sample_offset, return_trajectory, progress, callback,
                         check_finite, denoise=False):
        """The adaptive solve; returns [x, trajectory?, info]."""
        solv = self.solver
        trajectory = [x.clone()] if return_trajectory else None
        bar = _progress_bar(progress, f"flowsolve {solv.info.name} (accepted steps)", None)
        user_callback = callback
        model = _RecordingModel(model) if denoise else model

        def on_step(step, t, x):
            if bar is not None:
                bar.update(1)
            if user_callback is not None:
                if denoise:
                    user_callback(step=step, t=t, x=x, denoised=model.denoised_at(x, t))
                else:
                    user_callback(step=step, t=t, x=x)

        try:
            stats = solv.integrate(model, x, self.t_max, self.t_min, seed=seed_t, backend=backend,
                                   sample_offset=sample_offset, check_finite=check_finite, trajectory=trajectory,
                                   callback=on_step if (bar is not None or user_callback is not None) else None)
        finally:
            if bar is not None:
                bar.close()
        info = {"planned_nfe": None, "solver": solv.info.name, "rtol": solv.rtol, "atol": solv.atol}
        info.update(stats)
        return [x] + ([trajectory] if return_trajectory else []) + [info]


class _RecordingModel(Model):
    """The model of an adaptive run whose callback asks for ``denoised``: every evaluation also forms its x0
    prediction ``a(t) x + b(t) raw`` (float64 conversion, one host read of t per evaluation: adaptive solvers
    sync once per attempted step anyway). ``denoised_at(x, t)`` returns it when the latest evaluation was at
    that state and time (every adaptive solver here evaluates the accepted point (x, t) before its callback:
    the FSAL stage of bosh3 / dopri5 / tsit5, ggf's next drift), else None (ggf's last step to t_min)."""

    def __init__(self, inner: Model):
        self.__dict__.update(inner.__dict__)
        self._inner = inner
        self._last = None  # (x data_ptr, t, x0 prediction)

    def __call__(self, x, t):
        out = self._inner(x, t)
        t0 = float(t.reshape(-1)[0])
        tt = torch.tensor([t0], dtype=torch.float64)
        if bool(self._inner.can_convert("x0", tt)):
            a, b = (float(v) for v in self._inner._raw_conversion("x0", tt))
            self._last = (x.data_ptr(), t0, x * a + out * b)
        else:
            self._last = None
        return out

    def denoised_at(self, x, t):
        if self._last is None or self._last[0] != x.data_ptr() or self._last[1] != float(t):
            return None
        return self._last[2]


def _progress_bar(progress, desc: str, total):
    """A tqdm bar (``progress=True``, or a dict of tqdm keyword arguments such as ``{"file": f}``), or None."""
    if progress is False:
        return None
    from tqdm.auto import tqdm

    kwargs = {"desc": desc, "total": total}
    if isinstance(progress, dict):
        kwargs.update(progress)
    return tqdm(**kwargs)


_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)


def _f32_problem(tables: dict, t_eval: torch.Tensor, solver: str, times) -> str | None:
    """Why a float32 run of this plan would silently give inf/NaN, or None. Computed once at plan time on the
    host (pure Python after one ``tolist``), so ``Sampler.sample`` decides without touching a tensor: a time
    that is nonzero in float64 but zero or subnormal in float32 (the model would see another time than the
    plan), or a coefficient beyond float32's range (the table would hold inf)."""
    lo = min(abs(float(t)) for t in times if float(t) != 0.0) if any(float(t) != 0.0 for t in times) else 1.0
    t_vals = [abs(v) for v in t_eval.reshape(-1).tolist() if v == v and v != 0.0]
    tiny = min([lo] + t_vals)
    if tiny < _F32_TINY:
        return (f"the grid of {solver} reaches t={tiny:.3g}, below float32's smallest normal number ({_F32_TINY:.3g}): "
                f"a float32 model would be evaluated at another time than planned. Raise t_min (e.g. t_min >= 1e-6, "
                f"or exactly 0 where the path allows it) or sample in float64 (dtype=torch.float64 / a float64 tensor).")
    for name, tab in tables.items():
        rows = tab.tolist()
        for n, row in enumerate(rows):
            # finite in float64 only: inf/NaN are singular points, refused with their own message elsewhere
            big = max((abs(v) for v in row if v == v and abs(v) != float("inf")), default=0.0)
            if big > _F32_MAX:
                t = times[n] if n < len(times) else float("nan")
                return (f"the {name!r} coefficients of {solver} at step {n} (t={t:.3g}) are {big:.3g}, beyond "
                        f"float32's range ({_F32_MAX:.3g}): a float32 run would give inf/NaN. Raise t_min (e.g. "
                        f"t_min >= 1e-6) or sample in float64 (dtype=torch.float64 / a float64 tensor).")
    return None


def _short(t_grid) -> str:
    v = [f"{float(t):.3g}" for t in t_grid]
    return "[" + ", ".join(v if len(v) <= 6 else v[:3] + ["..."] + v[-2:]) + "]"


def _adaptive_infos():
    from .solvers.base import solvers

    return [s for s in solvers() if s.adaptive]


def sample(model: Model, noise_or_shape, solver="heun", steps: int | None = None, grid=None, *, seed=None,
           generator=None, t_max=None, t_min=None, dtype=torch.float32, device=None, backend=None,
           sample_offset: int = 0, return_trajectory: bool = False, return_info: bool = False, progress=False,
           callback=None, check_finite: bool | None = None, check_independence: bool = False,
           check_inplace: bool = False, rtol: float | None = None, atol: float | None = None,
           cuda_graph: bool = False):
    """Sample from a model by integrating its PF-ODE or reverse SDE from t_max down to t_min.

    Args:
        model: a ``fs.Model``.
        noise_or_shape: the initial state x(t_max), used as is (scale unit noise by
            ``path.sigma(t_max)`` yourself, as in k-diffusion); or a batch-first shape, in which case
            x(t_max) is drawn from N(0, sigma(t_max)^2 I) with keyed noise (stream 1) from ``seed``.
            A float16/bfloat16 tensor is promoted to float32 (the solver state is fp32, or fp64).
        solver: a registered name (``fs.solvers()``) or a Solver instance.
        steps: number of steps (not NFE; see ``return_info``); default 10 with a named grid, the grid's
            length with a sequence of times. An int, a numpy integer or a one-element integer tensor.
        grid: "uniform" | "logsnr" | "edm" | "quadratic" | a decreasing sequence of path times (real; a complex
            grid is refused); None takes the path's default (``path.default_grid``).
        seed: keys all noise per global sample, so sample b is the same in any batch. None (the default): a
            fresh 64-bit key drawn from torch's global CPU generator (``seed=torch.default_generator``), so two
            calls give new samples, as ``torch.randn`` does, and ``torch.manual_seed(s)`` makes a run
            repeatable; the key used is ``info["seed"]`` (``return_info=True``): pass it back as ``seed=`` to
            redraw the same samples. An int (a numpy integer, a one-element integer tensor): that key, the
            same samples on every call, whatever the global generator. A torch.Generator: a 64-bit key drawn
            from it (two 32-bit ``torch.randint`` words on its device): the same generator state gives the
            same samples, and the draw advances the generator, as any torch sampling call does.
        generator: a torch.Generator, the same as ``seed=generator`` (the name torch users expect).
        t_max, t_min: the time range (default: the path's sampling range); a number, a numpy scalar or a
            one-element real tensor.
        dtype, device: of the state when a shape is given (float32 default; float64 for verification). The
            device defaults to torch's default device (the CPU unless ``torch.set_default_device`` says
            otherwise); every tensor flowsolve makes for the run (seed, step index, tables, times, initial
            noise) goes to the state's device, the planning to the CPU.
        backend: "auto" | "torch" | "triton" (see ``flowsolve.kernels.backend``).
        sample_offset: global index of the first sample of this batch (for sharding).
        return_trajectory: also return the list of states at every grid point.
        return_info: also return a dict with ``nfe`` (counted model calls), ``grid``, ``solver`` and ``seed``
            (the int key of the noise; None when ``seed=None`` and the run draws no noise: a deterministic
            solver from a given x(t_max) draws no key and leaves the global generator alone).
        progress: show a tqdm progress bar (one tick per step; per accepted step for adaptive solvers); True or
            a dict of tqdm keyword arguments (e.g. ``{"file": f}``).
        callback: ``callback(step=n, t=t_next, x=x, denoised=x0)`` after each step (x is the live state: clone
            to keep it). ``denoised`` is passed only to a callback that takes a ``denoised`` parameter (or
            ``**kwargs``), and only then computed: the x0 prediction of the FIRST model evaluation made in step
            n, in the state's dtype. For single-step solvers (euler, heun, midpoint, rk4, dpm2/3, ...) and
            multistep ones that evaluate at the step start (dpm++2m/3m, deis, ipndm, ancestral, SDEs) that is at
            (x_n, t_n), k-diffusion's ``denoised``; UniPC evaluates at the predicted end point t_{n+1} (step 0:
            at t_max); None for a step that makes no evaluation (UniPC's last step) or where the model gives
            no x0. Adaptive solvers: the evaluation at the accepted point (x, t) itself (FSAL stage), None on
            ggf's final step.
        check_finite: check the initial state and every model output for NaN/inf (syncs once per evaluation);
            default: the model's flag.
        check_independence: before the loop, run ``fs.check_model(model, x, t_max)`` (two model calls, not
            counted in NFE): a ValueError names the samples whose outputs depend on another sample, or says
            that the model changed x in place.
        check_inplace: check after EVERY model call that the model left its input x unchanged (a ValueError
            naming the step and the fix, clone x in the model): the model receives the solver's live state, and
            an in-place update would silently corrupt the run. One state copy, one comparison and one host
            sync per call: a debugging aid, off by default, refused with ``cuda_graph``.
        rtol, atol: tolerances of an adaptive solver (``fs.solvers()`` marks them ``adaptive``); an error
            for fixed-step solvers. Default: the solver's own (1e-5).
        cuda_graph: record the whole loop as a CUDA graph and replay it (``flowsolve.cuda_graph``); fixed-step
            solvers on a CUDA device, no callback / progress / trajectory / check_finite. The recording is kept
            on the Sampler: build ``fs.Sampler(...)`` once and call ``.sample(..., cuda_graph=True)`` per batch
            (``fs.sample`` records and replays once per call, which is correct but saves nothing).

    Runs under ``torch.no_grad()`` (the loop updates buffers in place: a network with parameters builds no
    graph). A float32 state whose grid reaches a time below float32's normal range, or whose planned
    coefficients exceed it, is refused with the fix (raise t_min or sample in float64).

    An exception raised by the model mid-run propagates unchanged (its type, arguments and traceback) with a
    note saying where: ``flowsolve: raised by the model at step n of N (t=..., evaluation k of the step)``
    (adaptive solvers: the time and the evaluation number). Notes (PEP 678) need Python >= 3.11; on 3.10 the
    exception is wrapped in a RuntimeError with that text, chained from the original.

    Returns: x(t_min) [, trajectory] [, info], in that order. For an adaptive solver ``info`` also has
    ``steps`` (accepted), ``rejected`` and ``grid`` (the accepted times).
    """
    sampler = Sampler(model, solver, steps, grid, t_max=t_max, t_min=t_min, rtol=rtol, atol=atol)
    return sampler.sample(noise_or_shape, seed=seed, generator=generator, dtype=dtype, device=device, backend=backend,
                          sample_offset=sample_offset, return_trajectory=return_trajectory, return_info=return_info,
                          progress=progress, callback=callback, check_finite=check_finite,
                          check_independence=check_independence, check_inplace=check_inplace, cuda_graph=cuda_graph)
