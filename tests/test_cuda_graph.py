"""The CUDA-graph path (flowsolve/cuda_graph.py).

On CPU the graph is replaced by ``EagerReplay``, which re-runs the recorded loop: this checks
everything except the CUDA capture call itself -- the loop reads the seed, the initial state and
the step index only from static device tensors that ``sample`` refills before each replay, and the
step index is reset inside the recorded region -- so that replay k gives exactly what
``Sampler.sample`` gives for the same seed and input, whatever ran before it. The recorded loop always
uses the device step index (``Run(host_coefficients=False)``), so these tests also pin that path to the CPU
host-coefficient path ``Sampler.sample`` takes here (see tests/test_host_coefficients.py). On a CUDA device
the real capture is compared with eager sampling too (skipped without a GPU).
"""
import pytest
import torch

import flowsolve as fs
from flowsolve.cuda_graph import EagerReplay, GraphedSampler

# deterministic and stochastic, single-step, multistage, multistep (history buffers) and a
# corrector that carries an evaluation across steps
SOLVERS = ["euler", "heun", "dpm++2m", "unipc3-bh2", "euler_maruyama", "dpm++2m-sde", "pc"]


def _model():
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64),
                                torch.tensor([0.3, 1.2], dtype=torch.float64), fs.paths.VP())
    return fs.Model(prob.eps, prob.path, predicts="eps")


@pytest.mark.parametrize("solver", SOLVERS)
def test_replays_equal_eager_sampling_bitwise(solver):
    sampler = fs.Sampler(_model(), solver, steps=6)
    graphed = GraphedSampler(sampler, (8, 2), dtype=torch.float64, device="cpu", capture=EagerReplay)
    for seed in (3, 5, 3):  # a later replay must not see state left by an earlier one
        expected = sampler.sample((8, 2), seed=seed, dtype=torch.float64)
        assert torch.equal(graphed.sample(seed=seed), expected)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for seed in (7, 8):
        assert torch.equal(graphed.sample(x, seed=seed), sampler.sample(x, seed=seed))
    assert torch.equal(graphed.sample(seed=5), sampler.sample((8, 2), seed=5, dtype=torch.float64))
    assert len(graphed._graphs) == 2 and all(g.recorded == 1 for g in graphed._graphs.values())  # recorded once each


def test_sample_offset_and_generator_seed():
    sampler = fs.Sampler(_model(), "euler_maruyama", steps=5)
    graphed = GraphedSampler(sampler, (4, 2), device="cpu", sample_offset=4, capture=EagerReplay)
    full = sampler.sample((8, 2), seed=11)
    assert torch.equal(graphed.sample(seed=11), full[4:])  # the keyed noise of global samples 4..7
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(graphed.sample(seed=g1), sampler.sample((4, 2), seed=g2, sample_offset=4))


def test_output_is_a_copy():
    graphed = GraphedSampler(fs.Sampler(_model(), "heun", steps=3), (2, 2), device="cpu", capture=EagerReplay)
    a = graphed.sample(seed=0)
    b = graphed.sample(seed=1)
    assert not torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_refusals():
    model = _model()
    with pytest.raises(ValueError, match="adaptive"):
        GraphedSampler(fs.Sampler(model, "dopri5"), (2, 2), device="cpu", capture=EagerReplay)
    checked = fs.Model(model.fn, model.path, predicts="eps", check_finite=True)
    with pytest.raises(ValueError, match="check_finite"):
        GraphedSampler(fs.Sampler(checked, "heun", steps=3), (2, 2), device="cpu", capture=EagerReplay)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedSampler(fs.Sampler(model, "heun", steps=3), (2, 2), device="cpu")
    graphed = GraphedSampler(fs.Sampler(model, "heun", steps=3), (2, 2), device="cpu", capture=EagerReplay)
    with pytest.raises(ValueError, match="captured for"):
        graphed.sample(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="fs.Sampler"):
        GraphedSampler(model, (2, 2), device="cpu", capture=EagerReplay)
    with pytest.raises(TypeError, match="dtype"):
        GraphedSampler(fs.Sampler(model, "heun", steps=3), (2, 2), dtype=torch.float16, device="cpu",
                       capture=EagerReplay)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real graph capture)")
@pytest.mark.parametrize("solver", ["heun", "dpm++2m", "euler_maruyama"])
def test_cuda_graph_capture_matches_eager(solver):
    sampler = fs.Sampler(_model(), solver, steps=8)
    graphed = GraphedSampler(sampler, (1024, 2), device="cuda")
    for seed in (0, 1):
        expected = sampler.sample((1024, 2), seed=seed, device="cuda")
        # the same kernels on the same data in the same order: replay must be bitwise the eager result
        assert torch.equal(graphed.sample(seed=seed), expected)


def test_sampler_cuda_graph_flag_records_once_per_shape(monkeypatch):
    import flowsolve.cuda_graph as cg

    made = []

    class CPUGraphed(cg.GraphedSampler):  # the Sampler's cuda_graph=True path, with EagerReplay on CPU
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("capture", EagerReplay)
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cg, "GraphedSampler", CPUGraphed)
    sampler = fs.Sampler(_model(), "dpm++2m", steps=5)
    for seed in (0, 1, 2):
        assert torch.equal(sampler.sample((4, 2), seed=seed, cuda_graph=True), sampler.sample((4, 2), seed=seed))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler.sample(x, seed=3, cuda_graph=True), sampler.sample(x, seed=3))
    assert len(made) == 1  # one recording for shape (4, 2) float32 (noise and input graphs inside it)
    sampler.sample((6, 2), seed=0, cuda_graph=True)
    assert len(made) == 2


def test_sampler_cuda_graph_flag_refusals():
    sampler = fs.Sampler(_model(), "heun", steps=3)
    with pytest.raises(ValueError, match="CUDA device"):
        sampler.sample((2, 2), cuda_graph=True)
    with pytest.raises(ValueError, match="drop callback"):
        sampler.sample((2, 2), cuda_graph=True, callback=lambda **kw: None)
    with pytest.raises(TypeError, match="cuda_graph"):
        sampler.sample((2, 2), cuda_graph=1)
    with pytest.raises(ValueError, match="adaptive"):
        fs.sample(_model(), (2, 2), solver="dopri5", cuda_graph=True)
