"""The seed of the keyed noise as a one-element int64 device tensor (what every launcher takes).

Keeping the seed in device memory lets a CUDA graph replay with a new seed (copy into the tensor) and
keeps the sampling loop free of host syncs.
"""
from __future__ import annotations

import torch


def seed_tensor(seed: int | torch.Tensor | torch.Generator | None, device) -> torch.Tensor:
    """A one-element int64 seed tensor on ``device`` from an int, a tensor, a torch.Generator or None."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point():
            raise TypeError(f"seed tensor must hold one integer; got shape {tuple(seed.shape)} dtype {seed.dtype}.")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if isinstance(seed, torch.Generator):
        value = int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device).item())
    elif seed is None:
        value = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(seed, (int,)) and not isinstance(seed, bool):
        if not (-(2**63) <= seed < 2**63):
            raise ValueError(f"seed={seed} does not fit in int64.")
        value = seed
    else:
        raise TypeError(f"seed must be an int, a torch.Generator, a one-element tensor or None; got {type(seed).__name__}.")
    return torch.tensor([value], dtype=torch.int64, device=device)


__all__ = ["seed_tensor"]
