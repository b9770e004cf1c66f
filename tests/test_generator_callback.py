"""torch.Generator seeds, the per-step callback's ``denoised`` (x0 prediction) and the progress bar (issue 6)."""
import io

import pytest
import torch

import flowsolve as fs
from flowsolve.checks import key_from_generator

FIXED = [s.name for s in fs.solvers() if not s.adaptive]
STOCHASTIC_FIXED = [s.name for s in fs.solvers() if s.stochastic and not s.adaptive]


def _problem(dtype=torch.float64):
    path = fs.paths.VP()
    prob = fs.analytic.Gaussian(torch.tensor([0.5, -1.0, 0.25], dtype=dtype), torch.tensor([0.7, 1.2, 0.4], dtype=dtype),
                                path)
    return path, prob


class Recorder:
    """Wraps the analytic eps; records every (x, t) the solver evaluates at, in call order."""

    def __init__(self, prob):
        self.prob, self.calls = prob, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.prob.eps(x, t)


# ------------------------------------------------------------------------------------------ generator
def test_generator_key_is_two_randint_words():
    """The documented derivation: key = (w1 << 32) | w0 from torch.randint(0, 2^32, (2,)), in int64's signed range."""
    w = torch.randint(0, 2**32, (2,), generator=torch.Generator().manual_seed(123), dtype=torch.int64).tolist()
    expect = (w[1] << 32) | w[0]
    expect = expect - 2**64 if expect >= 2**63 else expect
    assert key_from_generator(torch.Generator().manual_seed(123)) == expect
    assert -(2**63) <= expect < 2**63


@pytest.mark.parametrize("solver", ["euler_maruyama", "dpm++2m-sde"])
def test_generator_seed_is_deterministic_and_equals_its_key(solver):
    path, prob = _problem(torch.float32)
    model = fs.Model(prob.eps, path, predicts="eps")
    kw = dict(solver=solver, steps=4)
    a = fs.sample(model, (3, 3), seed=torch.Generator().manual_seed(7), **kw)
    b = fs.sample(model, (3, 3), generator=torch.Generator().manual_seed(7), **kw)
    c = fs.sample(model, (3, 3), seed=key_from_generator(torch.Generator().manual_seed(7)), **kw)
    d = fs.sample(model, (3, 3), generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, d)  # another generator seed: other noise


def test_generator_advances_like_torch_sampling():
    path, prob = _problem(torch.float32)
    model = fs.Model(prob.eps, path, predicts="eps")
    g = torch.Generator().manual_seed(3)
    first = fs.sample(model, (2, 3), solver="euler_maruyama", steps=3, generator=g)
    second = fs.sample(model, (2, 3), solver="euler_maruyama", steps=3, generator=g)
    assert not torch.allclose(first, second)
    g.manual_seed(3)
    assert torch.equal(fs.sample(model, (2, 3), solver="euler_maruyama", steps=3, generator=g), first)


def test_generator_keys_samples_batch_invariantly():
    """Sample b is the same alone (sample_offset=b) or in the batch: the generator's key is one seed for all."""
    path, prob = _problem(torch.float32)
    model = fs.Model(prob.eps, path, predicts="eps")
    full = fs.sample(model, (4, 3), solver="euler_maruyama", steps=3, generator=torch.Generator().manual_seed(11))
    for b in range(4):
        one = fs.sample(model, (1, 3), solver="euler_maruyama", steps=3, sample_offset=b,
                        generator=torch.Generator().manual_seed(11))
        assert torch.equal(one[0], full[b])


def test_generator_errors():
    path, prob = _problem(torch.float32)
    model = fs.Model(prob.eps, path, predicts="eps")
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*seed= instead"):
        fs.sample(model, (2, 3), generator=5)
    with pytest.raises(ValueError, match="either seed= or generator="):
        fs.sample(model, (2, 3), seed=4, generator=torch.Generator())


