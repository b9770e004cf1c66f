"""``python -m bench steps`` (the main job): error vs NFE per solver on the analytic problems.

Writes a markdown table (stdout and ``<out>/steps.md``), a log-log PNG plot (``<out>/steps.png``)
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
    p.add_argument("--solvers", default=None, help="comma-separated solver names (default: all registered)")
    p.add_argument("--nfe", default=None, help="comma-separated NFE values (default: 4..200)")
    p.add_argument("--quick", action="store_true", help="fewer NFE values and samples (a smoke run)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("likelihood", help="log-likelihood cost: Hutchinson / exact / bare ODE solve (see bench/likelihood.py)",
                   add_help=False)
    sub.add_parser("speed", help="fused step throughput vs copy bandwidth (see bench/speed.py)", add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "speed":
        from .speed import main as speed_main

        return speed_main(argv[1:]) or 0
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
