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

Caching: results are kept in an in-memory dict (guarded by a lock) keyed by (model, path, parameterization,
time convention, solver and its options, nfe, t range, seed, pilot, max_iter, ref_steps, dtype). The model
part of the key (``_model_key``) is one of:

* content, for a ``torch.nn.Module``, a flowsolve object (an analytic problem, an adapter around a network)
  or a bound method of either: a SHA-256 of what determines its function (``_Digest``): the module tree
  (every submodule's name and class), the code of every class in it (bytecode, constants and names of each
  method through the MRO, and of the global helper functions they call, two calls deep), all parameters and
  buffers (persistent or not, bitwise), each submodule's own ``__dict__`` attributes (plain data, tensors,
  arrays, functions by code and closure, Python objects by class and attributes), its ``training`` flag, its
  forward (pre-)hooks and the global forward hooks. If any attribute cannot be hashed by content (an object
  of a C type: a lock, a file, an extension handle) the model falls back to identity. Globals that methods
  read and that are neither plain data, tensors, functions, classes nor modules (a logger, a config object)
  enter by type only: change them and pass ``cache=False`` or a new ``cache_key``;
* ``cache_key``, for any callable when the caller passes ``cache_key="name-v1"``: the string plus a digest
  of what can be hashed (its code, closure, the weights it holds; other objects by type) -- the caller vouches
  for the rest;
* identity otherwise (a plain function, a closure, a callable object): ``id(fn)``, valid while it is alive
  (checked through a weak reference where it allows one) and in this process only.

With ``cache_dir`` and a content or ``cache_key`` key (and a path and solver hashed by content), results
are also written to ``<cache_dir>/grid-<hash>.json`` and read back by later sessions: written atomically
(a temp file in the folder, then ``os.replace``); the folder is checked before the optimization (an
unwritable one warns, and the grid is still returned); a file that cannot be read, is not the expected JSON
object, was written for another key, or holds a grid that is not finite, strictly decreasing, of the
budget's length and from t_max to t_min is a miss with a warning, and is replaced.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import types
import warnings
import weakref

import torch

from .model import Model
from .paths import GaussianPath

__all__ = ["optimize", "clear_cache"]

_BUILTIN = ("logsnr", "edm", "uniform", "quadratic")
_CACHE: dict = {}  # key -> (grid, info, alive); every access holds _LOCK (optimize may run in several threads)
_REF_CACHE: dict = {}  # pilot references, shared by the solvers and budgets of one model; under _LOCK too
_LOCK = threading.Lock()
_FLOOR = 1e-3  # total weight of the increment floor (eps = _FLOOR / N per increment)


def clear_cache() -> None:
    """Empty the in-memory caches of ``optimize`` (the disk cache is left alone)."""
    with _LOCK:
        _CACHE.clear()
        _REF_CACHE.clear()


# ------------------------------------------------------------------------------------------------
# model keys
# ------------------------------------------------------------------------------------------------
_KEY_VERSION = 2  # bump when what a key covers changes (old disk entries then miss)
_MAX_DEPTH = 8  # nesting of containers / functions followed by a digest
_GLOBAL_HOPS = 2  # a method's global helper functions are hashed with their code, and their helpers' too
_NN_INTERNALS = frozenset(vars(torch.nn.Module()))  # torch's per-module bookkeeping (hooks, params, buffers, training)
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _is_flowsolve(obj) -> bool:
    return (type(obj).__module__ or "").split(".")[0] == "flowsolve"


def _is_ndarray(obj) -> bool:
    np = sys.modules.get("numpy")  # never imported here: an array can only exist if numpy already is
    return np is not None and isinstance(obj, (np.ndarray, np.generic))


def _is_python_object(obj) -> bool:
    """An instance of a class written in Python throughout (no C base but object, no __slots__): its state is its
    ``__dict__``. Instances of C types (a lock, a file, a generator, an extension object) have hidden state."""
    heap = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class created by a class statement
    return hasattr(obj, "__dict__") and all(
        base is object or (base.__flags__ & heap and "__slots__" not in vars(base)) for base in type(obj).__mro__)


