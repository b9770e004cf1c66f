"""Adaptive reverse-SDE sampling: "Gotta Go Fast" (Jolicoeur-Martineau, Li, Piche-Taillefer, Kachman &
Mitliagkas 2021, "Gotta Go Fast When Generating Data with Score-Based Models", Algorithm 1).

The reverse-time SDE of a Gaussian path (Anderson 1982; Song et al. 2021; FORMULAS.md §2), integrated from
t_max down to t_min with steps of size h > 0 (dt = -h):

    dx = (f(t) x - g^2(t) score(x, t)) dt + g(t) dw_bar,     drift(x, t) = f x - g^2 score = p(t) x + q(t) F

with the model's raw output F and score = a x + b F from ``Model.conversion("score", t)`` folded into
p = f - g^2 a and q = -g^2 b. One attempted step from (x, t), with t' = t - h and z ~ N(0, I):

    K1  = -h drift(x, t)   + g(t)  sqrt(h) z,      x'  = x + K1                  (Euler-Maruyama proposal)
    K2  = -h drift(x', t') + g(t') sqrt(h) z,      x'' = x + (K1 + K2) / 2       (stochastic improved Euler)
    E_b = || (x'' - x') / delta ||_2 / sqrt(D),    delta = atol + rtol max(|x'_prev|, |x''|)
    accept iff max_b E_b <= 1 (then x <- x'', t <- t', x'_prev <- x');  h <- min(t - t_min, theta h E^(-r))

(theta = 0.9, r = 0.9 as in the paper; E = max_b E_b). Both stages share the same z. Every update is a
linear combination: the proposal x' is one ``lincomb`` call with in-kernel keyed noise, and with
rho = g(t') / g(t) the noise of K2 is rho (K1 + h drift(x, t)), so

    x''      = x ((1 - rho)/2 + h rho p/2) + F (h rho q/2) + x' ((1 + rho)/2 - h p'/2) + F' (-h q'/2)
    x'' - x' = x ((1 - rho)/2 + h rho p/2) + F (h rho q/2) + x' ((rho - 1)/2 - h p'/2) + F' (-h q'/2)

(p, q at t; p', q', F' at t', x') are one pass of the fused embedded kernel (``flowsolve.kernels.embedded_step``:
new state, error estimate and its per-sample RMS norm together; no noise regenerated, no error tensor
stored). The coefficients are computed on the host in float64 for each attempt (h is only known then).

Choices, and where they differ from the paper and its code (AlexiaJM/score_sde_fast_sampling):

* **One step size for the batch.** The paper adapts h per sample. Per-sample steps need per-sample
  coefficients, which the fused kernels (one coefficient row per step) do not take; we share one h across the
  batch and accept iff the *largest* per-sample error is <= 1. That costs **one host sync per attempted step**
  (reading max_b E_b), which also decides the next h. Consequences: (a) a sample's result depends on the batch
  it is drawn in (its steps are its batch's steps): not batch-invariant, unlike every fixed-step sampler here;
  (b) the hardest sample sets the pace for all; (c) much less bias (next point).
* **Noise keys.** Attempt k (accepted or not, counted from 0) draws z keyed by (seed, global sample b +
  sample_offset, k, element, stream 0), like the fixed-step samplers' step noise. The same sample in another
  batch gets the same key sequence, but the keys land on different (t, h), so its path differs (point (a)).
* **Rejection draws new noise** (as the paper): a rejected attempt leaves x, t, x'_prev and the cached F
  unchanged, and the retry uses the next key. The error estimate is dominated by the noise (below), so both
  the accept decision and the next h depend on the increment just drawn: accepted increments are conditioned
  on E <= 1 (rejection sampling of the Brownian increment; Rackauckas & Nie 2017 avoid it with Brownian
  bridges) and the grid is correlated with the path. With a batch-shared step the decision and h depend on the
  batch maximum: for B samples only about (rejection rate)/B of each sample's increment distribution is cut,
  in its far tail (a relative loss of added variance of order (rejection rate) (2 log B + 2) / B per step:
  < 1e-3 for B = 20000), and h hardly depends on any one sample. A batch of ONE sample is the paper's per-sample
  algorithm, biased where E fluctuates, i.e. in few dimensions (E is an RMS over the D elements of a sample):
  on 2-D Gaussian data (a vectorized per-sample run with this error scale, 20000 samples, rtol = atol = 0.2,
  0.05, 0.0125) we measured output variances 15-34% (VP) and 17-165% (VE) above p(t_min), growing as the
  tolerance tightens (VP, 0.05: choosing h from each sample's own errors without rejecting gives +220%); in
  D = 16 (VP, 0.05) +1.5%, in D = 128 about -1% (the paper's images have D = 3072). With B = 20000 samples sharing
  one step the error in D = 2 is below the Monte-Carlo resolution (1%; tests/test_adaptive_sde.py). Sample
  low-dimensional data in large batches.
* **Extrapolation** (``extrapolate=True``, the paper's choice and its code's default): the accepted state is
  x'' (the improved-Euler result), the lower-order x' only serves the error estimate. ``extrapolate=False``
  keeps x'. The paper's Algorithm 1 offers both.
* **Error scale.** The shared kernel uses Hairer's delta = atol + rtol max(|x_ref|, |out|) (HNW II.4); the
  paper clamps, delta = max(atol, rtol max(|x'|, |x'_prev|)). The sum lies between 1 and 2 times the clamp, so
  the same tolerances are up to 2x looser here near |x| = atol/rtol. With extrapolation ``out`` is x'' where
  the paper has x' (they differ by the error estimate itself, |x'' - x'| <= delta on acceptance); with
  ``extrapolate=False`` the scale is the paper's, x'.
* **NFE.** A rejected attempt leaves (x, t) unchanged, so F(x, t) is reused: an attempt costs one model call
  (F' at x') plus one after each acceptance (F at the new state; none after the last, which lands on t_min), and
  one at t_max: NFE = 2 accepted + rejected (+ 1 with ``denoise``), against 2 per attempt in the paper's code.
  F is read after later model calls (F' of every attempt from the same point), so it is copied into a buffer the
  solver owns as it is evaluated: a model may return one reused output buffer (TensorRT / ONNX io-binding,
  CUDA-graph replay). One state-sized copy per accepted step; F' is consumed before the next model call.
* **First step.** ``h0`` defaults to 0.01 (t_max - t_min): the paper's h_init = 0.01 on its [1e-3, 1] range,
  scaled to paths with other time ranges (EDM's t = sigma in [0.002, 80]).
* **Tolerances.** Defaults rtol = 1e-2, atol = 0.0078 are the paper's CIFAR-10 VP setting (data in [-1, 1];
  they used atol 0.0039 for VE models on [0, 1] data, rtol 1e-2 ... 1e-1). atol is absolute, in data units.
* **Final denoising** (``denoise=True``; the paper's code always does it): one more model call returns Tweedie's
  E[x0 | x(t_min)] = (x + sigma^2 score) / alpha, from ``Model.conversion("x0", t_min)``; the paper's code
  omits the 1/alpha (1 + 5e-5 at VP's t_min = 1e-3). Default off, so that ``fs.sample`` returns x(t_min) as for
  every other sampler.

Weak order: for these additive-noise SDEs the accepted x'' is a stochastic improved-Euler step, weak order 2
(Kloeden & Platen 1992, §15.1; measured on fixed grids for Gaussian data: 2.05-2.16 on VP, VE, subVP); x' is weak
order 1. The error estimate x'' - x' is O(h^(3/2)) (its noise part,
(rho - 1) K1 / 2 and the drift difference along K1, dominates), which is why the paper's exponent r = 0.9 is
not the 1/(q+1) of an ODE controller. Rectified flow: its reverse SDE is singular at t = 1 (g^2 = 2t/(1-t)):
use t_max < 1.
"""
from __future__ import annotations

