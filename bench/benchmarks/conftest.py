"""pytest-benchmark suite (not part of ``python -m pytest tests``): run it with

    python -m pytest bench/benchmarks --benchmark-only -q

Torch threads: ``FLOWSOLVE_BENCH_THREADS`` (default: min(2, cpu count)), set before any benchmark runs, so
that a comparison between two saved runs compares the same thread count. The sampling benchmarks use the
torch twins (``FLOWSOLVE_BACKEND=torch`` unless already set); kernels run on CPU tensors.
"""
import os

os.environ.setdefault("FLOWSOLVE_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = int(os.environ.get("FLOWSOLVE_BENCH_THREADS", str(max(1, min(2, os.cpu_count() or 1)))))
torch.set_num_threads(THREADS)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["loadavg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
