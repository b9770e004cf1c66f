"""diffusers adapter: a diffusers UNet + scheduler as a ``fs.Model`` on a continuous-time path.

A discrete-time DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 4:
``q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I)`` with ``abar_i = prod_{j<=i} (1 - beta_j)``)
is turned into a continuous-time VP path as DPM-Solver does for discrete-time models (Lu et al. 2022,
"DPM-Solver", appendix on discrete-time DPMs, and ``NoiseScheduleVP('discrete')`` of its reference code): training step
``i = 0..N-1`` sits at ``t_i = (i + 1) / N``, ``alpha(t_i)^2 = abar_i``, and between the knots the half
log-SNR ``lambda = log(alpha / sigma)`` is interpolated piecewise-linearly in t. The network is then
called at the continuous timestep ``t N - 1`` (a float), which equals the training index at the knots.

Two state spaces:

* ``space="vp"`` (default): the scheduler's own state ``x_i = alpha_i x0 + sigma_i eps`` on
  :class:`DiscreteVP`; grids of path time t; the schedulers DDIMScheduler, DPMSolverMultistepScheduler,
  ... live here.
* ``space="ve"``: the k-diffusion / EDM state ``x / alpha`` with time = noise level ``s = sigma/alpha``
  on ``fs.paths.EDM`` (alpha = 1, sigma = t): the space of diffusers' EulerDiscreteScheduler,
  HeunDiscreteScheduler, ... whose ``sigmas`` are these s and whose ``scale_model_input`` divides by
  ``sqrt(s^2 + 1)`` (Karras et al. 2022, Table 1, "VP"). Euler in this space is Euler in s.

References: Ho et al. 2020 (DDPM schedule); Song, Meng & Ermon 2021 (DDIM); Lu et al. 2022 (DPM-Solver,
appendix on discrete-time models) and 2022b (DPM-Solver++); Karras et al. 2022 (EDM); diffusers' scheduler
docs, https://huggingface.co/docs/diffusers/api/schedulers/overview (``beta_schedule``,
``prediction_type``, ``timestep_spacing``, ``final_sigmas_type``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..model import Model, _closest
from ..paths import EDM, GaussianPath, _as_tensor

__all__ = ["DiscreteVP", "from_diffusers", "grid_from_diffusers", "alphas_cumprod_from_config"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACES = ("vp", "ve")


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) to full precision for every x (torch's softplus returns x itself above 20)."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))


class DiscreteVP(GaussianPath):
    """Continuous-time VP path through a discrete ``alphas_cumprod`` (Lu et al. 2022, appendix on discrete-time DPMs).

    Knots: training step i (0..N-1) at ``t_i = (i + 1) / N`` with ``alpha(t_i)^2 = alphas_cumprod[i]``,
    ``sigma^2 = 1 - alpha^2``; ``lambda = log(alpha/sigma)`` is linear in t between knots, so
    ``alpha^2 = sigmoid(2 lambda)`` and ``sigma^2 = sigmoid(-2 lambda)`` are smooth and monotone there.

    On ``[0, t_0]`` (below the first training step) sigma is continued linearly in t down to
    ``sigma(0) = 0`` (alpha = sqrt(1 - sigma^2) = 1): t = 0 is the data end, every derivative stays
    finite there (a linear log-alpha would give sigma ~ sqrt(t), whose derivative is infinite at 0),
    and lambda(0) = +inf. The model is evaluated below t_0 (timestep < 0) only if a grid goes there:
    the default sampling range is ``[t_min, t_max] = [t_0, 1] = [1/N, 1]``.

    Solvers. The exact PF-ODE solution depends on t only through lambda, which is smooth in lambda; but
    d lambda/dt jumps at every knot, so the ODE *in t* has kinks there: solvers stepping in t (euler, heun,
    rk4) are first order when their steps straddle knots, while solvers written in lambda (ddim, dpm++2m /
    dpm++3m) see no kink (measured on Gaussian data: heun's error halves, dpm++2m's quarters per halving). To match diffusers' Euler use ``space="ve"`` (Euler in s = sigma/alpha).

    Args:
        alphas_cumprod: 1-D, strictly decreasing, values in (0, 1); any float dtype (held in float64).
        t_min, t_max: default sampling range (default 1/N and 1).
    """

    name = "discrete_vp"
    default_grid = "logsnr"

    def __init__(self, alphas_cumprod, t_min: float | None = None, t_max: float = 1.0):
        try:
            acp = torch.as_tensor(alphas_cumprod).detach().cpu().to(torch.float64).clone()
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"alphas_cumprod must be a 1-D tensor or sequence of floats; got {type(alphas_cumprod).__name__}.") from e
        if acp.dim() != 1 or acp.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries; got shape {tuple(acp.shape)}.")
        if not bool(((acp > 0) & (acp < 1)).all()):
            bad = acp[~((acp > 0) & (acp < 1))][0]
            raise ValueError(
                f"alphas_cumprod must lie in (0, 1) (alpha^2 of each training step); found {float(bad)!r}. A "
                f"zero-terminal-SNR schedule needs its last value clamped above 0 (diffusers uses 2**-24)."
            )
        if not bool((acp[1:] < acp[:-1]).all()):
            i = int((acp[1:] >= acp[:-1]).nonzero()[0])
            raise ValueError(f"alphas_cumprod must be strictly decreasing; alphas_cumprod[{i + 1}] >= alphas_cumprod[{i}].")
        self.alphas_cumprod = acp
        self.N = acp.numel()
        # lambda_i = log(alpha/sigma) = (log abar - log(1 - abar)) / 2
        self._lam = 0.5 * (torch.log(acp) - torch.log1p(-acp))
        self._sigma0 = float(torch.sqrt(1.0 - acp[0]))
        self._t0 = 1.0 / self.N
        self.t_min = self._t0 if t_min is None else float(t_min)
        self.t_max = float(t_max)
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1 for DiscreteVP; got t_min={self.t_min}, t_max={self.t_max}.")

    # ----- timestep <-> t -------------------------------------------------------------------
    def timestep_of_t(self, t):
        """The (continuous) training timestep at path time t: ``t N - 1`` (float64)."""
        return _as_tensor(t).to(torch.float64) * self.N - 1.0

    def t_of_timestep(self, i):
        """Path time of (possibly fractional) training timestep i: ``(i + 1) / N`` (float64)."""
        return (_as_tensor(i).to(torch.float64) + 1.0) / self.N

    # ----- the piecewise-linear lambda on [t_0, 1] --------------------------------------------
    def _segment(self, t):
        """(lambda on [t_0, 1], its slope d lambda/dt, mask t >= t_0); t clamped into [0, 1]."""
        u = torch.clamp(t * self.N - 1.0, 0.0, self.N - 1.0)  # continuous timestep
        i = torch.clamp(torch.floor(u), max=self.N - 2).to(torch.int64)
        w = u - i.to(u.dtype)
        lam_i, lam_j = self._lam[i], self._lam[i + 1]
        lam = lam_i + w * (lam_j - lam_i)
        slope = (lam_j - lam_i) * self.N
        return lam, slope, t >= self._t0

    def lam(self, t):
        t = _as_tensor(t).to(torch.float64)
        lam, _, hi = self._segment(t)
        s = self._sigma0 * torch.clamp(t, min=0.0) / self._t0  # sigma on [0, t_0]
        lam_lo = 0.5 * (torch.log1p(-s * s) - 2.0 * torch.log(s))
        return torch.where(hi, lam, lam_lo)

    def log_alpha(self, t):
        t = _as_tensor(t).to(torch.float64)
        lam, _, hi = self._segment(t)
        s = self._sigma0 * torch.clamp(t, min=0.0) / self._t0
        # alpha^2 = sigmoid(2 lam) => log alpha = -softplus(-2 lam) / 2
        return torch.where(hi, -0.5 * _softplus(-2.0 * lam), 0.5 * torch.log1p(-s * s))

    def sigma(self, t):
        t = _as_tensor(t).to(torch.float64)
        lam, _, hi = self._segment(t)
        s = self._sigma0 * torch.clamp(t, min=0.0) / self._t0
        return torch.where(hi, torch.exp(-0.5 * _softplus(2.0 * lam)), s)

    def d_log_alpha(self, t):
        t = _as_tensor(t).to(torch.float64)
        lam, slope, hi = self._segment(t)
        s = self._sigma0 * torch.clamp(t, min=0.0) / self._t0
        ds = self._sigma0 / self._t0
        # d log alpha / d lam = sigma^2 = sigmoid(-2 lam); below t_0: d/dt log sqrt(1 - s^2) = -s s' / (1 - s^2)
        return torch.where(hi, torch.sigmoid(-2.0 * lam) * slope, -s * ds / (1.0 - s * s))

    def d_sigma(self, t):
        t = _as_tensor(t).to(torch.float64)
        lam, slope, hi = self._segment(t)
        # d log sigma / d lam = -alpha^2 = -sigmoid(2 lam)
        sig = torch.exp(-0.5 * _softplus(2.0 * lam))
        return torch.where(hi, -sig * torch.sigmoid(2.0 * lam) * slope,
                           torch.full_like(t, self._sigma0 / self._t0))

    def t_of_lambda(self, lam):
        """Inverse of ``lam``: +inf -> 0 (data end); below lambda(1) (no such t) -> t_hi = 1."""
        lam = _as_tensor(lam).to(torch.float64)
        neg = (-self._lam).contiguous()  # increasing
        j = torch.searchsorted(neg, (-lam).contiguous())  # neg[j-1] < -lam <= neg[j]
        j = torch.clamp(j, 1, self.N - 1)
        lam_i, lam_j = self._lam[j - 1], self._lam[j]
        w = torch.clamp((lam - lam_i) / (lam_j - lam_i), 0.0, 1.0)
        t_hi = (j.to(torch.float64) + w) / self.N  # timestep (j - 1) + w, plus 1, over N
        # below t_0: sigma^2 = sigmoid(-2 lam), t = t_0 sigma / sigma_0
        t_lo = self._t0 * torch.sqrt(torch.sigmoid(-2.0 * lam)) / self._sigma0
        return torch.where(lam > self._lam[0], torch.clamp(t_lo, max=self._t0), t_hi)

    def __repr__(self) -> str:
        return f"DiscreteVP(N={self.N}, t_min={self.t_min}, t_max={self.t_max})"


# ----------------------------------------------------------------------------------------------
def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17 (cosine, s = 0.008), as betas clipped at 0.999 (diffusers' float32)."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _get(cfg, key, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def alphas_cumprod_from_config(config) -> torch.Tensor:
    """``alphas_cumprod`` of a diffusers scheduler config (a dict or FrozenDict), computed exactly as
    diffusers' DDPM-family schedulers compute it: float32 betas from ``trained_betas`` or
    ``beta_schedule`` ("linear": Ho et al. 2020; "scaled_linear": Stable Diffusion's; "squaredcos_cap_v2":
    Nichol & Dhariwal 2021), float32 cumulative product (so the knots equal the scheduler's bit for bit).
    Returned as float64. A config holding ``alphas_cumprod`` itself is used as is."""
    if _get(config, "alphas_cumprod") is not None:
        return torch.as_tensor(_get(config, "alphas_cumprod")).to(torch.float64)
    if _get(config, "rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler config has rescale_betas_zero_snr=True; pass the scheduler object itself (its "
            "alphas_cumprod holds the rescaled, clamped schedule) or alphas_cumprod directly."
        )
    n = int(_get(config, "num_train_timesteps", 1000))
    trained = _get(config, "trained_betas")
    if trained is not None:
        betas = torch.tensor(list(trained) if not isinstance(trained, torch.Tensor) else trained, dtype=torch.float32)
    else:
        sched = _get(config, "beta_schedule", "linear")
        b0, b1 = float(_get(config, "beta_start", 0.0001)), float(_get(config, "beta_end", 0.02))
        if sched == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif sched == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        elif sched == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(n)
        else:
            raise ValueError(
                f"scheduler config beta_schedule={sched!r} is not one of {BETA_SCHEDULES}.{_closest(sched, BETA_SCHEDULES)} "
                f"Pass trained_betas, or alphas_cumprod directly."
            )
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def _alphas_cumprod(scheduler_or_config) -> tuple[torch.Tensor, object]:
    """(alphas_cumprod float64, config or None) from a scheduler, a config mapping or the array itself."""
    obj = scheduler_or_config
    if isinstance(obj, (torch.Tensor, list, tuple)) or type(obj).__module__ == "numpy":
        return torch.as_tensor(obj).to(torch.float64), None
    if isinstance(obj, Mapping):
        return alphas_cumprod_from_config(obj), obj
    acp = getattr(obj, "alphas_cumprod", None)
    config = getattr(obj, "config", None)
    if isinstance(acp, torch.Tensor):
        return acp.detach().cpu().to(torch.float64), config
    if isinstance(config, Mapping):
        return alphas_cumprod_from_config(config), config
    raise TypeError(
        f"scheduler_or_config must be a diffusers scheduler (e.g. DDIMScheduler(...)), its .config dict, or a 1-D "
        f"alphas_cumprod tensor; got {type(obj).__name__}."
    )


def _raw_output(out):
    """``out.sample`` for a diffusers output, the first element of a tuple (return_dict=False), else out."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the diffusers model returned {type(out).__name__}; expected a tensor, an output with .sample, or a tuple "
        f"whose first element is the prediction."
    )


