"""Likelihood benchmark (not a test): ``python -m bench.likelihood [--quick] [--out bench/results]``.

Measures, on whatever device it runs (CPU here; the JSON names it):

1. overhead: time of ``log_likelihood`` (Hutchinson, 1 Rademacher probe) / time of the bare ODE solve
   (``fs.sample``) with the same solver and steps, for an MLP velocity field at D = 2, 64, 3x32x32;
2. divergence cost vs D: one model evaluation with its divergence (exact by batched VJPs, exact by
   torch.func vmap(jacrev), Hutchinson with k = 1 and 4 probes) / one bare forward;
3. accuracy: |log p - closed form| vs NFE on a D = 16 Gaussian with a full covariance (rectified flow,
   RK4): exact divergence against Hutchinson with one probe (RMS over samples);
4. peak torch CPU memory of a Hutchinson run at 10 and 100 steps;
5. the fused Hutchinson kernel's torch twin: GB/s against a plain copy of the same bytes.

Writes ``<out>/likelihood.md`` (tables) and ``<out>/likelihood.json`` (every figure, with the device,
sizes, dtype and thread count).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import flowsolve as fs
from flowsolve import kernels as K
from flowsolve.likelihood import _Field, log_likelihood


class MLP(torch.nn.Module):
    """Velocity field u(x, t): flattened x and a sinusoidal time embedding -> 2 hidden SiLU layers -> x's shape."""

    def __init__(self, shape, hidden=512, n_freq=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.shape = tuple(shape)
        d = math.prod(self.shape)
        self.freqs = torch.exp(torch.linspace(0.0, math.log(100.0), n_freq))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 2 * n_freq, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, d),
        )
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, t):
        b = x.shape[0]
        emb = t.reshape(b, 1).to(x.dtype) * self.freqs.to(x)
        h = torch.cat([x.reshape(b, -1), torch.sin(emb), torch.cos(emb)], dim=1)
        return self.net(h).reshape(x.shape)


def _time(fn, repeat):
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def environment():
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def overhead(shapes, batch, steps, repeat):
    rows = []
    path = fs.paths.RectifiedFlow()
    for shape in shapes:
        net = MLP(shape)
        model = fs.Model(net, path, predicts="velocity")
        g = torch.Generator().manual_seed(0)
        x = torch.randn((batch, *shape), generator=g)
        bare = _time(lambda: fs.sample(model, x, solver="heun", steps=steps, grid="uniform"), repeat)
        hut = _time(lambda: log_likelihood(model, x, "heun", steps=steps, grid="uniform", divergence="hutchinson",
                                           probes=1), repeat)
        rows.append({"shape": list(shape), "D": math.prod(shape), "batch": batch, "steps": steps, "nfe": 2 * steps,
                     "bare_s": bare, "hutchinson_s": hut, "ratio": hut / bare})
        print(f"overhead D={math.prod(shape)}: bare {bare:.3f}s, hutchinson {hut:.3f}s, ratio {hut / bare:.2f}", flush=True)
    return rows


