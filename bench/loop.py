"""``python -m bench loop``: the whole sampling loop, flowsolve against k-diffusion and diffusers.

Same solver, same time grid, same NFE, same model callable, timed side by side in one process
(interleaved rounds, medians):

* heun     — ours ``heun``     vs k-diffusion ``sample_heun``   (Karras et al. 2022, Alg. 1);
* dpm++2m  — ours ``dpm++2m``  vs k-diffusion ``sample_dpmpp_2m`` and diffusers
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` (Lu et al. 2022b, Alg. 2);
* euler    — ours ``euler``    vs k-diffusion ``sample_euler`` and diffusers ``EulerDiscreteScheduler``.

Ours runs as ``fs.Sampler(...).sample`` (planned once, outside the timing) and as ``fs.sample``
(planned on every call). The problem is EDM's parameterization (Karras et al. 2022, sec. 2: alpha = 1,
sigma = t) with a denoiser model: for the analytic model, Gaussian data x0 ~ N(mu, s^2) per dimension, the
exact denoiser is closed-form (FORMULAS.md §3 with alpha = 1): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu),
an affine map a(sigma) x + b(sigma) costing three elementwise passes. The grid is diffusers' Karras
sigmas for its default beta schedule (also given to k-diffusion and to ours), ending at sigma = 0,
so the three libraries run the same method on the same grid and their samples agree to float32
rounding (``agreement`` in the JSON). Diffusers schedulers are stepped in their own variables (VP
scaling for the model input; the wrapper maps back with the scheduler's own sigma).

Per-step overhead = (loop time - NFE x model time) / steps, with the model time measured on its own
(the same callable; diffusers' wrapper also undoes its input scaling). The target: ours at most half
of k-diffusion's at [1, 2] and [4096, 64]. A second table uses a small MLP denoiser (3 linear layers,
width 256, sinusoidal time embedding: ``bench.likelihood.MLP``) instead of the closed form, and a
third the cost of a Hutchinson log-likelihood (``fs.log_likelihood``, 1 Rademacher probe, heun) against
the bare ODE solve with the same solver and steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import flowsolve as fs
from bench.peers import import_k_diffusion_sampling
from bench.speed import environment, interleaved, write_results

SOLVERS = ("heun", "dpm++2m", "euler")
KD_SAMPLER = {"heun": "sample_heun", "dpm++2m": "sample_dpmpp_2m", "euler": "sample_euler"}
SHAPES = ((1, 2), (4096, 64), (16, 3, 64, 64))
MU, S2 = 0.5, 0.25  # Gaussian data: mean 0.5, variance 0.25 per dimension


# ---------------------------------------------------------------------------------------------- models
def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_sigma] for x0 ~ N(MU, S2) per dimension and x_sigma = x0 + sigma eps (FORMULAS.md §3)."""
    c = (S2 / (S2 + sigma * sigma)).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return (x - MU).mul_(c).add_(MU)


class Counted:
    """Wraps a model callable and counts its calls (the NFE a loop really made)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def mlp_denoiser(shape, seed: int = 0):
    """A small MLP denoiser D(x, sigma): 3 linear layers of width 256, sinusoidal embedding of log sigma."""
    from bench.likelihood import MLP

    net = MLP(shape, hidden=256, seed=seed)

    def fn(x, sigma):
        return net(x, sigma.clamp_min(1e-4).log())  # log sigma: a bounded embedding input (sigma = 0 at the end)

    return fn


# ---------------------------------------------------------------------------------------------- grid and loops
def karras_sigmas(steps: int) -> torch.Tensor:
    """Diffusers' Karras sigmas for its default DDPM beta schedule, with the final 0 (float64, decreasing)."""
    from diffusers import EulerDiscreteScheduler

    s = EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="sample")
    s.set_timesteps(steps)
    return s.sigmas.to(torch.float64)


def edm_model(fn) -> fs.Model:
    return fs.Model(fn, fs.paths.EDM(), predicts="x0")


