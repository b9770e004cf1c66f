"""Step-count benchmark: error vs NFE for every registered solver (and the installed peer libraries' samplers)
on the analytic problems of ``bench.problems``.

ODE solvers: RMS over samples and dimensions of x_N - Phi(x_T), the exact flow map of Gaussian data
(FORMULAS.md §3) or, for Gaussian mixtures, a float64 RK4 reference refined until its own error (Richardson
estimate by step halving) is <= 1e-10, reported beside it; the same exact draws x_T ~ p_{t_max} for every NFE.
Pathwise errors are deterministic given x_T: 256 samples pin them to a few percent. Adaptive solvers are
swept over tolerances (rtol = atol) and placed at the NFE they counted.

SDE solvers (NFE 4, 10, 20, 50; on gaussian-vp, mixture-vp and mixture-edm): the sample mean and variance per dimension of x_N, started from exact draws of
p_{t_max}, against the exact marginal p_{t_min} (weak error): error = RMS over dimensions of the per-dimension
2-Wasserstein distance between N(mean_hat, var_hat) and N(mean, var). Its Monte-Carlo floor is the RMS of
the same statistic over 8 exact samples of p_{t_min} of the same size n (~ sqrt(1.5 var / n) for Gaussian
marginals), with the replicates' standard deviation as the statistic's standard error; an error within 2x the
floor is marked as noise. n per problem (bench/problems.py: 4096 in 16-D, 8192 in 2-D; ~0.2 us of keyed noise per
value and step on this CPU) puts the floor near 1e-2, below the errors at NFE 10-20 of every SDE solver.

Likelihood problems: |log p(x) - exact log p(x)| (RMS over exact data samples, nats) of
``fs.log_likelihood`` (Chen et al. 2018, FORMULAS.md §6) with the exact divergence and the exact prior
log p_{t_max}, so that the error is the ODE discretization alone.

On rectified flow, solvers that cannot start at t = 1 (alpha = 0: the reverse SDE, the noise-prediction
DPM-Solvers) start at t_max = 0.99, from exact draws of p(0.99); the table says so. Multistep solvers use
their defaults (dpm++3m: a DPM-Solver++(2S) first step, one extra NFE).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch

import flowsolve as fs

from .problems import REF_TOL, cache_dir, problems

DEFAULT_NFE = [4, 6, 8, 10, 14, 20, 30, 50, 70, 100, 200]  # NFE to a level beyond 200: "> 200"
QUICK_NFE = [4, 10, 20, 50]
ERROR_LEVELS = [1e-1, 1e-2, 1e-3]
SUMMARY_NFE = (10, 20, 50)
BUDGETS = (10, 20, 50, 100)
ODE_SAMPLES, QUICK_ODE_SAMPLES = 256, 32
QUICK_SDE_SAMPLES = 512  # --quick: a smoke run (the floor is ~4x higher than the default run's)
QUICK_PROBLEMS = ["gaussian-vp", "mixture-vp", "mixture16-edm", "loglik-mixture-vp"]  # --quick without --problems
QUICK_REF_TOL = 1e-8
# SDE solvers: the torch twin's keyed Philox noise costs ~0.2 us per value on this CPU (65k values a step in the
# 16-D problem), so the default SDE sweep is NFE 4, 10, 20, 50: beyond NFE 50 the weak errors are within 2x the
# Monte-Carlo floor of these sample sizes, where nothing finer is resolvable. --nfe runs them up to SDE_MAX_NFE.
SDE_MAX_NFE = 100
SDE_NFE = [4, 10, 20, 50]
SDE_T_MAX_RF = 0.99  # rectified flow: where a solver cannot start at t = 1 (alpha = 0)
ADAPTIVE_TOLS = [1e-2, 1e-3, 1e-4, 1e-5]
QUICK_TOLS = [1e-2, 1e-4]
# adaptive SDE solvers: their NFE grows fast as the tolerance tightens (ggf: NFE 242 at 1e-2, 5815 at 1e-4
# in D = 16); these tolerances keep them inside the SDE NFE range of the sweep
SDE_ADAPTIVE_TOLS = [0.3, 0.1]  # ggf: NFE ~110 and ~190 here; 0.03 costs ~520
SDE_QUICK_TOLS = [0.3]
LL_NFE = [4, 10, 20, 50, 100]
LL_QUICK_NFE = [4, 10, 20]
LL_SAMPLES, LL_QUICK_SAMPLES = 64, 16  # the error is deterministic per point: 64 points pin its RMS
LL_TOLS = [1e-3, 1e-5]
LL_QUICK_TOLS = [1e-3]
OURS = "flowsolve"
# Peer SDE samplers run on the Gaussian-mixture SDE problems only (the NFE-10 comparison's scope): k-diffusion's
# Brownian-tree samplers cost ~20x a plain noise draw per step, 85 s of CPU on gaussian-vp's 4096 x 16 alone.
PEER_SDE_PREFIX = "mixture"


def steps_for(info, nfe: int) -> int:
    return max(1, nfe // info.nfe_per_step)


def ode_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x - exact).pow(2).mean().sqrt())


def w2_error(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    """RMS over dimensions of W2(N(mean_hat, var_hat), N(mean, var)) per dimension."""
    m_hat, v_hat = x.mean(0), x.var(0)
    w2sq = (m_hat - mean) ** 2 + (v_hat.sqrt() - var.sqrt()) ** 2
    return float(w2sq.mean().sqrt())


def mc_floor_stats(prob, t, n, mean, var, generator, replicates: int = 8) -> tuple[float, float]:
    """(floor, sd): the RMS of ``w2_error`` over ``replicates`` exact samples of p_t of size n, and the
    replicates' standard deviation (the statistic's Monte-Carlo standard error at zero bias). One draw varies
    by a factor ~2 in 2-D: a single draw is no floor."""
    vals = [w2_error(prob.sample(n, t, generator=generator, dtype=torch.float64), mean, var) for _ in range(replicates)]
    return float(np.sqrt(np.mean(np.square(vals)))), float(np.std(vals, ddof=1))


def mc_floor(prob, t, n, mean, var, generator, replicates: int = 8) -> float:
    return mc_floor_stats(prob, t, n, mean, var, generator, replicates)[0]


def _runs(info, nfes, tols):
    """(steps, rtol) per run of a sweep: NFE targets for fixed-step solvers, tolerances for adaptive ones.
    Targets that give the same number of steps run once."""
    if info.adaptive:
        if info.stochastic:
            tols = SDE_QUICK_TOLS if tols == QUICK_TOLS else SDE_ADAPTIVE_TOLS
        return [(None, tol) for tol in tols]
    if info.stochastic:
        nfes = [n for n in nfes if n <= SDE_MAX_NFE]
    return [(s, None) for s in sorted({steps_for(info, n) for n in nfes})]


def _peer_runs(peer, nfes, tols):
    if peer.adaptive:
        if peer.stochastic:
            tols = SDE_QUICK_TOLS if tols == QUICK_TOLS else SDE_ADAPTIVE_TOLS
        return [(None, tol) for tol in tols]
    return [(n, None) for n in nfes if not (peer.stochastic and n > SDE_MAX_NFE)]


class _Starts:
    """Exact start draws and their reference endpoints, per start time, shared by every solver of a problem."""

    def __init__(self, problem, n_ode, n_sde, seed, ref_tol):
        self.p, self.n_ode, self.n_sde, self.ref_tol = problem, n_ode, n_sde, ref_tol
        self.g = torch.Generator().manual_seed(seed)
        self._ode, self._sde = {}, {}
        mean = problem.prob.mean(problem.t_min).expand(problem.dim).to(torch.float64)
        var = problem.prob.var(problem.t_min).expand(problem.dim).to(torch.float64)
        self.mean, self.var = mean, var
        self.floor = self.floor_sd = None

    def ode(self, t):
        if t not in self._ode:
            x = self.p.prob.sample(self.n_ode, t, generator=self.g, dtype=torch.float64)
            self._ode[t] = (x, self.p.reference(x, t, tol=self.ref_tol))
        return self._ode[t]

    def sde(self, t):
        if self.floor is None:
            self.floor, self.floor_sd = mc_floor_stats(self.p.prob, self.p.t_min, self.n_sde, self.mean, self.var, self.g)
        if t not in self._sde:
            self._sde[t] = self.p.prob.sample(self.n_sde, t, generator=self.g, dtype=torch.float64)
        return self._sde[t]


def _our_t_max(problem, model, name, info, x_probe):
    """t_max for solver ``name``: the problem's, or SDE_T_MAX_RF on rectified flow when the solver refuses t = 1."""
    if problem.path.name != "rectified_flow":
        return problem.t_max
    try:  # the reverse SDE and the noise-prediction DPM-Solvers are singular at alpha = 0 (t = 1)
        if info.adaptive:  # adaptive solvers check their end points when they run
            fs.sample(model, x_probe[:1], solver=name, t_max=problem.t_max, t_min=problem.t_min, rtol=0.5, atol=0.5)
        else:
            fs.Sampler(model, name, steps=2, t_max=problem.t_max, t_min=problem.t_min)
    except ValueError:
        return min(problem.t_max, SDE_T_MAX_RF)
    return problem.t_max


