"""Ahead-of-time compilation of every kernel specialization the launchers can produce, for real NVIDIA
targets, on a machine without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs kernels as Python and accepts code that the compiler
refuses, so it is no evidence that a kernel builds for a GPU. This module is:

* ``launches()``: every launch the launchers can make, found by *calling the launchers* over the space
  their own rules define (``lincomb.TRITON_DTYPES``, ``MAX_INPUTS``, ``offsets.TILE_BLOCKS``, the probe
  kinds, ``hutchinson.HUTCHINSON_DTYPES``, ``embedded.EMBEDDED_DTYPES``, ...) with small CPU tensors
  inside ``backend.recording_launches()``: each launcher prepares its arguments exactly as on a GPU and
  hands the kernel launch to the recorder instead of running it. So the list follows the launchers.
* ``specialization(...)``: the (signature, constexprs, attributes) Triton's own runtime binder derives
  from those arguments for a target (pointer alignment and integer divisibility included), and
  ``compile_launch`` compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
  down to a cubin (ptxas is shipped inside the triton wheel).
* ``ptxas_report``: registers, spill stores/loads and stack from ``ptxas -v`` on the generated PTX,
  plus Triton's shared-memory allocation.

Two example shapes are used: "aligned" ([16, 64]: sizes divisible by 16, the usual case on a GPU, for which
the runtime specializes integer arguments) and "odd" ([3, 7]); runtime variants for other integer values
(e.g. a size equal to 1) are compiled by Triton's JIT on the device.

``python -m bench kernels`` writes the matrix and the ptxas report; ``tests/test_aot_compile.py`` fails on
any compile error and on a register spill in the kernels the sampling loop uses.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
import time

import torch

from .backend import HAS_TRITON, recording_launches

TARGETS = (80, 90, 100)  # compute capabilities: A100, H100/H200, B200
SHAPES = {"aligned": (16, 64), "odd": (3, 7)}
LOOP_KERNELS = ("_lincomb_kernel", "_lincomb_noise_kernel", "_keyed_normal_kernel")  # run every sampling step


@dataclasses.dataclass
class Launch:
    """One recorded launch: a label naming the launcher's choices, the kernel and its arguments."""

    label: str
    kernel: object
    args: tuple
    kwargs: dict

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


def _dtype_name(d) -> str:
    return "none" if d is None else str(d).replace("torch.", "")


def _record(label: str, call) -> list[Launch]:
    with recording_launches() as rec:
        call()
    if not rec:
        raise RuntimeError(f"{label}: the launcher made no kernel launch (is the Triton path reachable?).")
    return [Launch(label if len(rec) == 1 else f"{label} [{i}]", k, a, kw) for i, (k, _grid, a, kw) in enumerate(rec)]


