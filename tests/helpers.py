"""Shared test helpers: problems built from fs.analytic, a counting model wrapper, order fits, and a
dispatch mode that counts aten ops (``aten._local_scalar_dense`` is a device read from the host)."""
from __future__ import annotations

import collections

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowsolve as fs

# (path factory, parameterization the model predicts): each pair can be evaluated on the whole grid
PATH_MODELS = {
    "vp-eps": (fs.paths.VP, "eps"),
    "vp_cosine-eps": (fs.paths.VPCosine, "eps"),
    "subvp-score": (fs.paths.SubVP, "score"),
    "ve-eps": (fs.paths.VE, "eps"),
    "edm-x0": (fs.paths.EDM, "x0"),
    "rf-velocity": (fs.paths.RectifiedFlow, "velocity"),
    "vp-v": (fs.paths.VP, "v"),
}


class Counting:
    """Wraps a callable, counts calls and checks that t stays inside [t_lo, t_hi]."""

    def __init__(self, fn, t_lo=-float("inf"), t_hi=float("inf")):
        self.fn, self.calls, self.t_lo, self.t_hi = fn, 0, t_lo, t_hi

    def __call__(self, x, t):
        self.calls += 1
        if bool((t < self.t_lo).any()) or bool((t > self.t_hi).any()):
            raise AssertionError(f"model evaluated at t={t.min().item()}..{t.max().item()} outside "
                                 f"[{self.t_lo}, {self.t_hi}]")
        return self.fn(x, t)


def gaussian_problem(key, mu, std):
    path_cls, predicts = PATH_MODELS[key]
    path = path_cls()
    prob = fs.analytic.Gaussian(torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64), path)
    return path, prob, fs.Model(getattr(prob, predicts), path, predicts=predicts)


def fitted_order(nfes, errors) -> float:
    """Least-squares slope of -log(error) against log(NFE)."""
    return float(-np.polyfit(np.log(np.asarray(nfes, float)), np.log(np.asarray(errors, float)), 1)[0])


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block, by overload packet name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Law:
    """(Used by the Restart / SA-Solver / ER-SDE exact-law tests.) Exact law of an affine Gaussian recursion: S slots per dimension, each new slot an affine form over the old
    slots, a constant and one standard normal z shared by the step (forms are [D, S + 2] tensors)."""

    def __init__(self, mean, var, slots):
        d = mean.numel()
        self.S = slots
        self.mean = torch.zeros(d, slots, dtype=torch.float64)
        self.cov = torch.zeros(d, slots, slots, dtype=torch.float64)
        self.mean[:, 0], self.cov[:, 0, 0] = mean, var

    def _form(self, col, value=1.0):
        f = torch.zeros(self.mean.shape[0], self.S + 2, dtype=torch.float64)
        f[:, col] = value
        return f

    def slot(self, j):
        return self._form(j)

    def const(self, c):
        return self._form(self.S, c)

    def z(self):
        return self._form(self.S + 1)

    def update(self, forms):
        M = torch.stack(forms, 1)
        A, c, e = M[:, :, : self.S], M[:, :, self.S], M[:, :, self.S + 1]
        self.mean = (A @ self.mean[:, :, None])[:, :, 0] + c
        self.cov = A @ self.cov @ A.transpose(1, 2) + e[:, :, None] * e[:, None, :]

    def result(self):
        return self.mean[:, 0], self.cov[:, 0, 0]


def F64(v) -> torch.Tensor:
    """A float64 tensor of v (the exact-law tests' time arguments)."""
    return torch.tensor(v, dtype=torch.float64)


def alpha_sigma(path, t) -> tuple[float, float]:
    """(alpha(t), sigma(t)) as Python floats, in float64."""
    return float(path.alpha(F64(t))), float(path.sigma(F64(t)))
