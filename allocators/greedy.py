# SoLA (Huang et al., 2025), Sec. 3.3: greedy rank allocation on a rank grid, cheapest error per cost saved
"""Greedy: from dense, repeatedly make the step that costs the least error per unit saved.

Each component walks down its candidates in decreasing (scalarised) cost; the step with the
smallest error increase per unit saved goes first, until every budget holds. The descent itself
(vectorised, equal to a literal heap) is :func:`rankalloc.allocators.moves.greedy_descent`, which
the Lagrangian and exact solvers also use to repair a choice that breaks a budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.moves import greedy_descent
from rankalloc.allocators.problem import DENSE, AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import limits_of, scalar_weights, segment_pick

STARTS = ("dense", "full")


@register_solver("greedy")
@dataclass(frozen=True)
class Greedy:
    """Greedy by error increase per unit of (scalarised) cost saved.

    Args:
        start: ``"dense"`` starts every component at its dense candidate (at the least-error one
            if its curve has none); ``"full"`` starts at its most expensive low-rank candidate,
            so dense is only reached as a cheaper step (it is cheaper above break-even).
        name: label in reports.
    """

    start: str = "dense"
    name: str = "greedy"
    max_budgets: ClassVar[int | None] = None
    exact_feasibility: ClassVar[bool | int] = 1  # one budget: the descent ends at the cheapest candidates

    def __post_init__(self):
        if self.start not in STARTS:
            raise ValueError(f"Greedy: expected start in {STARTS}, received {self.start!r}")

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        if (out := infeasible(problem, self.name, t0)) is not None:
            return out
        w = scalar_weights(problem)
        idx, ok, steps = greedy_descent(problem.flat, start_choices(problem, self.start, w), limits_of(problem), w)
        msg = "" if ok else ("greedy: every component reached its cheapest candidate and the budgets still do not "
                             "hold (several budgets pull against each other); try the lagrangian or exact solver")
        return finish(problem, self.name, idx, Status.FEASIBLE if ok else Status.INFEASIBLE, t0=t0,
                      message=msg, info={"steps": steps, "start": self.start})


def start_choices(problem: AllocationProblem, start: str, weights: np.ndarray) -> np.ndarray:
    """Start candidate of each component: ``"dense"`` or ``"full"`` (see :class:`Greedy`)."""
    F = problem.flat
    dense = np.concatenate([cv.ranks for cv in problem.curves]) == DENSE
    s = weights @ F.costs
    zero = np.zeros(len(s))
    if start == "dense":  # the dense candidate, else the least error (ties: cheapest)
        pos = segment_pick(F.offsets, dense, zero, zero)
        if (pos < 0).any():
            pos = np.where(pos < 0, segment_pick(F.offsets, np.ones(len(s), dtype=bool), -F.errors, s), pos)
    else:  # the most expensive low-rank candidate (ties: least error), else dense
        pos = segment_pick(F.offsets, ~dense, s, F.errors)
        if (pos < 0).any():
            pos = np.where(pos < 0, segment_pick(F.offsets, dense, zero, zero), pos)
    return pos - F.offsets[:-1]
