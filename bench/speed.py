"""``python -m bench speed``: the fused step against the memory limit.

For each size (float32 elements) it times, with medians of repeated runs in one process:

* ``copy``: ``out.copy_(x)`` into a preallocated tensor, the machine's copy bandwidth (2 x 4 bytes per
  element moved) and the limit every elementwise kernel is measured against;
* ``lincomb``: the fused Euler-type update ``out = c0 x + c1 d`` (3 x 4 bytes per element) on the
  backend of the device (the torch twin on CPU, the Triton kernel on CUDA), eager;
* ``lincomb+noise``: the same with in-kernel keyed Philox noise ``+ c2 z`` (same bytes moved);
* ``randn``: ``torch.randn(out=...)`` (4 bytes per element), the unkeyed reference for noise cost;
* ``keyed normal``: ``flowsolve.kernels.normal_`` (4 bytes per element);
* ``compiled``: the twin under ``torch.compile`` (``--compile``), with its compile time.

GB/s = bytes moved / median time; ``frac_copy`` = GB/s / copy GB/s at the same size.
Results: ``bench/results/speed.{json,md}`` (device, sizes, dtype, torch/triton versions).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

import flowsolve as fs
from flowsolve.kernels import lincomb, lincomb_torch, normal_, seed_tensor


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats: int, min_time: float = 0.05) -> float:
    """Median seconds per call over ``repeats`` timed batches (each long enough to time reliably)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / one / repeats)) if one * repeats < min_time else 1
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def measure(sizes, device, repeats, noise_max, compile_twin):
    rows = []
    step = torch.zeros(1, dtype=torch.int64, device=device)
    seed = seed_tensor(0, device)
    coef2 = torch.tensor([[1.0, -0.01, 0.0]], device=device).expand(2**31 - 1, 3)
    coef_n = torch.tensor([[1.0, -0.01, 0.1]], device=device).expand(2**31 - 1, 3)
    compiled = None
    compile_s = None
    for log2n in sizes:
        n = 1 << log2n
        b = 1 << max(0, log2n - 6)  # batch-first [B, 64]
        shape = (b, n // b)
        x = torch.randn(shape, device=device)
        d = torch.randn(shape, device=device)
        out = torch.empty_like(x)
        el = 4 * n
        cases = {
            "copy": (lambda: out.copy_(x), 2 * el),
            "lincomb": (lambda: lincomb(out, [x, d], coef2, step), 3 * el),
            "randn": (lambda: torch.randn(shape, out=out), el),
        }
        if log2n <= noise_max:
            cases["lincomb+noise"] = (lambda: lincomb(out, [x, d], coef_n, step, seed), 3 * el)
            cases["keyed normal"] = (lambda: normal_(out, seed, step), el)
        if compile_twin:
            if compiled is None:
                compiled = torch.compile(lincomb_torch, dynamic=False)
            t0 = time.perf_counter()
            compiled(out, [x, d], coef_n, step, seed)
            _sync(device)
            first = time.perf_counter() - t0
            compile_s = first if compile_s is None else compile_s
            cases["compiled lincomb+noise"] = (lambda: compiled(out, [x, d], coef_n, step, seed), 3 * el)
        copy_gbs = None
        for name, (fn, nbytes) in cases.items():
            sec = median_time(fn, device, repeats)
            gbs = nbytes / sec / 1e9
            if name == "copy":
                copy_gbs = gbs
            rows.append({"case": name, "log2_numel": log2n, "numel": n, "median_s": sec, "bytes": nbytes,
                         "GBps": gbs, "frac_copy": gbs / copy_gbs})
    return rows, compile_s


def markdown(rows):
    sizes = sorted({r["log2_numel"] for r in rows})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    head = "| case | " + " | ".join(f"2^{s}" for s in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 1)]
    for c in cases:
        cells = []
        for s in sizes:
            r = [r for r in rows if r["case"] == c and r["log2_numel"] == s]
            cells.append(f"{r[0]['GBps']:.1f} GB/s ({100 * r[0]['frac_copy']:.0f}%)" if r else "—")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,14,18,20,22,24,26", help="comma-separated log2 element counts")
    p.add_argument("--noise-max", type=int, default=22, help="largest log2 size for the keyed-noise cases (eager "
                   "keyed Philox on CPU is slow)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time the torch twin under torch.compile")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="sizes 2^10, 2^16, 2^20 and 5 repeats")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [10, 16, 20] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 5 if args.quick else args.repeats
    device = torch.device(args.device)
    t0 = time.perf_counter()
    rows, compile_s = measure(sizes, device, repeats, args.noise_max, args.compile)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "flowsolve": fs.__version__, "dtype": "float32",
           "backend": fs.kernels.resolve_backend(None, device),
           "triton": getattr(sys.modules.get("triton"), "__version__", None)}
    table = markdown(rows)
    header = (f"flowsolve speed — {env['date']}, {env['device']} ({env['machine']}, {env['cpus']} cores, "
              f"{env['torch_threads']} torch threads), float32, backend {env['backend']}, medians of {repeats}")
    if compile_s is not None:
        header += f"; torch.compile first call {compile_s:.1f} s"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.json"), "w") as fh:
        json.dump({"environment": env, "compile_first_call_s": compile_s, "rows": rows,
                   "elapsed_s": time.perf_counter() - t0}, fh, indent=1)
    with open(os.path.join(args.out, "speed.md"), "w") as fh:
        fh.write(header + "\n\n" + table + "\n")
    print(header)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
