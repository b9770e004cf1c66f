"""Classifier-free guidance: two analytic Gaussians as the conditional / unconditional branches of one
labelled network, guided outputs against the closed form of FORMULAS.md §3 written out here
(score = -C^-1 (x - alpha mu), C = alpha^2 s^2 + sigma^2), for every parameterization."""
import pytest
import torch

import flowsolve as fs
from flowsolve.guidance import CFG, classifier_free_guidance

F64 = torch.float64
MU = {1: torch.tensor([2.0, -1.0], dtype=F64), 0: torch.tensor([0.0, 0.5], dtype=F64)}
STD = {1: torch.tensor([0.3, 0.7], dtype=F64), 0: torch.tensor([1.0, 1.2], dtype=F64)}


class Labelled:
    """fn(x, t, label): Gaussian 1 where label == 1, Gaussian 0 where label == 0; records batch sizes."""

    def __init__(self, path, predicts):
        self.probs = {k: fs.analytic.Gaussian(MU[k], STD[k], path) for k in (0, 1)}
        self.predicts, self.batches = predicts, []

    def __call__(self, x, t, label):
        self.batches.append(x.shape[0])
        if label is None:
            label = torch.zeros(x.shape[0], dtype=torch.long)
        out = {k: getattr(p, self.predicts)(x, t) for k, p in self.probs.items()}
        return torch.where((label == 1).reshape(-1, 1), out[1], out[0])


def _closed_form_score(path, k, x, t):
    al, si = path.alpha(t).reshape(-1, 1), path.sigma(t).reshape(-1, 1)
    return -(x - al * MU[k]) / (al**2 * STD[k] ** 2 + si**2)


def _point(path, b=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = path.t_min + (path.t_max - path.t_min) * (0.05 + 0.9 * torch.rand(b, generator=g, dtype=F64))
    return torch.randn(b, 2, generator=g, dtype=F64) * path.sigma(t).reshape(-1, 1).clamp_min(1.0), t


@pytest.mark.parametrize("predicts", fs.PREDICTS)
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5, -0.5])
def test_guided_output_is_the_closed_form_combination_in_every_parameterization(predicts, scale):
    """Guide the raw output in any parameterization, convert to a score with fs.Model.conversion: the result
    is score_u + s (score_c - score_u) from the closed form (guidance commutes with the affine conversions)."""
    path = fs.paths.VP()
    net = Labelled(path, predicts)
    b = 7
    guided = classifier_free_guidance(fs.Model(net, path, predicts=predicts), torch.ones(b, dtype=torch.long),
                                      torch.zeros(b, dtype=torch.long), scale)
    assert isinstance(guided, fs.Model) and guided.predicts == predicts
    x, t = _point(path, b)
    raw = guided(x, t)
    assert net.batches == [2 * b]  # both branches in one call
    a, bb = guided.conversion("score", t)
    got = a.reshape(-1, 1) * x + bb.reshape(-1, 1) * raw
    su, sc = _closed_form_score(path, 0, x, t), _closed_form_score(path, 1, x, t)
    want = su + scale * (sc - su)
    # float64 closed forms on both sides; the conversion divides by sigma, alpha >= 6.6e-3: rounding ~1e-13
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_scale_one_and_zero_are_exactly_the_branches():
    path = fs.paths.RectifiedFlow()
    net = Labelled(path, "velocity")
    x, t = _point(path, 5)
    cond, uncond = torch.ones(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    # bit for bit: elementwise arithmetic on the 2B batch equals the same arithmetic on B (no reductions)
    assert torch.equal(CFG(net, 1.0, cond, uncond)(x, t), net.probs[1].velocity(x, t))
    assert torch.equal(CFG(net, 0.0, cond, uncond)(x, t), net.probs[0].velocity(x, t))


def test_one_batched_call_per_evaluation_through_the_sampler():
    path = fs.paths.RectifiedFlow()
    net = Labelled(path, "velocity")
    guide = CFG(net, 2.0, torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))  # batch-1 conds broadcast
    x, info = fs.sample(fs.Model(guide, path, predicts="velocity"), (6, 2), solver="heun", steps=4, dtype=F64,
                        return_info=True)
    assert guide.calls == info["nfe"] == 8 and net.batches == [12] * 8
    assert bool(torch.isfinite(x).all())


