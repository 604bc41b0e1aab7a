# MCKP Lagrangian relaxation (Sinha & Zoltners, 1979; Fisher, 1981): exact multiplier search on hull breakpoints
"""Lagrangian relaxation of the multiple-choice knapsack, with a certified lower bound.

Relax the budgets with multipliers ``lambda_k >= 0``. Each component then solves its own
``min_j e_lj + sum_k lambda_k c^k_lj``, whose answer is a vertex of the lower-left convex hull of
its curve (:mod:`rankalloc.allocators.hull`). By weak duality, for every ``lambda >= 0``

    L(lambda) = sum_l min_j (e_lj + sum_k lambda_k c^k_lj) - sum_k lambda_k B_k  <=  OPT,

and ``max_lambda L`` equals the optimum of the LP relaxation.

**One budget.** As ``lambda`` falls, component ``l`` moves up its hull exactly at its breakpoints
``lambda_li`` (the hull slopes), so the relaxed cost ``C(lambda)`` is a step function. Sort all
breakpoints in decreasing order and take hull edges in that order while the cost fits ``B``. This
gives the fitting solution of the smallest ``lambda``, and ``lambda*`` is the breakpoint of the
first edge that does not fit. Bisection on ``lambda`` converges to the same ``lambda*``, but here
it is found exactly, in one sort. ``lambda*`` also maximises ``L``: its slope ``C(lambda) - B`` changes
sign there. So ``L(lambda*)`` is the LP bound. A *fill* pass then spends what the hull step left
unspent. It repeatedly takes the upgrade, of any candidate, with the largest error decrease per
extra cost that still fits.

**Several budgets.** Cyclic coordinate ascent on the concave dual: for each resource ``k`` in
turn, hold the other multipliers fixed (they price the other resources into the error) and
maximise ``L`` over ``lambda_k`` by the exact one-budget search. ``L`` never decreases. The bound is
the largest ``L`` seen, valid at every ``lambda >= 0``. Each step's solution fits resource ``k``.
The best one that fits all budgets is kept. If none does, the last one is repaired by greedy
descent (:func:`rankalloc.allocators.greedy.greedy_descent`), then filled. If the repair fails,
the result is reported INFEASIBLE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.greedy import greedy_descent
from rankalloc.allocators.hull import breakpoints, lower_hulls
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.segments import (RTOL, fits, limits_of, offsets_of, scalar_weights, segment_cummax,
                                           stable_argsort)

OPTIMAL_RTOL = 1e-12
"""An allocation is reported OPTIMAL when its objective is within this relative gap of the bound."""


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
        R = len(B)
        lam = np.zeros(R)
        bound = dual_value(problem, lam)
        best, best_obj, last = None, np.inf, None
        rounds = 0
        for rounds in range(1, (1 if R == 1 else self.max_iter) + 1):
            before = lam.copy()
            for k in range(R):
                priced = F.errors + np.delete(lam, k) @ np.delete(F.costs, k, axis=0)
                last, lam[k] = coordinate_search(problem, priced, k)
                bound = max(bound, dual_value(problem, lam))
                pos = F.offsets[:-1] + last
                if fits(F.costs[:, pos].sum(axis=1), B):
                    obj = float(F.errors[pos].sum())
                    if obj < best_obj:
                        best, best_obj = last.copy(), obj
            if np.allclose(lam, before, rtol=1e-12, atol=0.0):
                break
        info = {"lambda": dict(zip(problem.resources, lam.tolist())), "rounds": rounds, "dual_value": bound}
        if best is None:
            best, ok, steps = greedy_descent(problem, last)
            info["repair_steps"] = steps
            if not ok:
                return finish(problem, self.name, best, Status.INFEASIBLE, lower_bound=bound, t0=t0, info=info,
                              message="lagrangian: no multiplier gave an allocation within every budget and the "
                                      "greedy repair failed; the budgets may still be feasible (try the exact solver)")
        if self.fill:
            best, info["fill_steps"] = fill_upgrades(problem, best)
        obj = problem.evaluate(best)[0]
        lower = min(bound, obj)
        optimal = obj - lower <= OPTIMAL_RTOL * max(abs(obj), np.finfo(float).tiny)
        return finish(problem, self.name, best, Status.OPTIMAL if optimal else Status.FEASIBLE,
                      lower_bound=lower, t0=t0, info=info)


def dual_value(problem: AllocationProblem, lam: np.ndarray) -> float:
    """``L(lambda) = sum_l min_j (e_lj + sum_k lambda_k c^k_lj) - sum_k lambda_k B_k``, a lower bound for ``lambda >= 0``."""
    F = problem.flat
    priced = F.errors + lam @ F.costs
    return float(np.minimum.reduceat(priced, F.offsets[:-1]).sum() - lam @ limits_of(problem))


def coordinate_search(problem: AllocationProblem, priced: np.ndarray, k: int):
    """Exact search for the smallest ``lambda_k`` whose relaxed solution fits resource ``k``.

    ``priced`` is each candidate's error plus the other resources' priced costs. Returns
    ``(choice_index, lambda_k)``: the choice takes the hull edges of breakpoint ``> lambda_k``
    and, among edges at ``lambda_k`` itself, those that still fit (every such choice minimises
    the relaxed objective at ``lambda_k``).
    """
    F = problem.flat
    L = len(problem.curves)
    c = F.costs[k]
    hull = lower_hulls(c, priced, F.offsets, collinear=True)
    left, right, lam = breakpoints(c, priced, hull, F.owner)
    edge_owner = F.owner[left]
    # breakpoints decrease along a chain; enforce it against rounding so that a prefix of the
    # global order is a prefix of every chain
    lam = -segment_cummax(-lam, offsets_of(edge_owner, L))
    order = stable_argsort(-lam)
    first = offsets_of(F.owner[hull], L)[:-1]
    spent = c[hull[first]].sum() + np.cumsum(c[right[order]] - c[left[order]])
    limit = problem.limits[problem.resources[k]]
    t = int(np.searchsorted(spent, limit * (1 + RTOL) + RTOL, side="right"))
    lam_k = float(lam[order[t]]) if t < len(order) else 0.0
    moves = np.bincount(edge_owner[order[:t]], minlength=L)
    return hull[first + moves] - F.offsets[:-1], lam_k


def fill_upgrades(problem: AllocationProblem, choice_index, weights: np.ndarray | None = None):
    """Spend the unused budget: repeatedly take the upgrade with the best error decrease per extra cost.

    An upgrade moves one component to any candidate of smaller error whose extra cost fits what
    is left of every budget. Its value is the decrease divided by the scalarised extra cost
    (free upgrades first). Returns ``(choice_index, number of upgrades)``.

    Only candidates that fitted in the previous round are re-examined after an upgrade that
    frees no resource. For another component nothing changed but the budget left, which shrank.
    For the upgraded one, a candidate that fits and improves on the new choice also fitted and
    improved on the old one. An upgrade that frees some resource re-examines everything.
    """
    F = problem.flat
    w = scalar_weights(problem) if weights is None else np.asarray(weights, dtype=np.float64)
    slack = limits_of(problem) * (1 + RTOL) + RTOL
    pos = F.offsets[:-1] + np.asarray(choice_index, dtype=np.int64)
    pool = np.arange(len(F.errors))
    steps = 0
    while len(pool):
        own = F.owner[pool]
        cur = pos[own]
        extra = F.costs[:, pool] - F.costs[:, cur]
        gain = F.errors[cur] - F.errors[pool]
        left = slack - F.costs[:, pos].sum(axis=1)
        ok = (gain > 0) & np.all(extra <= left[:, None], axis=0)
        if not ok.any():
            break
        ds = w @ extra
        value = np.where(ds > 0, gain / np.where(ds > 0, ds, 1.0), np.inf)
        cand = np.flatnonzero(ok)
        j = cand[np.argmax(value[cand])]
        pos[own[j]] = pool[j]
        steps += 1
        pool = pool[ok] if (extra[:, j] >= 0).all() else np.arange(len(F.errors))
    return pos - F.offsets[:-1], steps
