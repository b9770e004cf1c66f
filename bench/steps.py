"""Step-count benchmark: error vs NFE for every registered solver on the analytic problems.

ODE solvers: RMS over samples and dimensions of x_N - Phi(x_T), the exact flow map of the Gaussian
problem (FORMULAS.md §3) or, for the Gaussian mixtures, a float64 RK4 reference with 4096 steps whose
own error (estimated by step halving) is reported beside it; the same x_T ~ p_{t_max} (exact) for every
NFE. Float64, 1024 samples. Adaptive solvers are swept over tolerances (rtol = atol in ADAPTIVE_TOLS) and
placed at the NFE they counted.

SDE solvers (NFE <= 100, 20000 samples): the sample mean and variance per dimension of x_N, started from exact draws of
p_{t_max}, against the exact marginal p_{t_min}: error = RMS over dimensions of the per-dimension
2-Wasserstein distance between N(mean_hat, var_hat) and N(mean, var), with its Monte-Carlo noise
floor (the RMS of the same statistic between the exact marginal and 8 exact samples of the same size).

On rectified flow, solvers that cannot start at t = 1 (alpha = 0: the reverse SDE, the
noise-prediction DPM-Solvers) start at t_max = 0.99, from exact draws of p(0.99); the table says so.
Multistep solvers use their defaults (dpm++3m: a DPM-Solver++(2S) first step, one extra NFE).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

import flowsolve as fs

from .problems import problems

DEFAULT_NFE = [4, 6, 8, 10, 14, 20, 28, 40, 50, 70, 100, 140, 200]
QUICK_NFE = [4, 10, 20, 50]
ERROR_LEVELS = [1e-1, 1e-2, 1e-3]
ODE_SAMPLES, SDE_SAMPLES = 1024, 20000
# The torch twin's keyed Philox noise is dozens of int64 passes in eager mode: ~22 ms per step for
# 20000 x 16 float64 values on 2 cores (measured); SDE solvers are swept to NFE 100 until the twin's
# noise is compiled (issue 7).
SDE_MAX_NFE = 100
SDE_T_MAX_RF = 0.99  # rectified flow: where a solver cannot start at t = 1 (alpha = 0)
ADAPTIVE_TOLS = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6]
QUICK_TOLS = [1e-2, 1e-4]
# adaptive SDE solvers: their NFE grows fast as the tolerance tightens (ggf: NFE 242 at 1e-2, 5815 at 1e-4
# in D = 16); these tolerances keep them inside the SDE NFE range of the sweep
SDE_ADAPTIVE_TOLS = [0.3, 0.1, 0.03, 0.01]
SDE_QUICK_TOLS = [0.3, 0.03]


def steps_for(info, nfe: int) -> int:
    return max(1, nfe // info.nfe_per_step)


def ode_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x - exact).pow(2).mean().sqrt())


def w2_error(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    """RMS over dimensions of W2(N(mean_hat, var_hat), N(mean, var)) per dimension."""
    m_hat, v_hat = x.mean(0), x.var(0)
    w2sq = (m_hat - mean) ** 2 + (v_hat.sqrt() - var.sqrt()) ** 2
    return float(w2sq.mean().sqrt())


def mc_floor(prob, t, n, mean, var, generator, replicates: int = 8) -> float:
    """The statistic's Monte-Carlo floor: RMS of ``w2_error`` over ``replicates`` exact samples of size n
    (one draw of it varies by a factor ~2 in 2-D: a single draw is no floor)."""
    vals = [w2_error(prob.sample(n, t, generator=generator, dtype=torch.float64), mean, var) for _ in range(replicates)]
    return float(np.sqrt(np.mean(np.square(vals))))


def _runs(info, nfes, tols):
    """(steps, rtol) per run of a sweep: NFE targets for fixed-step solvers, tolerances for adaptive ones."""
    if info.adaptive:
        if info.stochastic:
            tols = SDE_QUICK_TOLS if tols == QUICK_TOLS else SDE_ADAPTIVE_TOLS
        return [(None, tol) for tol in tols]
    return [(steps_for(info, n), None) for n in nfes if not (info.stochastic and n > SDE_MAX_NFE)]


def sweep_problem(problem, solver_names, nfes, n_ode, n_sde, seed, progress, tols=ADAPTIVE_TOLS):
    prob, path = problem.prob, problem.path
    model = problem.model()
    rows = []
    g = torch.Generator().manual_seed(seed)
    x_ode = prob.sample(n_ode, problem.t_max, generator=g, dtype=torch.float64)
    exact_ode = problem.reference(x_ode, problem.t_max)
    for name in solver_names:
        info = fs.get_solver(name).info
        t_max = problem.t_max
        if path.name == "rectified_flow":
            try:  # the reverse SDE and the noise-prediction DPM-Solvers are singular at alpha = 0 (t = 1)
                if info.adaptive:  # adaptive solvers check their end points when they run
                    fs.sample(model, x_ode[:1], solver=name, t_max=t_max, t_min=problem.t_min, rtol=0.5, atol=0.5)
                else:
                    fs.Sampler(model, name, steps=2, t_max=t_max, t_min=problem.t_min)
            except ValueError:
                t_max = min(t_max, SDE_T_MAX_RF)
        x_ode_n, exact_n = x_ode, exact_ode
        if t_max != problem.t_max and not info.stochastic:
            x_ode_n = prob.sample(n_ode, t_max, generator=g, dtype=torch.float64)
            exact_n = problem.reference(x_ode_n, t_max)
        if info.stochastic:
            x_init = prob.sample(n_sde, t_max, generator=g, dtype=torch.float64)
            mean = prob.mean(problem.t_min).expand(problem.dim).to(torch.float64)
            var = prob.var(problem.t_min).expand(problem.dim).to(torch.float64)
            floor = mc_floor(prob, problem.t_min, n_sde, mean, var, g)
        for k, (steps, tol) in enumerate(_runs(info, nfes, tols)):
            t0 = time.perf_counter()
            kw = dict(steps=steps) if tol is None else dict(rtol=tol, atol=tol)
            try:
                if info.stochastic:
                    x, meta = fs.sample(model, x_init, solver=name, t_max=t_max, t_min=problem.t_min,
                                        seed=seed + (steps if tol is None else k), return_info=True, **kw)
                    err = w2_error(x, mean, var)
                    extra = {"metric": "w2_marginal", "mc_floor": floor, "samples": n_sde}
                else:
                    x, meta = fs.sample(model, x_ode_n, solver=name, t_max=t_max, t_min=problem.t_min,
                                        return_info=True, **kw)
                    err = ode_error(x, exact_n)
                    extra = {"metric": "rms_flow_map" if problem.exact_flow else "rms_reference", "samples": n_ode}
                    if not problem.exact_flow:
                        extra["reference_error"] = problem.ref_error[t_max]
                if tol is not None:
                    extra.update(rtol=tol, steps_taken=meta.get("steps"), rejected=meta.get("rejected"))
            except (ValueError, RuntimeError) as e:  # a solver that cannot run this problem (or hits max_steps) says why
                rows.append({"problem": problem.name, "solver": name, "nfe": None, "steps": steps, "error": None,
                             "skipped": str(e)})
                break
            if not math.isfinite(err):
                err = float("inf")
            rows.append({"problem": problem.name, "solver": name, "nfe": meta["nfe"], "steps": steps, "error": err,
                         "seconds": time.perf_counter() - t0, "t_max": t_max, "t_min": problem.t_min, **extra})
            if progress is not None:
                progress.update(1)
    return rows


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
    return _fmt(value, "nfe")


def markdown_table(rows, problem_names, solver_names, all_t_max=None):
    all_t_max = all_t_max or {}
    lines = ["| problem | solver | metric | err @ NFE 10 | err @ NFE 20 | err @ NFE 50 | "
             + " | ".join(f"NFE to {lv:g}" for lv in ERROR_LEVELS) + " |",
             "|" + "---|" * (6 + len(ERROR_LEVELS))]
    for p in problem_names:
        for s in solver_names:
            pts = [r for r in rows if r["problem"] == p and r["solver"] == s and r.get("error") is not None]
            skipped = [r for r in rows if r["problem"] == p and r["solver"] == s and "skipped" in r]
            if not pts:
                why = skipped[0]["skipped"][:60] + "…" if skipped else "no data"
                lines.append(f"| {p} | {s} | — | {why} | | | " + " | " * len(ERROR_LEVELS))
                continue
            metric = pts[0]["metric"]
            floor = f" (MC floor {pts[0]['mc_floor']:.1e})" if "mc_floor" in pts[0] else ""
            if "reference_error" in pts[0]:
                floor = f" (ref. err. {pts[0]['reference_error']:.0e})"
            if "rtol" in pts[0]:
                metric += ", adaptive: rtol = atol swept"
            if pts[0]["t_max"] != all_t_max.get(p, pts[0]["t_max"]):
                metric += f", t_max={pts[0]['t_max']:g}"
            cells = [_fmt(error_at(pts, n)) for n in (10, 20, 50)]
            floor_value = pts[0].get("mc_floor", 0.0)
            # an SDE error level within 2x the Monte-Carlo floor cannot be told from noise
            reach = ["< 2x MC floor" if lv < 2 * floor_value else _reach_cell(pts, lv) for lv in ERROR_LEVELS]
            lines.append(f"| {p} | {s} | {metric}{floor} | " + " | ".join(cells + reach) + " |")
    return "\n".join(lines)


def plot(rows, problem_names, solver_names, path_png):
    """Log-log error vs NFE: one column per problem, ODE solvers (pathwise error) in the top row and SDE
    solvers (weak error, with the Monte-Carlo floor) in the bottom row; colour and marker per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    infos = {s: fs.get_solver(s).info for s in solver_names}
    families = [("ODE solvers: RMS error of x(t_min) vs the exact / reference flow map", False),
                ("SDE solvers: W2 of the Gaussian fit vs the exact marginal", True)]
    families = [(title, sto) for title, sto in families if any(i.stochastic == sto for i in infos.values())]
    fig, axes = plt.subplots(len(families), len(problem_names), figsize=(4.6 * len(problem_names) + 3.2,
                             4.2 * len(families)), squeeze=False)
    colors, markers = plt.get_cmap("tab20"), "os^vD<>pPX*h"
    for row, (title, stochastic) in enumerate(families):
        names = [s for s in solver_names if infos[s].stochastic == stochastic]
        for col, p in enumerate(problem_names):
            ax = axes[row][col]
            for k, s in enumerate(names):
                pts = sorted((r["nfe"], r["error"]) for r in rows
                             if r["problem"] == p and r["solver"] == s and r.get("error") is not None
                             and math.isfinite(r["error"]) and r["error"] > 0)
                if pts:
                    style = ":" if infos[s].adaptive else "-"
                    ax.loglog(*zip(*pts), marker=markers[k % len(markers)], ms=3.5, lw=1.1, ls=style,
                              color=colors(k % 20), label=s + (" (adaptive)" if infos[s].adaptive else ""))
            floors = [r["mc_floor"] for r in rows if r["problem"] == p and "mc_floor" in r]
            if stochastic and floors:
                ax.axhline(float(np.median(floors)), color="gray", lw=0.8, ls="--", label="Monte-Carlo floor")
            ax.set_title(p if row == 0 else f"{p} (SDE)", fontsize=10)
            ax.set_xlabel("NFE (counted model calls)")
            if col == 0:
                ax.set_ylabel("error")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[row][0].get_legend_handles_labels()
        for ax in axes[row][1:]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        axes[row][-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                             title=title.split(":")[0], title_fontsize=8)
    fig.suptitle("flowsolve: error vs NFE (float64; ODE: pathwise; SDE: weak)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def environment():
    import triton  # noqa: F401  (installed with flowsolve on Linux)

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "triton": getattr(__import__("triton"), "__version__", None), "flowsolve": fs.__version__,
        "device": "cpu", "torch_threads": torch.get_num_threads(),
    }