def ours_planned(fn, solver: str, sigmas: torch.Tensor):
    sampler = fs.Sampler(edm_model(fn), solver, grid=sigmas.tolist())
    return lambda x_T: sampler.sample(x_T)


def ours_unplanned(fn, solver: str, sigmas: torch.Tensor):
    model = edm_model(fn)
    grid = sigmas.tolist()
    return lambda x_T: fs.sample(model, x_T, solver=solver, grid=grid)


def k_diffusion_loop(K, fn, solver: str, sigmas: torch.Tensor):
    sampler = getattr(K, KD_SAMPLER[solver])

    def run(x_T):
        s = sigmas.to(x_T.dtype)
        return sampler(fn, x_T.clone(), s, disable=True)

    return run


class _DiffusersModel:
    """A denoiser called the diffusers way: VP-scaled input x / sqrt(1 + sigma^2) and a timestep; it reads the
    scheduler's own sigma of the current step (``index``, set by the loop) and returns the x0 prediction
    (``prediction_type="sample"``)."""

    def __init__(self, fn, scheduler):
        self.fn, self.sched, self.index = fn, scheduler, 0

    def __call__(self, x_in, timestep):
        sigma = self.sched.sigmas[self.index].reshape(1).to(device=x_in.device, dtype=x_in.dtype)
        x = x_in * (1.0 + sigma * sigma).sqrt()
        return self.fn(x, sigma.expand(x.shape[0]))


def diffusers_loop(fn, solver: str, steps: int):
    """The usual diffusers loop: set_timesteps, then scale_model_input / model / step for each timestep.

    Euler (EulerDiscreteScheduler) works on x_sigma = x0 + sigma eps and scales the model input to VP;
    DPM-Solver++ (DPMSolverMultistepScheduler) works on the VP state x_vp = x_sigma / sqrt(1 + sigma^2):
    its loop takes and returns the VP state, converted here so all loops map the same x_T to the same x0.
    """
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if solver == "euler":
        sched = EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="sample")
        vp_state = False
    elif solver == "dpm++2m":
        sched = DPMSolverMultistepScheduler(use_karras_sigmas=True, prediction_type="sample",
                                            algorithm_type="dpmsolver++", solver_order=2)
        vp_state = True
    else:
        return None
    model = _DiffusersModel(fn, sched)

    def run(x_T):
        sched.set_timesteps(steps)
        s0 = sched.sigmas[0].to(x_T.dtype)
        x = x_T / (1.0 + s0 * s0).sqrt() if vp_state else x_T.clone()
        for i, t in enumerate(sched.timesteps):
            model.index = i
            x_in = sched.scale_model_input(x, t)
            x = sched.step(model(x_in, t), t, x, return_dict=False)[0]
        return x

    run.model = model
    run.sched = sched
    return run


def loops(fn, solver: str, sigmas: torch.Tensor, K, with_diffusers: bool = True) -> dict:
    """name -> callable x_T -> x_0 for every implementation of ``solver`` available here."""
    out = {"ours Sampler": ours_planned(fn, solver, sigmas), "ours fs.sample": ours_unplanned(fn, solver, sigmas)}
    if K is not None:
        out["k-diffusion"] = k_diffusion_loop(K, fn, solver, sigmas)
    if with_diffusers:
        d = diffusers_loop(fn, solver, sigmas.numel() - 1)
        if d is not None:
            out["diffusers"] = d
    return out


def count_nfe(name: str, fn, solver: str, sigmas: torch.Tensor, K, x_T: torch.Tensor):
    """(NFE, x_0) of one implementation, counted by wrapping the model (never from nominal steps)."""
    counted = Counted(fn)
    run = loops(counted, solver, sigmas, K, with_diffusers=(name == "diffusers"))[name]
    x = run(x_T)
    return counted.calls, x


def _model_time(fn, x_T, sigma, repeats, min_time) -> float:
    s = torch.full((x_T.shape[0],), float(sigma), dtype=x_T.dtype)
    return interleaved({"m": lambda: fn(x_T, s)}, "cpu", repeats, min_time)["m"]["median_s"]


