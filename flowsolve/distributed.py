"""Sampling one global batch over ``torch.distributed`` ranks, bitwise the same as one process.

Every noise flowsolve draws is keyed by (seed, global sample index, step, element, stream), so a rank
that samples global indices [start, stop) with ``sample_offset=start`` draws exactly the noise one
process drawing the whole batch would give those samples. ``sample_distributed`` splits the batch
into contiguous shards (``shard_range``), samples the local shard and, with ``gather=True``, all-gathers
the shards in rank order (gloo on CPU, NCCL on GPU; uneven shards are padded for the collective and
trimmed).

That holds only if every rank runs the same sampler: a rank with another seed or step count would return
a batch mixing two runs, and one with another N or dtype would enter the gather with a buffer of another
size (gloo aborts the process). So before anything else the ranks compare their arguments in ONE small
collective of a fixed size (an all-gather of a ~1.2 KB byte record per rank: for each compared argument an
8-byte BLAKE2b digest of a canonical description and the description's first 56 bytes; the drawn seed;
a preparation error). A mismatch, or arguments that one rank refuses, makes EVERY rank raise, naming the
argument and each rank's value; nothing reaches a collective whose size could differ.

Compared: N, the event shape, dtype, the model (its callable's type or qualified name, path and its parameters,
parameterization, time convention; not the network's weights or code: load the same checkpoint everywhere),
the solver and its options, steps, grid, t_max, t_min, the seed, the kernel backend (and device type),
return_trajectory, return_info, gather and cuda_graph. Not compared (rank-local by design): progress and
callback (a bar on rank 0 only is usual), check_finite / check_independence / check_inplace, and the device
index. A rank that raises while sampling its shard makes every rank raise too (with ``gather=True``: a status
flag travels with the gathered data).

``seed=None`` (the default) is one fresh seed for the whole batch: every rank draws a key from its own global
generator (so each generator advances alike) and all ranks use rank 0's, which the comparison collective
carries; ``info["seed"]`` reports it. An int, a one-element tensor or a torch.Generator works too, if it
gives the same key on every rank (the comparison says so otherwise).
"""
from __future__ import annotations

import hashlib
import inspect
import math
import struct

import torch

from . import checks as _checks
from .kernels import resolve_backend
from .kernels.seed import resolve_seed, seed_value
from .sample import Sampler

__all__ = ["shard_range", "sample_distributed"]

# one record per rank: [error flag (1 byte), drawn seed (8 bytes), FIELDS x (digest 8 + text 56), error text]
_DIGEST, _TEXT, _ERROR = 8, 56, 240
FIELDS = ("N", "event shape", "dtype", "model", "solver", "steps", "grid", "t_max", "t_min", "seed", "backend",
          "return_trajectory", "return_info", "gather", "cuda_graph")
_RECORD = 9 + len(FIELDS) * (_DIGEST + _TEXT) + _ERROR
# Sampler.sample's keywords that sample_distributed forwards; the compared ones are listed in FIELDS
_FORWARDED = ("dtype", "backend", "return_trajectory", "return_info", "cuda_graph", "progress", "callback",
              "check_finite", "check_independence", "check_inplace")
