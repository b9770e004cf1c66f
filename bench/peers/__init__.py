"""Peer libraries for side-by-side benchmarks and agreement tests (optional: ``pip install -e ".[peers]"``).

Each peer module runs one library's own sampling loop on a benchmark problem, counting NFE by
wrapping the callable it is given (never from nominal steps).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_k_diffusion_sampling():
    """``k_diffusion.sampling``, or None when k-diffusion is not installed.

    k-diffusion's package ``__init__`` imports its training code (torchvision, kornia, wandb, ...),
    which a sampler comparison does not need and which would replace torch 2.13.0 if installed with
    its dependencies. The peers extra therefore installs it with ``--no-deps``; here the package's
    ``sampling`` module is loaded on its own, under a bare parent package whose ``utils`` provides the
    one helper it uses (``append_dims``). With k-diffusion's full dependencies installed, the real
    package is imported instead.
    """
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
        del sys.modules[name]  # a half-imported package from the failed attempt above
    location = list(spec.submodule_search_locations)[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [location]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        """Append singleton dimensions to ``x`` until it has ``target_dims`` dimensions."""
        extra = target_dims - x.ndim
        if extra < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * extra]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = package, utils
    sampling_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{location}/sampling.py")
    sampling = importlib.util.module_from_spec(sampling_spec)
    sys.modules["k_diffusion.sampling"] = sampling
    try:
        sampling_spec.loader.exec_module(sampling)
    except ImportError:  # torchdiffeq / torchsde / scipy missing
        for name in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling"):
            sys.modules.pop(name, None)
        return None
    package.sampling = sampling
    return sampling
