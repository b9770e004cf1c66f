"""k-diffusion peers: its samplers (``k_diffusion.sampling.sample_*``) run by its own loops on a
benchmark problem (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models": the denoiser D(x; sigma) and the ODE dx/dsigma = (x - D) / sigma, eq. 3 and 7).

Conventions (docs/peers.md, "k-diffusion"):

* Sigma space. A Gaussian path x_t = alpha x0 + sigma eps becomes k-diffusion's alpha = 1 process by
  x_k = x / alpha, sigma_k = sigma / alpha (= e^-lambda). The denoiser is the problem's own model
  converted to x0: D(x_k, sigma_k) = x0(alpha(t) x_k, t) with t = path.t_of_lambda(-log sigma_k).
* Sigmas: ``get_sigmas_karras`` (rho = 7, k-diffusion's default schedule) between sigma_k(t_min) and
  sigma_k(t_start), built in float64, and WITHOUT the trailing sigma = 0 that k-diffusion appends (it
  normally ends with a last Euler / denoising step to sigma = 0): the run ends at t_min, where the
  benchmark's reference is. Where sigma(t_min) = 0 itself (rectified flow, t_min = 0) the ramp ends at
  0 and k-diffusion's own final step to sigma = 0 is the last one.
* Start: t_max, or 0.99 on rectified flow (alpha(1) = 0: sigma_k is infinite there).
* Noise (SDE samplers): a ``torch.Generator`` seeded by ``seed`` for the samplers whose default is
  ``randn_like`` (euler_ancestral, dpmpp_2s_ancestral); k-diffusion's own ``BrownianTreeNoiseSampler``
  with ``seed`` for those that default to it (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde). eta = 1.
* NFE: counted by a wrapper around the denoiser.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from . import CountingFn, PeerSolver, budget_steps, check_run_args, import_k_diffusion_sampling, rf_t_start, target_fn

LIBRARY = "k-diffusion"
RHO = 7.0

# name -> (sampler function name, stochastic, NFE of a step to sigma > 0, NFE of a step to sigma = 0,
#          default noise: "randn" | "tree" | None)
SAMPLERS = {
    "euler": ("sample_euler", False, 1, 1, None),
    "heun": ("sample_heun", False, 2, 1, None),
    "dpm_2": ("sample_dpm_2", False, 2, 1, None),
    "lms": ("sample_lms", False, 1, 1, None),
    "dpmpp_2m": ("sample_dpmpp_2m", False, 1, 1, None),
    "euler_ancestral": ("sample_euler_ancestral", True, 1, 1, "randn"),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", True, 2, 1, "randn"),
    "dpmpp_sde": ("sample_dpmpp_sde", True, 2, 1, "tree"),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", True, 1, 1, "tree"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", True, 1, 1, "tree"),
}


def applies(problem) -> bool:
    """Every Gaussian path with a finite sigma/alpha at the start: VP, EDM, rectified flow (from 0.99)."""
    return problem.path.name in ("vp", "edm", "rectified_flow")


def applies_tree(problem) -> bool:
    """The Brownian-tree samplers: VP and EDM only. On rectified flow sigma_k(t_min = 0) = 0 and the
    Karras ramp's last positive sigma is ~1e-9 (N = 40); torchsde's BrownianTree over [1e-9, 99]
    then recurses past Python's limit (RecursionError in ``_Interval._split``)."""
    return problem.path.name in ("vp", "edm")


@contextlib.contextmanager
def _default_float64():
    """``get_sigmas_karras`` ramps with ``torch.linspace`` in the default dtype: float64 sigmas need it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sigma_k(path, t) -> torch.Tensor:
    """k-diffusion's noise level sigma / alpha = exp(-lambda(t)), float64."""
    return torch.exp(-path.lam(torch.as_tensor(t, dtype=torch.float64)))


def karras_sigmas(K, problem, steps: int, t_start: float) -> torch.Tensor:
    """``steps + 1`` decreasing float64 sigmas from sigma_k(t_start) to sigma_k(t_min): k-diffusion's
    ``get_sigmas_karras(steps + 1, ...)`` with its appended trailing 0 removed."""
    s_max = float(sigma_k(problem.path, t_start))
    s_min = float(sigma_k(problem.path, problem.t_min))
    with _default_float64():
        sigmas = K.get_sigmas_karras(steps + 1, s_min, s_max, rho=RHO)
    if sigmas.dtype != torch.float64 or sigmas.numel() != steps + 2 or float(sigmas[-1]) != 0.0:
        raise RuntimeError(f"unexpected get_sigmas_karras output {sigmas.dtype} {tuple(sigmas.shape)}: "
                           "k-diffusion changed its schedule; update bench/peers/k_diffusion_peer.py.")
    return sigmas[:-1]


