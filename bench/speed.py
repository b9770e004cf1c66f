"""``python -m bench speed``: the fused step against the memory limit (DESIGN.md, "Principles" 5).

For each size (float32 elements, batch-first ``[B, 64]``) it times, with medians of repeated runs in
one process, every case interleaved round by round (so a load spike hits all cases alike):

* ``copy``: ``out.copy_(x)`` into a preallocated tensor, the machine's copy bandwidth (2 x 4 bytes per
  element moved) and the limit every elementwise kernel is measured against;
* ``lincomb``: the fused Euler-type update ``out = c0 x + c1 d`` (3 x 4 bytes per element) on the
  backend of the device (the torch twin on CPU, the Triton kernel on CUDA), eager; on CUDA also
  ``lincomb twin``, the torch twin on the GPU;
* ``lincomb+noise``: the same with in-kernel keyed Philox noise ``+ c2 z`` (same bytes moved);
* ``randn``: ``torch.randn(out=...)`` (4 bytes per element), the unkeyed reference for noise cost;
* ``keyed normal``: ``flowsolve.kernels.normal_`` (4 bytes per element, Philox4x32-10 of Salmon et
  al. 2011 plus Box-Muller);
* with ``--compile``: the torch twins of ``lincomb``, ``lincomb+noise``, ``keyed normal`` and
  ``randn`` under ``torch.compile(dynamic=True)``, each with its first-call (compile) time, and a
  cache check: the same compile in two fresh subprocesses sharing one ``TORCHINDUCTOR_CACHE_DIR``
  (inductor's FX graph cache), timing how much of the compile the on-disk cache removes.

GB/s = bytes moved / median time; ``frac_copy`` = GB/s / copy GB/s at the same size; ``ns_per_el`` =
median time / elements (the honest unit for the slow keyed noise, which rounds to 0.0 GB/s).
Results: ``<out>/speed.{json,md}`` (device, sizes, dtype, torch/triton versions, load average).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import flowsolve as fs
from flowsolve.kernels import lincomb, lincomb_torch, normal_, seed_tensor


# ---------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(fn, device, min_time: float) -> int:
    """Calls per timed sample so that one sample lasts at least ``min_time`` (after one warm-up call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_time / one))


def interleaved(fns: dict, device="cpu", repeats: int = 7, min_time: float = 0.02) -> dict:
    """Median seconds per call of each callable in ``fns``, timed side by side.

    Each callable is warmed up and calibrated (calls per sample), then ``repeats`` rounds run every
    callable once per round in the same order, so that the machine's load changes affect each case
    alike and ratios of the medians are comparable. Returns ``{name: {"median_s", "samples_s", "inner"}}``.
    """
    inner = {k: _calibrate(f, device, min_time) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync(device)
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: {"median_s": statistics.median(v), "samples_s": v, "inner": inner[k]} for k, v in samples.items()}


def median_time(fn, device, repeats: int, min_time: float = 0.05) -> float:
    """Median seconds per call of one callable (see ``interleaved``)."""
    return interleaved({"f": fn}, device, repeats, min_time)["f"]["median_s"]


