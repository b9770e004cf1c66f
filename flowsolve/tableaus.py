"""Butcher tableaus of the explicit Runge-Kutta methods flowsolve uses, as data, in one place.

Used by the fixed-step solvers (``solvers/runge_kutta.py``), the adaptive ones (``solvers/adaptive_rk.py``),
the likelihood integrators (``likelihood.py``) and ``fs.odeint``. A stage i evaluates the field at
y_i = x + h sum_j a_ij k_j, time t + c_i h; the step ends with x + h sum_j b_j k_j, and an embedded
pair estimates the local error by e = h sum_j (b_j - b_low_j) k_j (Hairer, Norsett & Wanner, "Solving
ODEs I", Sec. II.4). Each tableau checks its own consistency on construction: every row of a sums to
c_i, b (and b_low) sum to 1, and an FSAL tableau's last stage is the new point (a_s = b, c_s = 1,
b_s = 0), so its last evaluation is the next step's first. The order conditions themselves (every
rooted tree up to the stated order) are checked in tests/test_adaptive_ode.py.

Methods:
    euler      order 1                      Euler (1768)
    midpoint   order 2                      explicit midpoint rule (Runge 1895)
    heun       order 2                      Heun / trapezoidal (Karras et al. 2022, Alg. 1)
    rk4        order 4                      classical Runge-Kutta (Kutta 1901; HNW Table II.1.2)
    bosh3      order 3, embedded 2, FSAL    Bogacki & Shampine 1989, "A 3(2) pair of Runge-Kutta formulas",
                                            Appl. Math. Lett. 2(4), eq. (3.1)
    dopri5     order 5, embedded 4, FSAL    Dormand & Prince 1980, "A family of embedded Runge-Kutta formulae",
                                            J. Comp. Appl. Math. 6(1), Table 2 (HNW Table II.5.2)
    tsit5      order 5, embedded 4, FSAL    Tsitouras 2011, "Runge-Kutta pairs of order 5(4) satisfying only
                                            the first column simplifying assumption", Comput. Math. Appl. 62(2),
                                            Table 1 (b_low[6] = +1/66: the paper prints the error weight's sign
                                            flipped; the order conditions decide, tested)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tableau", "EULER", "MIDPOINT", "HEUN", "RK4", "BOSH3", "DOPRI5", "TSIT5", "TABLEAUS"]

_TOL = 1e-14


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method; ``b_low``: the embedded weights of order ``order_low`` (adaptive pairs)."""

    a: tuple  # lower-triangular rows a[i] = (a_i0, ..., a_i,i-1); a[0] = ()
    b: tuple
    c: tuple
    order: int
    b_low: tuple | None = None
    order_low: int | None = None
    fsal: bool = False
    name: str = ""
    paper: str = ""

    def __post_init__(self):
        s = len(self.c)
        label = f"tableau {self.name or '(unnamed)'}"
        if len(self.a) != s or len(self.b) != s or any(len(self.a[i]) != i for i in range(s)):
            raise ValueError(f"{label}: shapes do not match (need s rows of a with i entries in row i, s weights, s nodes).")
        if abs(sum(self.b) - 1.0) > _TOL:
            raise ValueError(f"{label}: b must sum to 1 (sums to {sum(self.b)!r}).")
        for i in range(s):
            if abs(sum(self.a[i]) - self.c[i]) > _TOL:
                raise ValueError(f"{label}: row {i} of a must sum to c[{i}] = {self.c[i]} (sums to {sum(self.a[i])!r}).")
        if (self.b_low is None) != (self.order_low is None):
            raise ValueError(f"{label}: give both b_low and order_low, or neither.")
        if self.b_low is not None:
            if len(self.b_low) != s:
                raise ValueError(f"{label}: b_low must have {s} weights.")
            if abs(sum(self.b_low) - 1.0) > _TOL:
                raise ValueError(f"{label}: b_low must sum to 1 (sums to {sum(self.b_low)!r}).")
        if self.fsal and not (self.c[-1] == 1.0 and tuple(self.a[-1]) == tuple(self.b[:-1]) and self.b[-1] == 0.0):
            raise ValueError(f"{label}: FSAL needs the last stage to be the new point (a[-1] = b[:-1], c[-1] = 1, b[-1] = 0).")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_low is not None

    @property
    def err(self) -> tuple:
        """Error weights b - b_low: e = h sum_j err_j k_j estimates the lower-order solution's local error."""
        if self.b_low is None:
            raise ValueError(f"tableau {self.name}: no embedded weights, so no error estimate.")
        return tuple(b - bl for b, bl in zip(self.b, self.b_low))

    @property
    def evals_per_step(self) -> int:
        """New model evaluations per step: the stages, less the one an FSAL pair reuses."""
        return self.stages - (1 if self.fsal else 0)


EULER = Tableau(a=((),), b=(1.0,), c=(0.0,), order=1, name="euler", paper="Euler")
MIDPOINT = Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5), order=2, name="midpoint",
                   paper="explicit midpoint (Runge 1895)")
HEUN = Tableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2, name="heun",
               paper="Heun / trapezoidal (Karras et al. 2022, Alg. 1)")
RK4 = Tableau(a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), c=(0.0, 0.5, 0.5, 1.0),
              order=4, name="rk4", paper="classical Runge-Kutta (Kutta 1901)")
BOSH3 = Tableau(
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    order=3, b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8), order_low=2, fsal=True, name="bosh3",
    paper="Bogacki & Shampine 1989, 3(2)",
)
DOPRI5 = Tableau(
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    order=5, b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40), order_low=4,
    fsal=True, name="dopri5", paper="Dormand & Prince 1980, 5(4)",
)
_T5 = (0.09646076681806522952, 0.01, 0.47988965041449957478, 1.3790085741037418932, -3.2900695154360806799,
       2.3247105240997739824)
TSIT5 = Tableau(
    a=(
        (),
        (0.161,),
        (-0.008480655492356988544, 0.33548065549235698854),
        (2.8971530571054934321, -6.3594484899750748431, 4.3622954328695814110),
        (5.3258648284392566044, -11.748883564062827878, 7.4955393428898362083, -0.092495066361755249257),
        (5.8614554429464200287, -12.920969317847109292, 8.1593678985761586432, -0.071584973281400997225,
         -0.028269050394068382909),
        _T5,
    ),
    b=_T5 + (0.0,),
    c=(0.0, 0.161, 0.327, 0.9, 0.98002554090450968573, 1.0, 1.0),
    order=5,
    b_low=(0.094680755765839458075, 0.0091835655403432530968, 0.48777052842476157079, 1.2342975669304789857,
           -2.7077123499835254549, 1.8666284181705870358, 1 / 66),
    order_low=4, fsal=True, name="tsit5", paper="Tsitouras 2011, 5(4)",
)

TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN, RK4, BOSH3, DOPRI5, TSIT5)}
