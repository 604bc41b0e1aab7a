# MCKP LP relaxation (Sinha & Zoltners, 1979) and the capped-simplex projection, as cvxpy models (test cross-checks)
"""Convex models solved with cvxpy, for the tests only. They cross-check the library's own exact code.

The library reports the LP bound from its own hull/Lagrangian code and from column generation on
scipy's HiGHS (:mod:`rankalloc.allocators.dual`); cvxpy is a test dependency (the ``test`` extra).
It is imported inside each function. Importing it before OR-tools breaks OR-tools (both ship
``libhighs.so.1``), and ``import rankalloc`` loads OR-tools first.

Import from tests with ``from cvx_models import ...`` (pytest puts tests/ on sys.path).

* :func:`lp_relaxation_bound`: the LP relaxation of the MCKP. Its optimum equals the best
  Lagrangian dual value (:mod:`rankalloc.allocators.lagrangian`).
* :func:`project_capped_simplex_cvx`: the Euclidean projection that
  :func:`rankalloc.allocators.iprs.project_capped_simplex` computes by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rankalloc.allocators.problem import AllocationProblem

LP_SOLVERS = ("GLOP", "SCIPY", "CLARABEL")
"""cvxpy solvers tried for LPs, in order (simplex codes first: their optima are exact vertices)."""


@dataclass(frozen=True)
class LPRelaxation:
    """The LP optimum (``inf`` when even the relaxation is infeasible) and the fractional ``x_lj``."""

    bound: float
    x: tuple[np.ndarray, ...]
    status: str
    solver: str


def lp_relaxation(problem: AllocationProblem, solver: str | None = None) -> LPRelaxation:
    """Solve the LP relaxation of the problem's MCKP.

        min  sum_lj e_lj x_lj
        s.t. sum_j x_lj = 1 for every component l,   x_lj >= 0 (so x_lj <= 1),
             sum_lj c^k_lj x_lj <= B_k for every budget k.

    ``e`` are the weighted errors (``problem.errors``), so sensitivity weights ``alpha_l`` count.
    Each budget row is divided by ``B_k`` (when positive) for conditioning.
    """
    import cvxpy as cp
    import scipy.sparse as sp

    F = problem.flat
    N, L = len(F.errors), len(problem.curves)
    A = sp.csr_matrix((np.ones(N), (F.owner, np.arange(N))), shape=(L, N))
    B = np.array([problem.limits[r] for r in problem.resources])
    scale = np.where(B > 0, B, 1.0)
    x = cp.Variable(N, nonneg=True)
    constraints = [A @ x == 1, (F.costs / scale[:, None]) @ x <= B / scale]
    lp = cp.Problem(cp.Minimize(F.errors @ x), constraints)
    name = solver or next((s for s in LP_SOLVERS if s in cp.installed_solvers()), None)
    if name is None:
        raise RuntimeError(f"lp_relaxation: none of the LP solvers {LP_SOLVERS} is installed for cvxpy")
    lp.solve(solver=name)
    if lp.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return LPRelaxation(math.inf, (), str(lp.status), name)
    if lp.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"lp_relaxation: solver {name} ended with status {lp.status!r}")
    xv = np.clip(np.asarray(x.value, dtype=np.float64), 0.0, 1.0)
    return LPRelaxation(float(lp.value), tuple(np.split(xv, F.offsets[1:-1])), str(lp.status), name)


def lp_relaxation_bound(problem: AllocationProblem, solver: str | None = None) -> float:
    """The optimum of the LP relaxation: a lower bound on the problem's optimum (``inf`` if infeasible)."""
    return lp_relaxation(problem, solver).bound


def project_capped_simplex_cvx(y, S: float) -> np.ndarray:
    """``argmin ||w - y||^2`` over ``{w in [0, 1]^L : sum w = S}``, solved with cvxpy."""
    import cvxpy as cp

    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) == 0 or not np.isfinite(y).all():
        raise ValueError(f"project_capped_simplex_cvx: expected a non-empty finite vector, received {y!r}")
    if not (np.isfinite(S) and 0 <= S <= len(y)):
        raise ValueError(f"project_capped_simplex_cvx: expected 0 <= S <= {len(y)}, received {S!r}")
    w = cp.Variable(len(y))
    qp = cp.Problem(cp.Minimize(cp.sum_squares(w - y)), [w >= 0, w <= 1, cp.sum(w) == S])
    qp.solve(solver="CLARABEL" if "CLARABEL" in cp.installed_solvers() else None)
    if qp.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"project_capped_simplex_cvx: solver ended with status {qp.status!r}")
    return np.asarray(w.value, dtype=np.float64)
