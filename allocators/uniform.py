# SVD-LLM (Wang et al., 2024), experiments: one removed fraction rho for every matrix, r = floor(mn(1 - rho) / (m + n))
"""Uniform allocation: every matrix keeps the same fraction ``1 - rho`` of its dense cost.

SVD-LLM uses ``r = floor(mn(1 - rho) / (m + n))`` for each ``m x n`` matrix, snapped down to the
rank grid. Put generally, for any cost model and any number of budgets: budget ``k`` implies the
removed fraction ``rho_k = 1 - B_k / D_k`` (``D_k`` = dense total, ``rho_k`` floored at 0).
Component ``l`` then takes its most expensive candidate (in the first budget's resource; ties
go to the smaller error) whose cost is at most ``(1 - rho_k) d^k_l`` in every resource ``k``.
With parameters and pure low-rank candidates this is exactly SVD-LLM's rule: dense only when
``rho = 0``, because ``r(m+n) <= (1 - rho) mn`` never admits dense for ``rho > 0``.

Summing the per-component caps gives at most ``B_k``, so the budgets hold whenever every
component has an admissible candidate. When one has none, it takes its cheapest candidate, and
the result is FEASIBLE only if the budgets still hold. There is no lower bound.

Otherwise it reports INFEASIBLE, with the largest removed fraction the grid allows uniformly, even
where another, non-uniform allocation would fit: the solver is the uniform rule, not a search for
any feasible allocation, and does not fall back to another rule (a baseline that silently changed
its rule would no longer be the baseline). It declares this in the solver contract:
``exact_feasibility = False`` (:class:`~rankalloc.allocators.allocation.Solver`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import feasible_limits, fits, limits_of, scalar_weights, segment_pick


@register_solver("uniform")
@dataclass(frozen=True)
class Uniform:
    """The SVD-LLM baseline: the same removed fraction for every component."""

    name: str = "uniform"
    max_budgets: ClassVar[int | None] = None
    exact_feasibility: ClassVar[bool | int] = False  # SVD-LLM's rule, not a search: it may refuse a feasible budget

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        dense = component_dense_costs(problem)  # (R, L)
        D = dense.sum(axis=1)
        B = limits_of(problem)
        kept = np.where(D > 0, np.minimum(B / np.where(D > 0, D, 1.0), 1.0), 1.0)  # 1 - rho_k
        idx, short = largest_within(problem, kept[:, None] * dense)
        cost = problem.flat.costs[:, problem.flat.offsets[:-1] + idx].sum(axis=1)
        ok = bool(fits(cost, B))
        info = {"removed": dict(zip(problem.resources, (1.0 - kept).tolist()))}
        msg = ""
        if short.any():
            names = [problem.curves[l].component.name for l in np.flatnonzero(short)]
            info["short"] = names
            msg = (f"uniform: {len(names)} component(s) have no candidate within (1 - rho) of their dense cost "
                   f"and took their cheapest one (first: {names[0]!r}); "
                   + uniform_floor_message(problem, dense))
        if not ok:
            msg = problem.infeasibility_message() or msg or (
                "uniform: the uniform allocation exceeds the budgets; " + uniform_floor_message(problem, dense))
        return finish(problem, self.name, idx, Status.FEASIBLE if ok else Status.INFEASIBLE, t0=t0,
                      message=msg, info=info)


def component_dense_costs(problem: AllocationProblem) -> np.ndarray:
    """Dense cost ``d^k_l`` of every component in every budgeted resource, shape ``(R, L)``."""
    return np.array([[problem.costs[r].dense(c) for c in problem.components] for r in problem.resources],
                    dtype=np.float64).reshape(len(problem.resources), len(problem.curves))


def largest_within(problem: AllocationProblem, caps: np.ndarray):
    """Per component, the most expensive candidate costing at most ``caps[k, l]`` in every resource ``k``.

    "Most expensive" is measured in the first resource; ties go to the smaller error, then to the
    earlier candidate. Returns ``(choice_index, short)``. ``short[l]`` is True when nothing fits
    component ``l``; it then gets its cheapest candidate by scalarised cost (ties: smaller error).
    """
    F = problem.flat
    allowed = np.all(F.costs <= feasible_limits(caps[:, F.owner]), axis=0)
    pos = segment_pick(F.offsets, allowed, F.costs[0], F.errors)
    short = pos < 0
    if short.any():
        s = scalar_weights(problem) @ F.costs
        pos = np.where(short, segment_pick(F.offsets, np.ones(len(s), dtype=bool), -s, F.errors), pos)
    return pos - F.offsets[:-1], short


def uniform_floor_message(problem: AllocationProblem, dense: np.ndarray) -> str:
    """The largest uniform removed fraction each resource allows on this grid, and the limit it needs."""
    F = problem.flat
    parts = []
    for k, res in enumerate(problem.resources):
        cheapest = np.minimum.reduceat(F.costs[k], F.offsets[:-1])
        has = dense[k] > 0
        q = float(np.max(cheapest[has] / dense[k][has])) if has.any() else 0.0
        parts.append(f"{res}: at most {1 - q:.2%} can be removed uniformly, which needs a limit of at least "
                     f"{q * dense[k].sum():.6g} (received {problem.limits[res]:.6g})")
    return "; ".join(parts)
