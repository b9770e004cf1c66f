"""Backend selection: Triton kernels or their pure-torch twins.

Rule (DESIGN.md, Conventions): CUDA tensors run the Triton kernels; CPU tensors run the torch
twins, unless ``TRITON_INTERPRET=1`` was set before triton was imported, in which case the Triton
kernels run on CPU tensors through Triton's interpreter (how CI checks the kernel code). One switch
forces either: the ``backend=`` argument of a launcher / ``fs.sample``, or the environment variable
``FLOWSOLVE_BACKEND`` (``auto`` | ``torch`` | ``triton``), the argument winning.
"""
from __future__ import annotations

import os

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
        if device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported, or use backend='torch' (the twin) on CPU."
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not support device {device}; use backend='torch'.")
    return backend
