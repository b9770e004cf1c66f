"""flowsolve.kernels: the fused step-kernel family (Triton) and its pure-torch twins.

Array math only: nothing here knows about schedules, models or solvers. Installed as
``flowsolve.kernels`` (the repository keeps it at top level as ``kernels/``).
"""
from .backend import HAS_TRITON, interpreting, resolve_backend
from .embedded import embedded_step, embedded_step_torch
from .hutchinson import PROBES, hutchinson_accumulate, hutchinson_accumulate_torch, probes_
from .lincomb import MAX_INPUTS, lincomb, lincomb_torch
from .philox import STREAM_INIT, STREAM_PROBE, STREAM_STEP, keyed_normal_torch, normal_
from .seed import seed_tensor
from .steps import euler_maruyama_step, euler_step, heun_step

__all__ = [
    "HAS_TRITON", "interpreting", "resolve_backend", "MAX_INPUTS", "lincomb", "lincomb_torch",
    "normal_", "seed_tensor", "keyed_normal_torch", "STREAM_STEP", "STREAM_INIT", "STREAM_PROBE",
    "euler_maruyama_step", "euler_step", "heun_step",
    "PROBES", "probes_", "hutchinson_accumulate", "hutchinson_accumulate_torch",
    "embedded_step", "embedded_step_torch",
]
