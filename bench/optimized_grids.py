"""Optimized time grids (``fs.grids.optimize``) against the built-in grids and the peer libraries, on
HELD-OUT Gaussian-mixture problems.

    python -m bench.optimized_grids [--quick] [--out bench/results]

Development: the grid optimizer was developed and tuned (pilot size, iteration budget, coordinate)
on bench.problems' ``mixture-vp`` only (2-D, 4 components, seed 0). The problems here differ in
dimension, number of components, data seed and path, and none of them was looked at while tuning:

    heldout8-vp    8-D, 6 components, data seed 11, VP path (linear beta), eps model, t in [1e-3, 1]
    heldout8-edm   8-D, 5 components, data seed 12, EDM path, x0 (denoiser) model, sigma in [0.002, 80]
    heldout16-rf   16-D, 8 components, data seed 13, rectified flow, velocity model, t in [0, 1]

Metric (as bench/steps.py): RMS over samples and dimensions of x_N - x_ref, float64, on exact
draws of p_{t_max} (512; seed 777: not the optimizer's pilot, which is 128 draws of N(0, sigma(t_max)^2 I)
with seed 0); x_ref is a float64 RK4 solve with REF_STEPS = 256 steps (its error estimate by
step halving is printed). The optimizer's cost is reported in NFE per optimization.
Peers: ``bench.peers.peer_solvers(problem)`` (deterministic fixed-step peers, run at the same NFE
budget through their own loops, counted NFE <= the budget) on the same draws, or, for a peer starting
elsewhere (k-diffusion on rectified flow: t = 0.99), on 512 exact draws of p at its start with their own
reference; "pending" when no peer module is available.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

import flowsolve as fs

from .problems import Problem
from .steps import ode_error

SOLVERS = ["dpm++2m", "dpm++3m", "unipc2-bh2", "unipc3-bh2", "deis", "ipndm"]
NFES = [5, 8, 10, 15]
GRIDS = ("logsnr", "edm", "uniform", "quadratic")
PILOT, PILOT_SEED, EVAL_SEED = 128, 0, 777
REF_STEPS = 256  # float64 RK4 reference (and half as many steps for its error estimate, printed); --quick: 128
EVAL_SAMPLES = 512
ITER_PER_STEP = 12  # optimizer objective calls per step of the grid (after the built-in grids)


def _mixture(dim: int, components: int, seed: int, path):
    """Means ~ U[-2, 2]^D, stds ~ U(0.15, 0.6) per dimension, weights ~ 0.5 + U(0, 1) (as bench.problems)."""
    g = torch.Generator().manual_seed(5000 + seed)
    means = 4.0 * torch.rand(components, dim, generator=g, dtype=torch.float64) - 2.0
    stds = 0.15 + 0.45 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return fs.analytic.GaussianMixture(means, stds, weights, path)


def held_out_problems() -> list[Problem]:
    vp, edm, rf = fs.paths.VP(), fs.paths.EDM(), fs.paths.RectifiedFlow()
    return [
        Problem("heldout8-vp", "8-D 6-component mixture, data seed 11, VP, eps model", _mixture(8, 6, 11, vp), vp,
                "eps", vp.t_max, vp.t_min, 8, ref_grid="logsnr"),
        Problem("heldout8-edm", "8-D 5-component mixture, data seed 12, EDM path, x0 model", _mixture(8, 5, 12, edm),
                edm, "x0", edm.t_max, edm.t_min, 8, ref_grid="edm"),
        Problem("heldout16-rf", "16-D 8-component mixture, data seed 13, rectified flow, velocity model",
                _mixture(16, 8, 13, rf), rf, "velocity", rf.t_max, rf.t_min, 16, ref_grid="uniform"),
    ]


def _steps(model, solver, nfe, t_max, t_min):
    """Steps at exactly ``nfe`` planned evaluations (None if unreachable)."""
    per = fs.get_solver(solver).info.nfe_per_step
    for steps in range(max(1, nfe // per), 0, -1):
        got = fs.Sampler(model, solver, steps=steps, t_max=t_max, t_min=t_min).nfe
        if got == nfe:
            return steps
        if got < nfe:
            return None
    return None


def reference(problem, x, t_max, steps):
    """Float64 RK4 endpoint from x at t_max on the problem's reference grid, and its error estimate
    |x_N - x_{N/2}| / 15 (RK4 is fourth order)."""
    kw = dict(solver="rk4", grid=problem.ref_grid, t_max=t_max, t_min=problem.t_min)
    ref = fs.sample(problem.model(), x, steps=steps, **kw)
    half = fs.sample(problem.model(), x, steps=steps // 2, **kw)
    return ref, float((ref - half).pow(2).mean().sqrt()) / 15.0


def _peer_rows(problem, nfes, n_eval, cache, ref_steps):
    """{nfe: (error, name, nfe_counted)} of the best deterministic fixed-step peer, or a reason string."""
    try:
        from .peers import peer_solvers

        peers = [p for p in peer_solvers(problem) if not p.stochastic and not p.adaptive]
    except (ImportError, AttributeError) as e:
        return f"pending ({type(e).__name__}: {e})"
    if not peers:
        return "pending (no deterministic fixed-step peer applies)"
    best = {}
    for peer in peers:
        t0 = float(peer.t_start(problem))
        if t0 not in cache:
            g = torch.Generator().manual_seed(EVAL_SEED + 1)
            x = problem.prob.sample(n_eval, t0, generator=g, dtype=torch.float64)
            cache[t0] = (x, reference(problem, x, t0, ref_steps)[0])
        x, ref = cache[t0]
        for nfe in nfes:
            try:
                x_end, counted = peer.run(problem, x.clone(), nfe=nfe, seed=0)
            except Exception as e:  # noqa: BLE001  (a peer that cannot run this budget is left out, with why)
                print(f"  peer {peer.name} nfe={nfe}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            err = ode_error(x_end.to(torch.float64), ref)
            if counted <= nfe and math.isfinite(err) and (nfe not in best or err < best[nfe][0]):
                best[nfe] = (err, peer.name, counted)
    return best


def _config(quick: bool) -> dict:
    return dict(quick=quick, solvers=["dpm++2m", "unipc2-bh2"] if quick else SOLVERS, nfes=[5, 10] if quick else NFES,
                n_eval=256 if quick else EVAL_SAMPLES, pilot=64 if quick else PILOT,
                ref_steps=REF_STEPS // 2 if quick else REF_STEPS)


def run_problem(index: int, quick: bool = False, progress: bool = True):
    """One held-out problem: (rows, note, costs)."""
    cfg = _config(quick)
    torch.set_num_threads(1)
    prob = held_out_problems()[index]
    solvers, nfes, n_eval, pilot, ref_steps = (cfg[k] for k in ("solvers", "nfes", "n_eval", "pilot", "ref_steps"))
    rows, costs = [], []
    model = prob.model()
    g = torch.Generator().manual_seed(EVAL_SEED)
    x = prob.prob.sample(n_eval, prob.t_max, generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    ref, ref_err = reference(prob, x, prob.t_max, ref_steps)
    note = {"description": prob.description, "reference_error": ref_err, "reference_steps": ref_steps,
            "reference_seconds": time.perf_counter() - t0}
    if progress:
        print(f"{prob.name}: reference {ref_err:.1e} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    t0 = time.perf_counter()
    peers = _peer_rows(prob, nfes, n_eval, {float(prob.t_max): (x, ref)}, ref_steps)  # same draws where they start at t_max
    note["peer_seconds"] = time.perf_counter() - t0
    if progress:
        print(f"{prob.name}: peers {'measured' if isinstance(peers, dict) else peers} ({note['peer_seconds']:.0f} s)",
              file=sys.stderr)
    for solver in solvers:
        for nfe in nfes:
            try:
                steps = _steps(model, solver, nfe, prob.t_max, prob.t_min)
            except ValueError as e:
                rows.append({"problem": prob.name, "solver": solver, "nfe": nfe, "skipped": str(e)[:80]})
                break
            if steps is None:
                continue
            t1 = time.perf_counter()
            # the pilot reference is optimize's default (float64 RK4, 256 + 128 steps), shared across calls
            grid, info = fs.grids.optimize(model, nfe=nfe, solver=solver, pilot=pilot, shape=(prob.dim,),
                                           seed=PILOT_SEED, max_iter=ITER_PER_STEP * steps, return_info=True)
            opt_s = time.perf_counter() - t1
            x_opt, meta = fs.sample(model, x, solver=solver, grid=grid, return_info=True)
            assert meta["nfe"] == nfe, (solver, nfe, meta["nfe"])
            row = {"problem": prob.name, "solver": solver, "nfe": nfe, "steps": steps,
                   "optimized": ode_error(x_opt, ref), "init": info["init"],
                   "objective_calls": info["objective_calls"], "cost_nfe": info["cost_nfe"],
                   "reference_reused": info["reference"]["reused"], "pilot": info["pilot"],
                   "pilot_error": info["pilot_error"], "seconds": opt_s, "grid": grid.tolist()}
            for name in GRIDS:
                try:
                    row[name] = ode_error(fs.sample(model, x, solver=solver, steps=steps, grid=name), ref)
                except ValueError:
                    row[name] = None
            if isinstance(peers, dict) and nfe in peers:
                row["peer"], row["peer_name"], row["peer_nfe"] = peers[nfe]
            rows.append(row)
            costs.append((info["objective_calls"], info["cost_nfe"], info["reference"]["nfe"]))
            if progress:
                print(f"  {prob.name} {solver} nfe={nfe}: opt {row['optimized']:.2e} "
                      f"best default {min(v for v in (row[n] for n in GRIDS) if v is not None):.2e} "
                      f"({opt_s:.1f} s)", file=sys.stderr)
    note["peers"] = peers if isinstance(peers, str) else "measured"
    return rows, note, costs


def run(quick: bool = False, jobs: int = 1, progress: bool = True):
    cfg = _config(quick)
    names = [p.name for p in held_out_problems()][: 2 if quick else None]
    t_start = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(jobs, len(names))) as pool:
            parts = pool.starmap(run_problem, [(k, quick, progress) for k in range(len(names))])
    else:
        parts = [run_problem(k, quick, progress) for k in range(len(names))]
    rows = [r for part in parts for r in part[0]]
    notes = {n: part[1] for n, part in zip(names, parts)}
    costs = [c for part in parts for c in part[2]]
    return rows, notes, costs, time.perf_counter() - t_start, cfg


def _f(v):
    return "—" if v is None else (f"{v:.2e}" if math.isfinite(v) else "diverged")


def markdown(rows, notes, costs, elapsed, cfg):
    lines = [f"flowsolve optimized grids (held-out problems) — {datetime.date.today().isoformat()}, CPU, float64, "
             f"{cfg['n_eval']} eval samples, pilot {cfg['pilot']}, {elapsed:.0f} s" + (" (--quick)" if cfg["quick"] else ""),
             "", "Developed on bench.problems mixture-vp (2-D, seed 0); evaluated only on:", ""]
    for name, n in notes.items():
        lines.append(f"- {name}: {n['description']}; reference error {n['reference_error']:.1e}; peers: {n['peers']}")
    lines += ["", "| problem | solver | NFE | optimized | logsnr | edm | uniform | quadratic | best default / optimized "
              "| best peer (name) | goal: opt <= peer / 2 |", "|" + "---|" * 11]
    met = total = 0
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['problem']} | {r['solver']} | — | skipped: {r['skipped']} |" + " |" * 7)
            continue
        defaults = [r[n] for n in GRIDS if r[n] is not None and math.isfinite(r[n])]
        ratio = min(defaults) / r["optimized"] if defaults and r["optimized"] > 0 else None
        if "peer" in r:
            peer = f"{r['peer']:.2e} ({r['peer_name']}, NFE {r['peer_nfe']})"
            ok = r["optimized"] <= 0.5 * r["peer"]
            goal = "met" if ok else f"not met ({r['optimized'] / r['peer']:.2f} x peer)"
            met, total = met + ok, total + 1
        else:
            peer = goal = "pending" if notes[r["problem"]]["peers"] != "measured" else "— (no peer at this NFE)"
        lines.append(f"| {r['problem']} | {r['solver']} | {r['nfe']} | {_f(r['optimized'])} | "
                     + " | ".join(_f(r[n]) for n in GRIDS) + f" | {ratio:.2f}x | {peer} | {goal} |")
    done = [r for r in rows if "skipped" not in r]
    if done:
        calls = [r["objective_calls"] for r in done]
        obj = [r["objective_calls"] * r["nfe"] for r in done]
        ref_nfe = costs[0][2]
        lines += ["", f"Optimization cost per (problem, solver, NFE), in NFE per pilot sample (x {cfg['pilot']} pilot "
                  f"samples for model evaluations of one sample): objective {min(obj)}-{max(obj)} (= {min(calls)}-"
                  f"{max(calls)} objective calls x NFE; the calls are the 4 built-in grids + Nelder-Mead, "
                  f"{ITER_PER_STEP} per step), plus the pilot reference once per problem ({ref_nfe} NFE: RK4 at "
                  f"{ref_nfe // 6} + {ref_nfe // 12} steps, shared by all solvers and budgets). Total over this run: "
                  f"{sum(obj) + ref_nfe * len(notes)} NFE per pilot sample; mean wall time per optimization "
                  f"{sum(r['seconds'] for r in done) / len(done):.1f} s."]
    if total:
        lines.append(f"Goal (half the best peer's error at the same NFE) met in {met} of {total} rows.")
    # headline: the best flowsolve solver with its optimized grid against the best peer, per problem and NFE
    lines += ["", "| problem | NFE | best flowsolve (optimized grid) | best flowsolve (default grids) | best peer | "
              "optimized / peer | goal (<= 0.5) |", "|" + "---|" * 7]
    for prob in notes:
        for nfe in cfg["nfes"]:
            rs = [r for r in rows if r["problem"] == prob and r.get("nfe") == nfe and "skipped" not in r]
            if not rs:
                continue
            bo = min(rs, key=lambda r: r["optimized"])
            dv = [(r[n], r["solver"], n) for r in rs for n in GRIDS if r[n] is not None and math.isfinite(r[n])]
            bd = min(dv) if dv else None
            pr = [r for r in rs if "peer" in r]
            if pr:
                peer = f"{pr[0]['peer']:.2e} ({pr[0]['peer_name']})"
                q = bo["optimized"] / pr[0]["peer"]
                tail = f"{q:.2f} | {'met' if q <= 0.5 else 'not met'} |"
            else:
                peer, tail = "pending", "— | pending |"
            lines.append(f"| {prob} | {nfe} | {bo['optimized']:.2e} ({bo['solver']}) | "
                         + (f"{bd[0]:.2e} ({bd[1]}, {bd[2]})" if bd else "—") + f" | {peer} | {tail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.optimized_grids", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 problems, 2 solvers, NFE 5 and 10, fewer samples")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--jobs", type=int, default=1, help="problems run in parallel processes (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows, notes, costs, elapsed, cfg = run(args.quick, args.jobs)
    text = markdown(rows, notes, costs, elapsed, cfg)
    os.makedirs(args.out, exist_ok=True)
    stem = "optimized_grids_quick" if args.quick else "optimized_grids"
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump({"config": cfg, "notes": notes, "elapsed_s": elapsed, "rows": rows,
                   "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                   "flowsolve": fs.__version__, "cpus": os.cpu_count()}}, fh, indent=1, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