import math

import torch

from ..kernels import STREAM_STEP, embedded_step, lincomb
from .base import AdaptiveSolver, SolverInfo, register

_ROWS = 2**31 - 1  # one-row tables broadcast over every step index (row stride 0): the index keys the noise only


def _one_row(values, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1).expand(_ROWS, len(values))


def _rows_on_device(groups, dtype, device):
    """Several one-row tables from ONE host-to-device copy (one per attempt, right after the sync that decided h)."""
    flat = torch.tensor([v for g in groups for v in g], dtype=dtype, device=device)
    out, i = [], 0
    for g in groups:
        out.append(flat[i:i + len(g)].view(1, -1).expand(_ROWS, len(g)))
        i += len(g)
    return out


@register
class GottaGoFast(AdaptiveSolver):
    """Gotta Go Fast (Jolicoeur-Martineau et al. 2021, Alg. 1): adaptive EM / improved-Euler on the reverse SDE.

    Args:
        rtol, atol: the error tolerances (defaults: the paper's, 1e-2 and 0.0078).
        h0: first step in path time (default 0.01 (t_max - t_min)).
        max_steps: limit on attempted steps (accepted + rejected).
        theta: safety factor of the step-size update h <- theta h E^(-r) (paper: 0.9).
        r: exponent of that update (paper: 0.9).
        extrapolate: keep the improved-Euler x'' on acceptance (paper's default) rather than the EM x'.
        denoise: return Tweedie's E[x0 | x(t_min)] (one more model call), as the paper's code does.

    One host sync per attempted step (the accept/reject decision on max_b E_b); see the module docstring for
    the batch-shared step, the noise keys and the bias of drawing new noise after a rejection.
    """

    info = SolverInfo("ggf", order=2, nfe_per_step=2, stochastic=True, needs="score", adaptive=True,
                      paper="Jolicoeur-Martineau et al. 2021, Gotta Go Fast, Alg. 1")

    def __init__(self, rtol: float = 1e-2, atol: float = 0.0078, h0: float | None = None, max_steps: int = 10_000,
                 *, theta: float = 0.9, r: float = 0.9, extrapolate: bool = True, denoise: bool = False):
        super().__init__(rtol, atol, h0, max_steps)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (0.0 < theta <= 1.0):
            raise ValueError(f"theta={theta!r} must be a safety factor in (0, 1] (the paper uses 0.9).")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r < math.inf):
            raise ValueError(f"r={r!r} must be a positive finite exponent of h <- theta h E^(-r) (the paper uses 0.9).")
        for name, v in (("extrapolate", extrapolate), ("denoise", denoise)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}={v!r} must be True or False.")
        self.theta, self.r, self.extrapolate, self.denoise = float(theta), float(r), extrapolate, denoise

    def __repr__(self) -> str:
        return (f"GottaGoFast(rtol={self.rtol:g}, atol={self.atol:g}, theta={self.theta:g}, r={self.r:g}, "
                f"extrapolate={self.extrapolate}, denoise={self.denoise})")

    # ------------------------------------------------------------------ host-side coefficients
    @staticmethod
    def _sde(model, t0: float, t1: float):
        """float64 (p, q, g) at t0 and t1: reverse drift = p x + q F, noise scale g (raises where singular)."""
        path = model.path
        tt = torch.tensor([t0, t1], dtype=torch.float64)
        a, b = model.conversion("score", tt)  # raises naming t where the model cannot give a score
        f, g2 = path.f(tt), path.g2(tt)
        p, q = f - g2 * a, -g2 * b
        vals = torch.stack([p, q, g2.sqrt()], 1)
        if not bool(torch.isfinite(vals).all()) or not bool((g2 > 0).all()):
            t_bad = t0 if not (bool(torch.isfinite(vals[0]).all()) and float(g2[0]) > 0) else t1
            raise ValueError(
                f"the reverse SDE of {type(path).__name__} is singular at t={t_bad:.6g} (f, g^2 or the score conversion "
                f"is not finite, or g^2 <= 0 there); Gotta Go Fast needs finite coefficients and g > 0 on [t_min, t_max]. "
                f"Move t_max/t_min inside the path's range (e.g. t_max < 1 for rectified flow, t_min > 0 where "
                f"sigma(0) = 0)."
            )
        return vals.tolist()

    def _rows(self, model, t0: float, t1: float, h: float):
        """(proposal row [1, 3], x'' row [1, 5], error row [1, 4]) on inputs (x, F) and (x, F, x', F')."""
        (p0, q0, g0), (p1, q1, g1) = self._sde(model, t0, t1)
        sh = math.sqrt(h)
        prop = [1.0 - h * p0, -h * q0, g0 * sh]
        rho = g1 / g0
        ex, ef = 0.5 * (1.0 - rho) + 0.5 * h * rho * p0, 0.5 * h * rho * q0
        exp_, efp = 0.5 * (rho - 1.0) - 0.5 * h * p1, -0.5 * h * q1
        err = [ex, ef, exp_, efp]
        out = [ex, ef, exp_ + 1.0, efp, 0.0] if self.extrapolate else [0.0, 0.0, 1.0, 0.0, 0.0]
        return prop, out, err

    # ------------------------------------------------------------------ the loop
    def integrate(self, model, x, t_max, t_min, *, seed, backend, sample_offset, check_finite, trajectory=None,
                  callback=None) -> dict:
        t_max, t_min = float(t_max), float(t_min)
        self._sde(model, t_max, t_min)  # clear error before any model call if an end of the range is singular
        dev, b = x.device, x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        span = t_max - t_min
        nfe = 0

        def evaluate(state, t):
            nonlocal nfe
            out = model(state, torch.full((b,), t, dtype=x.dtype, device=dev))
            nfe += 1
            if check_finite and not bool(torch.isfinite(out).all()):
                raise FloatingPointError(f"the model returned NaN/inf at t={t:.6g}; check the model there or raise t_min.")
            return out

        step = torch.zeros(1, dtype=torch.int64, device=dev)  # the attempt counter: the noise key
        cur, nxt = x, torch.empty_like(x)  # accepted state and the candidate x'' (swapped on acceptance)
        xp, xp_prev = torch.empty_like(x), x.clone()  # the EM proposal x' and the last accepted one (paper: x0 at t_max)
        err = torch.empty(b, dtype=acc, device=dev)
        # F at the accepted point is read by every attempt from it, after each attempt's own model call: the solver
        # owns a copy (a model may return one reused output buffer), one copy per accepted step
        raw = torch.empty_like(x)
        raw.copy_(evaluate(cur, t_max))
        t = t_max
        h = min(0.01 * span if self.h0 is None else float(self.h0), span)
        accepted = rejected = 0
        times = [t_max]
        while t > t_min:
            if accepted + rejected >= self.max_steps:
                raise RuntimeError(
                    f"ggf used max_steps={self.max_steps} attempted steps ({accepted} accepted, {rejected} rejected) and "
                    f"reached t={t:.6g} of t_min={t_min:.6g} (last step size {h:.3g}): raise max_steps, loosen "
                    f"rtol/atol (now {self.rtol:g}/{self.atol:g}), or use a fixed-step sampler (solver='euler_maruyama', "
                    f"steps=...)."
                )
            if h < 1e-12 * span:
                raise RuntimeError(
                    f"ggf's step size fell to {h:.3g} at t={t:.6g}: the error estimate cannot be met. Loosen rtol/atol "
                    f"(now {self.rtol:g}/{self.atol:g}) or check the model near t={t:.6g} (check_finite=True)."
                )
            last = (t - h) - t_min <= 1e-10 * span
            t1 = t_min if last else t - h
            h = t - t1
            prop, out_row, err_row = _rows_on_device(self._rows(model, t, t1, h), acc, dev)
            lincomb(xp, [cur, raw], prop, step, seed, sample_offset=sample_offset, stream=STREAM_STEP, backend=backend)
            raw_p = evaluate(xp, t1)
            embedded_step(nxt, err, [cur, raw, xp, raw_p], out_row, err_row, step, x_ref=xp_prev, rtol=self.rtol,
                          atol=self.atol, backend=backend)
            e = float(err.max())  # the one host sync per attempted step
            if not math.isfinite(e):
                raise FloatingPointError(
                    f"ggf's error estimate is not finite on the step t={t:.6g} -> {t1:.6g}: the model returned NaN/inf "
                    f"(run with check_finite=True to find where)."
                )
            step.add_(1)
            if e <= 1.0:
                accepted += 1
                cur, nxt = nxt, cur
                xp, xp_prev = xp_prev, xp
                t = t1
                times.append(t)
                if t > t_min:
                    raw.copy_(evaluate(cur, t))
                if trajectory is not None:
                    trajectory.append(cur.clone())
                if callback is not None:
                    callback(step=accepted - 1, t=t, x=cur)
            else:
                rejected += 1
            if t > t_min:
                h = (t - t_min) if e == 0.0 else min(t - t_min, self.theta * h * e ** (-self.r))
        if self.denoise:
            a, bb = (float(v) for v in model.conversion("x0", torch.tensor([t_min], dtype=torch.float64)))
            raw = evaluate(cur, t_min)
            lincomb(x, [cur, raw], _one_row([a, bb, 0.0], acc, dev), step, backend=backend)
        elif cur is not x:
            x.copy_(cur)
        return {"nfe": nfe, "steps": accepted, "rejected": rejected, "grid": torch.tensor(times, dtype=torch.float64),
                "denoised": self.denoise}