def times_of_sigmas(problem, sigmas: torch.Tensor, t_start: float) -> torch.Tensor:
    """Path times t(sigma_k) = t_of_lambda(-log sigma_k), ends pinned to t_start and t_min."""
    t = problem.path.t_of_lambda(-torch.log(sigmas))
    t[0], t[-1] = t_start, problem.t_min
    return t.clamp(problem.t_min, t_start)


def denoiser(problem, t_start: float):
    """D(x_k, sigma_k) = x0(alpha(t) x_k, t), t = t(sigma_k), from the problem's own model."""
    x0 = target_fn(problem, "x0")
    path = problem.path

    def D(x_k, sigma, **_):
        t = path.t_of_lambda(-torch.log(sigma.to(torch.float64))).clamp(problem.t_min, t_start)
        alpha = path.alpha(t).to(x_k.dtype).view((-1,) + (1,) * (x_k.dim() - 1))
        return x0(alpha * x_k, t)

    return D


def _nfe(spec, sigmas_last_zero: bool, steps: int) -> int:
    _, _, per_step, zero_step, _ = spec
    return per_step * steps - (per_step - zero_step) * sigmas_last_zero


def run_sampler(name: str, problem, x_init: torch.Tensor, *, nfe=None, tol=None, seed: int = 0,
                steps: int | None = None, sigmas: torch.Tensor | None = None):
    """Run ``k_diffusion.sampling.<SAMPLERS[name]>`` from x_init at t_start(problem) to t_min.

    Give ``nfe`` (the benchmark's budget), or ``steps`` (Karras sigmas), or ``sigmas`` (any decreasing
    float64 sigma_k from sigma_k(t_start) to sigma_k(t_min): used by the agreement tests).
    Returns (x at t_min, counted NFE).
    """
    K = import_k_diffusion_sampling()
    if K is None:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion (see bench/peers/__init__.py).")
    spec = SAMPLERS[name]
    t_start = rf_t_start(problem)
    pname = f"{LIBRARY}:{name}"
    last_zero = float(sigma_k(problem.path, problem.t_min)) == 0.0
    if sigmas is None:
        if steps is None:
            check_run_args(pname, x_init, nfe, tol, adaptive=False, min_nfe=_nfe(spec, last_zero, 1))
            steps = budget_steps(nfe, functools.partial(_nfe, spec, last_zero), pname)
        sigmas = karras_sigmas(K, problem, steps, t_start)
    else:
        check_run_args(pname, x_init, 1, None, adaptive=False)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    alpha0 = float(problem.path.alpha(torch.tensor(t_start, dtype=torch.float64)))
    alpha1 = float(problem.path.alpha(torch.tensor(problem.t_min, dtype=torch.float64)))
    model = CountingFn(denoiser(problem, t_start))
    x_k = x_init.to(torch.float64) / alpha0
    kwargs = {"disable": True}
    if spec[4] == "randn":
        g = torch.Generator(device=x_k.device).manual_seed(seed)
        kwargs["noise_sampler"] = lambda s, s_next: torch.randn(x_k.shape, generator=g, dtype=x_k.dtype, device=x_k.device)
    elif spec[4] == "tree":
        # the tree rounds its ends to ~6 digits and then warns that the first and last sigma lie outside
        # them: widen the interval by 0.1% (W(s) on a wider interval has the same increments' law)
        positive = sigmas[sigmas > 0]
        lo, hi = float(positive.min()) * (1 - 1e-3), float(positive.max()) * (1 + 1e-3)
        kwargs["noise_sampler"] = K.BrownianTreeNoiseSampler(x_k, lo, hi, seed=seed)
    x_end = getattr(K, spec[0])(model, x_k, sigmas, **kwargs)
    return alpha1 * x_end, model.calls


def _make(name: str) -> PeerSolver:
    spec = SAMPLERS[name]
    return PeerSolver(
        name=f"{LIBRARY}:{name}", library=LIBRARY, stochastic=spec[1], adaptive=False,
        applies=applies_tree if spec[4] == "tree" else applies,
        run=functools.partial(run_sampler, name), t_start=rf_t_start,
        note="Karras sigmas (rho=7) in sigma/alpha space, no trailing 0: ends at t_min",
    )


def solvers() -> list[PeerSolver]:
    """The k-diffusion peers, or [] when k-diffusion is not installed."""
    if import_k_diffusion_sampling() is None:
        return []
    return [_make(name) for name in SAMPLERS]


__all__ = ["SAMPLERS", "solvers", "run_sampler", "karras_sigmas", "times_of_sigmas", "sigma_k", "denoiser", "applies"]