# ------------------------------------------------------------------------------------------ callback
@pytest.mark.parametrize("solver", FIXED)
def test_callback_denoised_is_x0_of_first_evaluation_of_the_step(solver):
    """``denoised`` at step n equals the exact x0 (the analytic Gaussian's E[x0 | x_t], an independent closed
    form) at the state and time of the first model call the solver made in step n; None when it made none."""
    path, prob = _problem()
    rec = Recorder(prob)
    model = fs.Model(rec, path, predicts="eps")
    seen = []

    def cb(step, t, x, denoised):
        seen.append((step, len(rec.calls), None if denoised is None else denoised.clone()))

    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fs.sample(model, x_T, solver=solver, steps=5, callback=cb, seed=1)
    assert [s for s, _, _ in seen] == list(range(5))
    start = 0
    for step, end, den in seen:
        if end == start:
            assert den is None, f"step {step} made no evaluation but got a denoised"
            continue
        x_e, t_e = rec.calls[start]
        truth = prob.x0(x_e, t_e)
        # float64 throughout: the conversion (x - sigma eps)/alpha differs from the closed form by rounding only,
        # amplified by 1/alpha <= 150 at t = 1: 1e-10 is ~1e4 ulps of |x| ~ 3, far below any real mismatch (O(0.1))
        assert den is not None and den.dtype == torch.float64
        assert torch.allclose(den, truth, rtol=0, atol=1e-10), (solver, step, float((den - truth).abs().max()))
        start = end


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_adaptive_callback_denoised_is_x0_at_the_accepted_point(solver):
    path, prob = _problem()
    model = fs.Model(prob.eps, path, predicts="eps")
    checked = []

    def cb(step, t, x, denoised):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype)
        assert denoised is not None
        # float64 state; 1e-9 admits the conversion's rounding amplified by 1/alpha (<= 150) and nothing else
        assert torch.allclose(denoised, prob.x0(x, tt), rtol=0, atol=1e-9)
        checked.append(step)

    _, info = fs.sample(model, (3, 3), solver=solver, rtol=1e-4, atol=1e-4, dtype=torch.float64, callback=cb,
                        return_info=True)
    assert checked == list(range(info["steps"]))


def test_three_argument_callback_still_works():
    path, prob = _problem()
    model = fs.Model(prob.eps, path, predicts="eps")
    seen = []
    fs.sample(model, (2, 3), solver="heun", steps=3, callback=lambda step, t, x: seen.append((step, t)))
    assert [s for s, _ in seen] == [0, 1, 2] and seen[-1][1] == path.t_min


def test_callback_with_kwargs_gets_denoised():
    path, prob = _problem()
    model = fs.Model(prob.eps, path, predicts="eps")
    got = []
    fs.sample(model, (2, 3), solver="euler", steps=2, callback=lambda **kw: got.append(sorted(kw)))
    assert got == [["denoised", "step", "t", "x"]] * 2


# ------------------------------------------------------------------------------------------ progress
def test_progress_fixed_step_writes_tqdm_bar():
    path, prob = _problem()
    model = fs.Model(prob.eps, path, predicts="eps")
    buf = io.StringIO()
    fs.sample(model, (2, 3), solver="heun", steps=7, progress={"file": buf, "mininterval": 0})
    out = buf.getvalue()
    assert "flowsolve heun" in out and "7/7" in out


def test_progress_adaptive_counts_accepted_steps():
    path, prob = _problem()
    model = fs.Model(prob.eps, path, predicts="eps")
    buf = io.StringIO()
    _, info = fs.sample(model, (2, 3), solver="dopri5", rtol=1e-3, atol=1e-3, return_info=True,
                        progress={"file": buf, "mininterval": 0})
    out = buf.getvalue()
    assert "flowsolve dopri5 (accepted steps)" in out and f"{info['steps']}it" in out


def test_progress_true_goes_to_stderr(capsys):
    path, prob = _problem()
    fs.sample(fs.Model(prob.eps, path, predicts="eps"), (2, 3), solver="euler", steps=3, progress=True)
    assert "flowsolve euler" in capsys.readouterr().err


def test_progress_bad_type():
    path, prob = _problem()
    with pytest.raises(TypeError, match=r"progress='yes' must be True, False or a dict of tqdm keyword arguments"):
        fs.sample(fs.Model(prob.eps, path, predicts="eps"), (2, 3), steps=2, progress="yes")
