"""Solvers: one small class per method, registered by name (``fs.solvers()`` lists them)."""
from .base import Plan, Solver, SolverInfo, get_solver, register, solvers
from .ddim import DDIM
from .euler import Euler
from .euler_maruyama import EulerMaruyama
from .heun import Heun

__all__ = ["Plan", "Solver", "SolverInfo", "get_solver", "register", "solvers", "DDIM", "Euler", "EulerMaruyama", "Heun"]