def test_guided_flow_endpoint_is_the_flow_of_the_combined_field():
    """Rectified flow, scale 2: the guided velocity 2 u_c - u_u of two Gaussians is linear in x; integrate it
    once through CFG and once as the explicit closed-form combination: same endpoint (rk4, 32 steps)."""
    path = fs.paths.RectifiedFlow()
    net = Labelled(path, "velocity")
    g0, g1 = net.probs[0], net.probs[1]
    x1 = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    guided = fs.sample(fs.Model(CFG(net, 2.0, torch.ones(16, dtype=torch.long), torch.zeros(16, dtype=torch.long)), path,
                                predicts="velocity"), x1, solver="rk4", steps=32)
    combo = fs.sample(fs.Model(lambda x, t: 2.0 * g1.velocity(x, t) - g0.velocity(x, t), path, predicts="velocity"),
                      x1, solver="rk4", steps=32)
    # the same arithmetic in another order (lerp vs 2c - u): float64 rounding over 128 evaluations
    torch.testing.assert_close(guided, combo, rtol=0.0, atol=1e-12)


def test_uncond_none_makes_a_separate_call_with_none():
    path = fs.paths.VP()
    net = Labelled(path, "eps")
    x, t = _point(path, 3)
    out = CFG(net, 3.0, torch.ones(3, dtype=torch.long), None)(x, t)
    assert net.batches == [3, 3]
    e0, e1 = net.probs[0].eps(x, t), net.probs[1].eps(x, t)
    torch.testing.assert_close(out, e0 + 3.0 * (e1 - e0), rtol=1e-12, atol=1e-12)


def test_dict_conditions_keyword_and_per_sample_and_callable_scale():
    seen = {}

    def fn(x, t, *, cond):
        seen["emb"], seen["mask"] = cond["emb"], cond["mask"]
        return x * cond["emb"][:, :1]

    b = 4
    cond = {"emb": torch.full((1, 3), 2.0, dtype=F64), "mask": True}
    uncond = {"emb": torch.zeros(1, 3, dtype=F64), "mask": True}
    x, t = torch.randn(b, 2, dtype=F64), torch.rand(b, dtype=F64)
    scales = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    out = CFG(fn, scales, cond, uncond, cond_kwarg="cond")(x, t)
    assert seen["emb"].shape == (2 * b, 3) and seen["mask"] is True
    torch.testing.assert_close(out, x * (2.0 * scales)[:, None], rtol=1e-15, atol=0)  # uncond 0, cond 2x
    out_t = CFG(fn, lambda tt: 1.0 + tt, cond, uncond, cond_kwarg="cond")(x, t)
    torch.testing.assert_close(out_t, x * (2.0 * (1.0 + t))[:, None], rtol=1e-15, atol=1e-15)


def test_bad_input_names_the_argument():
    fn = lambda x, t, c: x  # noqa: E731
    x, t = torch.randn(4, 2), torch.rand(4)
    with pytest.raises(ValueError, match="scale"):
        CFG(fn, float("nan"), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="batch 3"):
        CFG(fn, 2.0, torch.ones(3, 5), torch.zeros(3, 5))(x, t)
    with pytest.raises(ValueError, match="match after the batch"):
        CFG(fn, 2.0, torch.ones(4, 5), torch.zeros(4, 6))(x, t)
    with pytest.raises(TypeError, match="both must be tensors"):
        CFG(fn, 2.0, torch.ones(4, 5), [1])(x, t)
    with pytest.raises(ValueError, match="cond is None"):
        CFG(fn, 2.0, None, torch.zeros(4))
    with pytest.raises(ValueError, match="shaped like x"):
        CFG(lambda x, t, c: x[:, :1], 2.0, torch.ones(4), torch.zeros(4))(x, t)


@pytest.mark.parametrize("scale, err, needle", [
    (lambda t: torch.ones(3, 2), ValueError, "must be a number or a real \\[B\\] tensor"),
    (lambda t: torch.ones(5), ValueError, "5 entries but the batch has 4"),
    (lambda t: "a", TypeError, "must be a number or a \\[B\\] tensor"),
])
def test_a_bad_scale_function_is_named(scale, err, needle):
    guided = fs.classifier_free_guidance(lambda x, t, c: -x + c, cond=torch.ones(4, 2), uncond=torch.zeros(4, 2),
                                         scale=scale)
    with pytest.raises(err, match=needle):
        guided(torch.randn(4, 2), torch.rand(4))
