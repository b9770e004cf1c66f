"""Optimized time grids for a fixed NFE budget: ``fs.grids.optimize``.

The grid of a fixed-step solver is chosen to minimise the solver's endpoint error on a small pilot
batch, measured against a fine reference solve of the same probability-flow ODE:

    J(grid) = log RMS_{b, j} ( x_N(grid; x_T^b) - Phi(x_T^b) )_j ,   x_T^b ~ N(0, sigma(t_max)^2 I)

where ``x_N`` is ``fs.sample(model, x_T, solver, grid=grid)`` and ``Phi`` an RK4 solve with
``ref_steps`` steps (its own error is estimated by step halving and returned in the info).

This is the idea of Align Your Steps (Sabour, Fidler & Kreis, 2024, "Align Your Steps: Optimizing
Sampling Schedules in Diffusion Models", Sec. 3: the schedule is optimised against a pilot batch of
the actual model and solver) with AYS's KL upper bound (their eq. 6) replaced by the directly
measured pathwise endpoint error, which is what the benchmark reports; and of Watson et al. 2021
("Learning to Efficiently Sample from Diffusion Probabilistic Models", the dynamic program over a
fixed set of candidate times): here the times are continuous and the search is derivative-free,
because the error of a *multistep* solver does not decompose over steps (each step reads the
history), which the DP of Watson et al. needs.

Parameterization (always monotone and inside [t_min, t_max]): a coordinate ``c(t)`` that is
strictly monotone in t, with N = steps increments

    c_i = c(t_max) + (c(t_min) - c(t_max)) * sum_{k < i} w_k,   w = (1 - N eps) softmax(z) + eps,

mapped back with ``path.t_of_lambda``. ``c = lambda = log(alpha / sigma)`` (log-SNR, as in
DPM-Solver's grid, Lu et al. 2022 Sec. 3.3) when lambda is finite at both ends; otherwise (e.g.
rectified flow on [0, 1], where lambda(0) = +inf and lambda(1) = -inf) the bounded coordinate
``c = sigmoid(lambda)`` (= 1 - t on rectified flow). The floor ``eps = 1e-3 / N`` keeps every
increment positive. Every built-in grid is exactly representable (z_k = log of its floored increments; one with
an increment below the floor is skipped),
so the search starts from the best built-in grid on the pilot and can only improve on it there.

The optimizer is Nelder-Mead (scipy; adaptive coefficients of Gao & Han 2012 above 4 dimensions),
first on 3 Legendre coefficients of a smooth deformation of the starting logits, then on the N - 1
free logits (the softmax is shift invariant), with at most ``max_iter`` objective calls in all and
the best grid evaluated returned (see ``_search``). The model is a black box: it is only called,
never differentiated.

Cost in NFE (model evaluations of one sample; multiply by ``pilot`` for per-sample evaluations):
    reference:   4 * ref_steps * 1.5         (RK4 at ref_steps and at ref_steps / 2, for its error)
    objective:   nfe per call, times (number of built-in grids tried + optimizer calls)
``info["cost_nfe"]`` reports the total, ``info["objective_calls"]`` the calls.

Caching: results are kept in an in-memory dict keyed by (model, path, solver, nfe, t range, seed,
pilot, max_iter, ref_steps). The model part of the key is a content hash (SHA-256) when one can be
computed: a ``torch.nn.Module`` (class and state_dict) or a ``flowsolve.analytic`` problem (class and
parameters), or a bound method of one; otherwise the identity of the callable (valid while it is
alive; checked through a weak reference where the callable allows one). With ``cache_dir`` and a
content hash, results are also written to ``<cache_dir>/<hash>.json`` and read back by later sessions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import weakref

import torch

from .model import Model
from .paths import GaussianPath

__all__ = ["optimize", "clear_cache"]

_BUILTIN = ("logsnr", "edm", "uniform", "quadratic")
_CACHE: dict = {}
_REF_CACHE: dict = {}  # pilot references, shared by the solvers and budgets of one model
_FLOOR = 1e-3  # total weight of the increment floor (eps = _FLOOR / N per increment)


def clear_cache() -> None:
    """Empty the in-memory cache of ``optimize``."""
    _CACHE.clear()
    _REF_CACHE.clear()


# ------------------------------------------------------------------------------------------------
# model keys
# ------------------------------------------------------------------------------------------------
def _hash_value(h, v, depth=0) -> bool:
    """Feed ``v`` into the hash; False when it cannot be hashed by content."""
    if depth > 4:
        return False
    if isinstance(v, torch.Tensor):
        t = v.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return True
    if v is None or isinstance(v, (bool, int, float, str)):
        h.update(repr(v).encode())
        return True
    if isinstance(v, (tuple, list)):
        h.update(b"(")
        return all(_hash_value(h, e, depth + 1) for e in v)
    if isinstance(v, GaussianPath):
        digest, by_content = _object_key(v)
        h.update(digest.encode())
        return by_content
    return False


def _object_key(obj) -> tuple[str, bool]:
    """(SHA-256 of an object's type and attributes, whether every attribute was hashed by content).

    Keys a path (``DiscreteVP``'s alphas_cumprod, a VP's betas, ...) and a solver instance (its order,
    tau, predictor, intervals, noise_scale, ...) for the cache; an attribute that cannot be hashed by
    content (a user callable) enters by identity, which is valid only in this process (no disk cache).
    """
    h = hashlib.sha256(f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
    by_content = True
    for name, value in sorted(vars(obj).items()):
        h.update(name.encode())
        if not _hash_value(h, value, depth=1):
            h.update(f"id{id(value)}".encode())
            by_content = False
    return h.hexdigest(), by_content


def _content_hash(fn) -> str | None:
    """SHA-256 of a torch module's state or an analytic problem's parameters; None otherwise."""
    from . import analytic

    obj, method = fn, ""
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):  # a bound method: hash its object
        obj, method = fn.__self__, fn.__func__.__qualname__
    h = hashlib.sha256()
    h.update(f"{type(obj).__module__}.{type(obj).__qualname__}.{method}".encode())
    if isinstance(obj, torch.nn.Module):
        for k, v in obj.state_dict().items():
            h.update(k.encode())
            if not _hash_value(h, v):
                return None
        return h.hexdigest()
    if type(obj).__module__ == analytic.__name__:
        for k in sorted(vars(obj)):
            if k.startswith("_"):
                continue  # the analytic classes keep only caches of their parameters in private fields
            h.update(k.encode())
            if not _hash_value(h, vars(obj)[k]):
                return None
        return h.hexdigest()
    return None


def _model_key(model: Model):
    """(key, content hash or None, liveness check)."""
    digest = _content_hash(model.fn)
    path_key, path_by_content = _object_key(model.path)
    head = (path_key, model.predicts, model.time_convention)
    if digest is not None and path_by_content:
        return ("hash", digest) + head, digest, (lambda: True)
    fn = model.fn
    target = fn.__self__ if hasattr(fn, "__self__") and hasattr(fn, "__func__") else fn
    try:
        ref = weakref.ref(target)
        alive = lambda: ref() is target  # noqa: E731
    except TypeError:
        alive = lambda: True  # noqa: E731
    name = getattr(getattr(fn, "__func__", None), "__qualname__", "")
    return ("id", id(target), name) + head, None, alive


# ------------------------------------------------------------------------------------------------
# the grid parameterization
# ------------------------------------------------------------------------------------------------
class _Coordinate:
    """c(t): lambda when finite at both ends, else sigmoid(lambda); strictly decreasing in t."""

    def __init__(self, path: GaussianPath, t_max: float, t_min: float):
        self.path, self.t_max, self.t_min = path, t_max, t_min
        ends = path.lam(torch.tensor([t_max, t_min], dtype=torch.float64))
        self.kind = "lambda" if bool(torch.isfinite(ends).all()) else "sigmoid_lambda"
        self.c_hi, self.c_lo = (float(v) for v in self.of_t(torch.tensor([t_max, t_min], dtype=torch.float64)))

    def of_t(self, t: torch.Tensor) -> torch.Tensor:
        lam = self.path.lam(t)
        return lam if self.kind == "lambda" else torch.sigmoid(lam)

    def t_of(self, c: torch.Tensor) -> torch.Tensor:
        if self.kind == "lambda":
            return self.path.t_of_lambda(c)
        return self.path.t_of_lambda(torch.log(c) - torch.log1p(-c))

    def grid(self, z: torch.Tensor) -> torch.Tensor:
        """Decreasing grid of len(z) + 1 times from t_max to t_min (exact ends) from logits z."""
        n = z.numel()
        w = (1.0 - _FLOOR) * torch.softmax(z, 0) + _FLOOR / n
        frac = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])
        frac = frac / frac[-1]
        c = self.c_hi + frac * (self.c_lo - self.c_hi)
        t = self.t_of(c)
        t[0], t[-1] = self.t_max, self.t_min
        return torch.clamp(t, self.t_min, self.t_max)

    def logits(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Logits z with ``grid(z) ~= grid`` (None if the grid's increments fall below the floor)."""
        c = self.of_t(grid)
        frac = (c - self.c_hi) / (self.c_lo - self.c_hi)
        w = frac[1:] - frac[:-1]
        n = w.numel()
        p = (w - _FLOOR / n) / (1.0 - _FLOOR)
        if not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
            return None
        return torch.log(p)


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
def _check_solver(solver):
    from .solvers.base import AdaptiveSolver, get_solver

    s = get_solver(solver)  # ValueError naming the registered solvers for an unknown name
    if isinstance(s, AdaptiveSolver) or s.info.adaptive:
        raise ValueError(f"solver={s.info.name!r} is adaptive: it chooses its own grid; optimize a fixed-step solver "
                         f"such as 'dpm++2m', 'unipc2-bh2' or 'deis'.")
    if s.info.stochastic:
        raise ValueError(f"solver={s.info.name!r} is stochastic: the grid optimizer measures the pathwise error of an "
                         f"ODE solver against the probability-flow ODE; use a deterministic solver such as 'dpm++2m'.")
    return s


def _steps_for_nfe(model, solver, nfe: int, grid_name: str, t_max, t_min) -> int:
    """Steps whose planned NFE is exactly ``nfe`` (solvers may add warm-up evaluations)."""
    from .sample import Sampler

    per = solver.info.nfe_per_step
    seen = {}
    for steps in range(max(1, nfe // per), 0, -1):
        got = Sampler(model, solver, steps=steps, grid=grid_name, t_max=t_max, t_min=t_min).nfe
        seen[steps] = got
        if got == nfe:
            return steps
        if got < nfe:
            break
    low = Sampler(model, solver, steps=1, grid=grid_name, t_max=t_max, t_min=t_min).nfe
    if nfe < low:
        raise ValueError(f"nfe={nfe} is too small for solver={solver.info.name!r}: one step costs {low} model "
                         f"evaluations; pass nfe >= {low}.")
    raise ValueError(f"nfe={nfe} is not reachable by solver={solver.info.name!r} (steps -> NFE: "
                     f"{dict(sorted(seen.items()))}); pass one of those NFE values.")


def _pilot_batch(pilot, shape, path, t_max, seed, dtype, device):
    if isinstance(pilot, torch.Tensor):
        if pilot.dim() < 2 or pilot.shape[0] < 1:
            raise ValueError(f"pilot as a tensor must be a batch of initial states [B, ...]; got shape {tuple(pilot.shape)}.")
        return pilot.detach().to(dtype=dtype, device=device if device is not None else pilot.device).clone()
    if isinstance(pilot, bool) or not isinstance(pilot, int) or pilot < 1:
        raise ValueError(f"pilot={pilot!r} must be a positive int (the pilot batch size) or a tensor of initial states.")
    if shape is None:
        raise ValueError("shape=None: pass the shape of one sample (e.g. shape=(2,) or (3, 32, 32)) so that the pilot "
                         "batch can be drawn from the prior, or pass pilot=<tensor of initial states>.")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ValueError(f"shape={shape!r} must be a sequence of positive ints (one sample's shape).") from e
    if any(s < 1 for s in shape):
        raise ValueError(f"shape={shape!r} must be a sequence of positive ints (one sample's shape).")
    g = torch.Generator().manual_seed(int(seed))
    std = float(path.sigma(torch.tensor(t_max, dtype=torch.float64)))
    x = torch.randn((pilot,) + shape, generator=g, dtype=torch.float64) * std
    return x.to(dtype=dtype, device=device if device is not None else "cpu")


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}={v!r} must be an int >= {lo}.")


# ------------------------------------------------------------------------------------------------
# the optimizer
# ------------------------------------------------------------------------------------------------
def optimize(model, path=None, nfe: int = 10, solver="dpm++2m", *, pilot=256, shape=None, seed: int = 0,
             t_max=None, t_min=None, cache: bool = True, cache_dir=None, max_iter: int | None = None,
             ref_steps: int = 256, dtype=torch.float64, device=None, return_info: bool = False):
    """A decreasing float64 grid of path times for ``solver`` at exactly ``nfe`` model evaluations,
    optimized for the endpoint error on a pilot batch (see the module docstring for the method).

    Use it as ``fs.sample(model, x, solver=solver, grid=grid)``; its counted NFE is ``nfe``.

    Args:
        model: a ``fs.Model`` (only called, never differentiated).
        path: optional; if given it must be ``model.path`` (or equal to it).
        nfe: the NFE budget (steps are chosen so that ``fs.Sampler(...).nfe == nfe``, counting warm-up
            evaluations such as dpm++3m's first DPM-Solver++(2S) step).
        solver: a fixed-step deterministic solver name or instance.
        pilot: pilot batch size (drawn from N(0, sigma(t_max)^2 I), a torch.Generator seeded with
            ``seed``), or a tensor of initial states used as is.
        shape: the shape of one sample (needed when ``pilot`` is an int).
        seed: the pilot's seed; the result is deterministic given it.
        t_max, t_min: the time range (default: the path's sampling range).
        cache: use and fill the in-memory cache (and ``cache_dir`` if given).
        cache_dir: a folder for an on-disk cache (models with a content hash only; see module docstring).
        max_iter: objective calls of the optimizer after the built-in grids (default 20 per step, at most 400).
        ref_steps: RK4 steps of the reference solve (float64 on the path's default grid).
        dtype, device: of the pilot state (float64 by default).
        return_info: also return a dict: the init grid, pilot errors, calls, cost in NFE, ...

    Returns: grid (float64 CPU tensor, ``steps + 1`` decreasing times from t_max to t_min) [, info].
    """
    from . import grids as _grids
    from .sample import Sampler

    if not isinstance(model, Model):
        raise TypeError("model must be a fs.Model; wrap your callable: fs.Model(fn, path, predicts='eps').")
    if path is not None and path is not model.path and repr(path) != repr(model.path):
        raise ValueError(f"path={path!r} differs from model.path={model.path!r}; the grid is optimized for the model's "
                         f"own path: pass path=None.")
    path = model.path
    s = _check_solver(solver)
    _check_int("nfe", nfe, 1)
    _check_int("ref_steps", ref_steps, 2)
    if max_iter is not None:
        _check_int("max_iter", max_iter, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int.")
    hi, lo = _grids.time_range(path, t_max, t_min)

    # built-in grids the solver can run on this range
    candidates = []
    for name in _BUILTIN:
        try:
            Sampler(model, s, steps=2, grid=name, t_max=hi, t_min=lo)
        except ValueError:
            continue
        candidates.append(name)
    if not candidates:  # let the sampler say why
        Sampler(model, s, steps=2, grid="uniform", t_max=hi, t_min=lo)
    steps = _steps_for_nfe(model, s, nfe, candidates[0], hi, lo)
    if max_iter is None:
        max_iter = min(400, 20 * steps)

    key = None
    digest = None
    if cache:
        mkey, digest, alive = _model_key(model)
        pkey = ("tensor", hashlib.sha256(pilot.detach().cpu().contiguous().numpy().tobytes()).hexdigest()) \
            if isinstance(pilot, torch.Tensor) else (pilot, tuple(shape) if shape is not None else None)
        solver_key, solver_by_content = _object_key(s)  # the solver's options, not only its name
        if not solver_by_content:
            digest = None  # an option held by identity: in-memory cache only
        key = mkey + (s.info.name, solver_key, nfe, hi, lo, seed, pkey, max_iter, ref_steps, str(dtype))
        hit = _CACHE.get(key)
        if hit is not None and hit[2]():
            return _result(hit[0].clone(), dict(hit[1], cache_hit=True), return_info)
        disk = _disk_path(cache_dir, digest, key)
        if disk is not None and os.path.isfile(disk):
            with open(disk) as fh:
                stored = json.load(fh)
            if stored.get("key") == repr(key):
                grid = torch.tensor(stored["grid"], dtype=torch.float64)
                _CACHE[key] = (grid, stored["info"], alive)
                return _result(grid.clone(), dict(stored["info"], cache_hit=True, cache_file=disk), return_info)

    x_T = _pilot_batch(pilot, shape, path, hi, seed, dtype, device)
    n_pilot = x_T.shape[0]

    # reference: float64 RK4 on the path's default grid (uniform if that grid is not valid here)
    ref_grid = path.default_grid
    try:
        _grids.make_grid(ref_grid, path, 2, t_max=hi, t_min=lo)
    except ValueError:
        ref_grid = "uniform"
    kw = dict(solver="rk4", grid=ref_grid, t_max=hi, t_min=lo)
    ref_key = None if key is None else mkey + (hi, lo, seed, pkey, ref_steps, str(dtype), ref_grid)
    ref_nfe = 4 * ref_steps + 4 * (ref_steps // 2)
    hit = _REF_CACHE.get(ref_key) if ref_key is not None else None
    if hit is not None and hit[2]() and torch.equal(hit[3], x_T.cpu()):
        ref, ref_err, ref_reused = hit[0].to(x_T.device), hit[1], True
    else:
        ref = Sampler(model, steps=ref_steps, **kw).sample(x_T)
        half = Sampler(model, steps=ref_steps // 2, **kw).sample(x_T)
        ref_err = float((ref - half).double().pow(2).mean().sqrt()) / 15.0  # RK4: err(N) ~ |x_N - x_{N/2}| / 15
        ref_reused = False
        if ref_key is not None:
            if len(_REF_CACHE) >= 8:  # a few references only: each is a pilot-sized tensor
                _REF_CACHE.pop(next(iter(_REF_CACHE)))
            _REF_CACHE[ref_key] = (ref.cpu(), ref_err, alive, x_T.cpu())

    calls = 0

    def pilot_error(grid: torch.Tensor) -> float:
        nonlocal calls
        calls += 1
        try:
            x = Sampler(model, s, grid=grid).sample(x_T)
        except (ValueError, FloatingPointError):
            return math.inf
        e = float((x - ref).double().pow(2).mean().sqrt())
        return e if math.isfinite(e) else math.inf

    coord = _Coordinate(path, hi, lo)
    init_errors = {}
    best = (math.inf, None, None)  # (error, logits, name)
    for name in candidates:
        g = _grids.make_grid(name, path, steps, t_max=hi, t_min=lo)
        z = coord.logits(g)
        if z is None:
            continue
        e = pilot_error(coord.grid(z))
        init_errors[name] = e
        if e < best[0]:
            best = (e, z, name)
    if best[1] is None:
        raise ValueError(f"no built-in grid gives a finite error for solver={s.info.name!r} at nfe={nfe} on "
                         f"{type(path).__name__} between t_max={hi} and t_min={lo}; check the model there.")
    init_error, z0, init_name = best
    z_best, e_best = z0.clone(), init_error

    if steps >= 2 and max_iter > 0:
        z_best, e_best = _search(pilot_error, coord, z0, e_best, steps, max_iter)
    if ref_err > 0.01 * e_best:
        warnings.warn(f"the pilot reference's estimated error ({ref_err:.2e}, RK4 with ref_steps={ref_steps}) is not "
                      f"small against the optimized pilot error ({e_best:.2e}): the grid may be fitted to the "
                      f"reference's error; pass a larger ref_steps.", stacklevel=2)
    grid = coord.grid(z_best)
    if not (bool((grid[1:] < grid[:-1]).all()) and float(grid[0]) == hi and float(grid[-1]) == lo):
        raise RuntimeError("internal error: the optimized grid is not strictly decreasing from t_max to t_min.")
    info = {
        "solver": s.info.name, "nfe": nfe, "steps": steps, "t_max": hi, "t_min": lo, "seed": seed,
        "pilot": n_pilot, "coordinate": coord.kind, "init": init_name, "init_errors": init_errors,
        "pilot_error": e_best, "init_pilot_error": init_error, "objective_calls": calls,
        "reference": {"solver": "rk4", "steps": ref_steps, "grid": ref_grid, "error_estimate": ref_err, "nfe": ref_nfe,
                      "reused": ref_reused},
        "cost_nfe": (0 if ref_reused else ref_nfe) + calls * nfe,
        "cost_sample_evals": ((0 if ref_reused else ref_nfe) + calls * nfe) * n_pilot,
        "cache_hit": False,
    }
    if cache:
        _CACHE[key] = (grid.clone(), info, alive)
        disk = _disk_path(cache_dir, digest, key)
        if disk is not None:
            os.makedirs(cache_dir, exist_ok=True)
            with open(disk, "w") as fh:
                json.dump({"key": repr(key), "grid": grid.tolist(), "info": info}, fh)
    return _result(grid, info, return_info)


class _BudgetSpent(Exception):
    pass


def _nelder_mead(f, u0, scale):
    """scipy Nelder-Mead from u0 with an axis simplex of size ``scale``, until f raises _BudgetSpent or
    it converges (f keeps the best point itself)."""
    import numpy as np
    from scipy.optimize import minimize

    d = u0.size
    simplex = np.vstack([u0] + [u0 + scale * np.eye(d)[k] for k in range(d)])
    try:
        minimize(f, u0, method="Nelder-Mead", options={"maxfev": 10**6, "initial_simplex": simplex,
                                                       "adaptive": d > 4, "xatol": 1e-4, "fatol": 1e-5})
    except _BudgetSpent:
        pass


def _search(pilot_error, coord, z0, e0, steps, max_iter):
    """Minimise the log pilot error over the logits with at most ``max_iter`` objective calls,
    keeping the best grid evaluated (never worse than the start z0):

    1. a smooth deformation of the start: z = z0 + sum_{j=1..q} a_j P_j(x_k), Legendre polynomials P_j
       on the step positions x_k in [-1, 1], q = min(3, steps - 1) coefficients (40% of the budget):
       few parameters, so Nelder-Mead converges in the budget;
    2. every free logit (z_N stays fixed: softmax is shift invariant), Nelder-Mead then one restart
       from its best point with a smaller simplex (the rest of the budget).
    """
    import numpy as np

    best = {"z": z0.clone(), "e": e0}
    state = {"calls": 0, "limit": 0}

    def log_err(z):
        if state["calls"] >= state["limit"]:
            raise _BudgetSpent
        state["calls"] += 1
        z = torch.as_tensor(z, dtype=torch.float64)
        e = pilot_error(coord.grid(z))
        if e < best["e"]:
            best["z"], best["e"] = z.clone(), e
        return math.log(e) if e > 0 and math.isfinite(e) else 1e3

    q = min(3, steps - 1)
    x = np.linspace(-1.0, 1.0, steps)
    basis = np.stack([np.polynomial.legendre.Legendre.basis(j)(x) for j in range(1, q + 1)], axis=1)
    zb = z0.numpy().copy()
    state["limit"] = int(0.4 * max_iter)
    _nelder_mead(lambda a: log_err(zb + basis @ a), np.zeros(q), 0.5)
    state["limit"] = max_iter
    for scale in (0.3, 0.1):
        last = float(best["z"][-1])
        if state["calls"] >= max_iter:
            break
        _nelder_mead(lambda v: log_err(np.append(v, last)), best["z"][:-1].numpy().copy(), scale)
    return best["z"], best["e"]


def _disk_path(cache_dir, digest, key):
    if cache_dir is None or digest is None:
        return None
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
    return os.path.join(os.fspath(cache_dir), f"grid-{name}.json")


def _result(grid, info, return_info):
    return (grid, info) if return_info else grid
