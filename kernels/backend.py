"""Backend selection: Triton kernels or their pure-torch twins.

Rule (docs/kernels.md): CUDA tensors run the Triton kernels; CPU tensors run the torch
twins, unless ``TRITON_INTERPRET=1`` was set before triton was imported, in which case the Triton
kernels run on CPU tensors through Triton's interpreter (how CI checks the kernel code). One switch
forces either: the ``backend=`` argument of a launcher / ``fs.sample``, or the environment variable
``FLOWSOLVE_BACKEND`` (``auto`` | ``torch`` | ``triton``), the argument winning.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

try:  # triton is an install dependency on Linux, but keep the twins usable without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_LOCAL = threading.local()


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a Triton kernel: ``kernel[grid](*args, **kwargs)``. Every launcher goes through here, so that
    ``recording_launches`` can collect the exact arguments of each launch instead (for ahead-of-time compiles)."""
    record = getattr(_LOCAL, "record", None)
    if record is not None:
        record.append((kernel, grid, args, kwargs))
        return
    counts = getattr(_LOCAL, "counts", None)
    if counts is not None:
        counts.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def counting_launches():
    """Within this context (this thread only), the yielded list receives the name of every Triton kernel launched
    (the kernels still run). Tests count launches per sampling step with it."""
    previous = getattr(_LOCAL, "counts", None)
    _LOCAL.counts = counts = []
    try:
        yield counts
    finally:
        _LOCAL.counts = previous


@contextlib.contextmanager
def recording_launches():
    """Within this context (this thread only), launchers on the Triton path record their launches in the
    yielded list instead of running them, and accept CPU tensors without Triton's interpreter. Used to
    enumerate and compile ahead of time every kernel specialization the launchers produce (``kernels/aot.py``)."""
    if not HAS_TRITON:
        raise RuntimeError("recording kernel launches needs triton installed.")
    previous = getattr(_LOCAL, "record", None)
    _LOCAL.record = record = []
    try:
        yield record
    finally:
        _LOCAL.record = previous


def recording() -> bool:
    return getattr(_LOCAL, "record", None) is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``; raise a clear error if impossible."""
    if backend is None:
        backend = os.environ.get("FLOWSOLVE_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"the environment variable FLOWSOLVE_BACKEND={backend!r} is not one of {BACKENDS}; set "
                             f"it to one of them or unset it (or pass backend= explicitly, which takes precedence).")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}; pass backend='auto' (or set FLOWSOLVE_BACKEND).")
    device = torch.device(device)
    if backend == "auto":
        if HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting())):
            return "triton"
        return "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' but triton is not installed: `pip install triton`, or use backend='torch'.")
        if device.type == "cpu" and not interpreting() and not recording():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported, or use backend='torch' (the twin) on CPU."
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not support device {device}; use backend='torch'.")
    return backend
