"""The seed of the keyed noise: validated once here, held as a one-element int64 device tensor (what every launcher
takes).

Keeping the seed in device memory lets a CUDA graph replay with a new seed (copy into the tensor) and
keeps the sampling loop free of host syncs.

What a seed may be (``resolve_seed``; every entry point that draws noise takes the same):

* an int, or an integer scalar of another kind (``numpy.int64``, a one-element integer tensor on any device);
  bool and complex values, floating-point tensors and non-integers are refused;
* a ``torch.Generator``: a 64-bit key drawn from it (two 32-bit ``torch.randint`` words on its device), so the
  same generator state gives the same key and the draw advances the generator, as any torch sampling call does;
* ``None``: a fresh key drawn the same way from torch's global CPU generator (``torch.default_generator``), so
  two calls give new samples and ``torch.manual_seed(s)`` makes a run repeatable. ``seed=None`` is
  ``seed=torch.default_generator``.
"""
from __future__ import annotations

import numbers

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def key_from_generator(generator: torch.Generator) -> int:
    """A 64-bit int key drawn from ``generator`` (two 32-bit words, on the generator's device).

    Deterministic: the same generator state gives the same key, so ``torch.Generator().manual_seed(s)``
    reproduces its samples. Like every torch sampling call it advances the generator, so two calls with
    one generator draw two different (reproducible) keys. Returned in int64's signed range."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}.")
    words = torch.randint(0, 2**32, (2,), generator=generator, device=generator.device, dtype=torch.int64).tolist()
    key = (words[1] << 32) | words[0]
    return key - 2**64 if key >= 2**63 else key


def resolve_seed(seed) -> int | torch.Tensor:
    """The seed as a Python int (from an int, a numpy integer, a Generator or None), or, for a tensor, the tensor
    itself, validated (one integer element; it is not read on the host, which would be a device sync)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in _INT_DTYPES:
            raise TypeError(f"a seed tensor must hold one integer (int8/16/32/64 or uint8); got shape "
                            f"{tuple(seed.shape)} dtype {seed.dtype}. Pass seed=int(...) or an int64 tensor.")
        return seed
    if seed is None:
        if torch.compiler.is_compiling():
            raise ValueError("seed=None draws a fresh key from torch's global generator on the host, which a compiled "
                             "graph cannot do; pass seed= as a one-element tensor made outside the compiled function "
                             "(seed=torch.tensor([s])), or an int.")
        return key_from_generator(torch.default_generator)
    if isinstance(seed, torch.Generator):
        return key_from_generator(seed)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and type(seed).__name__ not in ("bool_", "bool"):
        value = int(seed)
        if not (-(2**63) <= value < 2**63):
            raise ValueError(f"seed={value} does not fit in int64.")
        return value
    raise TypeError(f"seed must be an int, a torch.Generator, a one-element tensor or None; got "
                    f"{type(seed).__name__} {seed!r} (numpy integers and integer tensors are accepted; bool, float "
                    f"and complex values are not).")


def seed_tensor(seed: int | torch.Tensor | torch.Generator | None, device) -> torch.Tensor:
    """A one-element int64 seed tensor on ``device`` from any seed ``resolve_seed`` accepts."""
    seed = resolve_seed(seed)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def seed_value(seed: int | torch.Tensor) -> int:
    """The int a resolved seed stands for (reads a tensor seed on the host: call it outside the loop)."""
    return seed if isinstance(seed, int) else int(seed.reshape(-1)[0])


__all__ = ["seed_tensor", "resolve_seed", "seed_value", "key_from_generator"]
