"""Index arithmetic of the elementwise kernels, in int64 offsets.

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
    def tile_offsets(pid, n_col_blocks, batch, per_sample, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Program ``pid``'s tile of a contiguous ``[batch, per_sample]`` tensor: ``ROWS`` samples by ``BLOCK``
        elements. Returns (rows [ROWS, 1], col0, offs [ROWS, BLOCK], mask), all int64. One scalar division
        per program splits ``pid`` into (row block, column block); no per-element division or modulo."""
        rb = pid // n_col_blocks
        cb = pid - rb * n_col_blocks
        rows = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]
        col0 = cb.to(tl.int64) * BLOCK
        cols = col0 + tl.arange(0, BLOCK).to(tl.int64)[None, :]
        return rows, col0, rows * per_sample + cols, (rows < batch) & (cols < per_sample)

    @triton.jit
    def sample_element(offs, per_sample, sample_offset):
        """(global sample, element) of int64 flat offsets in a contiguous ``[B, per_sample]`` tensor."""
        offs = offs.to(tl.int64)
        return offs // per_sample + sample_offset, offs % per_sample


TILE_BLOCKS = (4, 64, 1024)  # the column widths of [ROWS, BLOCK] tiles (few: each is a compiled specialization)
TILE = 1024  # elements of one tile: ROWS = TILE // BLOCK


def tile_shape(per: int, block: int | None = None) -> tuple[int, int]:
    """(ROWS, BLOCK) of the [ROWS, BLOCK] tiles over rows of ``per`` elements: BLOCK the widest of
    ``TILE_BLOCKS`` not above max(4, next power of two >= per), ROWS = TILE // BLOCK. BLOCK is a multiple of 4,
    so a tile holds whole Philox groups of the noise format. ``block`` overrides (a power of two >= 4)."""
    if block is None:
        cap = max(4, 1 << (max(per, 1) - 1).bit_length())
        block = max(b for b in TILE_BLOCKS if b <= cap)
    elif block < 4 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 4 (tiles hold whole groups of four elements).")
    return max(1, TILE // block), block


def tile_grid(batch: int, per_sample: int, rows: int, block: int):
    """(grid, n_col_blocks) of a tiled launch over ``[batch, per_sample]`` in ``[rows, block]`` tiles
    (``tile_offsets``); the grid is one-dimensional, so any batch size fits (CUDA caps grid axes 1 and 2 at 65535)."""
    n_col_blocks = -(-per_sample // block)
    n_programs = -(-batch // rows) * n_col_blocks
    if n_programs >= 2**31:
        raise ValueError(f"a [{batch}, {per_sample}] tensor needs {n_programs} programs of {rows}x{block}; the grid "
                         f"holds fewer than 2^31: split the batch.")
    return (n_programs,), n_col_blocks


def sample_element_torch(offs: torch.Tensor, per_sample: int, sample_offset: int):
    """Twin of ``sample_element`` on an int64 tensor of flat offsets."""
    offs = offs.to(torch.int64)
    return torch.div(offs, per_sample, rounding_mode="floor") + sample_offset, torch.remainder(offs, per_sample)


def sample_element_ref(offset: int, per_sample: int, sample_offset: int) -> tuple[int, int]:
    """The contract, in Python ints: flat offset -> (global sample, element)."""
    return offset // per_sample + sample_offset, offset % per_sample


__all__ = ["sample_element_torch", "sample_element_ref", "tile_grid", "tile_shape", "TILE_BLOCKS"]
if HAS_TRITON:
    __all__ += ["block_offsets", "sample_element", "tile_offsets"]
