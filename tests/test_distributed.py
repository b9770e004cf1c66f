"""Sampling split over torch.distributed ranks (gloo, 2 spawned processes) is bitwise the same as one
process drawing the whole batch: keyed noise makes sample b's noise a function of its global index.

Ranks that disagree on an argument that changes the result (seed, steps, N, dtype, ...) all raise the same
error naming it, instead of returning a batch that mixes two runs or aborting inside gloo. One spawn runs every
scenario (each rank records what it got, values or exceptions); the tests read those records."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flowsolve as fs
from flowsolve.distributed import sample_distributed, shard_range

SHAPE = (7, 3)  # uneven over 2 ranks: shards of 4 and 3


def _model(fail_on_rank=None):
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64),
                                torch.tensor([0.7, 1.2, 0.3], dtype=torch.float64), path)
    if fail_on_rank is None:
        return fs.Model(prob.eps, path, predicts="eps")

    def eps(x, t):
        if dist.get_rank() == fail_on_rank:
            raise MemoryError("out of memory on this rank")
        return prob.eps(x, t)

    return fs.Model(eps, path, predicts="eps")


SOLVERS = ["euler_maruyama", "dpm++2m-sde", "heun"]
F64 = {"dtype": torch.float64}


def _scenarios(rank):
    """name -> a call of sample_distributed with this rank's arguments (some differ per rank on purpose)."""
    r = rank
    return {
        "seed differs": lambda: sample_distributed(_model(), SHAPE, solver="euler_maruyama", steps=5, seed=1234 + r,
                                                   **F64),
        "steps differ": lambda: sample_distributed(_model(), SHAPE, solver="heun", steps=5 + r, seed=1, **F64),
        "N differs": lambda: sample_distributed(_model(), (7 + r, 3), solver="heun", steps=5, seed=1, **F64),
        "dtype differs": lambda: sample_distributed(_model(), SHAPE, solver="heun", steps=5, seed=1,
                                                    dtype=(torch.float64, torch.float32)[r]),
        "seed None on one rank": lambda: sample_distributed(_model(), SHAPE, steps=5, seed=(None, 5)[r], **F64),
        "solver differs": lambda: sample_distributed(_model(), SHAPE, solver=("heun", "rk4")[r], steps=5, seed=1),
        "solver options differ": lambda: sample_distributed(_model(), SHAPE, solver=fs.get_solver("ancestral").__class__(
            eta=(1.0, 0.5)[r]), steps=5, seed=1),
        "return_info differs": lambda: sample_distributed(_model(), SHAPE, steps=5, seed=1, return_info=bool(r)),
        "fine after refusals": lambda: sample_distributed(_model(), SHAPE, solver="euler_maruyama", steps=5, seed=1234,
                                                          **F64),
        "info and trajectory": lambda: sample_distributed(_model(), SHAPE, solver="dpm++2m-sde", steps=4, seed=3,
                                                          return_info=True, return_trajectory=True, **F64),
        "local info and trajectory": lambda: sample_distributed(_model(), SHAPE, solver="dpm++2m-sde", steps=4,
                                                                seed=3, return_info=True, return_trajectory=True,
                                                                gather=False, **F64),
        "seed None": lambda: (torch.manual_seed(100 + r),  # different global generators on the two ranks
                              sample_distributed(_model(), SHAPE, solver="euler_maruyama", steps=5, return_info=True,
                                                 **F64))[1],
        "generator": lambda: sample_distributed(_model(), SHAPE, solver="euler_maruyama", steps=5,
                                                generator=torch.Generator().manual_seed(9), **F64),
        "more ranks than samples": lambda: sample_distributed(_model(), (1, 3), solver="euler_maruyama", steps=3,
                                                              seed=2, return_trajectory=True, **F64),
        "refused on rank 1": lambda: sample_distributed(_model(), SHAPE, steps=(5, 0)[r], seed=1),
        "model fails on rank 1": lambda: sample_distributed(_model(fail_on_rank=1), SHAPE, steps=3, seed=1),
        "adaptive": lambda: sample_distributed(_model(), SHAPE, solver="dopri5", seed=1),
    }


def _worker(rank, world, store_path, out_dir):
    os.environ.setdefault("FLOWSOLVE_BACKEND", "torch")
    torch.set_num_threads(1)
    # a short timeout turns a rank left waiting in a collective into an error instead of a hung test
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for solver in SOLVERS:
            x = sample_distributed(_model(), SHAPE, solver=solver, steps=5, seed=1234, **F64)
            local, (start, stop) = sample_distributed(_model(), SHAPE, solver=solver, steps=5, seed=1234, gather=False,
                                                      **F64)
            out[solver] = {"gathered": x, "local": local, "range": (start, stop)}
        for name, call in _scenarios(rank).items():
            try:
                out[name] = {"value": call()}
            except Exception as e:
                out[name] = {"error": type(e).__name__, "message": str(e), "notes": list(getattr(e, "__notes__", []))}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One spawn of 2 gloo processes for every test of this module: [rank 0's records, rank 1's records]."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def test_two_gloo_processes_match_one_process_bitwise(ranks):
    for solver in SOLVERS:
        one = fs.sample(_model(), SHAPE, solver=solver, steps=5, seed=1234, **F64)
        for rank in range(2):
            out = ranks[rank][solver]
            assert torch.equal(out["gathered"], one), (solver, rank)
            start, stop = out["range"]
            assert (start, stop) == shard_range(SHAPE[0], rank, 2)
            assert torch.equal(out["local"], one[start:stop])


