"""``python -m bench steps`` (the main job): error vs NFE per solver on the analytic problems.

Writes the NFE-10 accuracy summary, a per-budget recommendation and a markdown table (stdout and ``<out>/steps.md``), a log-log PNG plot (``<out>/steps.png``)
and a machine-readable JSON (``<out>/steps.json``).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("steps", help="error vs NFE for every solver on the analytic problems")
    p.add_argument("--problems", default=None, help="comma-separated problem names (default: all)")
    p.add_argument("--solvers", default=None, help="comma-separated solver names (default: all registered, and the "
                   "likelihood solvers on the loglik-* problems); peer names (library:method) or library names select peers")
    p.add_argument("--nfe", default=None, help="comma-separated NFE values (default: 4..200; SDE solvers: "
                   "4, 10, 20, 50, 100; given values above 100 are dropped for SDE solvers)")
    p.add_argument("--quick", action="store_true", help="NFE 4, 10, 20, 50, tiny sample sizes (a CI smoke run: seconds)")
    p.add_argument("--no-peers", action="store_true", help="do not run the peer libraries' samplers (bench/peers)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: small tensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("likelihood", help="log-likelihood cost: Hutchinson / exact / bare ODE solve (see bench/likelihood.py)",
                   add_help=False)
    sub.add_parser("speed", help="fused step throughput vs copy bandwidth (see bench/speed.py)", add_help=False)
    sub.add_parser("loop", help="whole sampling loop vs k-diffusion and diffusers (see bench/loop.py)", add_help=False)
    sub.add_parser("compile", help="torch.compile of Sampler.sample: compile time, speedup, agreement "
                   "(see bench/compile_bench.py)", add_help=False)
    sub.add_parser("kernels", help="compile every kernel specialization for sm_80/90/100 without a GPU; registers and "
                   "spills from ptxas (see bench/kernels.py)", add_help=False)
    sub.add_parser("gpu", help="everything a GPU can tell: kernels vs twins, solvers vs float64, bandwidth, loops "
                   "vs peers, torch.compile (needs CUDA; see bench/gpu.py)", add_help=False)
    sub.add_parser("optimized-grids", help="optimized time grids vs default grids and peers on held-out problems "
                   "(see bench/optimized_grids.py)", add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "speed":
        from .speed import main as speed_main

        return speed_main(argv[1:]) or 0
    sub_modules = {"loop": "loop", "compile": "compile_bench", "optimized-grids": "optimized_grids",
                   "kernels": "kernels", "gpu": "gpu"}
    if argv and argv[0] in sub_modules:
        import importlib

        return importlib.import_module(f".{sub_modules[argv[0]]}", __package__).main(argv[1:]) or 0
    if argv and argv[0] == "likelihood":
        from .likelihood import main as likelihood_main

        return likelihood_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command == "steps":
        from .steps import run_cli

        return run_cli(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
