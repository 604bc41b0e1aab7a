# PGSVD (Solgi et al., 2025), Sec. 3: one error tolerance epsilon for every layer
"""Uniform tolerance: every component takes its cheapest candidate with error at most ``epsilon``.

PGSVD proves that one common tolerance ``epsilon`` yields Pareto-optimal heterogeneous ranks for
its surrogate. Here ``epsilon`` applies to the problem's own (weighted) errors ``problem.errors``.
The solver returns the smallest ``epsilon`` whose allocation meets every budget.

The search is exact rather than a float bisection. As ``epsilon`` grows, component ``l`` switches
only when ``epsilon`` reaches the error of a candidate cheaper than every candidate of smaller
error (a *record*). So the allocation is a step function of ``epsilon``, changing only at record
errors. Sort all records by error, accumulate their cost changes and take the first level at
which every budget holds. A bisection over ``epsilon`` would converge to this level. The scan finds
it in one sort, and it stays exact when several budgets make feasibility non-monotone in ``epsilon``.
``epsilon`` starts at ``max_l min_j e_lj``, where every component first has a candidate. With several
resources, "cheapest" means the scalarised cost ``sum_k c_k / B_k``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import (fits, group_first_min, limits_of, offsets_of, scalar_weights,
                                           segment_cummax, sort_within, stable_argsort)


@register_solver("epsilon")
@dataclass(frozen=True)
class UniformEpsilon:
    """The smallest common error tolerance whose cheapest-within-tolerance allocation fits the budgets."""

    name: str = "epsilon"
    max_budgets: ClassVar[int | None] = None
    exact_feasibility: ClassVar[bool | int] = 1  # one budget: the largest tolerance gives the cheapest candidates

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        if (out := infeasible(problem, self.name, t0)) is not None:
            return out
        F = problem.flat
        L = len(problem.curves)
        s = scalar_weights(problem) @ F.costs
        # each component by increasing error; the cheapest candidate of each distinct error
        order = sort_within(F.errors, F.offsets)
        eo, oo = F.errors[order], F.owner[order]
        level = np.concatenate([[True], (oo[1:] != oo[:-1]) | (eo[1:] != eo[:-1])])
        cand = order[group_first_min(s[order], np.flatnonzero(level))]
        co = F.owner[cand]
        seg = offsets_of(co, L)
        best_before = np.concatenate([[np.inf], -segment_cummax(-s[cand], seg)[:-1]])
        first = np.zeros(len(cand), dtype=bool)
        first[seg[:-1]] = True
        best_before[first] = np.inf
        rec = cand[s[cand] < best_before]  # records, by component then increasing error
        ro = F.owner[rec]
        rfirst = np.concatenate([[True], ro[1:] != ro[:-1]])
        delta = F.costs[:, rec].copy()
        delta[:, ~rfirst] -= F.costs[:, rec[np.flatnonzero(~rfirst) - 1]]
        eps = F.errors[rec]
        ev = stable_argsort(eps)
        total = np.cumsum(delta[:, ev], axis=1)
        e_sorted = eps[ev]
        last_of_level = np.concatenate([e_sorted[1:] != e_sorted[:-1], [True]])
        eps0 = float(np.max(np.minimum.reduceat(F.errors, F.offsets[:-1])))
        valid = last_of_level & (e_sorted >= eps0)
        hit = np.flatnonzero(valid & fits(total, limits_of(problem)))
        ok = bool(len(hit))
        t = int(hit[0]) if ok else len(ev) - 1
        applied = np.bincount(ro[ev[:t + 1]], minlength=L)
        idx = rec[offsets_of(ro, L)[:-1] + applied - 1] - F.offsets[:-1]
        info = {"epsilon": float(e_sorted[t])}
        msg = "" if ok else (problem.infeasibility_message() or
                             "epsilon: even the largest tolerance (every component at its cheapest candidate) "
                             "breaks a budget; several budgets pull against each other (try the exact solver)")
        return finish(problem, self.name, idx, Status.FEASIBLE if ok else Status.INFEASIBLE, t0=t0,
                      message=msg, info=info)