def divergence_cost(shapes, batch, repeat, skip_exact_above):
    rows = []
    path = fs.paths.RectifiedFlow()
    for shape in shapes:
        d = math.prod(shape)
        net = MLP(shape)
        model = fs.Model(net, path, predicts="velocity")
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(1))
        t = torch.full((batch,), 0.5)
        coef = torch.tensor([[1.0, 0.0]])
        step = torch.zeros(1, dtype=torch.int64)
        seed = torch.tensor([0])

        def one(mode, k=1, method="vjp", chunk=None):
            f = _Field(model, x, mode, k, "rademacher", seed, 0, "torch", method, chunk)
            acc = torch.zeros(f.rows, batch)
            return lambda: f.evaluate(x, t, acc, coef, step)

        fwd = _time(lambda: model(x, t), repeat)
        row = {"shape": list(shape), "D": d, "batch": batch, "forward_s": fwd}
        row["hutchinson_k1_s"] = _time(one("hutchinson", 1), repeat)
        row["hutchinson_k4_s"] = _time(one("hutchinson", 4), repeat)
        if d <= skip_exact_above:
            row["exact_vjp_s"] = _time(one("exact"), max(1, repeat if d <= 64 else 1))
            row["exact_vjp_chunk1_s"] = _time(one("exact", chunk=1), max(1, repeat if d <= 64 else 1))
            if batch * d * d <= 2**27:
                row["exact_jacrev_s"] = _time(one("exact", method="jacrev"), max(1, repeat if d <= 64 else 1))
        rel = {k.replace("_s", "_x_fwd"): v / fwd for k, v in row.items() if k.endswith("_s") and k != "forward_s"}
        row.update(rel)
        rows.append(row)
        print("divergence", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def accuracy(d, n, nfes):
    path = fs.paths.RectifiedFlow()
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    std = 0.2 + 1.3 * torch.rand(d, generator=g, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    prob = fs.analytic.Gaussian(mu, std, path, rotation=rot)
    model = fs.Model(prob.velocity, path, predicts="velocity")
    x = prob.sample(n, 0.0, generator=g, dtype=torch.float64)
    truth = prob.log_prob(x, 0.0)
    rows = []
    for nfe in nfes:
        steps = max(1, nfe // 4)
        e = log_likelihood(model, x, "rk4", steps=steps, divergence="exact")[0]
        h = log_likelihood(model, x, "rk4", steps=steps, divergence="hutchinson", probes=1, seed=0)[0]
        rows.append({"D": d, "n": n, "solver": "rk4", "nfe": 4 * steps,
                     "exact_rms": float((e - truth).pow(2).mean().sqrt()), "exact_max": float((e - truth).abs().max()),
                     "hutchinson1_rms": float((h - truth).pow(2).mean().sqrt())})
        print("accuracy", rows[-1], flush=True)
    m = prob.integrated_jacobian(0.0, 1.0)
    sd = math.sqrt(2 * (float((m**2).sum()) - float((torch.diagonal(m) ** 2).sum())))
    return rows, sd


def memory(steps_list):
    from torch.profiler import ProfilerActivity, profile

    path = fs.paths.RectifiedFlow()
    prob = fs.analytic.Gaussian(torch.zeros(64, dtype=torch.float64), 0.5 * torch.ones(64, dtype=torch.float64), path)
    model = fs.Model(prob.velocity, path, predicts="velocity")
    x = prob.sample(256, 0.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = []
    for steps in steps_list:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            log_likelihood(model, x, "heun", steps=steps, divergence="hutchinson", probes=2)
        ev = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
        live = peak = 0
        for e in ev:
            live += e.nbytes()
            peak = max(peak, live)
        out.append({"steps": steps, "peak_bytes": peak, "batch": 256, "D": 64, "dtype": "float64", "probes": 2,
                    "solver": "heun"})
        print("memory", out[-1], flush=True)
    return out


def kernel_bandwidth(batch, d, repeat):
    z = K.probes_(torch.empty(1, batch, d), torch.tensor([0]), backend="torch")
    g = torch.randn(1, batch, d)
    acc = torch.zeros(1, batch)
    coef = torch.tensor([[1.0, 0.5]])
    step = torch.zeros(1, dtype=torch.int64)
    t_k = _time(lambda: K.hutchinson_accumulate(acc, g, coef, step, z, backend="torch"), repeat)
    dst = torch.empty_like(g)
    t_c = _time(lambda: dst.copy_(g), repeat)
    nbytes = 2 * g.numel() * 4  # the kernel reads z and vjp once
    return {"batch": batch, "D": d, "bytes_moved": nbytes, "twin_s": t_k, "twin_GBps": nbytes / t_k / 1e9,
            "copy_s": t_c, "copy_GBps": 2 * g.numel() * 4 / t_c / 1e9}


def markdown(res) -> str:
    env = res["environment"]
    lines = [f"# flowsolve likelihood benchmark — {env['date'][:10]}, CPU ({env['machine']}, {env['cpus']} cores, "
             f"{env['threads']} torch threads), torch {env['torch']}, float32 MLP (2 hidden layers of 512, SiLU)", "",
             f"Timings are medians of 3 after a warm-up; 1-minute load average {env.get('loadavg_1min') or 0:.2f} at the start, "
             f"{env.get('loadavg_1min_end') or 0:.2f} at the end (a shared machine: read ratios, not absolute times). "
             f"Regenerate with `python -m bench.likelihood --threads 1`.", ""]
    lines += ["## Hutchinson log-likelihood / bare ODE solve (heun, same steps, 1 Rademacher probe)", "",
              "| event shape | D | batch | steps (NFE) | bare solve (s) | log-likelihood (s) | ratio |", "|---|---|---|---|---|---|---|"]
    for r in res["overhead"]:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['D']} | {r['batch']} | {r['steps']} ({r['nfe']}) | "
                     f"{r['bare_s']:.4f} | {r['hutchinson_s']:.4f} | {r['ratio']:.2f} |")
    lines += ["", "## One evaluation with its divergence, in units of one bare forward", "",
              "| D | batch | forward (ms) | hutchinson k=1 | hutchinson k=4 | exact, batched VJPs | exact, 1 VJP at a time | exact, vmap(jacrev) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["divergence"]:
        f = lambda k: f"{r[k]:.1f}x" if k in r else "—"  # noqa: E731
        lines.append(f"| {r['D']} | {r['batch']} | {1e3 * r['forward_s']:.2f} | {f('hutchinson_k1_x_fwd')} | "
                     f"{f('hutchinson_k4_x_fwd')} | {f('exact_vjp_x_fwd')} | {f('exact_vjp_chunk1_x_fwd')} | "
                     f"{f('exact_jacrev_x_fwd')} |")
    acc = res["accuracy"]
    lines += ["", f"## Accuracy: D = {acc['rows'][0]['D']} Gaussian, full covariance, rectified flow, RK4, float64, "
              f"{acc['rows'][0]['n']} points", "",
              f"One-probe (Rademacher) standard deviation from FORMULAS.md §7: {acc['one_probe_sd']:.2f} nats.", "",
              "| NFE | exact: RMS error | exact: max error | Hutchinson k=1: RMS error |", "|---|---|---|---|"]
    for r in acc["rows"]:
        lines.append(f"| {r['nfe']} | {r['exact_rms']:.2e} | {r['exact_max']:.2e} | {r['hutchinson1_rms']:.2f} |")
    lines += ["", "## Peak torch CPU memory (profiler), Hutchinson, heun, B = 256, D = 64, float64, 2 probes", "",
              "| steps | peak |", "|---|---|"]
    for r in res["memory"]:
        lines.append(f"| {r['steps']} | {r['peak_bytes'] / 1e6:.3f} MB |")
    kb = res["kernel"]
    lines += ["", f"## Fused Hutchinson reduction, torch twin, [{kb['batch']}, {kb['D']}] float32", "",
              f"twin: {1e3 * kb['twin_s']:.3f} ms, {kb['twin_GBps']:.2f} GB/s of probe+VJP reads; plain copy of one "
              f"such tensor: {kb['copy_GBps']:.2f} GB/s (read+write).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.likelihood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--from-json", default=None, help="only rewrite the markdown from a saved JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            md = markdown(json.load(f))
        with open(os.path.join(args.out, "likelihood.md"), "w") as f:
            f.write(md)
        print(md)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else 3
    shapes = [(2,), (64,), (3, 32, 32)]
    batch = 32 if args.quick else 128
    res = {"environment": environment()}
    res["overhead"] = overhead(shapes, batch, 4 if args.quick else 16, repeat)
    res["divergence"] = divergence_cost(shapes + [(256,)], batch, repeat, skip_exact_above=4096)
    rows, sd = accuracy(16, 256 if args.quick else 2048, [8, 16, 32, 64, 128] if not args.quick else [8, 32])
    res["accuracy"] = {"rows": rows, "one_probe_sd": sd}
    res["memory"] = memory([10, 100] if not args.quick else [2, 4])
    res["kernel"] = kernel_bandwidth(batch, 3072, repeat)
    res["environment"]["loadavg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    md = markdown(res)
    print(md)
    if not args.quick:
        with open(os.path.join(args.out, "likelihood.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "likelihood.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
