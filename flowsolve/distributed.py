"""Sampling one global batch over ``torch.distributed`` ranks, bitwise the same as one process.

Every noise flowsolve draws is keyed by (seed, global sample index, step, element, stream), so a rank
that samples global indices [start, stop) with ``sample_offset=start`` draws exactly the noise one
process drawing the whole batch would give those samples. ``sample_distributed`` splits the batch
into contiguous shards (``shard_range``), samples the local shard and, with ``gather=True``, all-gathers
the shards in rank order (gloo on CPU, NCCL on GPU; uneven shards are padded for the collective and
trimmed). The seed must be the same on every rank: pass an int or a one-element tensor.
"""
from __future__ import annotations

import torch

from .sample import Sampler

__all__ = ["shard_range", "sample_distributed"]


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


def sample_distributed(model, shape, solver="heun", steps=None, grid=None, *, seed, group=None, gather: bool = True,
                       device=None, **kwargs):
    """Draw the global batch ``shape = (N, ...)`` across the ranks of ``group`` (default: the world).

    Each rank runs ``fs.Sampler(model, solver, steps, grid).sample`` on its shard with the shard's
    ``sample_offset``; the result is the same, bitwise, as ``fs.sample(model, shape, ...)`` in one
    process on the same backend. Returns the gathered ``[N, ...]`` batch (``gather=True``) or this
    rank's shard and its ``(start, stop)``. ``kwargs`` go to ``Sampler.sample`` (dtype, backend, ...).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sample_distributed needs an initialized process group: call "
                           "torch.distributed.init_process_group('gloo' or 'nccl', ...) first.")
    if isinstance(seed, torch.Generator) or seed is None:
        raise TypeError("seed must be an int or a one-element int64 tensor, the same on every rank "
                        "(a Generator or None could differ between ranks).")
    if "sample_offset" in kwargs:
        raise ValueError("sample_distributed sets sample_offset per rank; do not pass it.")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"shape must be a batch-first shape like (N, D); got {shape!r}.") from e
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, stop = shard_range(shape[0], rank, world)
    sampler_kw = {k: kwargs.pop(k) for k in ("t_max", "t_min", "rtol", "atol") if k in kwargs}
    sampler = Sampler(model, solver, steps, grid, **sampler_kw)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    if stop > start:
        local = sampler.sample((stop - start, *shape[1:]), seed=seed, device=device, sample_offset=start, **kwargs)
    else:
        local = torch.empty((0, *shape[1:]), dtype=kwargs.get("dtype", torch.float32), device=device)
    if not gather:
        return local, (start, stop)
    longest = shard_range(shape[0], 0, world)[1]
    padded = torch.zeros((longest, *shape[1:]), dtype=local.dtype, device=local.device)
    padded[: stop - start] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([parts[r][: (lambda a, b: b - a)(*shard_range(shape[0], r, world))] for r in range(world)])