def run_cli(args) -> int:
    all_problems = problems(args.seed)
    names = list(all_problems) if not args.problems else [p.strip() for p in args.problems.split(",") if p.strip()]
    for n in names:
        if n not in all_problems:
            raise SystemExit(f"unknown problem {n!r}; choose from {', '.join(all_problems)}")
    solver_names = [s.name for s in fs.solvers()] if not args.solvers else [s.strip() for s in args.solvers.split(",")]
    for s in solver_names:
        fs.get_solver(s)  # clear error for unknown names
    nfes = [int(v) for v in args.nfe.split(",")] if args.nfe else (QUICK_NFE if args.quick else DEFAULT_NFE)
    if any(n <= 0 for n in nfes):
        raise SystemExit("--nfe values must be positive integers")
    n_ode, n_sde = (256, 2000) if args.quick else (ODE_SAMPLES, SDE_SAMPLES)
    tols = QUICK_TOLS if args.quick else ADAPTIVE_TOLS
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        total = sum(len(_runs(fs.get_solver(s).info, nfes, tols)) for s in solver_names) * len(names)
        progress = tqdm(total=total, desc="bench steps", file=sys.stderr)
    t0 = time.perf_counter()
    rows = []
    for n in names:
        rows += sweep_problem(all_problems[n], solver_names, nfes, n_ode, n_sde, args.seed, progress, tols)
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    table = markdown_table(rows, names, solver_names, {n: all_problems[n].t_max for n in names})
    header = (f"flowsolve step-count benchmark — {datetime.date.today().isoformat()}, CPU ({platform.machine()}, "
              f"{os.cpu_count()} cores), float64, seed {args.seed}, {elapsed:.0f} s\n")
    md_path, png_path, json_path = (os.path.join(args.out, f) for f in ("steps.md", "steps.png", "steps.json"))
    with open(md_path, "w") as fh:
        fh.write(header + "\n" + table + "\n")
    plot(rows, names, solver_names, png_path)
    meta = {"environment": environment(), "problems": {n: all_problems[n].description for n in names},
            "reference_error": {n: all_problems[n].ref_error for n in names if all_problems[n].ref_error},
            "adaptive_tolerances": tols,
            "dtype": "float64", "seed": args.seed, "nfe": nfes, "ode_samples": n_ode, "sde_samples": n_sde,
            "elapsed_s": elapsed, "rows": rows}
    with open(json_path, "w") as fh:
        json.dump(meta, fh, indent=1)
    print(header)
    print(table)
    print(f"\nwrote {md_path}, {png_path}, {json_path}")
    return 0

