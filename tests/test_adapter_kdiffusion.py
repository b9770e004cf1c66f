"""k-diffusion adapter: flowsolve's samplers under a k-diffusion denoiser reproduce k-diffusion's own
samplers on its Karras sigma schedule (the peer as independent truth), in float64, on an analytic
Gaussian-mixture denoiser (FORMULAS.md §4: E[x0 | x_sigma] on the EDM path, x = x0 + sigma eps)."""
import math

import pytest
import torch

import flowsolve as fs
from bench.peers import import_k_diffusion_sampling
from flowsolve.adapters import from_k_diffusion, grid_from_sigmas
from tests.helpers import Counting

K = import_k_diffusion_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion is not installed (pip install flowsolve[peers])")

F64 = torch.float64
# Both sides run in float64 and perform the same arithmetic up to reassociation (flowsolve folds the
# x0 -> velocity conversion into its coefficient table). The measured disagreement is <= 6e-12 (Heun,
# 2 steps, |x| ~ 80 at the start); 1e-9 is float64 rounding (1.1e-16) times the sigma_max = 80 scale of x,
# times the condition of ~20 steps, with a wide margin. The issue asks for 1e-5: this is stricter.
ATOL = 1e-9


def _mixture(path, event=(2,)):
    d = math.prod(event)
    means = torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]], dtype=F64)
    means = means.repeat(1, (d + 1) // 2)[:, :d].reshape(3, *event)
    return fs.analytic.GaussianMixture(means, torch.tensor([0.3, 0.6, 0.2], dtype=F64),
                                       torch.tensor([0.5, 0.3, 0.2], dtype=F64), path)


def _start(sigmas, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * sigmas[0]  # k-diffusion scales unit noise by sigma_max


@needs_k
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 20])
@pytest.mark.parametrize("ours,theirs", [("heun", "sample_heun"), ("dpm++2m", "sample_dpmpp_2m"),
                                         ("euler", "sample_euler")])
def test_matches_k_diffusion_on_karras_sigmas(n, ours, theirs):
    """Same denoiser, same sigmas (with k-diffusion's trailing sigma = 0), same x_T: same endpoint and the
    same number of denoiser calls (Heun: 2n - 1, its last step is Euler into sigma = 0; 2M: n)."""
    path = fs.paths.EDM()
    gm = _mixture(path)
    sigmas = K.get_sigmas_karras(n, 0.002, 80.0).to(F64)
    assert float(sigmas[-1]) == 0.0
    x_T = _start(sigmas, (64, 2))
    peer = Counting(gm.x0)
    ref = getattr(K, theirs)(peer, x_T.clone(), sigmas, disable=True)
    mine = Counting(gm.x0, t_lo=float(sigmas[-2]), t_hi=float(sigmas[0]))  # never evaluated at sigma = 0
    model = from_k_diffusion(mine)
    out, info = fs.sample(model, x_T.clone(), solver=ours, grid=grid_from_sigmas(sigmas), return_info=True)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=0.0, atol=ATOL)
    assert mine.calls == peer.calls == info["nfe"]


@needs_k
def test_image_shaped_preconditioned_network_matches_k_diffusion():
    """[B, C, H, W] state and EDM's Table 1 preconditioning: a raw network F built as the exact inverse of
    D = c_skip x + c_out F(c_in x, ln(sigma)/4) around the analytic denoiser; the adapter's D must give
    k-diffusion's Heun endpoint when k-diffusion runs the analytic denoiser itself."""
    event, sd = (2, 3, 3), 0.5
    gm = _mixture(fs.paths.EDM(), event)

    def raw_network(x_in, c_noise):  # what an EDM-preconditioned network would have learnt exactly
        sigma = torch.exp(4.0 * c_noise).reshape(-1, 1, 1, 1)
        s2 = sigma**2 + sd**2
        x = x_in * torch.sqrt(s2)
        return (gm.x0(x, sigma.reshape(-1)) - sd**2 / s2 * x) / (sigma * sd / torch.sqrt(s2))

    sigmas = K.get_sigmas_karras(6, 0.002, 80.0).to(F64)
    x_T = _start(sigmas, (8, *event))
    ref = K.sample_heun(gm.x0, x_T.clone(), sigmas, disable=True)
    out = fs.sample(from_k_diffusion(raw_network, sigma_data=sd), x_T.clone(), solver="heun", grid=grid_from_sigmas(sigmas))
    # one more source of rounding than above: x -> c_in x -> x, relative 1e-16 of |x| <= 80 per call
    torch.testing.assert_close(out, ref, rtol=0.0, atol=ATOL)


def test_preconditioning_is_identity_at_sigma_zero_and_passes_extra_args():
    seen = {}

    def raw(x_in, c_noise, *, label):
        seen["label"], seen["c_noise"] = label, c_noise
        return torch.full_like(x_in, float("nan")) if bool((~torch.isfinite(c_noise)).any()) else x_in

    model = from_k_diffusion(raw, sigma_data=0.5, extra_args={"label": 3})
    x = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)
    out = model(x, t)
    assert seen["label"] == 3 and bool(torch.isfinite(seen["c_noise"]).all())
    torch.testing.assert_close(out[:2], x[:2], rtol=0, atol=0)  # c_skip(0) = 1, c_out(0) = 0: D = x exactly
    # sigma = 1, sd = 0.5: c_skip = 0.2, c_out = 1/sqrt(5), c_in = 2/sqrt(5), F = identity
    torch.testing.assert_close(out[2:], (0.2 + 2.0 / 5.0) * x[2:], rtol=1e-15, atol=1e-15)


def test_model_on_edm_path_and_range_from_denoiser_attributes():
    class Wrapped(torch.nn.Module):  # like k-diffusion's DiscreteSchedule wrappers: 0-d tensor attributes
        def __init__(self):
            super().__init__()
            self.register_buffer("sigma_min", torch.tensor(0.0292))
            self.register_buffer("sigma_max", torch.tensor(14.6146))

        def forward(self, x, sigma):
            return x / (1.0 + sigma.reshape(-1, 1) ** 2)

    model = from_k_diffusion(Wrapped())
    assert isinstance(model.path, fs.paths.EDM) and model.predicts == "x0"
    assert model.path.t_min == pytest.approx(0.0292) and model.path.t_max == pytest.approx(14.6146)
    assert from_k_diffusion(Wrapped(), sigma_min=0.1, sigma_max=10.0).path.t_max == 10.0
    assert from_k_diffusion(lambda x, s: x).path.t_max == 80.0


def test_grid_from_sigmas_keeps_trailing_zero_and_validates():
    s = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float32)
    g = grid_from_sigmas(s)
    assert g.dtype == F64 and g.tolist() == s.double().tolist()
    with pytest.raises(ValueError, match="strictly decreasing"):
        grid_from_sigmas([10.0, 1.0, 0.0, 0.0])  # duplicated final sigma: a no-op last step
    with pytest.raises(ValueError, match=">= 0"):
        grid_from_sigmas([1.0, -0.5])
    with pytest.raises(ValueError, match="at least 2"):
        grid_from_sigmas([1.0])
    with pytest.raises(ValueError, match="sigma_data"):
        from_k_diffusion(lambda x, s: x, sigma_data=-1.0)
    with pytest.raises(TypeError, match="callable"):
        from_k_diffusion(3)
