"""The built-in benchmark problems: analytic data under a path, a model made from its closed forms,
an exact initial law, and a reference endpoint (the exact flow map for Gaussian data, FORMULAS.md §3;
a float64 RK4 solve refined by step doubling until its own error, estimated by Richardson's rule
err(N) ~ |x_N - x_{N/2}| / (2^4 - 1) for a fourth-order method, is below ``REF_TOL``, for Gaussian
mixtures, FORMULAS.md §4) and the exact marginal moments for SDE solvers. The likelihood problems
carry the exact log-density (FORMULAS.md §3-4) that ``log_likelihood`` (Chen et al. 2018, FORMULAS.md §6)
is scored against.

Mixture references are cached on disk (``$FLOWSOLVE_BENCH_CACHE``, default ``~/.cache/flowsolve/bench``),
keyed by a SHA-256 of everything they depend on: the problem's parameters, the start points, the range,
grid and tolerance, and the source of the library files that compute them. The file name holds a prefix of
the key and the file holds all of it. A file is read with ``torch.load(weights_only=True)`` (a tampered
pickle cannot run code) and used only if it holds a finite float reference of the start points' shape and
dtype, a finite error estimate within the tolerance and a step count in range, computed for the same key;
any other file (truncated, foreign, tampered, stale) is recomputed and replaced with a warning naming it.
Files are written atomically (a temp file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import torch

import flowsolve as fs

# Gaussian-mixture reference: RK4 on the problem's reference grid, steps doubled from REF_MIN_STEPS until the
# halving estimate of its RMS error is below REF_TOL. The smallest mixture error in the table is ~1e-7
# (adaptive solvers at rtol 1e-6), so 1e-10 keeps the reference >= 1000x more accurate than anything it scores.
REF_TOL = 1e-10
REF_MIN_STEPS, REF_MAX_STEPS = 256, 16384
CACHE_FORMAT = 2  # bump when the file layout or the key changes
_SOURCES = ("analytic.py", "paths.py", "grids.py", "sample.py", "model.py", "solvers/runge_kutta.py")


@dataclass
class Problem:
    name: str
    description: str
    prob: object  # a fs.analytic problem
    path: object
    predicts: str
    t_max: float
    t_min: float
    dim: int
    ref_grid: str | None = None  # the grid of the float64 reference solve (mixtures only)
    sde: bool = True  # sweep the SDE solvers here (weak error vs the exact marginal)
    n_sde: int = 8192  # SDE samples: sets the Monte-Carlo floor ~ sqrt(1.5 var / n) of the W2 statistic
    kind: str = "sample"  # "sample": fs.sample sweeps; "likelihood": log_likelihood sweeps
    ref_error: dict = field(default_factory=dict)  # t_max -> estimated RMS error of the reference
    ref_steps: dict = field(default_factory=dict)  # t_max -> RK4 steps of the reference
    cache_hits: int = 0

    def model(self) -> fs.Model:
        return fs.Model(_SharedTime(getattr(self.prob, self.predicts)), self.path, predicts=self.predicts)

    @property
    def exact_flow(self) -> bool:
        return isinstance(self.prob, fs.analytic.Gaussian)

    def params(self) -> dict:
        """Everything the problem's numbers depend on (for the cache key and the JSON)."""
        p = self.prob
        tensors = {k: getattr(p, k) for k in ("mu", "std", "rotation", "means", "stds", "weights")
                   if getattr(p, k, None) is not None}
        return {"class": type(p).__name__, "path": type(self.path).__name__,
                "path_range": [self.path.t_min, self.path.t_max], "predicts": self.predicts,
                "t_max": self.t_max, "t_min": self.t_min, "dim": self.dim, "ref_grid": self.ref_grid,
                "tensors": tensors}

    def reference(self, x_T: torch.Tensor, t_max: float, tol: float = REF_TOL, cache: bool = True) -> torch.Tensor:
        """The endpoint at t_min of the PF-ODE started from x_T at t_max: exact for Gaussian data, else a float64
        RK4 solve, steps doubled until its estimated RMS error <= ``tol`` (kept in ``ref_error[t_max]``)."""
        if self.exact_flow:
            return self.prob.flow(x_T, t_max, self.t_min)
        key = _cache_key(self, x_T, t_max, tol) if cache else None
        path = _cache_file(self, key) if cache else None
        if path is not None and os.path.exists(path):
            saved = _load_reference(path, key, x_T, tol)
            if saved is not None:
                self.ref_error[t_max], self.ref_steps[t_max] = saved["error"], saved["steps"]
                self.cache_hits += 1
                return saved["ref"]
        model = self.model()
        kw = dict(solver="rk4", grid=self.ref_grid, t_max=t_max, t_min=self.t_min)
        steps = REF_MIN_STEPS
        coarse = fs.sample(model, x_T, steps=steps // 2, **kw)
        while True:
            fine = fs.sample(model, x_T, steps=steps, **kw)
            err = float((fine - coarse).pow(2).mean().sqrt()) / 15.0
            if err <= tol or steps >= REF_MAX_STEPS:
                break
            coarse, steps = fine, 2 * steps
        self.ref_error[t_max], self.ref_steps[t_max] = err, steps
        if path is not None:
            _save_reference(path, {"format": CACHE_FORMAT, "key": key, "ref": fine, "error": err, "steps": steps})
        return fine


class _SharedTime:
    """The closed form called with one time when the whole batch shares it (fs.sample's loop and log_likelihood
    evaluate every sample at the same planned time): the mixture's per-component [K, D] variances are then
    computed once, not per sample. Same arithmetic per element (bitwise-equal output), fewer transcendental evaluations."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, t):
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1 and bool((t == t[0]).all()):
            t = t[:1]
        return self.fn(x, t)


def cache_dir() -> str:
    return os.environ.get("FLOWSOLVE_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flowsolve", "bench"))


def _cache_key(problem: Problem, x_T: torch.Tensor, t_max: float, tol: float) -> str:
    """SHA-256 (hex) of everything a mixture reference depends on; stored inside the file and compared on load."""
    h = hashlib.sha256(f"flowsolve-bench-reference-v{CACHE_FORMAT}".encode())
    params = problem.params()
    for k, v in sorted(params.pop("tensors").items()):
        h.update(k.encode())
        h.update(v.to(torch.float64).contiguous().numpy().tobytes())
    h.update(repr(sorted(params.items())).encode())
    h.update(repr((float(t_max), float(tol), REF_MIN_STEPS, REF_MAX_STEPS, str(x_T.dtype), tuple(x_T.shape))).encode())
    h.update(x_T.detach().contiguous().numpy().tobytes())
    root = os.path.dirname(os.path.abspath(fs.__file__))
    for src in _SOURCES:
        try:
            with open(os.path.join(root, src), "rb") as fh:
                h.update(fh.read())
        except OSError:
            h.update(src.encode())
    return h.hexdigest()


def _cache_file(problem: Problem, key: str) -> str:
    return os.path.join(cache_dir(), f"{problem.name}-{key[:20]}.pt")


def _check_reference(saved, key: str, x_T: torch.Tensor, tol: float) -> str | None:
    """Why a loaded cache entry is not the reference for ``key`` (None if it is)."""
    if not isinstance(saved, dict):
        return f"holds a {type(saved).__name__}, not a dict"
    if saved.get("format") != CACHE_FORMAT or saved.get("key") != key:
        return "was computed for another problem, start point, range or library version (its key differs)"
    ref, err, steps = saved.get("ref"), saved.get("error"), saved.get("steps")
    if not isinstance(ref, torch.Tensor) or ref.shape != x_T.shape or ref.dtype != x_T.dtype or ref.device != x_T.device:
        what = f"{ref.dtype} {tuple(ref.shape)}" if isinstance(ref, torch.Tensor) else type(ref).__name__
        return f"holds a {what} reference, not {x_T.dtype} {tuple(x_T.shape)}"
    if not bool(torch.isfinite(ref).all()):
        return "holds a reference with NaN or inf"
    if isinstance(err, bool) or not isinstance(err, float) or not 0.0 <= err < float("inf"):
        return f"holds an error estimate {err!r}, not a finite float >= 0"
    if isinstance(steps, bool) or not isinstance(steps, int) or not REF_MIN_STEPS <= steps <= REF_MAX_STEPS:
        return f"holds steps={steps!r}, not an int in [{REF_MIN_STEPS}, {REF_MAX_STEPS}]"
    if err > tol and steps < REF_MAX_STEPS:
        return f"holds a reference of error {err:.1e} > tol {tol:.1e} at steps={steps} < {REF_MAX_STEPS}"
    return None


def _load_reference(path: str, key: str, x_T: torch.Tensor, tol: float) -> dict | None:
    """The cached entry at ``path`` if it is the reference for ``key``; None (with a warning naming the file) if
    the file cannot be read by ``torch.load(weights_only=True)`` (truncated, foreign, or a pickle that would run
    code) or holds anything else."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a miss
        why = f"cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    else:
        why = _check_reference(saved, key, x_T, tol)
        if why is None:
            return saved
    warnings.warn(f"bench reference cache file {path} {why}; recomputing the reference and replacing the file.",
                  stacklevel=3)
    return None


def _save_reference(path: str, entry: dict) -> None:
    """Write ``entry`` atomically: a temp file in the same folder, then ``os.replace`` (readers see the old file or
    the whole new one, never a partial one). A failure (read-only home, full disk) warns; nothing is left behind."""
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
        with os.fdopen(fd, "wb") as fh:
            torch.save(entry, fh)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        warnings.warn(f"bench reference cache file {path} could not be written ({e}); continuing without the cache.",
                      stacklevel=3)


def _gaussian_data(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    std = 0.2 + 1.3 * torch.rand(dim, generator=g, dtype=torch.float64)
    return mu, std


def _mixture_data(seed: int, components: int = 4, dim: int = 2):
    """Well-separated anisotropic 2-D mixture: means ~ U[-2, 2]^2, stds ~ U(0.15, 0.6) per dimension."""
    g = torch.Generator().manual_seed(1000 + seed)
    means = 4.0 * torch.rand(components, dim, generator=g, dtype=torch.float64) - 2.0
    stds = 0.15 + 0.45 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return means, stds, weights


def _mixture16_data(seed: int, components: int = 6, dim: int = 16):
    """Anisotropic 16-D mixture: means ~ N(0, I), per-dimension stds ~ U(0.1, 0.8) (an 8:1 spread within a
    component), weights ~ 0.5 + U(0, 1). ``fs.analytic.GaussianMixture`` has diagonal components only, so the
    anisotropy is per dimension (no rotation)."""
    g = torch.Generator().manual_seed(2000 + seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.7 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return means, stds, weights


def problems(seed: int = 0) -> dict[str, Problem]:
    """Name -> Problem. Gaussian data (D=16, mu ~ N(0,1), std ~ U(0.2, 1.5)) under VP (eps model) and rectified
    flow (velocity model); a 4-component 2-D Gaussian mixture under VP, rectified flow and EDM (x0 model); a
    6-component anisotropic 16-D mixture under VP, EDM and rectified flow; two log-likelihood problems. Fixed seed."""
    mu, std = _gaussian_data(16, seed)
    means, stds, weights = _mixture_data(seed)
    m16, s16, w16 = _mixture16_data(seed)
    vp, rf, edm = fs.paths.VP(), fs.paths.RectifiedFlow(), fs.paths.EDM()
    mix = fs.analytic.GaussianMixture
    ref = "ODE reference: float64 RK4 on the {} grid, steps doubled until its estimated error <= %.0e" % REF_TOL
    g = torch.Generator().manual_seed(3000 + seed)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    out = [
        Problem("gaussian-vp", "Gaussian data (D=16), VP path (linear beta), eps model, t in [1e-3, 1]; exact flow map",
                fs.analytic.Gaussian(mu, std, vp), vp, "eps", vp.t_max, vp.t_min, 16, n_sde=4096),
        Problem("gaussian-rf", "Gaussian data (D=16), rectified-flow path, velocity model, t in [0, 1]; exact flow map "
                "(solvers singular at t = 1 start at t_max = 0.99)",
                fs.analytic.Gaussian(mu, std, rf), rf, "velocity", rf.t_max, rf.t_min, 16, sde=False),
        Problem("mixture-vp", "4-component anisotropic Gaussian mixture in 2-D, VP path, eps model, t in [1e-3, 1]; "
                + ref.format("logsnr"), mix(means, stds, weights, vp), vp, "eps", vp.t_max, vp.t_min, 2,
                ref_grid="logsnr", n_sde=8192),
        Problem("mixture-rf", "4-component anisotropic Gaussian mixture in 2-D, rectified flow, velocity model, "
                "t in [0, 1]; " + ref.format("uniform"), mix(means, stds, weights, rf), rf, "velocity",
                rf.t_max, rf.t_min, 2, ref_grid="uniform", sde=False),
        Problem("mixture-edm", "4-component anisotropic Gaussian mixture in 2-D, EDM path (sigma in [0.002, 80]), "
                "x0 model; " + ref.format("logsnr (uniform in log sigma)"), mix(means, stds, weights, edm), edm,
                "x0", edm.t_max, edm.t_min, 2, ref_grid="logsnr", n_sde=8192),
        Problem("mixture16-vp", "6-component Gaussian mixture in 16-D, per-dimension stds U(0.1, 0.8), VP path, "
                "eps model; " + ref.format("logsnr"), mix(m16, s16, w16, vp), vp, "eps", vp.t_max, vp.t_min, 16,
                ref_grid="logsnr", sde=False),
        Problem("mixture16-edm", "6-component Gaussian mixture in 16-D, per-dimension stds U(0.1, 0.8), EDM path, "
                "x0 model; " + ref.format("logsnr (uniform in log sigma)"), mix(m16, s16, w16, edm), edm, "x0",
                edm.t_max, edm.t_min, 16, ref_grid="logsnr", sde=False),
        Problem("mixture16-rf", "6-component Gaussian mixture in 16-D, per-dimension stds U(0.1, 0.8), rectified "
                "flow, velocity model; " + ref.format("uniform"), mix(m16, s16, w16, rf), rf, "velocity",
                rf.t_max, rf.t_min, 16, ref_grid="uniform", sde=False),
        Problem("loglik-gaussian-rf", "log-likelihood: D=16 Gaussian with a full (randomly rotated) covariance, "
                "rectified flow, velocity model; |log p - exact log p| (nats) at exact data samples, exact divergence, "
                "exact prior log p_1", fs.analytic.Gaussian(mu, std, rf, rotation=rot), rf, "velocity",
                rf.t_max, rf.t_min, 16, sde=False, kind="likelihood"),
        Problem("loglik-mixture-vp", "log-likelihood: the 2-D mixture under VP (eps model), t in [1e-3, 1]; "
                "|log p - exact log p| (nats), exact divergence, exact prior log p_1",
                mix(means, stds, weights, vp), vp, "eps", vp.t_max, vp.t_min, 2, sde=False, kind="likelihood"),
    ]
    return {p.name: p for p in out}
