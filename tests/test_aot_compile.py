"""Compile truth: every kernel specialization the launchers can produce compiles for real NVIDIA targets.

Triton's interpreter runs kernels as Python and accepted code the compiler refuses (13 of 32 specializations
once failed on every target: plain Python globals read inside ``@triton.jit`` code). Here each launch that
``flowsolve.kernels.aot.launches`` records (the launchers called over their own dispatch rules) is specialized
as Triton's runtime would for the target and compiled to a cubin for sm_80, sm_90 and sm_100, on this
CPU-only machine; ptxas (shipped in the triton wheel) reports registers and spills of the kernels every
sampling step runs, which must not spill. ``python -m bench kernels`` writes the full report.
"""
import collections
import os
import subprocess
import sys

import pytest
import torch

import flowsolve  # noqa: F401  (registers flowsolve.kernels)
from flowsolve.kernels.backend import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (it is a dependency on Linux)")

if HAS_TRITON:
    from flowsolve.kernels import aot
    from flowsolve.kernels.lincomb import MAX_INPUTS, TRITON_DTYPES, TRITON_NOISE_DTYPES
    from flowsolve.kernels.offsets import TILE_BLOCKS

# compiled in a fresh process: under TRITON_INTERPRET=1 (set by conftest) @triton.jit functions are Python
_NEGATIVE_CONTROL = """
import torch, triton, triton.language as tl
import flowsolve
from flowsolve.kernels import aot
SCALE = 2.0  # a plain Python global

@triton.jit
def reads_a_plain_global(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) * SCALE)

@triton.jit
def reads_a_constexpr_global(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) * FINE)

FINE = tl.constexpr(2.0)
for fn in (reads_a_plain_global, reads_a_constexpr_global):
    r = aot.compile_launch(aot.Launch(fn.__name__, fn, (torch.zeros(4),), {}), 90, report=False)
    print(fn.__name__, r.ok, " ".join(r.error.split()))
"""


def _constexprs(launch):
    return {k: v for k, v in launch.kwargs.items()}


def test_enumeration_follows_the_launchers_dispatch_rules():
    """Every value of every axis the launchers choose on is reached: K = 1..MAX_INPUTS with and without
    noise, every dtype triple, every tile width, both probe kinds, regenerated and stored probes, the
    embedded kernel's single- and two-stage reductions."""
    by = collections.defaultdict(list)
    for launch in aot.launches():
        by[launch.kernel_name].append(launch)
    assert {_constexprs(x)["K"] for x in by["_lincomb_kernel"]} == set(range(1, MAX_INPUTS + 1))
    assert {_constexprs(x)["K"] for x in by["_lincomb_noise_kernel"]} == set(range(1, MAX_INPUTS + 1))
    flat = {(x.args[2].dtype, x.args[10].dtype, x.args[0].dtype) for x in by["_lincomb_kernel"]}
    assert flat == set(TRITON_DTYPES)
    noisy = {(x.args[2].dtype, x.args[10].dtype, x.args[0].dtype) for x in by["_lincomb_noise_kernel"]}
    assert noisy == set(TRITON_NOISE_DTYPES)
    for name in ("_lincomb_noise_kernel", "_keyed_normal_kernel", "_probe_kernel"):
        assert {_constexprs(x)["BLOCK"] for x in by[name]} == set(TILE_BLOCKS), name
    assert {_constexprs(x)["KIND"] for x in by["_probe_kernel"]} == {0, 1}
    assert {(_constexprs(x)["REGEN"], _constexprs(x)["KIND"]) for x in by["_hutchinson_kernel"]} == {
        (True, 0), (True, 1), (False, 0)}
    emb = {(_constexprs(x)["SINGLE"], x.args[-1], _constexprs(x)["BLOCK"]) for x in by["_embedded_kernel"]}
    assert {s for s, _, _ in emb} == {True, False} and {n for _, n, _ in emb} == {0, 1}  # has_noise: runtime
    assert {b for _, _, b in emb} == set(TILE_BLOCKS)
    assert by["_finish_kernel"], "the two-stage reduction's second kernel was never launched"


def test_a_kernel_reading_a_plain_global_fails_to_compile(tmp_path):
    """Negative control: the compile path rejects exactly the bug class the interpreter let through, and
    accepts the fix (a ``tl.constexpr`` global)."""
    script = tmp_path / "negative_control.py"
    script.write_text(_NEGATIVE_CONTROL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["reads_a_plain_global"].startswith("False") and "global" in lines["reads_a_plain_global"].lower()
    assert lines["reads_a_constexpr_global"].startswith("True"), lines["reads_a_constexpr_global"]


def test_every_specialization_compiles_for_every_target_and_loop_kernels_do_not_spill():
    workers = max(1, min(2, os.cpu_count() or 1))
    results, unsupported = aot.compile_matrix(aot.TARGETS, ("aligned",), workers=workers, report=aot.LOOP_KERNELS)
    assert 80 not in unsupported and 90 not in unsupported, f"the installed Triton cannot build for: {unsupported}"
    failed = [f"sm_{r.cc} {r.label}: {r.error.splitlines()[0] if r.error else ''}" for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} specializations failed to compile:\n" + "\n".join(failed[:20])
    n_launch = len(aot.launches())
    assert len(results) == n_launch * (len(aot.TARGETS) - len(unsupported))
    loop = [r for r in results if r.kernel in aot.LOOP_KERNELS]
    assert loop and all(r.registers is not None for r in loop)
    spilled = [f"sm_{r.cc} {r.label}: {r.spill_stores} B stores, {r.spill_loads} B loads" for r in loop
               if r.spill_stores or r.spill_loads]
    assert not spilled, "register spills in kernels the sampling loop runs:\n" + "\n".join(spilled)
