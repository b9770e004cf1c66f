"""flowsolve: fast, verified samplers for diffusion and flow-matching models.

    import flowsolve as fs
    path = fs.paths.VP()
    model = fs.Model(fn, path, predicts="eps")
    x = fs.sample(model, (16, 2), solver="heun", steps=10, seed=0)
"""
from __future__ import annotations


def _import_kernels():
    """``flowsolve.kernels``: installed from the top-level ``kernels/`` folder (setup.py package_dir).

    Run from a source checkout without installing, the folder is loaded from the repository root.
    """
    import importlib
    import importlib.util
    import os
    import sys

    try:
        return importlib.import_module(__name__ + ".kernels")
    except ModuleNotFoundError as e:
        if e.name != __name__ + ".kernels":
            raise
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(
        __name__ + ".kernels", os.path.join(src, "__init__.py"), submodule_search_locations=[src]
    )
    if spec is None:
        raise ImportError("flowsolve.kernels is missing: reinstall flowsolve (pip install .)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kernels = _import_kernels()

from . import analytic, grids, paths, solvers as _solvers_pkg  # noqa: E402
from .model import PREDICTS, Model  # noqa: E402
from .sample import Sampler, sample  # noqa: E402
from .solvers import Solver, SolverInfo, get_solver, register  # noqa: E402
from .solvers import solvers  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Model", "PREDICTS", "sample", "Sampler", "solvers", "Solver", "SolverInfo", "get_solver", "register",
           "paths", "grids", "analytic", "kernels"]