@pytest.mark.parametrize("name, field, per_rank", [
    ("seed differs", "seed", "rank 0: 1234; rank 1: 1235"),
    ("steps differ", "steps", "rank 0: 5; rank 1: 6"),
    ("N differs", "N", "rank 0: 7; rank 1: 8"),
    ("dtype differs", "dtype", "rank 0: torch.float64; rank 1: torch.float32"),
    ("seed None on one rank", "seed", "rank 0: None; rank 1: 5"),
    ("solver differs", "solver", "rank 0: flowsolve.solvers.heun.Heun(); rank 1: flowsolve.solvers.runge_kutta"),
    ("solver options differ", "solver", "(eta=1.0); rank 1: flowsolve.solvers.ancestral"),
    ("return_info differs", "return_info", "rank 0: False; rank 1: True"),
])
def test_ranks_that_disagree_all_raise_the_same_error_naming_the_argument(ranks, name, field, per_rank):
    errors = [ranks[r][name] for r in range(2)]
    assert all(e.get("error") == "ValueError" for e in errors), errors
    assert errors[0]["message"] == errors[1]["message"]
    msg = errors[0]["message"]
    assert f"the ranks disagree on {field} (" in msg and per_rank in msg, msg
    assert "pass the same values on every rank" in msg.lower()


def test_the_group_still_works_after_refused_calls(ranks):
    one = fs.sample(_model(), SHAPE, solver="euler_maruyama", steps=5, seed=1234, **F64)
    assert all(torch.equal(ranks[r]["fine after refusals"]["value"], one) for r in range(2))


def test_return_info_and_return_trajectory(ranks):
    x1, traj1, info1 = fs.sample(_model(), SHAPE, solver="dpm++2m-sde", steps=4, seed=3, return_info=True,
                                 return_trajectory=True, **F64)
    for rank in range(2):
        x, traj, info = ranks[rank]["info and trajectory"]["value"]
        assert torch.equal(x, x1) and len(traj) == len(traj1) == 5
        assert all(torch.equal(a, b) for a, b in zip(traj, traj1))
        start, stop = shard_range(SHAPE[0], rank, 2)
        assert info["seed"] == 3 and info["rank"] == rank and info["world_size"] == 2 and info["shard"] == (start, stop)
        assert info["nfe"] == info1["nfe"] == info["planned_nfe"]
        local, ltraj, linfo, shard = ranks[rank]["local info and trajectory"]["value"]
        assert shard == (start, stop) and torch.equal(local, x1[start:stop]) and linfo["shard"] == shard
        assert all(torch.equal(a, b[start:stop]) for a, b in zip(ltraj, traj1))


def test_seed_none_is_one_fresh_seed_shared_by_all_ranks(ranks):
    (x0, info0), (x1, info1) = (ranks[r]["seed None"]["value"] for r in range(2))
    torch.manual_seed(100)  # rank 0's generator: its draw is the seed of every rank
    expected_seed = fs.kernels.seed.key_from_generator(torch.default_generator)
    assert info0["seed"] == info1["seed"] == expected_seed
    one = fs.sample(_model(), SHAPE, solver="euler_maruyama", steps=5, seed=expected_seed, **F64)
    assert torch.equal(x0, one) and torch.equal(x1, one)


def test_a_generator_seed_that_agrees_is_accepted(ranks):
    one = fs.sample(_model(), SHAPE, solver="euler_maruyama", steps=5, seed=torch.Generator().manual_seed(9), **F64)
    assert all(torch.equal(ranks[r]["generator"]["value"], one) for r in range(2))


def test_more_ranks_than_samples(ranks):
    x1, traj1 = fs.sample(_model(), (1, 3), solver="euler_maruyama", steps=3, seed=2, return_trajectory=True, **F64)
    for rank in range(2):
        x, traj = ranks[rank]["more ranks than samples"]["value"]
        assert torch.equal(x, x1) and all(torch.equal(a, b) for a, b in zip(traj, traj1))


def test_a_rank_that_refuses_its_arguments_or_fails_mid_run_makes_every_rank_raise(ranks):
    own, other = ranks[1]["refused on rank 1"], ranks[0]["refused on rank 1"]
    assert own["error"] == "ValueError" and "steps=0 must be >= 1" in own["message"]
    assert any("every rank of the group raises" in n for n in own["notes"])
    assert other["error"] == "RuntimeError" and "rank 1: ValueError: steps=0 must be >= 1" in other["message"]
    own, other = ranks[1]["model fails on rank 1"], ranks[0]["model fails on rank 1"]
    assert own["error"] == "MemoryError" and own["message"] == "out of memory on this rank"
    assert any("rank(s) [1] raised while sampling" in n for n in own["notes"])
    assert other["error"] == "RuntimeError" and "rank(s) [1] raised while sampling their shard" in other["message"]


def test_adaptive_solvers_refused_on_every_rank(ranks):
    for rank in range(2):
        e = ranks[rank]["adaptive"]
        assert e["error"] == "ValueError" and "is adaptive: it chooses one step sequence" in e["message"]


def test_shard_range_partitions_the_batch():
    for n in (0, 1, 7, 64):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_sample_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        sample_distributed(_model(), SHAPE, seed=0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_range(4, 2, 2)
