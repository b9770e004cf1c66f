"""Adapters: other libraries' models as ``fs.Model`` objects, so that any flowsolve solver runs under them.

Each adapter module adds its public names below (one import line per module).
"""
from __future__ import annotations
from .kdiffusion import KDiffusionDenoiser, from_k_diffusion, grid_from_sigmas  # noqa: E402,F401
from .flow_matching import from_flow_matching  # noqa: E402,F401
from .diffusers import DiscreteVP, from_diffusers, grid_from_diffusers  # noqa: E402,F401