def environment(device) -> dict:
    """What every result file records about the machine and the software."""
    device = torch.device(device)
    triton = sys.modules.get("triton")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "flowsolve": fs.__version__,
            "triton": getattr(triton, "__version__", None),
            "backend": fs.kernels.resolve_backend(None, device),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def write_results(out_dir: str, stem: str, payload: dict, md: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump(payload, fh, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write(md + "\n")


# ---------------------------------------------------------------------------------------------- cases
# bytes moved per element (float32): reads + writes of the tensors each case touches
BYTES_PER_EL = {"copy": 8, "lincomb": 12, "lincomb twin": 12, "lincomb+noise": 12, "randn": 4, "keyed normal": 4}
NOISE_CASES = ("lincomb+noise", "keyed normal")


def bytes_moved(case: str, numel: int, itemsize: int = 4) -> int:
    """Bytes a case must move at the least: ``copy`` reads and writes one tensor (2 passes), ``lincomb``
    reads two and writes one (3), the noise generators only write (1); compiled variants likewise."""
    base = case.replace("compiled ", "")
    return BYTES_PER_EL[base] // 4 * itemsize * numel


def _compiled_twins():
    """The torch twins under torch.compile(dynamic=True): one compile serves every size (the keyed noise takes
    a minute or more to compile on CPU: inductor's C++ code generation and compilation of the int64 Philox
    rounds), so the first call at the first size carries the compile and later sizes show none."""
    def lin(out, x, d, coef, step):
        return lincomb_torch(out, [x, d], coef, step)

    def lin_noise(out, x, d, coef, step, seed):
        return lincomb_torch(out, [x, d], coef, step, seed)

    def keyed(out, seed, step):
        return normal_(out, seed, step, backend="torch")

    def randn(out):
        return out.copy_(torch.randn_like(out))

    return {k: torch.compile(f, dynamic=True) for k, f in
            (("lincomb", lin), ("lincomb+noise", lin_noise), ("keyed normal", keyed), ("randn", randn))}


def measure(sizes, device, repeats, noise_max, compile_twin=False, compile_noise_max=20, min_time=0.02):
    rows, compile_rows = [], []
    device = torch.device(device)
    step = torch.zeros(1, dtype=torch.int64, device=device)
    seed = seed_tensor(0, device)
    coef2 = torch.tensor([[1.0, -0.01, 0.0]], device=device).expand(2**31 - 1, 3)
    coef_n = torch.tensor([[1.0, -0.01, 0.1]], device=device).expand(2**31 - 1, 3)
    compiled = _compiled_twins() if compile_twin else None
    for log2n in sizes:
        n = 1 << log2n
        b = 1 << max(0, log2n - 6)
        shape = (b, n // b)
        x = torch.randn(shape, device=device)
        d = torch.randn(shape, device=device)
        outs = {}

        def buf(name):  # one output buffer per case: no case writes another's memory
            return outs.setdefault(name, torch.empty(shape, device=device))

        cases = {
            "copy": lambda o=buf("copy"): o.copy_(x),
            "lincomb": lambda o=buf("lincomb"): lincomb(o, [x, d], coef2, step),
            "randn": lambda o=buf("randn"): torch.randn(shape, out=o),
        }
        if device.type == "cuda":
            cases["lincomb twin"] = lambda o=buf("twin"): lincomb(o, [x, d], coef2, step, backend="torch")
        if log2n <= noise_max:
            cases["lincomb+noise"] = lambda o=buf("lincomb+noise"): lincomb(o, [x, d], coef_n, step, seed)
            cases["keyed normal"] = lambda o=buf("keyed"): normal_(o, seed, step)
        if compiled is not None:
            calls = {"lincomb": (lambda o=buf("c_lin"): compiled["lincomb"](o, x, d, coef2, step)),
                     "randn": (lambda o=buf("c_randn"): compiled["randn"](o))}
            if log2n <= compile_noise_max:
                calls["lincomb+noise"] = lambda o=buf("c_noise"): compiled["lincomb+noise"](o, x, d, coef_n, step, seed)
                calls["keyed normal"] = lambda o=buf("c_keyed"): compiled["keyed normal"](o, seed, step)
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                sync(device)
                compile_rows.append({"case": f"compiled {name}", "log2_numel": log2n, "first_call_s": time.perf_counter() - t0})
                cases[f"compiled {name}"] = fn
        timed = interleaved(cases, device, repeats, min_time)
        copy_gbs = None
        for name, res in timed.items():
            sec = res["median_s"]
            nbytes = bytes_moved(name, n)
            gbs = nbytes / sec / 1e9
            copy_gbs = gbs if name == "copy" else copy_gbs
            rows.append({"case": name, "log2_numel": log2n, "numel": n, "median_s": sec, "samples_s": res["samples_s"],
                         "bytes": nbytes, "GBps": gbs, "frac_copy": gbs / copy_gbs, "ns_per_el": 1e9 * sec / n})
    return rows, compile_rows


# ---------------------------------------------------------------------------------------------- compile cache
_CACHE_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
from flowsolve.kernels import lincomb_torch, seed_tensor
n = 1 << int(sys.argv[1])
x = torch.randn(n // 64, 64); d = torch.randn(n // 64, 64); out = torch.empty_like(x)
coef = torch.tensor([[1.0, -0.01, 0.1]]).expand(1000, 3)
step = torch.zeros(1, dtype=torch.int64); seed = seed_tensor(0, "cpu")
noise = sys.argv[3] == "noise"
f = torch.compile(lambda o, x, d, c, s, k: lincomb_torch(o, [x, d], c, s, k if noise else None), dynamic=False)
t0 = time.perf_counter(); f(out, x, d, coef, step, seed); first = time.perf_counter() - t0
print(json.dumps({"first_call_s": first, "process_s": time.perf_counter() - t_start}))
"""


def compile_cache_check(log2n: int, noise: bool, threads: int, timeout: float = 300.0) -> dict:
    """Compile the same twin in two fresh processes sharing a fresh TORCHINDUCTOR_CACHE_DIR.

    The first process compiles from scratch and fills the FX graph cache; the second finds the graph
    there and skips inductor's code generation (dynamo still traces). Returns both first-call times.
    """
    with tempfile.TemporaryDirectory(prefix="fs-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="1")
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
        runs = []
        for _ in range(2):
            try:
                p = subprocess.run([sys.executable, "-c", _CACHE_CHILD, str(log2n), str(threads),
                                    "noise" if noise else "plain"], env=env, capture_output=True, text=True,
                                   timeout=timeout)
            except subprocess.TimeoutExpired:
                runs.append({"error": f"timed out after {timeout:.0f} s"})
                break
            if p.returncode != 0:
                runs.append({"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"})
                break
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    res = {"log2_numel": log2n, "noise": noise, "cold": runs[0], "warm": runs[1] if len(runs) > 1 else None}
    if len(runs) == 2 and "first_call_s" in runs[0] and "first_call_s" in runs[1]:
        res["warm_over_cold"] = runs[1]["first_call_s"] / runs[0]["first_call_s"]
    return res


# ---------------------------------------------------------------------------------------------- report
def _cell(r) -> str:
    g = r["GBps"]
    gbs = f"{g:.1f}" if g >= 10 else f"{g:.2f}"
    return f"{gbs} GB/s ({100 * r['frac_copy']:.0f}%), {r['ns_per_el']:.3g} ns/el"


def markdown(rows, compile_rows=(), cache=(), header="") -> str:
    sizes = sorted({r["log2_numel"] for r in rows})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = [header, ""] if header else []
    lines += ["| case | " + " | ".join(f"2^{s}" for s in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    for c in cases:
        cells = []
        for s in sizes:
            r = [r for r in rows if r["case"] == c and r["log2_numel"] == s]
            cells.append(_cell(r[0]) if r else "—")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if compile_rows:
        lines += ["", "torch.compile(dynamic=True) first call (s) at each size (the compile is paid at the first size):", "",
                  "| case | " + " | ".join(f"2^{s}" for s in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
        for c in dict.fromkeys(r["case"] for r in compile_rows):
            cells = []
            for s in sizes:
                r = [r for r in compile_rows if r["case"] == c and r["log2_numel"] == s]
                cells.append(f"{r[0]['first_call_s']:.2f}" if r else "—")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    for c in cache:
        what = "lincomb+noise" if c["noise"] else "lincomb"
        if c.get("warm_over_cold") is not None:
            lines.append(f"\nOn-disk inductor cache, compiled {what} at 2^{c['log2_numel']}: first call "
                         f"{c['cold']['first_call_s']:.2f} s in a fresh process, {c['warm']['first_call_s']:.2f} s "
                         f"in a second process with the same TORCHINDUCTOR_CACHE_DIR (x{c['warm_over_cold']:.2f}).")
        else:
            lines.append(f"\nOn-disk inductor cache, compiled {what}: {c}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,12,14,16,18,20,22,24,26", help="comma-separated log2 element counts")
    p.add_argument("--noise-max", type=int, default=26, help="largest log2 size for the eager keyed-noise cases")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7; --quick: 3)")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time the torch twins under torch.compile, and "
                   "check the on-disk inductor cache in two subprocesses")
    p.add_argument("--compile-noise-max", type=int, default=20, help="largest log2 size for compiled keyed noise")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="sizes 2^10, 2^16, 2^20, 3 repeats, short samples; keyed "
                   "noise to 2^16; the cache check on plain lincomb only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [10, 16, 20] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    min_time = 0.005 if args.quick else args.min_time
    noise_max = min(args.noise_max, 16) if args.quick else args.noise_max
    device = torch.device(args.device)
    t0 = time.perf_counter()
    env = environment(device)
    rows, compile_rows = measure(sizes, device, repeats, noise_max, args.compile,
                                 min(args.compile_noise_max, noise_max), min_time)
    cache = []
    if args.compile and device.type == "cpu":
        cache = [compile_cache_check(10 if args.quick else 16, noise, torch.get_num_threads())
                 for noise in ((False,) if args.quick else (False, True))]
    env["loadavg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = (f"flowsolve speed — {env['date']}, {env['device']} ({env['machine']}, {env['cpus']} cores, "
              f"{env['torch_threads']} torch threads, load {env['loadavg_1min']:.1f}), float32, backend "
              f"{env['backend']}, torch {env['torch']}, medians of {repeats} interleaved rounds"
              + (" (--quick smoke run)" if args.quick else ""))
    md = markdown(rows, compile_rows, cache, header)
    write_results(args.out, "speed", {"environment": env, "quick": args.quick, "sizes_log2": sizes, "dtype": "float32", "repeats": repeats,
                                      "rows": rows, "compile": compile_rows, "compile_cache": cache,
                                      "elapsed_s": time.perf_counter() - t0}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