def launches(shape: tuple[int, int] = SHAPES["aligned"]) -> list[Launch]:
    """Every kernel launch the launchers make over their dispatch rules, for state tensors of ``shape``
    ([B, D]; the tile width follows D, so every ``TILE_BLOCKS`` entry is reached by varying D too)."""
    from .embedded import EMBEDDED_DTYPES, embedded_step
    from .hutchinson import BLOCKS as HUTCH_BLOCKS
    from .hutchinson import HUTCHINSON_DTYPES, PROBE_DTYPES, PROBES, hutchinson_accumulate, probes_
    from .lincomb import MAX_INPUTS, TRITON_DTYPES, TRITON_NOISE_DTYPES, lincomb
    from .offsets import TILE_BLOCKS, tile_shape
    from .philox import normal_

    b, d = shape
    seed = torch.zeros(1, dtype=torch.int64)
    step = torch.zeros(1, dtype=torch.int64)
    # one per-sample size for each tile width (D itself first): the tile shape is a function of D
    widths = {}
    for per in [d] + [w for w in TILE_BLOCKS] + [4 * TILE_BLOCKS[-1] + 4]:
        widths.setdefault(tile_shape(per)[1], per)
    out = []
    for din, dacc, dout in TRITON_DTYPES:
        for k in range(1, MAX_INPUTS + 1):
            xs = [torch.zeros(b, d, dtype=din) for _ in range(k)]
            coef = torch.zeros(1, k + 1, dtype=dacc)
            tag = f"lincomb K={k} {_dtype_name(din)}/{_dtype_name(dacc)}/{_dtype_name(dout)}"
            out += _record(tag, lambda: lincomb(torch.zeros(b, d, dtype=dout), xs, coef, step, backend="triton"))
    for dt, _, _ in TRITON_NOISE_DTYPES:
        for blk, per in sorted(widths.items()):
            for k in range(1, MAX_INPUTS + 1):
                xs = [torch.zeros(b, per, dtype=dt) for _ in range(k)]
                coef = torch.zeros(1, k + 1, dtype=dt)
                tag = f"lincomb+noise K={k} {_dtype_name(dt)} block={blk}"
                out += _record(tag, lambda: lincomb(torch.zeros(b, per, dtype=dt), xs, coef, step, seed,
                                                    backend="triton"))
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for blk, per in sorted(widths.items()):
            out += _record(f"normal_ {_dtype_name(dt)} block={blk}",
                           lambda: normal_(torch.zeros(b, per, dtype=dt), seed, step, backend="triton"))
    for dt in PROBE_DTYPES:
        for kind in PROBES:
            for blk, per in sorted(widths.items()):
                out += _record(f"probes_ {kind} {_dtype_name(dt)} block={blk}",
                               lambda: probes_(torch.zeros(2, b, per, dtype=dt), seed, kind=kind, backend="triton"))
    for dvjp, dprobe, dacc in HUTCHINSON_DTYPES:
        for kind in (PROBES if dprobe is None else PROBES[:1]):
            for per in (HUTCH_BLOCKS[0], HUTCH_BLOCKS[0] + 1):  # one per block choice
                vjp = torch.zeros(2, b, per, dtype=dvjp)
                probes = None if dprobe is None else torch.zeros(2, b, per, dtype=dprobe)
                acc = torch.zeros(2, b, dtype=dacc)
                tag = (f"hutchinson {'regenerated ' + kind if probes is None else 'stored'} probes "
                       f"{_dtype_name(dvjp)}/{_dtype_name(dprobe)}/{_dtype_name(dacc)} per={per}")
                out += _record(tag, lambda: hutchinson_accumulate(acc, vjp, torch.zeros(1, 2, dtype=dacc), step, probes,
                                                                  seed, kind=kind, backend="triton"))
    for dt, _, _ in EMBEDDED_DTYPES:
        sizes = dict(widths)
        sizes["two-stage"] = 8 * TILE_BLOCKS[-1] + 1  # above one chunk: the partial-sum reduction and its finish
        for blk, per in sorted(sizes.items(), key=str):
            for k in range(1, MAX_INPUTS + 1):
                for noise in (False, True):
                    xs = [torch.zeros(b, per, dtype=dt) for _ in range(k)]
                    tag = f"embedded K={k} {_dtype_name(dt)} block={blk}{' +noise' if noise else ''}"
                    out += _record(tag, lambda: embedded_step(
                        torch.zeros(b, per, dtype=dt), torch.zeros(b, dtype=dt), xs, torch.zeros(1, k + 1, dtype=dt),
                        torch.zeros(1, k, dtype=dt), step, x_ref=torch.zeros(b, per, dtype=dt), rtol=1e-3,
                        atol=1e-6, seed=seed if noise else None, backend="triton"))
    return out


