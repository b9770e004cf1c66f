"""Sampling split over torch.distributed ranks (gloo, 2 spawned processes) is bitwise the same as one
process drawing the whole batch: keyed noise makes sample b's noise a function of its global index."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flowsolve as fs
from flowsolve.distributed import sample_distributed, shard_range

SHAPE = (7, 3)  # uneven over 2 ranks: shards of 4 and 3


def _model():
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64),
                                torch.tensor([0.7, 1.2, 0.3], dtype=torch.float64), path)
    return fs.Model(prob.eps, path, predicts="eps")


SOLVERS = ["euler_maruyama", "dpm++2m-sde", "heun"]


def _worker(rank, world, store_path, out_dir):
    os.environ.setdefault("FLOWSOLVE_BACKEND", "torch")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        out = {}
        for solver in SOLVERS:
            x = sample_distributed(_model(), SHAPE, solver=solver, steps=5, seed=1234, dtype=torch.float64)
            local, (start, stop) = sample_distributed(_model(), SHAPE, solver=solver, steps=5, seed=1234,
                                                      dtype=torch.float64, gather=False)
            out[solver] = {"gathered": x, "local": local, "range": (start, stop)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_bitwise(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for solver in SOLVERS:
        one = fs.sample(_model(), SHAPE, solver=solver, steps=5, seed=1234, dtype=torch.float64)
        for rank in range(2):
            out = torch.load(tmp_path / f"rank{rank}.pt")[solver]
            assert torch.equal(out["gathered"], one), (solver, rank)
            start, stop = out["range"]
            assert (start, stop) == shard_range(SHAPE[0], rank, 2)
            assert torch.equal(out["local"], one[start:stop])


def test_shard_range_partitions_the_batch():
    for n in (0, 1, 7, 64):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_sample_distributed_needs_a_process_group_and_a_shared_seed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        sample_distributed(_model(), SHAPE, seed=0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_range(4, 2, 2)
