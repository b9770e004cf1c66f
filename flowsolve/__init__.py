"""flowsolve: fast, verified samplers for diffusion and flow-matching models.

    import flowsolve as fs
    path = fs.paths.VP()
    model = fs.Model(fn, path, predicts="eps")
    x = fs.sample(model, (16, 2), solver="heun", steps=10, seed=0)
"""
from __future__ import annotations


def _import_kernels():
    """``flowsolve.kernels``: the top-level ``kernels/`` folder, installed as ``flowsolve.kernels``.

    In a source checkout (run in place, or installed editable) the folder beside this package is
    loaded, so that the package and its kernels always come from the same tree.
    """
    import importlib
    import importlib.util
    import os
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    name = __name__ + ".kernels"
    if not os.path.isfile(os.path.join(src, "__init__.py")) or os.path.isdir(os.path.join(os.path.dirname(__file__), "kernels")):
        return importlib.import_module(name)  # an installed wheel: flowsolve/kernels/
    spec = importlib.util.spec_from_file_location(name, os.path.join(src, "__init__.py"), submodule_search_locations=[src])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kernels = _import_kernels()

from . import analytic, grids, paths, solvers as _solvers_pkg  # noqa: E402
from .model import PREDICTS, Model  # noqa: E402
from .sample import Sampler, sample  # noqa: E402
from . import likelihood  # noqa: E402
from .langevin import annealed_langevin, langevin  # noqa: E402
from .likelihood import bits_per_dim, dequantize, log_likelihood  # noqa: E402
from .odeint import odeint  # noqa: E402
from .sdeint import sdeint  # noqa: E402
from . import distributed  # noqa: E402
from . import adapters, cuda_graph, guidance  # noqa: E402
from .guidance import CFG, classifier_free_guidance  # noqa: E402
from .checks import check_model  # noqa: E402
from .solvers import Solver, SolverInfo, get_solver, register  # noqa: E402
from .solvers import solvers  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Model", "PREDICTS", "sample", "Sampler", "solvers", "Solver", "SolverInfo", "get_solver", "register",
           "paths", "grids", "analytic", "kernels", "odeint", "sdeint", "distributed", "adapters", "cuda_graph",
           "guidance", "CFG", "classifier_free_guidance", "check_model",
           "log_likelihood", "bits_per_dim", "dequantize", "likelihood", "langevin", "annealed_langevin"]