def specialization(launch: Launch, cc: int):
    """(backend, signature, constexprs, attrs, options) that Triton's runtime would derive for this launch on
    a device of compute capability ``cc`` (its binder: dtypes, constexprs, pointer alignment, int divisibility)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, spec, options)
    return backend, signature, constexprs, attrs, options


@dataclasses.dataclass
class CompileResult:
    label: str
    kernel: str
    cc: int
    ok: bool
    seconds: float
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, cc: int, fp_fusion: bool = True) -> dict:
    """Registers, spills and stack of one PTX module from the wheel's ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        cmd = [get_ptxas(cc).path, "-v", f"--gpu-name={sm_arch_from_capability(cc)}", f.name, "-o", "/dev/null"]
        if not fp_fusion:
            cmd.insert(1, "--fmad=false")
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    used, frame = _PTXAS_USED.search(log), _PTXAS_FRAME.search(log)
    if used is None or frame is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return {"registers": int(used.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def compile_launch(launch: Launch, cc: int, report: bool = True) -> CompileResult:
    """Compile one launch for compute capability ``cc`` down to a cubin; never raises on a compile error.
    ``report``: also read registers/spills/stack with ``ptxas -v`` (a second ptxas run)."""
    return _compile_launch(launch, cc, report)


def _compile_launch(launch: Launch, cc: int, report: bool) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        _, signature, constexprs, attrs, options = specialization(launch, cc)
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options.__dict__)
        res = CompileResult(launch.label, launch.kernel_name, cc, True, 0.0, shared=compiled.metadata.shared)
        if report:
            for key, value in ptxas_report(compiled.asm["ptx"], cc, options.enable_fp_fusion).items():
                setattr(res, key, value)
    except Exception as e:  # noqa: BLE001 - the report names every failure
        res = CompileResult(launch.label, launch.kernel_name, cc, False, 0.0, error=f"{type(e).__name__}: {e}")
    res.seconds = time.perf_counter() - t0
    return res


def supported_targets(targets=TARGETS) -> dict[int, str]:
    """{cc: ""} for targets the installed Triton compiles a trivial kernel for, {cc: reason} for the others."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _probe(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + 1.0)

    status = {}
    for cc in targets:
        try:
            triton.compile(ASTSource(_probe, {"x_ptr": "*fp32"}, {}), target=GPUTarget("cuda", cc, 32))
            status[cc] = ""
        except Exception as e:  # noqa: BLE001
            status[cc] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return status


def _compile_many(items):
    return [compile_launch(launch, cc, report is True or launch.kernel_name in report) for launch, cc, report in items]


def compile_matrix(targets=TARGETS, shapes=("aligned",), workers: int = 1, report=True):
    """Compile every launch of ``launches()`` for every supported target; returns (results, unsupported)
    where unsupported maps a target the installed Triton cannot build for to the reason.

    The compiles run in ``workers`` fresh processes started without ``TRITON_INTERPRET`` (under the
    interpreter ``@triton.jit`` functions are Python and cannot be compiled), each taking every
    ``workers``-th launch. ``report``: True (ptxas -v for every launch) or a collection of kernel names."""
    if not HAS_TRITON:
        raise RuntimeError("compiling kernels ahead of time needs triton installed.")
    import multiprocessing as mp
    import os

    ctx = mp.get_context("spawn")
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:  # the children inherit the environment of the moment they start
        with ctx.Pool(workers) as pool:
            parts = pool.starmap(_worker, [(i, workers, tuple(targets), tuple(shapes), report) for i in range(workers)])
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    results = [r for part, _ in parts for r in part]
    key = {}
    for shape in shapes:  # the order of launches(), whichever worker compiled them
        for i, launch in enumerate(launches(SHAPES[shape])):
            key[_label(launch.label, shape, shapes)] = (shapes.index(shape), i)
    results.sort(key=lambda r: (key[r.label], r.cc))
    status = parts[0][1]
    return results, {cc: why for cc, why in status.items() if why}


def _label(label, shape, shapes):
    return f"{label} ({shape})" if len(shapes) > 1 else label


def _spec_key(launch: Launch, cc: int):
    _, signature, constexprs, attrs, options = specialization(launch, cc)
    return (launch.kernel_name, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), str(sorted(options.__dict__.items())))


def _worker(index, workers, targets, shapes, report):
    """Enumerate every launch, group launches that specialize identically for a target (compiled once, reported
    under each label), and compile this worker's share of the distinct specializations."""
    status = supported_targets(targets)
    groups = {}  # (cc, key) -> [launch, ...] in enumeration order
    for shape in shapes:
        for launch in launches(SHAPES[shape]):
            launch = dataclasses.replace(launch, label=_label(launch.label, shape, shapes))
            for cc in targets:
                if not status[cc]:
                    groups.setdefault((cc, _spec_key(launch, cc)), []).append(launch)
    results = []
    for (cc, _), same in list(groups.items())[index::workers]:
        first = compile_launch(same[0], cc, report is True or same[0].kernel_name in report)
        results += [dataclasses.replace(first, label=launch.label) for launch in same]
    return results, status


__all__ = ["TARGETS", "SHAPES", "LOOP_KERNELS", "Launch", "CompileResult", "launches", "specialization",
           "compile_launch", "compile_matrix", "ptxas_report", "supported_targets"]
