# Pareto sweep (cost vs objective) of any solver over a list of budgets: a combinator, not a solver
"""Trade-off curve of one solver: solve at each budget, keep the non-dominated points.

``pareto_sweep(solver, problem, budgets)`` solves ``problem`` once per budget. A float is a
removed fraction of the first budget's resource; a :class:`Budget` names its own. Each swept
budget replaces the problem's budget on the same resource, and the other budgets stay. A point
is dominated when another point costs no more in the swept resource and has no larger
objective. Only allocations that meet their budgets enter the front.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Sequence

import numpy as np

from rankalloc.allocators.allocation import Allocation, solved
from rankalloc.allocators.problem import AllocationProblem, Budget


@dataclass(frozen=True)
class ParetoPoint:
    """One solve of the sweep: its budget, cost per resource, objective and allocation."""

    budget: Budget
    cost: dict
    objective: float
    allocation: Allocation


@dataclass(frozen=True)
class ParetoFront:
    """Non-dominated points by increasing cost of ``resource``, plus what was dropped and why.

    ``dominated`` also holds exact duplicates of a kept point. ``infeasible`` holds the
    allocations that did not meet their budgets.
    """

    resource: str
    solver: str
    points: tuple[ParetoPoint, ...]
    dominated: tuple[ParetoPoint, ...] = ()
    infeasible: tuple[Allocation, ...] = ()

    @property
    def costs(self) -> np.ndarray:
        return np.array([p.cost[self.resource] for p in self.points])

    @property
    def objectives(self) -> np.ndarray:
        return np.array([p.objective for p in self.points])

    @property
    def removed(self) -> np.ndarray:
        """Fraction of the dense cost of ``resource`` removed at each point."""
        return np.array([p.allocation.removed(self.resource) for p in self.points])

    def to_frame(self):
        """One row per front point: budget, removed fraction, cost per resource, objective, status."""
        import pandas as pd

        return pd.DataFrame([{"budget": p.budget.describe(), "removed": p.allocation.removed(self.resource),
                              **{f"cost_{r}": v for r, v in p.cost.items()}, "objective": p.objective,
                              "status": str(p.allocation.status)} for p in self.points])


def pareto_sweep(solver, problem: AllocationProblem, budgets: Sequence[float | Budget],
                 progress: bool = True) -> ParetoFront:
    """Solve ``problem`` at every budget with ``solver`` and return the non-dominated points.

    Args:
        solver: anything with ``solve(problem) -> Allocation``.
        problem: the problem whose budget on the swept resource is replaced.
        budgets: floats (removed fraction of ``problem.resources[0]``) or :class:`Budget` objects,
            all on the same resource.
        progress: show a progress bar (only on a terminal).

    With an exact solver, every point is optimal at its budget. Then the front is the exact
    cost/objective trade-off at these budgets by construction, and no point is dominated except
    through ties. With a heuristic, the front is what that heuristic achieves.
    """
    if not callable(getattr(solver, "solve", None)):
        raise ValueError(f"pareto_sweep: expected a solver with a solve(problem) method, received {solver!r}")
    if not isinstance(problem, AllocationProblem):
        raise ValueError(f"pareto_sweep: expected an AllocationProblem, received {type(problem).__name__}")
    if isinstance(budgets, (str, Real, Budget)) or not isinstance(budgets, Sequence):
        raise ValueError(f"pareto_sweep: expected a sequence of budgets (floats or Budget), received {budgets!r}")
    if len(budgets) == 0:
        raise ValueError("pareto_sweep: expected at least one budget, received none")
    swept = []
    for b in budgets:
        if isinstance(b, Budget):
            swept.append(b)
        elif isinstance(b, Real) and not isinstance(b, bool):
            swept.append(Budget(problem.resources[0], removed=float(b)))
        else:
            raise ValueError(f"pareto_sweep: expected a float (removed fraction) or a Budget, received {b!r}")
    resources = {b.resource for b in swept}
    if len(resources) != 1:
        raise ValueError(f"pareto_sweep: expected every budget on one resource, received {sorted(resources)}")
    resource = swept[0].resource

    from tqdm import tqdm

    points, infeasible = [], []
    for b in tqdm(swept, desc=f"pareto {getattr(solver, 'name', type(solver).__name__)}",
                  disable=None if progress else True):
        kept = tuple(b if x.resource == resource else x for x in problem.budgets)
        alloc = solved(solver, problem.with_budgets(*kept, *(() if resource in problem.resources else (b,))))
        if alloc.feasible:
            points.append(ParetoPoint(b, dict(alloc.cost), float(alloc.objective), alloc))
        else:
            infeasible.append(alloc)
    front, dominated = [], []
    best = np.inf
    for p in sorted(points, key=lambda p: (p.cost[resource], p.objective)):
        if p.objective < best:
            front.append(p)
            best = p.objective
        else:
            dominated.append(p)
    return ParetoFront(resource, getattr(solver, "name", type(solver).__name__), tuple(front), tuple(dominated),
                       tuple(infeasible))
