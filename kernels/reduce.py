"""Batch-invariant per-row sums for the torch twins (array math only).

A plain ``p.sum(1)`` may pick its blocking from the whole tensor's shape, so a row's sum could change
with the number of rows. The twins that reduce per sample (Hutchinson dot products, the embedded step's
error norm) sum each row in fixed chunks instead: bitwise independent of the batch size.
"""
from __future__ import annotations

import torch

ROW_CHUNK = 8192  # elements per fixed summation chunk


def rowsum_fixed_chunks(p: torch.Tensor, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """Per-row sums of a [R, n] tensor in fixed chunks of ``chunk`` elements: bitwise independent of R."""
    rows, n = p.shape
    m = n // chunk
    if m == 0:
        return p.sum(1)
    tot = p[:, : m * chunk].reshape(rows, m, chunk).sum(2).sum(1)
    if n > m * chunk:
        tot = tot + p[:, m * chunk:].sum(1)
    return tot