def _measure(problem, starts, t_start, stochastic, x_end):
    if stochastic:
        return w2_error(x_end, starts.mean, starts.var), {"metric": "w2_marginal", "mc_floor": starts.floor,
                                                          "mc_floor_sd": starts.floor_sd, "samples": starts.n_sde}
    extra = {"metric": "rms_flow_map" if problem.exact_flow else "rms_reference", "samples": starts.n_ode}
    if not problem.exact_flow:
        extra["reference_error"] = problem.ref_error[t_start]
        extra["reference_steps"] = problem.ref_steps[t_start]
    return ode_error(x_end, starts.ode(t_start)[1]), extra


def _row(problem, solver, library, stochastic, adaptive, nfe, steps, tol, err, seconds, t_start, extra):
    if not math.isfinite(err):
        err = float("inf")
    row = {"problem": problem.name, "solver": solver, "library": library, "family": "sde" if stochastic else "ode",
           "adaptive": adaptive, "nfe": int(nfe), "steps": steps, "error": err, "seconds": seconds,
           "t_max": t_start, "t_min": problem.t_min, **extra}
    if tol is not None:
        row["rtol"] = tol
    return row


def _skip(problem, solver, library, stochastic, why):
    return {"problem": problem.name, "solver": solver, "library": library, "family": "sde" if stochastic else "ode",
            "nfe": None, "error": None, "skipped": why}


