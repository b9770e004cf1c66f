"""Step-size control for embedded Runge-Kutta pairs: a PI controller and the initial-step heuristic.

Error norm (what the controller reads): err = max_b RMS_j( e[b, j] / (atol + rtol max(|x_n[b, j]|, |x_{n+1}[b, j]|)) ),
the per-sample RMS of Hairer, Norsett & Wanner ("Solving ODEs I", 2nd ed., Sec. II.4, eq. 4.11), maxed over
the batch because one step size is shared by the batch; a step is accepted iff err <= 1. Computing it is one
fused pass (``flowsolve.kernels.embedded_step``); reading the max on the host is the one host sync per
attempted step.

PI controller (Gustafsson 1991, "Control theoretic techniques for stepsize selection in explicit Runge-Kutta
methods", ACM TOMS 17; Soederlind 2002, "Automatic control and adaptive time-stepping", Numer. Algorithms 31;
HNW II.4 and Vol. II, Sec. IV.2). With k = q + 1 for an error estimate of order q (the lower order of the pair:
err ~ C h^k), after an accepted step

    factor = safety * err_n^(-beta1) * err_{n-1}^(beta2),    beta1 = 0.7 / k,  beta2 = 0.4 / k,

clamped to [factor_min, factor_max] (and to <= 1 on the step right after a rejection, HNW II.4); err_{n-1} is
the previous accepted step's error (1 before the first), floored at 1e-4 as in Hairer's DOPRI5 code. After a
rejection the plain (I) controller shrinks the step: factor = max(factor_min, safety * err_n^(-1/k)), and
factor_min for a non-finite error (an overflowing trial step). The next step is h * factor.

Initial step (HNW I, Sec. II.4, "Starting step size", p. 169), with the same norm ||.|| and sc = atol + rtol |x0|:
    d0 = ||x0||, d1 = ||f(t0, x0)||;  h0 = 0.01 d0 / d1  (1e-6 if d0 or d1 < 1e-5);
    one explicit Euler step x1 = x0 + h0 f0, d2 = ||f(t0 + h0, x1) - f0|| / h0;
    h1 = (0.01 / max(d1, d2))^(1 / (p + 1))  (max(1e-6, 1e-3 h0) if max(d1, d2) <= 1e-15);  h = min(100 h0, h1),
p the order of the propagated solution. Per sample, then the minimum over the batch. h0 is capped at half the
interval (the Euler probe must stay inside [t_min, t_max] and off its far end, which may be singular) and h at
the whole interval. This costs one model evaluation and two host reads (h0, then h).
"""
from __future__ import annotations

import math

import torch

__all__ = ["PIController", "initial_step"]


class PIController:
    """PI step-size controller; ``decide(err)`` returns (accept, factor) and updates the memory.

    Args:
        error_order: q, the order of the embedded (lower-order) solution whose error is estimated; k = q + 1.
        safety, factor_min, factor_max: the usual safety factor and clamps (0.9, 0.2, 10).
        beta1, beta2: PI gains (default Gustafsson's 0.7 / k and 0.4 / k; beta2 = 0 is the I controller
            h_new = h * safety * err^(-beta1) of HNW II.4, eq. 4.13 with beta1 = 1 / k).
    """

    def __init__(self, error_order: int, *, safety: float = 0.9, beta1: float | None = None, beta2: float | None = None,
                 factor_min: float = 0.2, factor_max: float = 10.0):
        if isinstance(error_order, bool) or not isinstance(error_order, int) or error_order < 1:
            raise ValueError(f"error_order={error_order!r} must be a positive int (the embedded method's order).")
        k = error_order + 1
        self.k = k
        self.beta1 = 0.7 / k if beta1 is None else float(beta1)
        self.beta2 = 0.4 / k if beta2 is None else float(beta2)
        self.safety, self.factor_min, self.factor_max = float(safety), float(factor_min), float(factor_max)
        if not (0 < self.safety <= 1 and 0 < self.factor_min < 1 < self.factor_max and self.beta1 > 0 and self.beta2 >= 0):
            raise ValueError("need 0 < safety <= 1, 0 < factor_min < 1 < factor_max, beta1 > 0 and beta2 >= 0.")
        self.reset()

    def reset(self) -> None:
        self.err_prev = 1.0
        self.after_reject = False

    def decide(self, err: float) -> tuple[bool, float]:
        """(accepted, factor) for a step whose error norm is ``err`` (a host float)."""
        if not math.isfinite(err):
            self.after_reject = True
            return False, self.factor_min
        if err <= 1.0:
            e = max(err, 1e-10)
            factor = self.safety * e ** (-self.beta1) * self.err_prev ** self.beta2
            factor = min(self.factor_max, max(self.factor_min, factor))
            if self.after_reject:
                factor = min(factor, 1.0)
            self.err_prev = max(err, 1e-4)
            self.after_reject = False
            return True, factor
        self.after_reject = True
        return False, max(self.factor_min, self.safety * err ** (-1.0 / self.k))


def _rms(v: torch.Tensor, sc: torch.Tensor, nb: int) -> torch.Tensor:
    return (v / sc).reshape(nb, -1).pow(2).mean(1).sqrt()


def initial_step(x0: torch.Tensor, f0: torch.Tensor, probe, *, order: int, rtol: float, atol: float, span: float,
                 nb: int) -> float:
    """Hairer's starting step size (module docstring) for a state ``x0`` viewed as ``nb`` samples.

    ``probe(h0)`` makes the explicit Euler step of size h0 (>0, along the integration direction), evaluates the
    field there and returns f1. Returns |h| (> 0, <= span). Two host reads.
    """
    sc = atol + rtol * x0.abs()
    d0, d1 = _rms(x0, sc, nb), _rms(f0, sc, nb)
    h0_b = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = float(h0_b.min())  # host read 1
    if not math.isfinite(h0):
        raise FloatingPointError("the field is NaN/inf at the initial state (its first evaluation): check the model/f "
                                 "at the start time.")
    h0 = min(h0, 0.5 * span)
    f1 = probe(h0)
    d2 = _rms(f1 - f0, sc, nb) / h0
    m = torch.maximum(d1, d2)
    h1 = torch.where(m <= 1e-15, torch.full_like(m, max(1e-6, 1e-3 * h0)), (0.01 / m.clamp_min(1e-300)) ** (1.0 / (order + 1)))
    h = float(torch.minimum(100 * h0 * torch.ones_like(h1), h1).min())  # host read 2
    if not math.isfinite(h):  # the Euler probe met a non-finite field: start from h0 and let the controller shrink
        h = h0
    return min(max(h, 1e-12 * span), span)
