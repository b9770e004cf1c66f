"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", Sec. 4.2, Algorithm 1 and the Langevin corrector of Algorithms 4-5, App. G).

At each level t_n of the grid (n = 0 .. N-1) the state first takes M Langevin corrector steps toward the
marginal p(t_n) and then one step of any fixed-step predictor from t_n to t_{n+1}. That is the order of
the official score_sde code (``pc_sampler``: corrector, then predictor, at each time; the paper's Alg. 1
writes the predictor first and corrects at the new level): the corrector acts at the level of the state
*before* the predictor step, so it never runs at t_N (where sigma may be 0), the prior sample is corrected
at t_0, and the returned state is the predictor's last output (uncorrected, as in score_sde). The
corrector step (Alg. 4/5, "x <- x + eps g + sqrt(2 eps) z"):

    x <- x + eta score(x, t_n) + sqrt(2 eta) z,                        z ~ N(0, I),

with one of two step-size rules (``step_size=``; the default is "sigma", for the bias of "snr" below):

    "snr"    eta_b = 2 (snr sqrt(D) / ||score(x_b, t_n)||)^2, per sample b, D = elements per sample
             (Song's rule eta = 2 (r ||z|| / ||g||)^2, LangevinCorrector in score_sde's sampling.py);
    "sigma"  eta_n = 2 (snr sigma(t_n))^2, the same rule with the score's norm replaced by that of
             pure noise at level t_n, ||z|| / sigma_n (score_sde's AnnealedLangevinDynamics corrector).

Deviations from score_sde, and why:

* Batch invariance. score_sde averages ||g|| and ||z|| over the batch, so one sample's step (hence the
  sample) depends on the rest of its batch. Here the norms are per sample and ||z|| is replaced by
  sqrt(D) = sqrt(E ||z||^2), so eta_b is a [B] tensor computed on the device (no host sync) and does not
  depend on the noise drawn in the same step (in score_sde it does: the update there is not Gaussian
  given x). A sample with score exactly 0 gets eta_b = 0 (score_sde divides by zero).
* VP: score_sde multiplies eta by the DDPM alpha_i = 1 - beta_i of its N = 1000 discretization (between
  0.98 and 0.9999); there is no such factor on a continuous path, and none here.
* The corrector draws its noise on its own keyed stream (``STREAM_CORRECTOR`` = 3) with the step key
  n M + k for corrector step k at level n, so it is independent of the predictor's noise (stream 0, key
  n, and any extra streams 8+ a predictor may use), and all M steps share one compiled Triton kernel.

Default ``snr = 0.16`` (score_sde's VE CIFAR-10 value) for VP as well. Both rules measure the step in
units of the target's variance: for data N(m, v) per dimension the "snr" rule gives eta ~ 2 snr^2 v (on
VE, VP or any path, at any noise level, for any scale of x) and "sigma" gives eta / v = 2 snr^2 sigma^2/v
<= 2 snr^2, since v >= sigma^2 on every path. So the ULA step stays stable (eta / v < 2 needs snr < 1) and
its O(eta) stationary variance bias (FORMULAS.md §5b: v / (1 - eta / (2 v))) stays below about
snr^2 = 2.6 % on every path; nothing in the rule is specific to VE.

Known bias of the per-sample "snr" rule in low dimension. A step size that depends on the current state
makes the corrector a *time-changed* Langevin chain: as eta -> 0 it samples p / eta(x), not p. With eta_b
proportional to 1 / ||score||^2 the corrector's stationary law is p(x) ||score(x)||^2 (up to O(snr^2)):
for Gaussian data with per-dimension variances v_d its variance is v_d (1 + 2 H_d), H_d = v_d^-1 /
sum_e v_e^-1 (isotropic data: 1 + 2/D). That is +0.07 % at D = 3072 (CIFAR-10) but +25 % at D = 8
(measured +29 % with snr = 0.16), and at D = 2 the variance is many times the target's (measured 13-19x
in float64 chains: near the mode ||score|| -> 0, eta_b -> inf and the chain makes long excursions).
score_sde's batch averages hide this (the step barely depends on any one sample). For low-dimensional
data use ``step_size="sigma"``, which is unbiased up to O(eta) (tests/test_predictor_corrector.py checks
both laws).

