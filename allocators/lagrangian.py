# MCKP Lagrangian relaxation (Sinha & Zoltners, 1979; Fisher, 1981): exact multiplier search on hull breakpoints
"""Lagrangian relaxation of the multiple-choice knapsack, with a certified lower bound.

Relax the budgets with multipliers ``lambda_k >= 0``. Each component then solves its own
``min_j e_lj + sum_k lambda_k c^k_lj``, whose answer is a vertex of the lower-left convex hull of
its curve (:mod:`rankalloc.allocators.hull`). By weak duality, for every ``lambda >= 0``

    L(lambda) = sum_l min_j (e_lj + sum_k lambda_k c^k_lj) - sum_k lambda_k B_k  <=  OPT,

and ``max_lambda L`` equals the optimum of the LP relaxation (:mod:`rankalloc.allocators.dual`).

**One budget.** The exact multiplier search (:func:`rankalloc.allocators.dual.multiplier_search`)
finds ``lambda*`` in one sort of the hull breakpoints, and ``L(lambda*)`` is the LP bound. A
*fill* pass (:func:`rankalloc.allocators.moves.fill_upgrades`) then spends what the hull step
left unspent. It repeatedly takes the upgrade, of any candidate, with the largest error decrease
per extra cost that still fits.

**Several budgets.** Cyclic coordinate ascent on the concave dual: for each resource ``k`` in
turn, hold the other multipliers fixed (they price the other resources into the error) and
maximise ``L`` over ``lambda_k`` by the exact one-budget search. ``L`` never decreases. The bound is
the largest ``L`` seen, valid at every ``lambda >= 0``. Each step's solution fits resource ``k``.
The best one that fits all budgets is kept. If none does, the last one is repaired by greedy
descent (:func:`rankalloc.allocators.moves.greedy_descent`), then filled. If the repair fails,
the result is reported INFEASIBLE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.dual import dual_value, multiplier_search
from rankalloc.allocators.moves import fill_upgrades, greedy_descent
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import fits, limits_of, scalar_weights

OPTIMAL_RTOL = 1e-12
"""An allocation is reported OPTIMAL when its objective is within this relative gap of the bound."""


@register_solver("lagrangian")
@dataclass(frozen=True)
class Lagrangian:
    """Lagrangian relaxation with an exact multiplier search, a fill pass and a certified lower bound.

    Args:
        fill: spend the budget left after the hull solution on the best-value upgrades.
        max_iter: rounds of cyclic coordinate ascent over the multipliers (several budgets; one
            budget needs a single exact search).
        name: label in reports.
    """

    fill: bool = True
    max_iter: int = 20
    name: str = "lagrangian"
    max_budgets: ClassVar[int | None] = None
    exact_feasibility: ClassVar[bool | int] = 1  # one budget: the greedy repair ends at the cheapest candidates

    def __post_init__(self):
        if not isinstance(self.fill, bool):
            raise ValueError(f"Lagrangian: expected fill to be True or False, received {self.fill!r}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"Lagrangian: expected max_iter to be a positive integer, received {self.max_iter!r}")

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        if (out := infeasible(problem, self.name, t0)) is not None:
            return out
        F = problem.flat
        B = limits_of(problem)
        w = scalar_weights(problem)
        R = len(B)
        lam = np.zeros(R)
        bound = dual_value(F, lam, B)
        best, best_obj, last = None, np.inf, None
        rounds = 0
        for rounds in range(1, (1 if R == 1 else self.max_iter) + 1):
            before = lam.copy()
            for k in range(R):
                priced = F.errors + np.delete(lam, k) @ np.delete(F.costs, k, axis=0)
                last, lam[k] = multiplier_search(F, priced, k, B[k])
                bound = max(bound, dual_value(F, lam, B))
                pos = F.offsets[:-1] + last
                if fits(F.costs[:, pos].sum(axis=1), B):
                    obj = float(F.errors[pos].sum())
                    if obj < best_obj:
                        best, best_obj = last.copy(), obj
            if np.allclose(lam, before, rtol=1e-12, atol=0.0):
                break
        info = {"lambda": dict(zip(problem.resources, lam.tolist())), "rounds": rounds, "dual_value": bound}
        if best is None:
            best, ok, steps = greedy_descent(F, last, B, w)
            info["repair_steps"] = steps
            if not ok:
                return finish(problem, self.name, best, Status.INFEASIBLE, lower_bound=bound, t0=t0, info=info,
                              message="lagrangian: no multiplier gave an allocation within every budget and the "
                                      "greedy repair failed; the budgets may still be feasible (try the exact solver)")
        if self.fill:
            best, info["fill_steps"] = fill_upgrades(F, best, B, w)
        obj = problem.evaluate(best)[0]
        lower = min(bound, obj)
        optimal = obj - lower <= OPTIMAL_RTOL * max(abs(obj), np.finfo(float).tiny)
        return finish(problem, self.name, best, Status.OPTIMAL if optimal else Status.FEASIBLE,
                      lower_bound=lower, t0=t0, info=info)
