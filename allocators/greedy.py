# SoLA (Huang et al., 2025), Sec. 3.3: greedy rank allocation on a rank grid, cheapest error per cost saved
"""Greedy descent: from dense, repeatedly make the step that costs the least error per unit saved.

Each component ``l`` walks down its *path*: its candidates in decreasing cost, starting from the
start candidate, keeping the least error at each distinct cost and skipping every candidate that
costs more than the start. A step ``p -> p+1`` raises the error by ``de = e_{p+1} - e_p`` and
saves ``ds = sum_k (c^k_p - c^k_{p+1}) / B_k``. With one budget this is the plain cost saved, up to
the factor ``1/B``. The greedy takes the step with the smallest ratio ``de / ds`` among the next
steps of all components, and repeats until every budget holds.

A heap does this in ``O(N log L)`` Python steps. The vectorised form relies on this fact. The heap
pops a component's steps in order, and it pops steps by increasing *prefix maximum*
``P_p = max(ratio_1, ..., ratio_p)`` of their component's ratios, ties going to the lower
component and then the earlier step. Once a step with ratio ``P`` is popped, every head left in
the heap has key ``>= P``. A later step of the same component with a smaller ratio is therefore
popped at once, as if its key were ``P``. So the pop order is a stable sort of the per-step
prefix maxima in (component, step) order. The stopping point is the first prefix of that order
whose cumulative savings meet every budget. The test suite checks this against a literal heap
implementation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.problem import DENSE, AllocationProblem
from rankalloc.allocators.segments import (fits, group_first_min, limits_of, offsets_of, scalar_weights,
                                           segment_cummax, segment_pick, sort_within, stable_argsort)

STARTS = ("dense", "full")


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

    def __post_init__(self):
        if self.start not in STARTS:
            raise ValueError(f"Greedy: expected start in {STARTS}, received {self.start!r}")

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        if (out := infeasible(problem, self.name, t0)) is not None:
            return out
        start = start_choices(problem, self.start, scalar_weights(problem))
        idx, ok, steps = greedy_descent(problem, start)
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


def greedy_descent(problem: AllocationProblem, start, weights: np.ndarray | None = None):
    """Greedy descent from ``start`` (one candidate index per component) until every budget holds.

    Returns ``(choice_index, ok, steps)``: ``ok`` is False when every path is exhausted and a
    budget still fails (then every component sits at the end of its path).
    """
    F = problem.flat
    L = len(problem.curves)
    w = scalar_weights(problem) if weights is None else np.asarray(weights, dtype=np.float64)
    lim = limits_of(problem)
    s = w @ F.costs
    start_pos = F.offsets[:-1] + np.asarray(start, dtype=np.int64)
    cur = s[start_pos][F.owner]
    mask = s < cur
    mask[start_pos] = True
    eligible = np.flatnonzero(mask)
    own = F.owner[eligible]
    seg = offsets_of(own, L)
    order = eligible[sort_within(-s[eligible], seg)]  # each component by decreasing cost, start first
    so = F.owner[order]
    level = np.concatenate([[True], (so[1:] != so[:-1]) | (s[order][1:] != s[order][:-1])])
    path = order[group_first_min(F.errors[order], np.flatnonzero(level))]  # least error per cost
    po = F.owner[path]
    step = np.flatnonzero(po[1:] == po[:-1])  # step k goes path[k] -> path[k+1]
    a, b = path[step], path[step + 1]
    de = F.errors[b] - F.errors[a]
    saved = F.costs[:, a] - F.costs[:, b]  # (R, S)
    ratio = de / (s[a] - s[b])  # s strictly decreases along a path
    P = segment_cummax(ratio, offsets_of(po[step], L))
    pop = stable_argsort(P)
    total = F.costs[:, start_pos].sum(axis=1)
    remaining = total[:, None] - np.cumsum(saved[:, pop], axis=1)
    hit = np.flatnonzero(np.concatenate([[fits(total, lim)], fits(remaining, lim)]))  # after 0, 1, ... steps
    ok = bool(len(hit))
    t = int(hit[0]) if ok else len(pop)
    moves = np.bincount(po[step][pop[:t]], minlength=L)
    first = offsets_of(po, L)[:-1]
    idx = path[first + moves] - F.offsets[:-1]
    return idx, ok, t
