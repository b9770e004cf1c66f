"""Test configuration.

TRITON_INTERPRET=1 must be set before triton is imported: it lets the Triton kernels run on CPU
tensors through Triton's interpreter, which is how the kernel code itself is tested without a GPU.
Sampling tests use the torch twin by default (FLOWSOLVE_BACKEND=torch); kernel tests and a few
end-to-end tests ask for backend="triton" explicitly.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLOWSOLVE_BACKEND", "torch")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Numerical tests are slow and must not flake: no deadline, a fixed example sequence, few examples.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