def sweep_ours(problem, name, starts, nfes, tols, seed, progress):
    info = fs.get_solver(name).info
    model = problem.model()
    x_probe = starts.ode(problem.t_max)[0]
    t_max = _our_t_max(problem, model, name, info, x_probe)
    rows, failed = [], []
    for k, (steps, tol) in enumerate(_runs(info, nfes, tols)):
        t0 = time.perf_counter()
        kw = dict(steps=steps) if tol is None else dict(rtol=tol, atol=tol)
        try:
            if info.stochastic:
                x0 = starts.sde(t_max)
                x, meta = fs.sample(model, x0, solver=name, t_max=t_max, t_min=problem.t_min,
                                    seed=seed + (steps if tol is None else k), return_info=True, **kw)
            else:
                x0 = starts.ode(t_max)[0]
                x, meta = fs.sample(model, x0, solver=name, t_max=t_max, t_min=problem.t_min, return_info=True, **kw)
        except (ValueError, RuntimeError, FloatingPointError) as e:  # a solver that cannot run this problem says why
            failed.append(str(e))  # (planning errors are cheap: a larger NFE may still run, e.g. restart's intervals)
            continue
        finally:
            if progress is not None:
                progress.update(1)
        err, extra = _measure(problem, starts, t_max, info.stochastic, x)
        if tol is not None:
            extra.update(steps_taken=meta.get("steps"), rejected=meta.get("rejected"))
        rows.append(_row(problem, name, OURS, info.stochastic, info.adaptive, meta["nfe"], steps, tol, err,
                         time.perf_counter() - t0, t_max, extra))
    if failed:
        rows.append(_skip(problem, name, OURS, info.stochastic, failed[0]) | {"failed_runs": len(failed)})
    return rows


def sweep_peer(problem, peer, starts, nfes, tols, seed, progress):
    rows, seen, failed = [], set(), []
    runs = _peer_runs(peer, nfes, tols)
    for k, (nfe, tol) in enumerate(runs):
        t0 = time.perf_counter()
        try:
            t_start = float(peer.t_start(problem))
            x0 = starts.sde(t_start) if peer.stochastic else starts.ode(t_start)[0]
            x, counted = peer.run(problem, x0, nfe=nfe, tol=tol, seed=seed + k)
        except Exception as e:  # noqa: BLE001  (a third-party loop: any failure is reported, not fatal)
            failed.append(f"{type(e).__name__}: {e}")  # e.g. a budget below one step: a larger one may run
            if progress is not None:
                progress.update(1)
            continue
        if progress is not None:
            progress.update(1)
        if counted in seen and tol is None:  # a budget that gave the same run as a smaller one
            continue
        seen.add(counted)
        err, extra = _measure(problem, starts, t_start, peer.stochastic, x.to(torch.float64))
        rows.append(_row(problem, peer.name, peer.library, peer.stochastic, peer.adaptive, counted, None, tol, err,
                         time.perf_counter() - t0, t_start, extra))
    if failed:
        rows.append(_skip(problem, peer.name, peer.library, peer.stochastic, failed[0]) | {"failed_runs": len(failed)})
    return rows


def likelihood_solvers(selected=None):
    names = list(fs.likelihood.TABLEAUS)
    return [n for n in names if selected is None or n in selected]


