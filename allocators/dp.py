# Pseudo-polynomial dynamic program for the multiple-choice knapsack (Kellerer, Pferschy & Pisinger, 2004, Ch. 11)
"""``DynamicProgram``: the textbook exact DP, kept simple as ground truth for small instances.

Costs are divided by the gcd of all costs of a budget, so they become integers ``w_lj``. The
capacity is ``W = floor(B / gcd)``. Component by component,

    f_0(w) = 0,    f_l(w) = min_j  e_lj + f_{l-1}(w - w_lj)    (w >= w_lj),

where ``f_l(w)`` is the least error of components ``1..l`` with total cost at most ``w``. The
optimum is ``f_L(W)``. The choices come back through the stored arg-min (back-pointers). Two
budgets use a 2-D table ``f_l(w1, w2)``. The table size ``states x candidates`` is capped by
``max_cells``, and a larger instance is refused with ``ValueError``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import reduce

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible, infeasible_message
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import feasible_limits, limits_of


@register_solver("dp", ground_truth=True)
@dataclass(frozen=True)
class DynamicProgram:
    """Exact DP for one or two budgets with integer-valued costs; status OPTIMAL, lower bound = objective.

    Args:
        max_cells: refuse (ValueError) when ``(states) x (candidates)`` exceeds this; states is
            ``W + 1`` for one budget, ``(W1 + 1)(W2 + 1)`` for two.
    """

    max_cells: float = 2e7
    name: str = "dp"
    max_budgets = 2

    def __post_init__(self):
        if not self.max_cells > 0:
            raise ValueError(f"DynamicProgram: expected max_cells > 0, received {self.max_cells!r}")

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        R = len(problem.resources)
        if R > 2:
            raise ValueError(f"DynamicProgram handles one or two budgets, received {R}: {list(problem.resources)}")
        bad = infeasible(problem, self.name, t0)
        if bad is not None:
            return bad
        limits = feasible_limits(limits_of(problem))
        weights, caps = [], []
        for res, limit in zip(problem.resources, limits):
            table = problem.cost_tables[res]
            allc = np.concatenate(table)
            if not np.all(allc == np.round(allc)) or allc.max() >= 2 ** 53:
                raise ValueError(f"DynamicProgram: budget {res!r} needs integer-valued costs, received e.g. "
                                 f"{allc[allc != np.round(allc)][:1].tolist()}")
            g = reduce(math.gcd, np.unique(allc.astype(np.int64)).tolist(), 0) or 1
            weights.append([(t.astype(np.int64) // g) for t in table])
            caps.append(int(math.floor(limit / g)))
        states = math.prod(c + 1 for c in caps)
        cells = float(states) * sum(len(cv) for cv in problem.curves)
        if cells > self.max_cells:
            raise ValueError(f"DynamicProgram: {states} cost states x {sum(len(cv) for cv in problem.curves)} "
                             f"candidates = {cells:.3g} cells, above max_cells={self.max_cells:.3g}; "
                             f"use Exact for large instances")
        shape = tuple(c + 1 for c in caps)
        f = np.zeros(shape)  # f[w] = least error so far with total cost <= w (per axis)
        back = []
        for l, errors in enumerate(problem.errors):
            new = np.full(shape, np.inf)
            arg = np.full(shape, -1, dtype=np.int64)
            for j, e in enumerate(errors):
                w = [int(weights[k][l][j]) for k in range(R)]
                if any(wk > ck for wk, ck in zip(w, caps)):
                    continue
                src = tuple(slice(0, c + 1 - wk) for wk, c in zip(w, caps))
                dst = tuple(slice(wk, c + 1) for wk, c in zip(w, caps))
                cand = f[src] + e
                better = cand < new[dst]
                new[dst] = np.where(better, cand, new[dst])
                arg[dst] = np.where(better, j, arg[dst])
            f = new
            back.append(arg)
        at = tuple(caps)
        if not np.isfinite(f[at]):
            res = problem.resources[0]
            idx = [int(np.argmin(t)) for t in problem.cost_tables[res]]
            return finish(problem, self.name, idx, Status.INFEASIBLE, t0=t0,
                          message=infeasible_message(problem))
        idx = [0] * len(problem.curves)
        pos = list(caps)
        for l in range(len(problem.curves) - 1, -1, -1):  # follow the back-pointers
            j = int(back[l][tuple(pos)])
            idx[l] = j
            pos = [p - int(weights[k][l][j]) for k, p in enumerate(pos)]
        obj = problem.evaluate(idx)[0]
        return finish(problem, self.name, idx, Status.OPTIMAL, lower_bound=obj, t0=t0,
                      info={"cost_states": states, "cells": cells})