class _DiffusersFn:
    """``fn(x, t)`` for ``fs.Model``: maps path time to the network's timestep (and, in "ve" space, the
    state to the network's input scale) and calls ``net(sample, timestep)``."""

    def __init__(self, net, path: DiscreteVP, space: str, kind: str, round_timesteps: bool):
        self.net, self.dvp, self.space, self.kind, self.round = net, path, space, kind, round_timesteps
        self.__name__ = getattr(net, "__name__", type(net).__name__)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Training timestep(s) for path time(s) t ([B]); float in t's dtype, or int64 if rounded."""
        t64 = t.to(torch.float64)
        if self.space == "ve":
            t64 = self.dvp.t_of_lambda(-torch.log(t64))  # noise level s -> DiscreteVP time
        ts = self.dvp.timestep_of_t(t64)
        if self.round:
            return torch.clamp(torch.round(ts), 0, self.dvp.N - 1).to(torch.int64).to(t.device)
        return ts.to(dtype=t.dtype, device=t.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ts = self.timestep(t)
        if self.space == "vp":
            return _raw_output(self.net(x, ts))
        s = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        c_in = torch.rsqrt(s * s + 1.0)  # alpha_vp = 1/sqrt(1 + s^2): x_vp = x_ve alpha_vp
        raw = _raw_output(self.net(x * c_in, ts))
        if self.kind == "v":  # eps = alpha v + sigma x_vp = c_in v + s c_in^2 x_ve
            return c_in * raw + s * c_in * c_in * x
        return raw  # eps (unchanged by the rescaling) or x0


def from_diffusers(unet_or_fn, scheduler_or_config, *, prediction_type: str | None = None, space: str = "vp",
                   round_timesteps: bool = False, check_finite: bool = False) -> Model:
    """A ``fs.Model`` from a diffusers model (``model(sample, timestep).sample``) and its scheduler.

    Args:
        unet_or_fn: a diffusers model (UNet2DModel, UNet2DConditionModel with its extra arguments bound by
            ``functools.partial``, ...) or any callable ``fn(sample, timestep)`` returning a tensor, an output
            with ``.sample`` or a tuple.
        scheduler_or_config: a diffusers scheduler (its ``alphas_cumprod`` is used as is), its ``.config``
            (betas from ``trained_betas`` or ``beta_schedule`` in "linear", "scaled_linear",
            "squaredcos_cap_v2", computed as diffusers does), or a 1-D ``alphas_cumprod``.
        prediction_type: "epsilon" | "v_prediction" | "sample" (default: the config's, else "epsilon"); the
            Model predicts eps / v / x0 (diffusers' v = alpha eps - sigma x0, Salimans & Ho 2022).
        space: "vp" (default): state and time of :class:`DiscreteVP`, the space of DDIM/DPM-Solver
            schedulers; "ve": state ``x / alpha`` and time ``s = sigma / alpha`` on ``fs.paths.EDM``, the space
            of EulerDiscreteScheduler (``sigmas``, ``scale_model_input``); a v/x0 network is converted to eps/x0.
        round_timesteps: False (default): the network is called with the continuous timestep ``t N - 1`` as a
            float tensor of the state's dtype (exact at the training steps, interpolated between them, as
            DPM-Solver's discrete wrapper does); True: rounded to the nearest training step and passed as an
            int64 tensor clamped to [0, N-1], as DDIM/DPM-Solver schedulers feed their UNet.
        check_finite: passed to ``fs.Model``.

    Returns ``fs.Model(fn, path, predicts)``; ``path`` is the DiscreteVP (``space="vp"``) or an
    ``fs.paths.EDM`` over the schedule's noise levels (``space="ve"``, with ``.discrete_vp`` attached).
    Sample with ``fs.sample(model, x_T, solver=..., grid=grid_from_diffusers(scheduler))`` to reproduce a
    scheduler's steps, or with any named grid.
    """
    if not callable(unet_or_fn):
        raise TypeError(f"unet_or_fn must be a diffusers model or a callable fn(sample, timestep); got {type(unet_or_fn).__name__}.")
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not one of {SPACES}.{_closest(space, SPACES)}")
    if not isinstance(round_timesteps, bool):
        raise TypeError(f"round_timesteps must be True or False; got {round_timesteps!r}.")
    acp, config = _alphas_cumprod(scheduler_or_config)
    if prediction_type is None:
        prediction_type = _get(config, "prediction_type", "epsilon") if config is not None else "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        choices = tuple(PREDICTION_TYPES)
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {choices}.{_closest(prediction_type, choices)}")
    kind = PREDICTION_TYPES[prediction_type]
    dvp = DiscreteVP(acp)
    fn = _DiffusersFn(unet_or_fn, dvp, space, kind, round_timesteps)
    if space == "vp":
        return Model(fn, dvp, predicts=kind, check_finite=check_finite)
    s = torch.exp(-dvp._lam)  # noise levels sigma/alpha at the knots
    path = EDM(sigma_min=float(s[0]), sigma_max=float(s[-1]))
    path.discrete_vp = dvp
    return Model(fn, path, predicts="x0" if kind == "x0" else "eps", check_finite=check_finite)


# ----------------------------------------------------------------------------------------------
def grid_from_diffusers(scheduler, space: str = "vp", *, rtol: float = 1e-5) -> torch.Tensor:
    """Our decreasing float64 time grid for a diffusers scheduler's steps, after ``set_timesteps(n)``.

    The scheduler evaluates its network at ``scheduler.timesteps[i]`` and steps the state from the noise
    level of that timestep to the next one; the last step ends at the scheduler's final level
    (``sigmas[-1]`` for sigma-based schedulers: 0 with ``final_sigmas_type="zero"``; DDIM's
    ``final_alpha_cumprod``: 1, i.e. sigma = 0, with ``set_alpha_to_one=True``). sigma = 0 maps to t = 0
    (``space="vp"``) or s = 0 (``space="ve"``). A last step that does not move the noise level (DDIM with
    ``set_alpha_to_one=False`` and a last timestep 0: its update is the identity) is left out.

    ``space="vp"``: ``t_i = (timesteps[i] + 1) / N``; ``space="ve"``: the noise levels ``s_i`` themselves
    (``scheduler.sigmas`` where the scheduler has them, so that its steps are reproduced exactly).
    Raises ValueError where the scheduler's noise levels are not those of its timesteps on DiscreteVP
    (to ``rtol``, float32 rounding): e.g. Karras sigmas (whose timesteps diffusers interpolates in log
    sigma) or DDIM with "linspace" spacing (whose step lands between the listed timesteps).
    """
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not one of {SPACES}.{_closest(space, SPACES)}")
    ts = getattr(scheduler, "timesteps", None)
    if not isinstance(ts, torch.Tensor) or ts.numel() == 0:
        raise ValueError("scheduler has no timesteps; call scheduler.set_timesteps(num_inference_steps) first.")
    acp, _ = _alphas_cumprod(scheduler)
    dvp = DiscreteVP(acp)
    ts = ts.detach().cpu().to(torch.float64)
    s_knots = torch.exp(-dvp.lam(dvp.t_of_timestep(ts)))  # noise level of each listed timestep on DiscreteVP
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() == ts.numel() + 1:
        s_all = sigmas.detach().cpu().to(torch.float64)
        s_states, s_final = s_all[:-1], float(s_all[-1])
    elif hasattr(scheduler, "final_alpha_cumprod"):  # DDIM-family: steps from timestep to timestep - N // n
        n_inf = int(getattr(scheduler, "num_inference_steps", ts.numel()) or ts.numel())
        prev = ts - dvp.N // n_inf
        if not bool((prev[:-1] == ts[1:]).all()):
            raise ValueError(
                f"{type(scheduler).__name__} steps each timestep t to t - {dvp.N // n_inf}, which is not the next listed "
                f"timestep for these timesteps ({ts[:3].tolist()}...); use timestep_spacing='leading' or 'trailing' "
                f"with a step count dividing num_train_timesteps."
            )
        s_states = s_knots
        last = int(prev[-1])
        a_final = float(acp[last]) if last >= 0 else float(scheduler.final_alpha_cumprod)
        s_final = math.sqrt((1.0 - a_final) / a_final) if a_final < 1.0 else 0.0
    else:
        raise TypeError(f"{type(scheduler).__name__} has neither sigmas nor final_alpha_cumprod; cannot read its steps.")
    bad = (s_states - s_knots).abs() > rtol * s_knots
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{type(scheduler).__name__}'s noise level at step {i} (sigma={float(s_states[i]):.6g}) is not that of its "
            f"timestep {float(ts[i]):g} on DiscreteVP (sigma={float(s_knots[i]):.6g}): diffusers interpolates its "
            f"timesteps differently (e.g. Karras sigmas, fractional 'linspace' timesteps). Use integer timesteps "
            f"(timestep_spacing='leading' or 'trailing') or a flowsolve grid such as grid='logsnr'."
        )
    if space == "ve":
        grid = torch.cat([s_states, torch.tensor([s_final], dtype=torch.float64)])
    else:
        t_states = dvp.t_of_timestep(ts)
        if s_final == 0.0:
            t_final = 0.0
        else:  # snap to a training step where the level is one (float32 rounding), else invert lambda
            s_all_knots = torch.exp(-dvp._lam)
            k = int(torch.argmin((s_all_knots - s_final).abs()))
            near = abs(float(s_all_knots[k]) - s_final) <= rtol * float(s_all_knots[k])
            t_final = float(dvp.t_of_timestep(k)) if near else float(dvp.t_of_lambda(torch.tensor(-math.log(s_final))))
        grid = torch.cat([t_states, torch.tensor([t_final], dtype=torch.float64)])
    if grid.numel() > 2 and float(grid[-1]) == float(grid[-2]):
        # the last step does not move the noise level (DDIM, set_alpha_to_one=False, last timestep 0): the
        # scheduler's update there is the identity (sqrt(a) x0 + sqrt(1-a) eps = x), so it is dropped
        grid = grid[:-1]
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"{type(scheduler).__name__}'s steps are not strictly decreasing in noise level: {grid.tolist()}.")
    return grid