def _ll_runs(name, nfes, tols):
    tab = fs.likelihood.TABLEAUS[name]
    if tab.b_low is not None:
        return [(None, tol) for tol in tols]
    per_step = len(tab.c)
    return [(s, None) for s in sorted({max(1, n // per_step) for n in nfes})]


def sweep_likelihood(problem, names, nfes, tols, n, seed, progress):
    """|log_likelihood - exact log p| vs NFE (exact divergence, exact prior log p_{t_max})."""
    prob = problem.prob
    g = torch.Generator().manual_seed(seed)
    x = prob.sample(n, problem.t_min, generator=g, dtype=torch.float64)
    truth = prob.log_prob(x, problem.t_min)
    prior = lambda z: prob.log_prob(z, problem.t_max)  # noqa: E731
    model = problem.model()
    rows = []
    for name in names:
        for steps, tol in _ll_runs(name, nfes, tols):
            t0 = time.perf_counter()
            kw = dict(steps=steps) if tol is None else dict(rtol=tol, atol=tol)
            try:
                lp, _, meta = log_likelihood_info(model, x, name, prior, problem, kw)
            except (ValueError, RuntimeError) as e:
                rows.append({**_skip(problem, name, OURS, False, str(e)), "family": "likelihood"})
                break
            finally:
                if progress is not None:
                    progress.update(1)
            err = float((lp - truth).pow(2).mean().sqrt())
            row = _row(problem, name, OURS, False, tol is not None, meta["nfe"], steps, tol, err,
                       time.perf_counter() - t0, problem.t_max, {"metric": "rms_logp_nats", "samples": n,
                                                                 "divergence": "exact"})
            row["family"] = "likelihood"
            rows.append(row)
    return rows


def log_likelihood_info(model, x, name, prior, problem, kw):
    lp, se, meta = fs.log_likelihood(model, x, name, divergence="exact", prior_log_prob=prior, t_min=problem.t_min,
                                     t_max=problem.t_max, return_info=True, **kw)
    return lp, se, meta


# ------------------------------------------------------------------------------------------------------------
# reading the sweep
# ------------------------------------------------------------------------------------------------------------
def nfe_to_reach(points, level):
    """Smallest NFE from which the error stays <= ``level`` for every larger NFE of the sweep,
    log-log interpolated between the last point above the level and the next (None if never)."""
    pts = sorted((r["nfe"], r["error"]) for r in points if r.get("error") is not None)
    if not pts or pts[-1][1] > level:
        return None
    above = [i for i, (_, e) in enumerate(pts) if e > level]
    if not above:
        return float(pts[0][0])
    (n0, e0), (n1, e1) = pts[above[-1]], pts[above[-1] + 1]
    if not (math.isfinite(e0) and e1 > 0):
        return float(n1)
    w = (math.log(level) - math.log(e0)) / (math.log(e1) - math.log(e0))
    return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))


def error_at(points, nfe):
    """Error at ``nfe``: the measured point, or log-log interpolation between the two neighbours
    (solvers with 3 or 4 evaluations per step, or an extra warm-up evaluation, miss round NFEs)."""
    pts = sorted((r["nfe"], r["error"]) for r in points if r.get("error") is not None)
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if n0 == nfe:
            return e0
        if n0 < nfe < n1 and e0 > 0 and e1 > 0 and math.isfinite(e0) and math.isfinite(e1):
            w = (math.log(nfe) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp(math.log(e0) + w * (math.log(e1) - math.log(e0)))
    if pts and pts[-1][0] == nfe:
        return pts[-1][1]
    return None


def _fmt(v, kind="err"):
    if v is None:
        return "—"
    if kind == "nfe":
        return f"{v:.0f}"
    return f"{v:.2e}" if math.isfinite(v) else "diverged"


def _reach_cell(pts, level) -> str:
    """'NFE to level': the interpolated crossing, or '<= N' when the sweep's smallest NFE N (an adaptive
    solver's loosest tolerance, or the first NFE of the sweep) is already below the level."""
    value = nfe_to_reach(pts, level)
    first = min((r["nfe"], r["error"]) for r in pts)
    if value is not None and first[1] <= level and all(r["error"] <= level for r in pts):
        return f"<= {first[0]:.0f}"
    if value is None:  # never reached (or left again) within the sweep
        return f"> {max(r['nfe'] for r in pts):.0f}"
    return _fmt(value, "nfe")


def _series(rows):
    """(problem, solver) -> measured rows, in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault((r["problem"], r["solver"]), []).append(r)
    return out


def markdown_table(rows, problem_names, solver_names=None, all_t_max=None):
    """One line per (problem, solver): error at NFE 10/20/50 and the NFE needed for each error level."""
    all_t_max = all_t_max or {}
    lines = ["| problem | solver | library | metric | " + " | ".join(f"err @ NFE {n}" for n in SUMMARY_NFE) + " | "
             + " | ".join(f"NFE to {lv:g}" for lv in ERROR_LEVELS) + " |",
             "|" + "---|" * (4 + len(SUMMARY_NFE) + len(ERROR_LEVELS))]
    series = _series(rows)
    for p in problem_names:
        names = [s for (q, s) in series if q == p]
        names = sorted(names, key=lambda s: (series[(p, s)][0].get("library", OURS) != OURS,
                                             series[(p, s)][0].get("family") == "sde", s))
        if solver_names is not None:
            names = [s for s in names if s in solver_names or series[(p, s)][0].get("library", OURS) != OURS]
        for s in names:
            allr = series[(p, s)]
            lib = allr[0].get("library", OURS)
            pts = [r for r in allr if r.get("error") is not None]
            if not pts:
                why = [r["skipped"] for r in allr if "skipped" in r]
                why = (why[0][:70] + "…") if why else "no data"
                lines.append(f"| {p} | {s} | {lib} | — | {why} |" + " |" * (len(SUMMARY_NFE) - 1 + len(ERROR_LEVELS)))
                continue
            first = pts[0]
            metric = first["metric"]
            note = ""
            if "mc_floor" in first:
                note = f" (MC floor {first['mc_floor']:.1e} ± {first['mc_floor_sd']:.0e}, n={first['samples']})"
            elif "reference_error" in first:
                note = f" (ref. err. {first['reference_error']:.0e})"
            if "rtol" in first:
                metric += ", adaptive: rtol = atol swept"
            if first["t_max"] != all_t_max.get(p, first["t_max"]):
                metric += f", t_max={first['t_max']:g}"
            floor = first.get("mc_floor", 0.0)
            cells = []
            for n in SUMMARY_NFE:
                e = error_at(pts, n)
                cells.append(_fmt(e) + (" †" if e is not None and floor and e < 2 * floor else ""))
            # an SDE error level within 2x the Monte-Carlo floor cannot be told from noise
            reach = ["< 2x MC floor" if lv < 2 * floor else _reach_cell(pts, lv) for lv in ERROR_LEVELS]
            lines.append(f"| {p} | {s} | {lib} | {metric}{note} | " + " | ".join(cells + reach) + " |")
    return "\n".join(lines)


def _best(series, problem, family, nfe, ours):
    """(solver, error) of the smallest error at ``nfe`` among our solvers (ours=True) or the peers'."""
    best = None
    for (p, s), rs in series.items():
        if p != problem or rs[0].get("family") != family or (rs[0].get("library", OURS) == OURS) != ours:
            continue
        e = error_at([r for r in rs if r.get("error") is not None], nfe)
        if e is not None and math.isfinite(e) and (best is None or e < best[1]):
            best = (s, e)
    return best


def accuracy_summary(rows, problem_names, nfe=10):
    """At NFE ``nfe`` on the Gaussian-mixture problems: our best solver's error vs the best peer's, per family."""
    series = _series(rows)
    out = []
    for p in problem_names:
        if not p.startswith("mixture"):
            continue
        for fam in ("ode", "sde"):
            ours, peer = _best(series, p, fam, nfe, True), _best(series, p, fam, nfe, False)
            if ours is None and peer is None:
                continue
            out.append({"problem": p, "family": fam, "nfe": nfe, "ours": ours, "peer": peer,
                        "peer_over_ours": (peer[1] / ours[1]) if ours and peer and ours[1] > 0 else None})
    return out


def recommend(rows, budgets=BUDGETS):
    """Per family and NFE budget: the flowsolve solver with the smallest geometric mean, over every problem of the
    family, of (its error at the budget / the best error any solver of the sweep, peers included, reached there).
    Only solvers measured at that budget on every problem of the family compete."""
    series = _series(rows)
    fams = {}
    for (p, s), rs in series.items():
        fams.setdefault(rs[0].get("family"), set()).add(p)
    out = []
    for fam in ("ode", "sde", "likelihood"):
        probs = sorted(fams.get(fam, ()))
        if not probs:
            continue
        for b in budgets:
            errs = {}  # solver -> {problem: err}
            best = {}
            for (p, s), rs in series.items():
                if p not in probs or rs[0].get("family") != fam:
                    continue
                e = error_at([r for r in rs if r.get("error") is not None], b)
                if e is None or not math.isfinite(e) or e <= 0:
                    continue
                best[p] = min(best.get(p, e), e)
                if rs[0].get("library", OURS) == OURS:
                    errs.setdefault(s, {})[p] = e
            scores = sorted((math.exp(np.mean([math.log(v[p] / best[p]) for p in probs])), s)
                            for s, v in errs.items() if all(p in v for p in probs))
            if scores:
                out.append({"family": fam, "budget": b, "problems": probs,
                            "ranking": [{"solver": s, "geomean_over_best": sc} for sc, s in scores[:3]]})
    return out


def summary_markdown(summary, recs):
    lines = ["## Accuracy at NFE 10 on the Gaussian-mixture problems: flowsolve's best vs the best peer", "",
             "| problem | family | best flowsolve solver | its error | best peer | its error | peer / flowsolve |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        o, p = r["ours"], r["peer"]
        ratio = f"{r['peer_over_ours']:.2f}x" if r["peer_over_ours"] is not None else "—"
        lines.append(f"| {r['problem']} | {r['family'].upper()} | {o[0] if o else '—'} | {_fmt(o[1]) if o else '—'} | "
                     f"{p[0] if p else '— (no peer ran)'} | {_fmt(p[1]) if p else '—'} | {ratio} |")
    lines += ["", "## Which solver to pick per NFE budget (generated from the sweep)", "",
              "Geometric mean over the family's problems of error / best error of any solver (peers included) at that "
              "NFE; 1.00x = the best on every problem. Only flowsolve solvers measured on all of them are ranked.", "",
              "| family | NFE budget | pick | runner-up | third |", "|---|---|---|---|---|"]
    for r in recs:
        cells = [f"{x['solver']} ({x['geomean_over_best']:.2f}x)" for x in r["ranking"]] + ["—"] * 3
        lines.append(f"| {r['family'].upper()} ({len(r['problems'])} problems) | {r['budget']} | " + " | ".join(cells[:3]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# the figure
# ------------------------------------------------------------------------------------------------------------
def plot(rows, problem_names, solver_names, path_png):
    """Log-log error vs NFE, one panel per (problem, family): ODE solvers (pathwise error), SDE solvers (weak error,
    with the Monte-Carlo floor as a dashed line), likelihood (nats). flowsolve solid, peers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = _series([r for r in rows if r.get("error") is not None and math.isfinite(r["error"]) and r["error"] > 0])
    panels = []
    for p in problem_names:
        for fam in ("ode", "sde", "likelihood"):
            if any(q == p and rs[0]["family"] == fam for (q, _), rs in series.items()):
                panels.append((p, fam))
    labels = sorted({s for (_, s) in series}, key=lambda s: (":" in s, s))
    if not panels:
        panels = [(problem_names[0] if problem_names else "no data", "ode")]
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    n_labels = len(labels) + 1
    legend_cols = max(1, math.ceil(n_labels / max(20, 4 * nrow)))
    legend_in = 1.8 * legend_cols
    width = 4.4 * ncol + legend_in
    fig, axes = plt.subplots(nrow, ncol, figsize=(width, 3.8 * nrow), squeeze=False)
    colors, markers = plt.get_cmap("tab20"), "os^vD<>pPX*h"
    handles = {}
    titles = {"ode": "ODE: RMS error vs exact / reference", "sde": "SDE: W2 of the Gaussian fit (weak)",
              "likelihood": "log-likelihood: RMS |log p error| (nats)"}
    for ax, (p, fam) in zip(axes.flat, panels):
        for (q, s), rs in series.items():
            if q != p or rs[0]["family"] != fam:
                continue
            k = labels.index(s)
            pts = sorted((r["nfe"], r["error"]) for r in rs)
            peer = rs[0].get("library", OURS) != OURS
            (line,) = ax.loglog(*zip(*pts), marker=markers[(k // 20) % len(markers)] if not peer else "x", ms=3.5,
                                lw=1.0, ls="--" if peer else (":" if rs[0].get("adaptive") else "-"),
                                color=colors(k % 20))
            handles.setdefault(s, line)
        floors = [r["mc_floor"] for (q, _), rs in series.items() if q == p for r in rs if "mc_floor" in r]
        if fam == "sde" and floors:
            handles.setdefault("Monte-Carlo floor", ax.axhline(float(np.median(floors)), color="gray", lw=0.8, ls="--"))
        ax.set_title(f"{p}\n{titles[fam]}", fontsize=8.5)
        ax.set_xlabel("NFE (counted model calls)", fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    names = list(handles)
    fig.legend([handles[n] for n in names], names, loc="center right", fontsize=6.5, ncol=legend_cols,
               title="solid: flowsolve (dotted: adaptive)\ndashed, x: peer libraries", title_fontsize=7)
    fig.suptitle("flowsolve step-count benchmark: error vs NFE (float64)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - legend_in / width, 0.97))
    fig.savefig(path_png, dpi=100)
    plt.close(fig)


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment():
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "device": "cpu", "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {d: _version(d) for d in ("torch", "numpy", "triton", "scipy", "matplotlib", "tqdm", "diffusers",
                                              "torchdiffeq", "torchsde", "k-diffusion")} | {"flowsolve": fs.__version__},
        "torch": torch.__version__, "numpy": np.__version__,
    }


# ------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------
def _peers_for(problem, enabled, selected):
    if not enabled or problem.kind != "sample":
        return []
    try:
        from .peers import peer_solvers
    except ImportError:
        return []
    try:
        out = peer_solvers(problem)
    except Exception as e:  # noqa: BLE001  (a broken peer module must not stop the benchmark)
        print(f"peers unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    if selected is not None:
        out = [p for p in out if p.name in selected or p.library in selected or "peers" in selected]
    return out


def _peer_names() -> set:
    """Names and library names of the installed peer samplers (empty without bench.peers)."""
    try:
        from .peers import peer_solvers

        return {n for p in peer_solvers() for n in (p.name, p.library)}
    except Exception:  # noqa: BLE001
        return set()


def _usage_error(message: str):
    """Exit like argparse does on a bad argument: the message on stderr, exit code 2, no traceback."""
    print(f"python -m bench steps: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_out(out) -> None:
    """``--out`` must be a folder we can create and write into: checked before the sweep (minutes), not after."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        _usage_error(f"--out={out!r} is not a writable folder ({e.strerror or e}); pass a folder you can write to, "
                     f"e.g. --out bench/results.")


def run_cli(args) -> int:
    """``python -m bench steps``: the arguments are checked first (bad values exit with code 2 before any work)."""
    threads = getattr(args, "threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        _usage_error(f"--threads={threads}: pass a positive number of torch intra-op threads (default 1).")
    _check_out(args.out)
    # One intra-op thread by default: the tensors here are <= 65k elements, where a second thread saves nothing and,
    # on a loaded shared machine, oversubscription made the reference solves 10x slower (measured: 95 s vs 9 s).
    torch.set_num_threads(threads)
    wall0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    all_problems = problems(args.seed)
    if args.problems:
        names = [p.strip() for p in args.problems.split(",") if p.strip()]
    else:
        names = QUICK_PROBLEMS if args.quick else list(all_problems)
    for n in names:
        if n not in all_problems:
            raise SystemExit(f"--problems: unknown problem {n!r}; choose from {', '.join(all_problems)}")
    registered = [s.name for s in fs.solvers()]
    selected = None if not args.solvers else [s.strip() for s in args.solvers.split(",") if s.strip()]
    ll_names = likelihood_solvers(selected)
    if selected is None:
        solver_names = registered
    else:
        solver_names = [s for s in selected if s in registered]
        peer_names = _peer_names()
        for s in selected:
            if s not in registered and s not in ll_names and s not in peer_names and s != "peers":
                try:
                    fs.get_solver(s)  # its error names the registered solvers and a close match
                except ValueError as e:
                    raise SystemExit(f"--solvers: {e} Likelihood solvers: {', '.join(fs.likelihood.TABLEAUS)}; peers: "
                                     f"{', '.join(sorted(peer_names)) or 'none installed'} (or 'peers' for all).") from None
    quick = args.quick
    if args.nfe:
        try:
            nfes = sorted({int(v) for v in args.nfe.split(",") if v.strip()})
        except ValueError:
            raise SystemExit(f"--nfe={args.nfe!r}: pass comma-separated positive integers, e.g. --nfe 4,10,20") from None
        if not nfes or nfes[0] <= 0:
            raise SystemExit(f"--nfe={args.nfe!r}: values must be positive integers")
        ll_nfes = nfes
    else:
        nfes = QUICK_NFE if quick else DEFAULT_NFE
        ll_nfes = LL_QUICK_NFE if quick else LL_NFE
    if not args.nfe and not quick:
        sde_nfes = SDE_NFE
    else:
        sde_nfes = [n for n in nfes if n <= SDE_MAX_NFE]
    n_ode = QUICK_ODE_SAMPLES if quick else ODE_SAMPLES
    tols = QUICK_TOLS if quick else ADAPTIVE_TOLS
    ll_tols = LL_QUICK_TOLS if quick else LL_TOLS
    ref_tol = QUICK_REF_TOL if quick else REF_TOL
    peers_on = not getattr(args, "no_peers", False)

    plan = []  # (problem, kind, what, runs)
    for n in names:
        p = all_problems[n]
        if p.kind == "likelihood":
            for s in ll_names:
                plan.append((p, "ll", s, len(_ll_runs(s, ll_nfes, ll_tols))))
            continue
        for s in solver_names:
            info = fs.get_solver(s).info
            if info.stochastic and not p.sde:
                continue
            plan.append((p, "ours", s, len(_runs(info, sde_nfes if info.stochastic else nfes, tols))))
        for peer in _peers_for(p, peers_on, selected):
            if peer.stochastic and not (p.sde and p.name.startswith(PEER_SDE_PREFIX)):
                continue
            plan.append((p, "peer", peer, len(_peer_runs(peer, sde_nfes if peer.stochastic else nfes, tols))))
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=sum(r for *_, r in plan), desc="bench steps", file=sys.stderr)
    rows, starts = [], {}
    sizes = {}
    for p, kind, what, _ in plan:
        if progress is not None:
            progress.set_postfix_str(f"{p.name} {getattr(what, 'name', what)}"[:40])
        if kind == "ll":
            n_ll = LL_QUICK_SAMPLES if quick else LL_SAMPLES
            sizes[p.name] = {"kind": "likelihood", "dim": p.dim, "samples": n_ll}
            rows += sweep_likelihood(p, [what], ll_nfes, ll_tols, n_ll, args.seed, progress)
            continue
        if p.name not in starts:
            n_sde = QUICK_SDE_SAMPLES if quick else p.n_sde
            starts[p.name] = _Starts(p, n_ode, n_sde, args.seed, ref_tol)
            sizes[p.name] = {"kind": "sample", "dim": p.dim, "ode_samples": n_ode, "sde_samples": n_sde if p.sde else 0}
        st = starts[p.name]
        if kind == "ours":
            info = fs.get_solver(what).info
            rows += sweep_ours(p, what, st, sde_nfes if info.stochastic else nfes, tols, args.seed, progress)
        else:
            rows += sweep_peer(p, what, st, sde_nfes if what.stochastic else nfes, tols, args.seed, progress)
    if progress is not None:
        progress.close()
    for name, st in starts.items():
        if st.floor is not None:
            sizes[name].update(mc_floor=st.floor, mc_floor_sd=st.floor_sd)

    summary, recs = accuracy_summary(rows, names), recommend(rows)
    os.makedirs(args.out, exist_ok=True)
    md_path, png_path, json_path = (os.path.join(args.out, f) for f in ("steps.md", "steps.png", "steps.json"))
    plot(rows, names, None, png_path)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    table = markdown_table(rows, names, None, {n: all_problems[n].t_max for n in names})
    n_peers = len({r["solver"] for r in rows if r.get("library", OURS) != OURS})
    header = (f"# flowsolve step-count benchmark — {datetime.date.today().isoformat()}, CPU ({platform.machine()}, "
              f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads), float64, seed {args.seed}"
              f"{', --quick' if quick else ''}: {wall:.0f} s wall, {user:.0f} s user CPU\n\n"
              f"Sizes: ODE {n_ode} samples (pathwise RMS error); SDE n per problem (weak error, MC floor given); "
              f"likelihood {LL_QUICK_SAMPLES if quick else LL_SAMPLES} samples. Mixture references: float64 RK4, "
              f"estimated error <= {ref_tol:.0e}. NFE = counted model calls. {n_peers} peer samplers"
              f"{' (disabled: --no-peers)' if not peers_on else ''}; peer SDE samplers on the mixture problems only. "
              f"† = within 2x the Monte-Carlo floor (noise, not discretization error). "
              f"Regenerate: `python -m bench steps`.\n")
    body = summary_markdown(summary, recs) + "\n\n## Error vs NFE, every solver\n\n" + table + "\n"
    with open(md_path, "w") as fh:
        fh.write(header + "\n" + body)
    meta = {"environment": environment(), "dtype": "float64", "seed": args.seed, "quick": bool(quick),
            "wall_s": wall, "user_cpu_s": user, "system_cpu_s": system,
            "problems": {n: {"description": all_problems[n].description, **sizes.get(n, {}),
                             "reference_error": all_problems[n].ref_error, "reference_steps": all_problems[n].ref_steps,
                             "reference_cache_hits": all_problems[n].cache_hits} for n in names},
            "reference_tol": ref_tol, "reference_cache": cache_dir(), "nfe": nfes, "sde_nfe": sde_nfes,
            "likelihood_nfe": ll_nfes, "adaptive_tolerances": tols, "sde_adaptive_tolerances":
            SDE_QUICK_TOLS if quick else SDE_ADAPTIVE_TOLS, "likelihood_tolerances": ll_tols,
            "solvers": solver_names, "likelihood_solvers": ll_names, "peers": peers_on,
            "summary_nfe10": summary, "recommendation": recs, "rows": rows}
    with open(json_path, "w") as fh:
        json.dump(meta, fh, indent=1, default=str)
    print(header)
    print(body)
    print(f"wrote {md_path}, {png_path}, {json_path}")
    return 0