def compare(fn, shape, solver: str, steps: int, K, repeats: int, min_time: float, seed: int = 0) -> dict:
    """Time every implementation of ``solver`` on ``shape`` side by side; NFE counted, samples compared."""
    sigmas = karras_sigmas(steps)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(sigmas[0])
    runs = loops(fn, solver, sigmas, K)
    nfe, finals = {}, {}
    for name in runs:
        nfe[name], finals[name] = count_nfe(name, fn, solver, sigmas, K, x_T)
    timed = interleaved({k: (lambda r=r: r(x_T)) for k, r in runs.items()}, "cpu", repeats, min_time)
    model_s = _model_time(fn, x_T, sigmas[steps // 2], repeats, min_time)
    row = {"solver": solver, "shape": list(shape), "steps": steps, "model_s": model_s, "impl": {}}
    if "diffusers" in runs:
        dm = runs["diffusers"].model
        dm.sched.set_timesteps(steps)
        dm.index = steps // 2
        row["diffusers_model_s"] = _model_time(lambda x, s: dm(x, None), x_T, 0.0, repeats, min_time)
    ref = finals["ours Sampler"]
    for name, res in timed.items():
        m = row.get("diffusers_model_s", model_s) if name == "diffusers" else model_s
        loop_s = res["median_s"]
        row["impl"][name] = {"loop_s": loop_s, "samples_s": res["samples_s"], "nfe": nfe[name],
                             "overhead_per_step_s": (loop_s - nfe[name] * m) / steps,
                             "max_abs_diff_vs_ours": float((finals[name] - ref).abs().max())}
    kd = row["impl"].get("k-diffusion")
    for name, r in row["impl"].items():
        if kd is not None:
            r["loop_ratio_vs_k_diffusion"] = r["loop_s"] / kd["loop_s"]
            r["overhead_ratio_vs_k_diffusion"] = r["overhead_per_step_s"] / kd["overhead_per_step_s"]
    return row


# ---------------------------------------------------------------------------------------------- stochastic
# ours -> the k-diffusion sampler of the same kind and cost class it is timed against
STOCHASTIC = {"euler_maruyama": "sample_euler_ancestral", "ancestral": "sample_euler_ancestral",
              "dpm++2m-sde": "sample_dpmpp_2m_sde", "er-sde-3": "sample_dpmpp_2m_sde", "restart": "sample_euler_ancestral"}


def k_diffusion_stochastic(K, fn, name: str, sigmas: torch.Tensor):
    """k-diffusion's sampler with a plain Gaussian noise sampler (``randn_like`` per step; not the Brownian tree, so
    that the comparison is of the loops, as its default for sample_euler_ancestral)."""
    sampler = getattr(K, name)

    def run(x_T):
        kw = {"noise_sampler": lambda sigma, sigma_next: torch.randn_like(x_T)} if name == "sample_dpmpp_2m_sde" else {}
        return sampler(fn, x_T.clone(), sigmas.to(x_T.dtype), disable=True, **kw)

    return run


def compare_stochastic(fn, shape, solver: str, steps: int, K, repeats: int, min_time: float, seed: int = 0) -> dict:
    """Whole-loop time of our stochastic ``solver`` (planned ``fs.Sampler``, keyed in-kernel noise) against k-diffusion's
    sampler of the same kind on the same sigmas; NFE counted by wrapping the model; ratios of loop time and of loop
    time per NFE (restart makes more evaluations per step)."""
    sigmas = karras_sigmas(steps)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(sigmas[0])
    kd_name = STOCHASTIC[solver]
    counted_ours, counted_kd = Counted(fn), Counted(fn)
    fs.Sampler(edm_model(counted_ours), solver, grid=sigmas.tolist()).sample(x_T, seed=seed)
    k_diffusion_stochastic(K, counted_kd, kd_name, sigmas)(x_T)
    sampler = fs.Sampler(edm_model(fn), solver, grid=sigmas.tolist())
    kd = k_diffusion_stochastic(K, fn, kd_name, sigmas)
    timed = interleaved({"ours": lambda: sampler.sample(x_T, seed=seed), "k-diffusion": lambda: kd(x_T)}, "cpu",
                        repeats, min_time)
    ours_s, kd_s = timed["ours"]["median_s"], timed["k-diffusion"]["median_s"]
    n_o, n_k = counted_ours.calls, counted_kd.calls
    return {"solver": solver, "k_diffusion": kd_name, "shape": list(shape), "steps": steps, "nfe": n_o, "kd_nfe": n_k,
            "ours_s": ours_s, "kd_s": kd_s, "loop_ratio": ours_s / kd_s, "per_nfe_ratio": (ours_s / n_o) / (kd_s / n_k)}


# ---------------------------------------------------------------------------------------------- likelihood
def likelihood_cost(shapes, batch: int, steps: int, repeats: int, min_time: float) -> list:
    """Hutchinson log-likelihood (1 Rademacher probe, heun) against the bare ODE solve, same steps and model."""
    from bench.likelihood import MLP

    rows = []
    path = fs.paths.RectifiedFlow()
    for shape in shapes:
        net = MLP(shape, hidden=256)
        model = fs.Model(net, path, predicts="velocity")
        x0 = torch.randn((batch,) + tuple(shape), generator=torch.Generator().manual_seed(0))
        sampler = fs.Sampler(model, "heun", steps=steps)
        timed = interleaved({
            "ode": lambda: sampler.sample(x0),
            "hutchinson": lambda: fs.log_likelihood(model, x0, solver="heun", steps=steps, divergence="hutchinson",
                                                    probes=1, probe="rademacher", seed=0),
        }, "cpu", repeats, min_time)
        rows.append({"shape": list(shape), "batch": batch, "steps": steps, "ode_s": timed["ode"]["median_s"],
                     "hutchinson_s": timed["hutchinson"]["median_s"],
                     "ratio": timed["hutchinson"]["median_s"] / timed["ode"]["median_s"]})
    return rows


# ---------------------------------------------------------------------------------------------- report
def _us(s: float) -> str:
    return f"{1e6 * s:.1f}"


def table(rows, title: str) -> str:
    lines = [f"### {title}", "",
             "| solver | shape | impl | NFE | loop (ms) | model (us/NFE) | overhead (us/step) | overhead / k-diffusion "
             "| loop / k-diffusion | max abs diff vs ours |", "|" + "---|" * 10]
    for row in rows:
        for name, r in row["impl"].items():
            m = row.get("diffusers_model_s", row["model_s"]) if name == "diffusers" else row["model_s"]
            lines.append(
                f"| {row['solver']} | {'x'.join(map(str, row['shape']))} | {name} | {r['nfe']} | {1e3 * r['loop_s']:.3f} "
                f"| {_us(m)} | {_us(r['overhead_per_step_s'])} | {r.get('overhead_ratio_vs_k_diffusion', float('nan')):.2f} "
                f"| {r.get('loop_ratio_vs_k_diffusion', float('nan')):.2f} | {r['max_abs_diff_vs_ours']:.2g} |")
    return "\n".join(lines)


def markdown(res) -> str:
    env = res["environment"]
    head = (f"flowsolve loop — {env['date']}, {env['device']} ({env['machine']}, {env['cpus']} cores, "
            f"{env['torch_threads']} torch threads, load {env['loadavg_1min']:.1f}), float32, torch {env['torch']}, "
            f"{res['steps']} steps on diffusers' Karras sigmas, medians of {res['repeats']} interleaved rounds. "
            f"Overhead per step = (loop - NFE x model) / steps." + (" (--quick smoke run)" if res.get("quick") else ""))
    parts = [head] + (["", table(res["analytic"], "Analytic Gaussian denoiser")] if res["analytic"] else [])
    if res.get("mlp"):
        parts += ["", table(res["mlp"], "MLP denoiser (3 layers, width 256)")]
    if res.get("stochastic"):
        parts += ["", "### Stochastic samplers: ours (keyed in-kernel noise) vs k-diffusion (plain `randn_like` noise)", "",
                  "Analytic Gaussian denoiser. Loop ratio = our whole loop / k-diffusion's; per-NFE ratio divides each by "
                  "its counted NFE (restart evaluates more per step).", "",
                  "| ours | k-diffusion | shape | NFE ours / k-diff. | ours (ms) | k-diffusion (ms) | loop ratio | per-NFE ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["stochastic"]:
            parts.append(f"| {r['solver']} | {r['k_diffusion']} | {'x'.join(map(str, r['shape']))} | {r['nfe']} / "
                         f"{r['kd_nfe']} | {1e3 * r['ours_s']:.3f} | {1e3 * r['kd_s']:.3f} | {r['loop_ratio']:.2f} | "
                         f"{r['per_nfe_ratio']:.2f} |")
    if res.get("likelihood"):
        parts += ["", "### Hutchinson log-likelihood vs bare ODE (heun, MLP velocity, rectified flow)", "",
                  "| shape | batch | steps | ODE (ms) | log-likelihood (ms) | ratio |", "|---|---|---|---|---|---|"]
        for r in res["likelihood"]:
            parts.append(f"| {'x'.join(map(str, r['shape']))} | {r['batch']} | {r['steps']} | {1e3 * r['ode_s']:.2f} "
                         f"| {1e3 * r['hutchinson_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7; --quick: 3)")
    p.add_argument("--min-time", type=float, default=0.02)
    p.add_argument("--no-mlp", action="store_true")
    p.add_argument("--no-stochastic", action="store_true", help="skip the stochastic samplers vs k-diffusion")
    p.add_argument("--only-stochastic", action="store_true", help="only the stochastic samplers vs k-diffusion")
    p.add_argument("--no-likelihood", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="shapes [1,2] and [256,64], 3 repeats (a smoke run)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    solvers = [s for s in args.solvers.split(",") if s]
    for s in solvers:
        if s not in SOLVERS:
            raise SystemExit(f"--solvers: {s!r} is not one of {SOLVERS}.")
    K = import_k_diffusion_sampling()
    shapes = ((1, 2), (256, 64)) if args.quick else SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    min_time = 0.005 if args.quick else args.min_time
    t0 = time.perf_counter()
    res = {"environment": environment("cpu"), "quick": args.quick, "steps": args.steps, "repeats": repeats, "dtype": "float32",
           "k_diffusion": K is not None, "data": {"mu": MU, "var": S2}}
    try:
        import diffusers

        res["environment"]["diffusers"] = diffusers.__version__
    except ImportError:
        raise SystemExit("bench loop needs diffusers (its Karras sigmas define the common grid): pip install diffusers")
    if args.only_stochastic:
        args.no_mlp = args.no_likelihood = True
        solvers = []
    res["analytic"] = [compare(gaussian_denoiser, shape, s, args.steps, K, repeats, min_time)
                       for shape in shapes for s in solvers]
    if not args.no_stochastic and K is not None:
        res["stochastic"] = [compare_stochastic(gaussian_denoiser, shape, s, args.steps, K, repeats, min_time)
                             for shape in shapes for s in STOCHASTIC]
    if not args.no_mlp:
        mlp_shapes = shapes[:2]
        res["mlp"] = [compare(mlp_denoiser(shape[1:]), shape, s, args.steps, K, repeats, min_time)
                      for shape in mlp_shapes for s in solvers]
    if not args.no_likelihood:
        res["likelihood"] = likelihood_cost([(2,), (64,)], 64 if args.quick else 256, 4 if args.quick else 16,
                                            repeats, min_time)
    res["environment"]["loadavg_1min_end"] = os.getloadavg()[0]
    res["elapsed_s"] = time.perf_counter() - t0
    md = markdown(res)
    write_results(args.out, "loop", res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