_SAMPLER_KW = ("t_max", "t_min", "rtol", "atol")


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard [start, stop) of ``n`` global samples for ``rank`` of ``world_size`` (the first
    ``n % world_size`` ranks take one sample more)."""
    for name, v in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int; got {v!r}.")
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= rank < world_size; got n={n}, rank={rank}, world_size={world_size}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sample_distributed(model, shape, solver="heun", steps=None, grid=None, *, seed=None, group=None,
                       gather: bool = True, device=None, **kwargs):
    """Draw the global batch ``shape = (N, ...)`` across the ranks of ``group`` (default: the world).

    Each rank runs ``fs.Sampler(model, solver, steps, grid, t_max=, t_min=).sample`` on its shard with the
    shard's ``sample_offset``; the result is the same, bitwise, as ``fs.sample(model, shape, ..., seed=s)`` in
    one process on the same backend. Call it on every rank of the group with the same arguments: they are
    compared first (module notes), and a mismatch raises a ValueError on every rank naming the argument and
    the value on each rank.

    Args:
        model, solver, steps, grid: as ``fs.Sampler``; ``kwargs`` may hold ``t_max``, ``t_min`` and the keywords
            of ``Sampler.sample`` (dtype, backend, return_trajectory, return_info, progress, callback, cuda_graph,
            check_finite, check_independence, check_inplace, generator). Adaptive solvers are refused: they choose
            one step sequence per batch, so a shard would not give what the whole batch gives.
        shape: the global batch shape ``(N, ...)``.
        seed: None (the default: a fresh seed, rank 0's draw, the same on every rank), an int, a one-element
            integer tensor or a torch.Generator giving the same key on every rank.
        group: the process group (default: the world).
        gather: all-gather the shards (default) or return this rank's shard.
        device: of this rank's samples (default: the current CUDA device under NCCL, else the CPU).

    Returns (as ``fs.sample``, plus the shard when not gathering):
        ``gather=True``: ``x [, trajectory] [, info]``: the ``[N, ...]`` batch, the list of ``[N, ...]`` states at
        every grid point, and this rank's info (``nfe`` of its own shard, ``seed``, ``rank``, ``world_size``,
        ``shard``). ``gather=False``: ``local [, trajectory] [, info], (start, stop)``: this rank's samples
        (global indices [start, stop)) and their trajectory.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sample_distributed needs an initialized process group: call "
                           "torch.distributed.init_process_group('gloo' or 'nccl', ...) first.")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nccl = dist.get_backend(group) == "nccl"
    try:
        prep = _Prepared(model, shape, solver, steps, grid, seed, gather, device, kwargs, nccl)
        error = None
    except Exception as e:  # raised after the comparison, on every rank: the others must not wait in a collective
        prep, error = None, e
    mine = _record(prep, error, torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    records = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(records, mine, group=group)  # the one collective before any whose size depends on arguments
    records = [bytes(r.cpu().tolist()) for r in records]
    _raise_if_refused(records, rank, error)
    _raise_if_different(records)
    if prep.seed is None:
        prep.seed = struct.unpack("<q", records[0][1:9])[0]  # rank 0's fresh draw, on every rank
    return _run(prep, rank, world, group, dist)


class _Prepared:
    """This rank's validated arguments, its planned Sampler and the description of what the ranks compare."""

    def __init__(self, model, shape, solver, steps, grid, seed, gather, device, kwargs, nccl):
        kwargs = dict(kwargs)
        if "sample_offset" in kwargs:
            raise ValueError("sample_distributed sets sample_offset per rank; do not pass it.")
        unknown = sorted(set(kwargs) - set(_FORWARDED) - set(_SAMPLER_KW) - {"generator"})
        if unknown:
            raise TypeError(f"sample_distributed got unexpected keyword arguments {unknown}; it takes those of "
                            f"fs.Sampler (t_max, t_min) and Sampler.sample ({', '.join(_FORWARDED)}, generator).")
        _checks.check_bool("gather", gather)
        self.shape = _checks.as_shape(shape, "shape", "pass the global batch shape (N, ...) as ints, e.g. (64, 2)")
        generator = kwargs.pop("generator", None)
        if generator is not None:
            if seed is not None:
                raise ValueError("pass either seed= or generator=, not both (generator= is seed=<torch.Generator>).")
            seed = generator
        self.sampler = Sampler(model, solver, steps, grid, **{k: kwargs.pop(k) for k in _SAMPLER_KW if k in kwargs})
        if self.sampler.plan is None:
            raise ValueError(f"solver={self.sampler.solver.info.name!r} is adaptive: it chooses one step sequence for "
                             f"its whole batch, so a rank's shard would not be sampled as in the global batch. Use a "
                             f"fixed-step solver (e.g. 'dpm++3m', 'rk4'), or fs.sample(..., sample_offset=start) per "
                             f"rank if shard-dependent steps are acceptable.")
        self.dtype = kwargs.get("dtype", torch.float32)
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype={self.dtype!r}: the solver state must be torch.float32 or torch.float64.")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = _checks.check_device(device)
        backend = resolve_backend(kwargs.get("backend"), self.device)
        self.gather, self.kwargs = gather, kwargs
        # explicit seeds become their int key here (each rank its own: compared below); None stays None and a
        # fresh key is drawn from this rank's global generator, of which only rank 0's is used
        self.seed = None if seed is None else seed_value(resolve_seed(seed))
        self.drawn = resolve_seed(None) if seed is None else 0
        s = self.sampler
        named = grid if isinstance(grid, str) else (model.path.default_grid if grid is None else None)
        values = {
            "N": self.shape[0], "event shape": self.shape[1:], "dtype": self.dtype, "model": _describe(model),
            "solver": _describe(s.solver), "steps": s.plan.n_steps,
            "grid": repr(named) if named is not None else "times " + ", ".join(repr(t) for t in s.times),
            "t_max": s.t_max, "t_min": s.t_min, "seed": self.seed,
            "backend": f"{backend} on {self.device.type}", "gather": gather,
            **{k: kwargs.get(k, False) for k in ("return_trajectory", "return_info", "cuda_graph")},
        }
        self.texts = [v if isinstance(v, str) else repr(v) for v in (values[f] for f in FIELDS)]


def _record(prep: _Prepared | None, error: BaseException | None, device: torch.device) -> torch.Tensor:
    """This rank's fixed-size comparison record (uint8, on ``device``: where the group's backend collects)."""
    buf = bytearray(_RECORD)
    if error is not None:
        buf[0] = 1
        msg = f"{type(error).__name__}: {error}".encode(errors="replace")[:_ERROR]
        buf[_RECORD - _ERROR:_RECORD - _ERROR + len(msg)] = msg
    else:
        buf[1:9] = struct.pack("<q", prep.drawn)
        for i, text in enumerate(prep.texts):
            raw = text.encode(errors="replace")
            off = 9 + i * (_DIGEST + _TEXT)
            buf[off:off + _DIGEST] = hashlib.blake2b(raw, digest_size=_DIGEST).digest()
            head = raw[:_TEXT]
            buf[off + _DIGEST:off + _DIGEST + len(head)] = head
    return torch.tensor(list(buf), dtype=torch.uint8, device=device)


def _field(record: bytes, i: int) -> tuple[bytes, str]:
    off = 9 + i * (_DIGEST + _TEXT)
    text = record[off + _DIGEST:off + _DIGEST + _TEXT]
    shown = text.rstrip(b"\0").decode(errors="replace")
    return record[off:off + _DIGEST], shown + ("..." if text[-1:] != b"\0" else "")  # a full slot: cut off


def _raise_if_refused(records, rank, error):
    """Every rank raises when some rank could not prepare its run: that rank its own exception (with a note),
    the others a RuntimeError naming it and its message."""
    failed = [(r, rec[_RECORD - _ERROR:].rstrip(b"\0").decode(errors="replace")) for r, rec in enumerate(records)
              if rec[0]]
    if not failed:
        return
    others = ", ".join(f"rank {r}: {msg}" for r, msg in failed)
    if error is not None:
        _checks.reraise_with_note(error, f"sample_distributed: rank {rank} refused its arguments; every rank of the "
                                         f"group raises ({others}).")
    raise RuntimeError(f"sample_distributed: {others} -- that rank refused its arguments, so no rank samples; "
                       f"fix its arguments (every rank must pass the same ones).")


def _raise_if_different(records):
    """A ValueError, the same on every rank, naming each argument the ranks disagree on and its value per rank."""
    lines = []
    for i, name in enumerate(FIELDS):
        fields = [_field(rec, i) for rec in records]
        if len({d for d, _ in fields}) == 1:
            continue
        groups: dict[bytes, list[int]] = {}
        for r, (d, _) in enumerate(fields):
            groups.setdefault(d, []).append(r)
        per = "; ".join(f"{_ranks(rs)}: {fields[rs[0]][1]}" for rs in groups.values())
        lines.append(f"{name} ({per})")
    if lines:
        raise ValueError("sample_distributed: the ranks disagree on " + ", ".join(lines) + ". Every rank must pass "
                         "the same arguments: they decide which samples each rank draws and with which noise. Pass "
                         "the same values on every rank (for a fresh seed, pass seed=None on all of them).")


def _ranks(rs: list[int]) -> str:
    shown = ", ".join(str(r) for r in rs[:8]) + (", ..." if len(rs) > 8 else "")
    return f"rank {shown}" if len(rs) == 1 else f"ranks {shown}"


def _run(prep: _Prepared, rank: int, world: int, group, dist):
    """Sample this rank's shard; gather the shards (and trajectories) with a status flag, so that a rank that
    fails makes every rank raise instead of leaving them waiting in the gather."""
    shape, n = prep.shape, prep.shape[0]
    start, stop = shard_range(n, rank, world)
    want_traj = bool(prep.kwargs.get("return_trajectory", False))
    want_info = bool(prep.kwargs.get("return_info", False))
    plan = prep.sampler.plan
    kw = {k: v for k, v in prep.kwargs.items() if k not in ("return_trajectory", "return_info")}
    error = None
    try:
        if stop > start:
            out = prep.sampler.sample((stop - start, *shape[1:]), seed=prep.seed, device=prep.device,
                                      sample_offset=start, return_trajectory=want_traj, return_info=True, **kw)
            x, traj, info = out[0], (out[1] if want_traj else None), out[-1]
        else:  # more ranks than samples: an empty shard
            x = torch.empty((0, *shape[1:]), dtype=prep.dtype, device=prep.device)
            traj = [x.clone() for _ in range(plan.n_steps + 1)] if want_traj else None
            info = {"nfe": 0, "planned_nfe": plan.nfe, "grid": plan.grid, "solver": prep.sampler.solver.info.name,
                    "seed": prep.seed}
        info.update(rank=rank, world_size=world, shard=(start, stop))
    except Exception as e:
        if not prep.gather:
            raise  # no collective follows: the other ranks are not kept waiting
        error, x, traj, info = e, None, None, None
    if prep.gather:
        x, traj = _gather(x, traj, error, prep, rank, world, group, dist, want_traj)
    result = [x] + ([traj] if want_traj else []) + ([info] if want_info else [])
    if not prep.gather:
        return (*result, (start, stop))
    return result[0] if len(result) == 1 else tuple(result)


def _gather(x, traj, error, prep, rank, world, group, dist, want_traj):
    """All-gather ``[x] + trajectory`` in one padded buffer per rank whose last element is a status flag."""
    shape, n = prep.shape, prep.shape[0]
    rows = 1 + (prep.sampler.plan.n_steps + 1 if want_traj else 0)
    event = math.prod(shape[1:])
    longest = shard_range(n, 0, world)[1]  # rank 0's shard is a longest one
    device = prep.device if x is None else x.device
    payload = torch.zeros(rows * longest * event + 1, dtype=prep.dtype, device=device)
    if error is None:
        block = payload[:-1].view(rows, longest, event)
        local = x.shape[0]
        for i, state in enumerate([x] + (traj or [])):
            block[i, :local] = state.reshape(local, event)
    else:
        payload[-1] = 1.0
    parts = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(parts, payload, group=group)
    failed = [r for r, flag in enumerate(torch.stack([p[-1] for p in parts]).tolist()) if flag != 0.0]
    if failed:
        msg = f"sample_distributed: rank(s) {failed} raised while sampling their shard; every rank of the group raises"
        if error is not None:
            _checks.reraise_with_note(error, msg + f" (this is rank {rank}).")
        raise RuntimeError(msg + f"; rank {rank}'s shard was fine. See the traceback of rank {failed[0]}.")
    sizes = [b - a for a, b in (shard_range(n, r, world) for r in range(world))]
    full = torch.cat([p[:-1].view(rows, longest, event)[:, :size] for p, size in zip(parts, sizes)], dim=1)
    states = [full[i].reshape(shape) for i in range(rows)]
    return states[0], (states[1:] if want_traj else None)


def _describe(v, depth: int = 0) -> str:
    """A canonical, process-independent description of an argument (no addresses): numbers and strings by repr,
    tensors by dtype, shape and a digest of their bytes, functions by qualified name, objects by type and public
    attributes (three levels deep). A torch module is described by its type only (its weights are not read)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, torch.Tensor):
        data = v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        return f"tensor{tuple(v.shape)}:{v.dtype}:{hashlib.blake2b(bytes(data.tolist()), digest_size=8).hexdigest()}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_describe(e, depth + 1) for e in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v[k], depth + 1)}" for k in sorted(v, key=repr)) + "}"
    if inspect.ismethod(v):
        return f"{_describe(v.__self__, depth + 1)}.{v.__func__.__name__}"
    if isinstance(v, torch.nn.Module):
        return _qualname(type(v))
    if inspect.isroutine(v) or inspect.isclass(v):
        return _qualname(v)
    if depth >= 3 or not hasattr(v, "__dict__"):
        return _qualname(type(v))
    attrs = ", ".join(f"{k}={_describe(a, depth + 1)}" for k, a in sorted(vars(v).items()) if not k.startswith("_"))
    return f"{_qualname(type(v))}({attrs})"


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
