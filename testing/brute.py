# Exhaustive enumeration of the multiple-choice knapsack: the ground truth of small instances
"""Brute force: every combination of one candidate per component, and the tolerance objectives are compared in.

The kit's ground truth for "the exact optimum" on small problems (a few components with a few candidates
each; :func:`brute_force` refuses more than :data:`MAX_COMBINATIONS`). Budgets are met within the
library's one feasibility tolerance (:func:`rankalloc.allocators.segments.feasible_limits`).
"""

from __future__ import annotations

import itertools

import numpy as np

from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.segments import feasible_limits

REL_TOL = 1e-6
"""Objective tolerance, relative to the problem's error scale (exact solvers may scale errors to integers)."""

MAX_COMBINATIONS = 200_000
"""The most combinations :func:`brute_force` enumerates."""


def tol(problem: AllocationProblem) -> float:
    """Absolute objective tolerance: :data:`REL_TOL` times the sum of the largest error of each component."""
    scale = float(sum(e.max() for e in problem.errors))
    return REL_TOL * max(scale, 1e-12) + 1e-12


def brute_force(problem: AllocationProblem) -> tuple[float | None, tuple[int, ...] | None, int]:
    """Enumerate every combination: ``(optimal objective or None if infeasible, one optimal index, #optimal)``.

    ``#optimal`` counts the combinations within :func:`tol` of the optimum (1 = unique optimum). Raises
    ``ValueError`` above :data:`MAX_COMBINATIONS` combinations.
    """
    sizes = [len(cv) for cv in problem.curves]
    total = int(np.prod(sizes))
    if total > MAX_COMBINATIONS:
        raise ValueError(f"brute force: {total} combinations is too many (at most {MAX_COMBINATIONS})")
    idx = np.array(list(itertools.product(*[range(s) for s in sizes])), dtype=np.int64).reshape(total, len(sizes))
    pos = idx + problem.flat.offsets[:-1]
    obj = problem.flat.errors[pos].sum(axis=1)
    ok = np.ones(total, dtype=bool)
    for k, r in enumerate(problem.resources):
        cost = problem.flat.costs[k][pos].sum(axis=1)
        ok &= cost <= feasible_limits(problem.limits[r])
    if not ok.any():
        return None, None, 0
    best = float(obj[ok].min())
    winners = np.flatnonzero(ok & (obj <= best + tol(problem)))
    return best, tuple(int(j) for j in idx[winners[0]]), len(winners)
