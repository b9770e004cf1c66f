"""``python -m bench kernels``: compile every kernel specialization for real NVIDIA targets, without a GPU.

Enumerates the launches the launchers can make (``flowsolve.kernels.aot.launches``: the launchers are
called over their own dispatch rules and their launches recorded), derives each specialization the way
Triton's runtime would on the target, compiles it to a cubin for sm_80, sm_90 and sm_100 (where the
installed Triton supports the target), and reads registers, spills and stack from ``ptxas -v``.

Writes ``<out>/kernels.md`` (the compile matrix per kernel and target, the worst registers/spills per
kernel, every failure) and ``<out>/kernels.json`` (every specialization). Exit status 1 on any compile
error or on a spill in a kernel the sampling loop uses.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="80,90,100", help="compute capabilities (default 80,90,100)")
    p.add_argument("--shapes", default="aligned,odd", help="example shapes: aligned ([16, 64]) and/or odd ([3, 7])")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    args = p.parse_args(argv)
    try:
        targets = tuple(int(t) for t in args.targets.split(","))
    except ValueError:
        p.error(f"--targets={args.targets!r}: give compute capabilities such as 80,90,100")
    shapes = tuple(s for s in args.shapes.split(",") if s)
    from flowsolve.kernels import aot

    bad = [s for s in shapes if s not in aot.SHAPES]
    if bad or not shapes:
        p.error(f"--shapes: choose from {sorted(aot.SHAPES)}; got {args.shapes!r}")
    if args.workers < 1:
        p.error(f"--workers={args.workers} must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        p.error(f"--out={args.out!r} is not writable")
    os.environ.pop("TRITON_INTERPRET", None)

    import torch
    import triton

    t0 = time.perf_counter()
    results, unsupported = aot.compile_matrix(targets, shapes, workers=args.workers, report=True)
    wall = time.perf_counter() - t0
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU needed",
        "torch": torch.__version__, "triton": triton.__version__, "targets": list(targets),
        "unsupported_targets": {str(k): v for k, v in unsupported.items()}, "shapes": list(shapes),
        "wall_seconds": round(wall, 1), "workers": args.workers,
    }
    rows = [r.__dict__ for r in results]
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    md = _markdown(results, meta)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(md)
    print(md)
    failed = [r for r in results if not r.ok]
    spills = [r for r in results if r.ok and r.kernel in aot.LOOP_KERNELS and (r.spill_stores or r.spill_loads)]
    return 1 if failed or spills else 0


def _markdown(results, meta) -> str:
    by_kernel = collections.OrderedDict()
    for r in results:
        by_kernel.setdefault(r.kernel, []).append(r)
    targets = meta["targets"]
    lines = [
        f"# Kernel compile matrix — {meta['date']}",
        "",
        f"triton {meta['triton']}, torch {meta['torch']}; {meta['machine']}; {meta['workers']} compile processes, "
        f"{meta['wall_seconds']} s wall. Every launch the launchers can make over their dispatch rules "
        f"(`flowsolve.kernels.aot.launches`), specialized as Triton's runtime would for the target, compiled to a "
        f"cubin with `triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32))`; registers, spills and stack "
        f"from the wheel's `ptxas -v`, shared memory from Triton's metadata. Example shapes: {', '.join(meta['shapes'])}.",
        "",
    ]
    if meta["unsupported_targets"]:
        for cc, why in meta["unsupported_targets"].items():
            lines.append(f"- sm_{cc}: not supported by this Triton ({why}); not compiled.")
        lines.append("")
    lines += ["| kernel | " + " | ".join(f"sm_{cc} compiled" for cc in targets) + " | registers (max) | spill bytes "
              "(max) | stack bytes (max) | shared bytes (max) |",
              "|---|" + "---|" * len(targets) + "---|---|---|---|"]
    total = collections.Counter()
    for name, rs in by_kernel.items():
        cells = []
        for cc in targets:
            sub = [r for r in rs if r.cc == cc]
            ok = sum(r.ok for r in sub)
            total[cc, "ok"] += ok
            total[cc, "n"] += len(sub)
            cells.append(f"{ok}/{len(sub)}" if sub else "—")
        good = [r for r in rs if r.ok and r.registers is not None]
        regs = max((r.registers for r in good), default=None)
        spill = max((max(r.spill_stores, r.spill_loads) for r in good), default=None)
        stack = max((r.stack for r in good), default=None)
        shared = max((r.shared for r in good), default=None)
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {regs} | {spill} | {stack} | {shared} |")
    lines.append("| **all** | " + " | ".join(f"**{total[cc, 'ok']}/{total[cc, 'n']}**" for cc in targets)
                 + " | | | | |")
    failed = [r for r in results if not r.ok]
    lines += ["", f"Failures: {len(failed)}."]
    for r in failed[:50]:
        lines.append(f"- sm_{r.cc} `{r.kernel}` {r.label}: {r.error.splitlines()[0][:300] if r.error else ''}")
    lines += ["", "Registers per kernel and target (min–max over its specializations):", "",
              "| kernel | " + " | ".join(f"sm_{cc}" for cc in targets) + " |", "|---|" + "---|" * len(targets)]
    for name, rs in by_kernel.items():
        cells = []
        for cc in targets:
            regs = [r.registers for r in rs if r.cc == cc and r.ok and r.registers is not None]
            cells.append(f"{min(regs)}–{max(regs)}" if regs else "—")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