class _Digest:
    """A SHA-256 of values by content: what a model key is made of.

    Tensors by dtype, shape and bytes; plain data, containers, dtypes and devices by value; a torch module by
    its tree (every submodule's name and class), its parameters and buffers (persistent or not), each
    submodule's non-torch ``__dict__`` attributes, ``training`` flag and forward (pre-)hooks, and the global
    forward hooks; a class by its name and the code of its methods (bytecode, constants, names, defaults) and
    plain class attributes, through its MRO; a function by its name, code, defaults, closure cells and the
    globals its code reads; a flowsolve object (path, solver, analytic problem, adapter) by its class and
    attributes (an analytic problem's public ones: its private fields are caches of them).

    An object it cannot hash by content (a file handle, a lock, an extension object, ...) enters by identity:
    ``by_content`` becomes False and the digest is valid in this process only. Two exceptions, where identity
    would make nearly every real model uncacheable: a global read by a function or a class-level attribute
    (a logger, a config object) and, with ``strict=False`` (a user's ``cache_key``, who vouches for what cannot
    be hashed), any such object enter by their type name only.
    """

    def __init__(self, strict: bool = True):
        self.h = hashlib.sha256(f"flowsolve-grid-key-v{_KEY_VERSION} python{sys.version_info[:2]} "
                                f"torch{torch.__version__}".encode())
        self.strict, self.by_content = strict, True
        self._lenient = 0  # > 0 while hashing globals and class attributes
        self._hops = 0  # globals followed so far on the current path
        self._seen = {}  # id -> (object, name): classes, functions and objects already in the digest (cycles, sharing)

    def hexdigest(self) -> str:
        return self.h.hexdigest()

    def tag(self, s: str) -> None:
        self.h.update(s.encode("utf-8", "backslashreplace"))
        self.h.update(b"\0")

    def opaque(self, v) -> None:
        if self.strict and not self._lenient:
            self.tag(f"id:{_qualname(type(v))}:{id(v)}")
            self.by_content = False
        else:
            self.tag(f"type:{_qualname(type(v))}")

    def _once(self, obj, name: str) -> bool:
        """True the first time ``obj`` is met; later meetings (shared objects, cycles) enter as a reference."""
        hit = self._seen.get(id(obj))
        if hit is not None and hit[0] is obj:
            self.tag(f"ref:{hit[1]}")
            return False
        self._seen[id(obj)] = (obj, name)
        return True

    # ---- values
    def value(self, v, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return self.opaque(v)
        if isinstance(v, _PLAIN):
            self.tag(f"{type(v).__name__}:{v!r}")
        elif isinstance(v, torch.Tensor):
            self.tensor(v)
        elif isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout, range, slice)):
            self.tag(f"{type(v).__name__}:{v!r}")
        elif isinstance(v, enum.Enum):
            self.tag(f"enum:{_qualname(type(v))}.{v.name}")
        elif isinstance(v, (tuple, list)):
            self.tag(f"{type(v).__name__}[{len(v)}]")
            for e in v:
                self.value(e, depth + 1)
        elif isinstance(v, dict):
            self.tag(f"{type(v).__name__}[{len(v)}]")
            for k, e in v.items():
                self.value(k, depth + 1)
                self.value(e, depth + 1)
        elif isinstance(v, (set, frozenset)) and all(isinstance(e, _PLAIN) for e in v):
            self.tag(f"{type(v).__name__}:{sorted(repr(e) for e in v)!r}")
        elif isinstance(v, torch.nn.Module):
            if self._once(v, "module"):
                self.module(v, depth)
        elif isinstance(v, types.ModuleType):
            self.tag(f"pymodule:{v.__name__}")
        elif isinstance(v, type):
            self.klass(v, depth)
        elif isinstance(v, types.FunctionType):
            self.function(v, depth)
        elif isinstance(v, types.MethodType):
            self.tag("method")
            self.value(v.__self__, depth + 1)
            self.value(v.__func__, depth + 1)
        elif isinstance(v, types.BuiltinFunctionType) and (v.__self__ is None or
                                                           isinstance(v.__self__, (types.ModuleType, type))):
            self.tag(f"builtin:{_qualname(v)}")
        elif isinstance(v, functools.partial):
            self.tag("partial")
            for part in (v.func, v.args, v.keywords):
                self.value(part, depth + 1)
        elif _is_flowsolve(v) and hasattr(v, "__dict__"):
            if self._once(v, _qualname(type(v))):
                self.flowsolve_object(v, depth)
        elif _is_ndarray(v):
            self.ndarray(v)
        elif _is_python_object(v) and not self._lenient:  # e.g. an attention processor held by a module
            if self._once(v, _qualname(type(v))):
                self.klass(type(v), depth)
                for name, e in sorted(vars(v).items()):
                    self.tag(f"attr:{name}")
                    self.value(e, depth + 1)
        else:
            self.opaque(v)

    def ndarray(self, v) -> None:
        np = sys.modules["numpy"]
        if isinstance(v, np.generic):
            self.tag(f"np:{type(v).__name__}:{v!r}")
        elif v.dtype.hasobject:
            self.opaque(v)
        else:
            self.tag(f"ndarray:{v.dtype.str}:{v.shape}")
            self.h.update(np.ascontiguousarray(v).view(np.uint8).reshape(-1))

    def tensor(self, v: torch.Tensor) -> None:
        """Bitwise: dtype, shape and the raw bytes (any dtype, any device, any strides)."""
        try:
            if v.layout != torch.strided or v.is_quantized or v.device.type == "meta":
                raise TypeError(f"a {v.layout} / quantized / meta tensor")
            t = v.detach().to("cpu").contiguous().reshape(-1)
            self.tag(f"T:{t.dtype}:{tuple(v.shape)}")
            self.h.update(t.view(torch.uint8).numpy())
        except (TypeError, RuntimeError):
            self.opaque(v)

    def code(self, co: types.CodeType) -> None:
        """Bytecode, constants (nested code objects too), names and argument layout; not the file or line."""
        self.tag(f"code:{co.co_name}:{co.co_argcount}:{co.co_kwonlyargcount}:{co.co_flags}:{co.co_names!r}")
        self.h.update(co.co_code)
        for c in co.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c)
            elif isinstance(c, frozenset):  # `x in {"a", "b"}`: its repr's order follows the per-process str hash
                self.tag(f"const:frozenset:{sorted(repr(e) for e in c)!r}")
            else:
                self.tag(f"const:{type(c).__name__}:{c!r}")

    def function(self, fn: types.FunctionType, depth: int = 0) -> None:
        if not self._once(fn, _qualname(fn)):
            return
        self.tag(f"fn:{_qualname(fn)}")
        self.code(fn.__code__)
        self.value(fn.__defaults__, depth + 1)
        self.value(fn.__kwdefaults__, depth + 1)
        for cell in fn.__closure__ or ():
            try:
                self.value(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                self.tag("cell:empty")
        # the globals its code reads (and its nested functions' code): a helper function, a constant, a table
        # (followed for _GLOBAL_HOPS functions deep: forward -> helper -> helper's helper, not a library's call graph)
        if self._hops >= _GLOBAL_HOPS:
            return
        names, stack = [], [fn.__code__]
        while stack:
            co = stack.pop()
            names += co.co_names
            stack += [c for c in co.co_consts if isinstance(c, types.CodeType)]
        self._lenient += 1
        self._hops += 1
        try:
            for name in sorted(set(names)):
                if name in fn.__globals__:
                    self.tag(f"global:{name}")
                    self.value(fn.__globals__[name], depth + 1)
        finally:
            self._lenient -= 1
            self._hops -= 1

    def klass(self, cls: type, depth: int = 0) -> None:
        """A class by name and the code of every method through its MRO (torch.nn.Module and object excluded)."""
        if not self._once(cls, _qualname(cls)):
            return
        self.tag(f"class:{_qualname(cls)}")
        for base in cls.__mro__:
            if base in (torch.nn.Module, object):
                continue
            if base is not cls:
                self.tag(f"base:{_qualname(base)}")
                if not self._once(base, _qualname(base)):
                    continue
            for name, attr in sorted(vars(base).items()):
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if isinstance(attr, property):
                    attr = (attr.fget, attr.fset)
                elif not isinstance(attr, (types.FunctionType, tuple, list, dict) + _PLAIN):
                    continue  # descriptors, nested classes' instances...: their type's code is not the class's
                if name.startswith("__") and name.endswith("__") and not isinstance(attr, (types.FunctionType, tuple)):
                    continue  # __doc__, __module__, __slotnames__ (set by copy/pickle), __firstlineno__, ...
                self.tag(f"attr:{name}")
                self._lenient += 1
                try:
                    self.value(attr, depth + 1)
                finally:
                    self._lenient -= 1

    def module(self, m: torch.nn.Module, depth: int = 0) -> None:
        """Structure, code, parameters, buffers, non-torch attributes, training flags and forward hooks."""
        from torch.nn.modules import module as nn_module

        for name in ("_global_forward_pre_hooks", "_global_forward_hooks"):
            hooks = getattr(nn_module, name, {})
            self.tag(f"{name}[{len(hooks)}]")
            for hook in hooks.values():
                self.value(hook, depth + 1)
        for name, sub in m.named_modules(remove_duplicate=False):
            self.tag(f"sub:{name}")
            self.klass(type(sub), depth)
            attrs = vars(sub)
            self.tag(f"training:{attrs.get('training')!r}")
            for kind, flags in (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
                                ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"))):
                hooks = attrs.get(kind, {})
                self.tag(f"{kind}[{len(hooks)}]")
                for hid, hook in hooks.items():  # the handle ids are process-wide counters: not hashed
                    self.tag(repr([hid in attrs.get(f, {}) for f in flags]))
                    self.value(hook, depth + 1)
            for k in sorted(attrs):
                if k not in _NN_INTERNALS:
                    self.tag(f"attr:{k}")
                    self.value(attrs[k], depth + 1)
        for kind, tensors in (("param", m.named_parameters(remove_duplicate=False)),
                              ("buffer", m.named_buffers(remove_duplicate=False))):
            for name, t in tensors:
                self.tag(f"{kind}:{name}")
                self.tensor(t)

    def flowsolve_object(self, obj, depth: int = 0) -> None:
        """A flowsolve path, solver, analytic problem or adapter: class and attributes (an analytic problem's
        public ones only)."""
        from . import analytic

        self.klass(type(obj), depth)
        public_only = type(obj).__module__ == analytic.__name__
        for name, value in sorted(vars(obj).items()):
            if public_only and name.startswith("_"):
                continue
            self.tag(f"attr:{name}")
            self.value(value, depth + 1)


def _object_key(obj) -> tuple[str, bool]:
    """(SHA-256 of an object's class code and attributes, whether everything was hashed by content).

    Keys a path (``DiscreteVP``'s alphas_cumprod, a VP's betas, ...) and a solver instance (its order,
    tau, predictor, intervals, noise_scale, ...) for the cache; an attribute that cannot be hashed by
    content (a user callable) enters by identity, which is valid only in this process (no disk cache).
    """
    d = _Digest()
    d.tag(f"object:{_qualname(type(obj))}")
    d.klass(type(obj))
    for name, value in sorted(vars(obj).items()):
        d.tag(f"attr:{name}")
        d.value(value, 1)
    return d.hexdigest(), d.by_content


def _fn_digest(fn, strict: bool = True) -> str | None:
    """SHA-256 of what determines ``fn``'s function, or None where it cannot be known.

    By content: a torch module, a flowsolve object (an analytic problem, an adapter around a network), or a
    bound method of either (the object plus the method's code). ``strict`` (no ``cache_key``): any other callable,
    or one of these holding something that cannot be hashed by content, gives None (keyed by identity). With
    ``strict=False`` (a user's ``cache_key``) every callable gets a digest of what can be hashed (its code,
    closure, the weights it holds...), the rest by type name.
    """
    obj, method = fn, None
    if isinstance(fn, types.MethodType):
        obj, method = fn.__self__, fn.__func__
    if strict and not isinstance(obj, torch.nn.Module) and not (_is_flowsolve(obj) and hasattr(obj, "__dict__")):
        return None
    d = _Digest(strict=strict)
    d.tag("model-fn")
    d.value(obj)
    if method is not None:
        d.tag("bound-method")
        d.value(method)
    return d.hexdigest() if d.by_content else None


def _model_key(model: Model, cache_key: str | None = None):
    """(key, how: "content" | "cache_key" | "identity", liveness check).

    The key ends with the path's content, the parameterization and the time convention. "content" and
    "cache_key" keys are the same in every process (the disk cache may use them, if the path is hashed by
    content); an "identity" key holds ``id(fn)`` and is valid while ``fn`` is alive (checked through a weak
    reference where it allows one).
    """
    path_key, path_by_content = _object_key(model.path)
    head = (path_key, model.predicts, model.time_convention)
    fn = model.fn
    if cache_key is not None:
        return ("cache_key", cache_key, _fn_digest(fn, strict=False)) + head, "cache_key", path_by_content, \
            (lambda: True)
    digest = _fn_digest(fn)
    if digest is not None:
        return ("content", digest) + head, "content", path_by_content, (lambda: True)
    target = fn.__self__ if isinstance(fn, types.MethodType) else fn
    try:
        ref = weakref.ref(target)
        alive = lambda: ref() is target  # noqa: E731
    except TypeError:
        alive = lambda: True  # noqa: E731
    name = getattr(getattr(fn, "__func__", None), "__qualname__", "")
    return ("id", id(target), name) + head, "identity", False, alive


def _module_dtype(fn):
    """The floating dtype of the torch modules that ``fn`` runs, when they share one; None otherwise.

    The modules looked at: ``fn`` itself, the object of a bound method, the attributes of a flowsolve adapter,
    and for a plain function the modules in its closure and in the globals its code names (a lambda around a
    network). A heuristic for the default pilot dtype only: an explicit ``dtype=`` overrides it.
    """
    obj = fn.__self__ if isinstance(fn, types.MethodType) else fn
    if isinstance(obj, torch.nn.Module):
        found = [obj]
    elif _is_flowsolve(obj) and hasattr(obj, "__dict__"):
        found = [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]
    elif isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            with contextlib.suppress(ValueError):
                cells.append(cell.cell_contents)
        names = [obj.__globals__[n] for n in obj.__code__.co_names if n in obj.__globals__]
        found = [v for v in cells + names if isinstance(v, torch.nn.Module)]
    else:
        found = []
    dtypes = {t.dtype for m in found for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


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
             t_max=None, t_min=None, cache: bool = True, cache_dir=None, cache_key: str | None = None,
             max_iter: int | None = None, ref_steps: int = 256, dtype=None, device=None, return_info: bool = False):
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
        cache_dir: a folder for an on-disk cache, for models keyed by content or by ``cache_key`` (see the
            module docstring). Checked before the optimization: a folder that cannot be created or written
            warns and the grid is still computed and returned; a file that is unreadable, of the wrong type,
            written for another key or holding an invalid grid is a miss with a warning (and is replaced).
        cache_key: a non-empty str that names the model's function and version (e.g. ``"unet-ema-v3"``). A
            torch module or flowsolve object is keyed by its content without it; any other callable (a plain
            function, a closure, a wrapper object) is keyed by its identity, valid in this process only, unless
            ``cache_key`` is given: then every callable with the same ``cache_key`` and code shares the grid,
            also through ``cache_dir``. You vouch that the key changes when what it names does.
        max_iter: objective calls of the optimizer after the built-in grids (default 20 per step, at most 400).
        ref_steps: RK4 steps of the reference solve (in the pilot's dtype, on the path's default grid).
        dtype: of the pilot state. Default: the dtype of a torch module's floating parameters and buffers when
            they share one (float32 and float64 as is; float16/bfloat16 modules get float32, the solver state's
            dtype, and must cast their input), else float64. A model that cannot take it raises a ValueError
            naming the dtype to pass.
        device: of the pilot state.
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
    if cache_key is not None and (not isinstance(cache_key, str) or not cache_key):
        raise TypeError(f"cache_key={cache_key!r} must be a non-empty str naming the model's function and its version, "
                        f"e.g. cache_key='unet-ema-v3'.")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir={cache_dir!r} must be a folder path (str or os.PathLike).")
    module_dtype = _module_dtype(model.fn)
    if dtype is None:
        dtype = module_dtype if module_dtype in (torch.float32, torch.float64) else \
            torch.float32 if module_dtype is not None else torch.float64
    hi, lo = _grids.time_range(path, t_max, t_min)

    # the model's key and the disk folder are settled before any model evaluation: a cache_dir that will not
    # be used, or cannot be, is reported now, not after the optimization
    disk_dir = None
    if cache:
        mkey, how, disk_ok, alive = _model_key(model, cache_key)
        solver_key, solver_by_content = _object_key(s)  # the solver's options, not only its name
        if cache_dir is not None:
            why_not = None if disk_ok and solver_by_content else (
                "the model is keyed by identity (a plain callable, or an object holding something that cannot be "
                "hashed by content): pass cache_key='<name-and-version of the model>' to store its grids"
                if how == "identity" else
                f"the {'path' if not disk_ok else 'solver'} holds an option that cannot be hashed by content")
            if why_not is not None:
                warnings.warn(f"cache_dir={os.fspath(cache_dir)!r} is not used: {why_not}; the grid is cached in "
                              f"memory only.", stacklevel=2)
            else:
                disk_dir = _writable_dir(cache_dir)
    elif cache_dir is not None:
        warnings.warn(f"cache_dir={os.fspath(cache_dir)!r} is not used with cache=False.", stacklevel=2)

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
    disk = None
    if cache:
        if isinstance(pilot, torch.Tensor):
            d = _Digest()
            d.tensor(pilot)
            pkey = ("tensor", d.hexdigest())
        else:
            pkey = (pilot, tuple(shape) if shape is not None else None)
        key = (_KEY_VERSION,) + mkey + (s.info.name, solver_key, nfe, hi, lo, seed, pkey, max_iter, ref_steps,
                                        str(dtype))
        with _LOCK:
            hit = _CACHE.get(key)
        if hit is not None and hit[2]():
            return _result(hit[0].clone(), dict(hit[1], cache_hit=True), return_info)
        if disk_dir is not None:
            disk = os.path.join(disk_dir, f"grid-{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}.json")
            stored = _load_grid(disk, repr(key), steps, hi, lo) if os.path.exists(disk) else None
            if stored is not None:
                grid, info = stored
                with _LOCK:
                    _CACHE[key] = (grid, info, alive)
                return _result(grid.clone(), dict(info, cache_hit=True, cache_file=disk), return_info)

    x_T = _pilot_batch(pilot, shape, path, hi, seed, dtype, device)
    n_pilot = x_T.shape[0]

    # reference: RK4 in the pilot's dtype on the path's default grid (uniform if that grid is not valid here)
    ref_grid = path.default_grid
    try:
        _grids.make_grid(ref_grid, path, 2, t_max=hi, t_min=lo)
    except ValueError:
        ref_grid = "uniform"
    kw = dict(solver="rk4", grid=ref_grid, t_max=hi, t_min=lo)
    ref_key = None if key is None else mkey + (hi, lo, seed, pkey, ref_steps, str(dtype), ref_grid)
    ref_nfe = 4 * ref_steps + 4 * (ref_steps // 2)
    with _LOCK:
        hit = _REF_CACHE.get(ref_key) if ref_key is not None else None
    if hit is not None and hit[2]() and torch.equal(hit[3], x_T.cpu()):
        ref, ref_err, ref_reused = hit[0].to(x_T.device), hit[1], True
    else:
        try:
            ref = Sampler(model, steps=ref_steps, **kw).sample(x_T)
        except RuntimeError as e:  # the first model evaluation: a pilot dtype the model cannot take
            if not any(m in str(e) for m in ("dtype", "scalar type", "Double and Float", "Float and Double")):
                raise
            fix = f"pass dtype={module_dtype}" if module_dtype is not None else "pass the dtype the model takes"
            have = f"its parameters are {module_dtype}" if module_dtype is not None else "it expects another dtype"
            raise ValueError(f"the model cannot take the pilot state's dtype={dtype} ({e}); {have}: {fix} "
                             f"(dtype=None follows a torch module's parameters).") from e
        half = Sampler(model, steps=ref_steps // 2, **kw).sample(x_T)
        ref_err = float((ref - half).double().pow(2).mean().sqrt()) / 15.0  # RK4: err(N) ~ |x_N - x_{N/2}| / 15
        ref_reused = False
        if ref_key is not None:
            with _LOCK:
                while len(_REF_CACHE) >= 8:  # a few references only: each is a pilot-sized tensor
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
        "dtype": str(dtype), "model_key": how if cache else None, "cache_hit": False,
    }
    if cache:
        with _LOCK:
            _CACHE[key] = (grid.clone(), info, alive)
        if disk is not None:
            _save_grid(disk, {"format": _KEY_VERSION, "key": repr(key), "grid": grid.tolist(), "info": info})
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


def _writable_dir(cache_dir) -> str | None:
    """``cache_dir`` as a str if it can be created and written into (a temp file is made and removed), else None
    with a warning: the grid is then computed and returned but not stored."""
    folder = os.fspath(cache_dir)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        warnings.warn(f"cache_dir={folder!r} is not writable ({e.strerror or e}); the grid is optimized and returned "
                      f"but not stored on disk: pass a folder you can write to.", stacklevel=3)
        return None
    return folder


def _check_stored(stored, key: str, steps: int, hi: float, lo: float):
    """(grid, info) from a decoded cache file, or the reason it is not a valid entry for ``key``."""
    if not isinstance(stored, dict):
        return f"holds a JSON {type(stored).__name__}, not an object"
    if stored.get("format") != _KEY_VERSION or stored.get("key") != key:
        return "was written for another key (another model, solver, budget, range, pilot or version)"
    values, info = stored.get("grid"), stored.get("info")
    if not isinstance(info, dict):
        return f"holds info of type {type(info).__name__}, not an object"
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "holds a grid that is not a list of numbers"
    if len(values) != steps + 1:
        return f"holds a grid of {len(values)} times, not steps + 1 = {steps + 1}"
    grid = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(grid).all()):
        return "holds a grid with NaN or inf"
    if not bool((grid[1:] < grid[:-1]).all()):
        return "holds a grid that is not strictly decreasing"
    if float(grid[0]) != hi or float(grid[-1]) != lo or float(grid.max()) > hi or float(grid.min()) < lo:
        return f"holds a grid that does not run from t_max={hi} to t_min={lo}"
    return grid, info


def _load_grid(file: str, key: str, steps: int, hi: float, lo: float):
    """(grid, info) from a cache file, or None with a warning naming it (a miss: recomputed and replaced)."""
    try:
        with open(file, encoding="utf-8") as fh:
            stored = json.load(fh)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        why = f"cannot be read as JSON ({type(e).__name__}: {e})"
    else:
        why = _check_stored(stored, key, steps, hi, lo)
        if isinstance(why, tuple):
            return why
    warnings.warn(f"grid cache file {file} {why}: treated as a miss; the grid is recomputed and the file replaced.",
                  stacklevel=3)
    return None


def _save_grid(file: str, entry: dict) -> None:
    """Atomic write: a temp file in the same folder, then ``os.replace`` (a reader sees the old file or the whole
    new one). A failure warns, removes the temp file and leaves the grid returned but not stored."""
    folder = os.path.dirname(file)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-grid-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(entry, fh)
        os.replace(tmp, file)
        tmp = None
    except (OSError, TypeError, ValueError) as e:
        warnings.warn(f"cache_dir={folder!r}: the grid could not be stored in {file} ({e}); it is returned but not "
                      f"cached on disk.", stacklevel=3)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _result(grid, info, return_info):
    return (grid, info) if return_info else grid
