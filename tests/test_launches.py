"""One launch per step where the design promises it (issue: GPU-true kernels, item 4).

The multistep solvers write their x0 history entry and their update in ONE fused kernel launch (``lincomb``
with a second output, ``Run.push_update``), and the model's time vector of each evaluation is a view of a
table laid out once per run (no ``index_select`` or fill per evaluation). Launches are counted with
``backend.counting_launches`` on the Triton path (through the interpreter on CPU), and the model call marks
the sequence, so the launches between two model calls are one step's. Aten ops of the loop are recorded with
a TorchDispatchMode on the twin path.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowsolve as fs
from flowsolve.kernels.backend import HAS_TRITON, counting_launches, interpreting

needs_triton = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs triton + TRITON_INTERPRET=1")

ONE_LAUNCH = ["dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "er-sde-1", "er-sde-2", "er-sde-3"]
TWO_LAUNCHES = ["unipc2-bh1", "unipc2-bh2", "unipc3-bh1", "unipc3-bh2"]  # predictor, then corrector + history


def _model(marks, launched):
    """The exact eps of N(0.5, 0.25) data on VP; each call records how many kernels were launched before it."""
    path = fs.paths.VP()

    def fn(x, t):
        marks.append(len(launched[0]))
        a = path.alpha(t).to(x.dtype)[:, None]
        s = path.sigma(t).to(x.dtype)[:, None]
        return s * (x - a * 0.5) / (a * a * 0.25 + s * s)

    return fs.Model(fn, path, predicts="eps")


def launches_between_model_calls(solver: str, steps: int = 8):
    """Launches after each model call up to the next one (the last entry: after the last model call)."""
    marks, launched = [], [[]]
    sampler = fs.Sampler(_model(marks, launched), solver, steps=steps)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    with counting_launches() as names:
        launched[0] = names
        sampler.sample(x, seed=1, backend="triton")
    bounds = marks + [len(names)]
    return [bounds[i + 1] - bounds[i] for i in range(len(marks))]


@needs_triton
@pytest.mark.parametrize("solver", ONE_LAUNCH)
def test_multistep_solvers_launch_one_kernel_per_step(solver):
    counts = launches_between_model_calls(solver)
    # dpm++3m's default first step is a DPM-Solver++(2S) step (two model calls); every other step is one model
    # call followed by one fused launch (history entry + update, noise included)
    tail = counts[2:] if solver == "dpm++3m" else counts
    assert tail and all(c == 1 for c in tail), counts


@needs_triton
@pytest.mark.parametrize("solver", TWO_LAUNCHES)
def test_unipc_launches_two_kernels_per_step(solver):
    counts = launches_between_model_calls(solver)
    # first call: its history push and the first predictor; then the corrector (with the new history entry) and
    # the next predictor between two model calls; after the last model call: corrector + the last predictor
    assert counts[0] == 2 and all(c == 2 for c in counts[1:]), counts


@pytest.mark.parametrize("solver", ONE_LAUNCH + TWO_LAUNCHES + ["euler", "heun", "euler_maruyama", "ancestral"])
def test_time_vector_is_a_view_not_an_op_per_evaluation(solver):
    """The loop builds no time vector per evaluation: no index_select, full, fill or expand of the time table
    between the plan and the end of the run (the model's own ops are excluded: it computes nothing here)."""
    path = fs.paths.VP()
    out = torch.zeros(3, 5)

    def fn(x, t):
        return out  # no ops: whatever the dispatch mode sees is the loop's

    model = fs.Model(fn, path, predicts="eps")
    sampler = fs.Sampler(model, solver, steps=6)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket).split(".")[-1])
            return func(*args, **(kwargs or {}))

    run_ops = Ops()
    with run_ops:
        sampler.sample(x, seed=1, backend="torch")
    for name in ("index_select", "full", "fill_"):
        assert name not in run_ops.names, (name, solver)