Cost per corrector step, in passes over state-sized memory, besides the model call:
    "sigma": one fused ``lincomb`` (read x and the raw output, write x; noise in the kernel): 3.
    "snr", eps or score models (the score conversion has no x term, score = b raw): ||raw|| (1 read),
        keyed noise into a buffer (1 write), x += (eta b) raw and x += sqrt(2 eta) z (two addcmul, 3 + 3): 8.
    "snr", other parameterizations: the score written once by a fused conversion call (3), then as above: 11.
A per-sample coefficient cannot be a row of the lincomb table (one row per step, shared by the batch),
which is why "snr" needs the separate norm, noise and addcmul passes.

Composition. The plan is the predictor's plan (its tables, flags and t_eval columns unchanged) plus the
corrector's tables and flags (names prefixed ``pc_``) and one t_eval column appended after the predictor's
(the level t_n, evaluated M times). ``step`` runs the corrector steps, then ``predictor.step(run, n)``.
NFE per step = the predictor's + M (M fewer at a level where the model cannot give a score, e.g. an
x0-model where alpha = 0: the corrector is skipped there at plan time). Any registered fixed-step solver,
ODE or SDE, works as the predictor; ``order`` reports the predictor's order in the step size, but the
corrector's bias depends on snr, not on the step, so the error does not vanish as steps -> inf at fixed snr.
"""
from __future__ import annotations

import torch

from ..kernels import lincomb, normal_
from .base import AdaptiveSolver, Plan, Solver, SolverInfo, get_solver, register

STREAM_CORRECTOR = 3  # keyed-noise stream of the Langevin corrector (0 step, 1 init, 2 probes, 8+ extra noises)
STEP_SIZES = ("snr", "sigma")
_PAPER = "Song et al. 2021, Sec. 4.2, Alg. 1, 4-5 (PC sampling, Langevin corrector)"


@register
class PredictorCorrector(Solver):
    """Predictor-corrector sampler: M Langevin corrector steps at t_n, then one predictor step.

    Args:
        predictor: a registered fixed-step solver name (``fs.solvers()``) or a Solver instance, ODE or SDE.
        corrector_steps: M >= 1, Langevin steps per level.
        snr: the signal-to-noise ratio r in (0, 1) of the step-size rule.
        step_size: "sigma" (default: eta_n = 2 (snr sigma_n)^2, unbiased up to O(eta) in any dimension) or
            "snr" (per-sample score norms, Song's LangevinCorrector; biased by a factor ~ 1 + 2/D in the
            variance for D elements per sample: use it only for high-dimensional data, see the module notes).
    """

    info = SolverInfo("pc", order=1, nfe_per_step=2, stochastic=True, needs="score",
                      paper=f"{_PAPER}; predictor euler_maruyama")  # the default instance's

    def __init__(self, predictor="euler_maruyama", corrector_steps: int = 1, snr: float = 0.16,
                 step_size: str = "sigma"):
        if isinstance(predictor, PredictorCorrector):
            raise ValueError("predictor must not itself be a PredictorCorrector; raise corrector_steps instead.")
        if isinstance(predictor, str) and predictor == "pc":
            raise ValueError("predictor='pc' would nest predictor-corrector samplers; raise corrector_steps instead.")
        if isinstance(predictor, type):
            raise TypeError(f"predictor must be a solver name or a Solver instance; got the class {predictor.__name__} "
                            f"(instantiate it: predictor={predictor.__name__}()).")
        pred = get_solver(predictor)  # names: ValueError listing the registered ones
        if isinstance(pred, AdaptiveSolver) or pred.info.adaptive:
            raise ValueError(f"predictor={pred.info.name!r} is adaptive; a predictor-corrector sampler needs a "
                             f"fixed-step predictor such as 'euler_maruyama', 'ancestral' or 'heun'.")
        if getattr(pred, "carries_evaluation", False):
            raise ValueError(f"predictor={pred.info.name!r} carries its model evaluation at the predicted point into the "
                             f"next step (UniPC's corrector reuses it), which a Langevin corrector moving the state in "
                             f"between would make stale; use a predictor such as 'euler_maruyama', 'ddim' or 'dpm++2m'.")
        if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 1:
            raise ValueError(f"corrector_steps={corrector_steps!r} must be a positive int (Langevin steps per level); "
                             f"for no corrector use the predictor itself as the solver.")
        if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not (0.0 < snr < 1.0):
            raise ValueError(f"snr={snr!r} must be a number in (0, 1): the Langevin step is eta ~ 2 snr^2 Var, stable "
                             f"only below 2 Var (score_sde uses 0.16 for CIFAR-10, 0.075 in its 256x256 configs).")
        if step_size not in STEP_SIZES:
            raise ValueError(f"step_size={step_size!r} must be one of {STEP_SIZES}: 'snr' (per-sample score norms) or "
                             f"'sigma' (eta = 2 (snr sigma_t)^2).")
        self.predictor, self.corrector_steps, self.snr, self.step_size = pred, corrector_steps, float(snr), step_size
        p = pred.info
        self.info = SolverInfo("pc", order=p.order, nfe_per_step=p.nfe_per_step + corrector_steps, stochastic=True,
                               needs="score", multistep=p.multistep, paper=f"{_PAPER}; predictor {p.name}")

    def __repr__(self) -> str:
        return (f"PredictorCorrector(predictor={self.predictor!r}, corrector_steps={self.corrector_steps}, "
                f"snr={self.snr:g}, step_size={self.step_size!r})")

    def plan(self, model, grid) -> Plan:
        pp = self.predictor.plan(model, grid)
        for name in list(pp.tables) + list(pp.flags):
            if name.startswith("pc_"):
                raise ValueError(f"the predictor's plan uses the name {name!r}, reserved for the corrector's tables.")
        t0 = grid[:-1]
        n, m = t0.numel(), self.corrector_steps
        correct = model.can_convert("score", t0)
        a, b = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        if bool(correct.any()):
            a[correct], b[correct] = model.conversion("score", t0[correct])  # score = a x + b raw
        tables = dict(pp.tables)
        zero = torch.zeros(n, dtype=torch.float64)
        direct = bool((a[correct] == 0).all())
        if self.step_size == "sigma":
            eta = torch.where(correct, 2.0 * (self.snr * model.path.sigma(t0)) ** 2, zero)
            row = torch.stack([1.0 + eta * a, eta * b, (2.0 * eta).sqrt()], 1)
            tables["pc_lang"] = row.repeat_interleave(m, 0)  # row n M + k: corrector step k at level n
        else:
            tables["pc_score"] = torch.stack([a, b, zero], 1)
        t_col = torch.where(correct, t0, torch.full_like(t0, float("nan")))
        t_eval = torch.cat([pp.t_eval, t_col[:, None]], 1)
        flags = dict(pp.flags)
        flags.update({"pc_correct": [bool(c) for c in correct], "pc_col": pp.t_eval.shape[1], "pc_direct": direct})
        evals = [e + m * int(c) for e, c in zip(pp.evals, flags["pc_correct"])]
        return Plan(grid, tables, t_eval, evals, flags)

    def step(self, run, n: int) -> None:
        if run.plan.flags["pc_correct"][n]:
            for k in range(self.corrector_steps):
                self._correct(run, k)
        self.predictor.step(run, n)

    def _correct(self, run, k: int) -> None:
        x, m = run.x, self.corrector_steps
        key = run.step_index if m == 1 else run.step_index * m + k  # device arithmetic: no host sync
        raw = run.evaluate(x, run.plan.flags["pc_col"])
        if self.step_size == "sigma":
            lincomb(x, [x, raw], run.tables["pc_lang"], key, run.seed, sample_offset=run.sample_offset,
                    stream=STREAM_CORRECTOR, backend=run.backend)
            return
        batch = x.shape[0]
        per = x[0].numel()
        bshape = (batch,) + (1,) * (x.dim() - 1)
        if run.plan.flags["pc_direct"]:  # score = b raw: no score buffer
            coef_b = run.tables["pc_score"].index_select(0, run.step_index)[0, 1]
            s = raw
            n2 = torch.linalg.vector_norm(raw.reshape(batch, -1), dim=1, dtype=coef_b.dtype).square() * coef_b.square()
        else:
            s = run.combine(run.buffer("pc_score"), [x, raw], "pc_score")
            coef_b = None
            n2 = torch.linalg.vector_norm(s.reshape(batch, -1), dim=1).square()
        eta = torch.where(n2 > 0, (2.0 * self.snr**2 * per) / n2, torch.zeros_like(n2))
        z = normal_(run.buffer("pc_noise"), run.seed, key, sample_offset=run.sample_offset, stream=STREAM_CORRECTOR,
                    backend=run.backend)
        drift = eta if coef_b is None else eta * coef_b
        x.addcmul_(s, drift.to(x.dtype).view(bshape))
        x.addcmul_(z, (2.0 * eta).sqrt().to(x.dtype).view(bshape))

