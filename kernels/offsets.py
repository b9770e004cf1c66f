"""Index arithmetic of the elementwise kernels, in int64 (DESIGN.md, "Contracts": int64 offsets).

``tl.program_id(0)`` is an int32; ``program_id * BLOCK`` in int32 wraps once a tensor has 2^31 elements
(triton-lang/triton #1058, fla #1080: silently corrupted output). Every elementwise kernel here computes
its flat offsets with ``block_offsets`` (cast to int64 BEFORE the multiply) and splits a flat offset into
the noise key's (global sample, element) pair with ``sample_element``; the torch twins use the same split
(``sample_element_torch``), and ``sample_element_ref`` is the contract in Python's unbounded ints. The
Philox counters take the low 32 bits of each (``philox.py``), so the launchers require
``sample_offset + B <= 2^32`` and ``per_sample < 2^32`` (``philox._check_keys``).

Tested without allocating 2^31 elements (tests/test_offsets.py): the helpers take a program-id base, so a
one-block launch under the interpreter evaluates offsets near 2^31 and 2^32.
"""
from __future__ import annotations

import torch

from .backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def block_offsets(pid, BLOCK: tl.constexpr):
        """Flat int64 offsets ``pid * BLOCK + [0, BLOCK)`` of program ``pid`` (any int type)."""
        return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)

    @triton.jit
    def sample_element(offs, per_sample, sample_offset):
        """(global sample, element) of int64 flat offsets in a contiguous ``[B, per_sample]`` tensor."""
        offs = offs.to(tl.int64)
        return offs // per_sample + sample_offset, offs % per_sample


def sample_element_torch(offs: torch.Tensor, per_sample: int, sample_offset: int):
    """Twin of ``sample_element`` on an int64 tensor of flat offsets."""
    offs = offs.to(torch.int64)
    return torch.div(offs, per_sample, rounding_mode="floor") + sample_offset, torch.remainder(offs, per_sample)


def sample_element_ref(offset: int, per_sample: int, sample_offset: int) -> tuple[int, int]:
    """The contract, in Python ints: flat offset -> (global sample, element)."""
    return offset // per_sample + sample_offset, offset % per_sample


__all__ = ["sample_element_torch", "sample_element_ref"]
if HAS_TRITON:
    __all__ += ["block_offsets", "sample_element"]
