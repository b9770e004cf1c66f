"""Solvers: one small class per method, registered by name (``fs.solvers()`` lists them)."""
from .base import AdaptiveSolver, Plan, Solver, SolverInfo, get_solver, register, solvers
from .ddim import DDIM
from .euler import Euler
from .euler_maruyama import EulerMaruyama
from .heun import Heun
from .runge_kutta import RK4, ButcherTableau, Midpoint, RungeKutta
from .dpm_solver import DPMSolver2, DPMSolver3
from .dpm_solver_pp import DPMSolverPP2M, DPMSolverPP3M
from .unipc import UniPC, UniPC2BH1, UniPC2BH2, UniPC3BH1, UniPC3BH2
from .deis import DEIS, DEIS2, IPNDM
from .ancestral import Ancestral
from .edm_sde import EDMStochastic
from .dpm_solver_pp_sde import DPMSolverPP2MSDE, DPMSolverPP3MSDE
from .predictor_corrector import PredictorCorrector
from .adaptive_rk import AdaptiveRungeKutta, Bosh3, Dopri5, Tsit5
from .adaptive_sde import GottaGoFast
from .restart import Restart
from .sa_solver import SASolver
from .er_sde import ERSDE1, ERSDE2, ERSDE3

__all__ = ["AdaptiveSolver", "Plan", "Solver", "SolverInfo", "get_solver", "register", "solvers",
           "DDIM", "Euler", "EulerMaruyama", "Heun", "RK4", "Midpoint", "RungeKutta", "ButcherTableau",
           "DPMSolver2", "DPMSolver3", "DPMSolverPP2M", "DPMSolverPP3M",
           "UniPC", "UniPC2BH1", "UniPC2BH2", "UniPC3BH1", "UniPC3BH2", "DEIS", "DEIS2", "IPNDM",
           "Ancestral", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "EDMStochastic", "PredictorCorrector",
           "AdaptiveRungeKutta", "Bosh3", "Dopri5", "Tsit5", "GottaGoFast", "Restart", "SASolver",
           "ERSDE1", "ERSDE2", "ERSDE3"]
