"""Deliberately broken solvers and cost models: each breaks one rule of the contract, as a real bug would.

Loaded as a plugin (``rankalloc check --plugin tests/broken_plugins.py --solver broken-objective``) or
imported, the file registers every one (:func:`register`, ``replace=True``: loading twice is harmless);
:func:`unregister` takes them out again, so a test can keep them out of the shared registries.
:data:`BROKEN_SOLVERS` and :data:`BROKEN_COST_MODELS` map each name to the check of ``rankalloc.testing`` it
must fail. Most wrap greedy, which meets the contract, and change one thing.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible, infeasible_message
from rankalloc.allocators.costs import Params
from rankalloc.allocators.greedy import Greedy
from rankalloc.allocators.problem import DENSE, AllocationProblem, Curve
from rankalloc.allocators.registry import register_cost_model, register_solver
from rankalloc.allocators.segments import feasible_limits

BROKEN_SOLVERS = {
    "broken-objective": "objective_matches_choices",
    "broken-bound": "lower_bound_valid",
    "broken-optimal": "optimal_claims_true",
    "broken-random": "deterministic",
    "broken-order": "order_invariant",
    "broken-infeasible": "infeasible_is_true",
    "broken-overbudget": "budgets_held",
    "broken-grid": "ranks_on_grid",
    "broken-budgets": "budget_count",
    "broken-mutates": "problem_unchanged",
    "broken-raises": "budgets_held",
}
"""Broken solver name -> the check it must fail."""

BROKEN_COST_MODELS = {
    "broken-falling": "monotone_in_rank",
    "broken-dense": "dense_matches",
    "broken-sparse": "monotone_in_sparsity",
    "broken-scalar": "vectorized_matches_scalar",
    "broken-impure": "pure",
    "broken-negative": "finite_nonnegative",
}
"""Broken cost model name -> the check it must fail."""


def _greedy(problem: AllocationProblem) -> Allocation:
    return Greedy().solve(problem)


@dataclass(frozen=True)
class UnweightedObjective:
    """Reports the objective without the component weights alpha_l (right only when every weight is 1)."""

    name: str = "broken-objective"

    def solve(self, problem):
        a = _greedy(problem)
        raw = sum(float(cv.errors[j]) for cv, j in zip(problem.curves, a.choice_index))
        return dataclasses.replace(a, solver=self.name, objective=raw)


@dataclass(frozen=True)
class ObjectiveAsBound:
    """Reports its own (heuristic) objective as a certified lower bound."""

    name: str = "broken-bound"

    def solve(self, problem):
        a = _greedy(problem)
        return dataclasses.replace(a, solver=self.name, lower_bound=a.objective if a.feasible else None)


@dataclass(frozen=True)
class ClaimsOptimal:
    """Calls every feasible greedy allocation OPTIMAL."""

    name: str = "broken-optimal"

    def solve(self, problem):
        a = _greedy(problem)
        return dataclasses.replace(a, solver=self.name, status=Status.OPTIMAL if a.feasible else a.status)


@dataclass(frozen=True)
class Unseeded:
    """Greedy, then moves one component chosen by an unseeded random generator to rank 0 when that is cheaper
    in every resource (the allocation stays feasible; it just differs from run to run)."""

    name: str = "broken-random"

    def solve(self, problem):
        a = _greedy(problem)
        if a.status != Status.FEASIBLE:
            return dataclasses.replace(a, solver=self.name)
        idx = list(a.choice_index)
        l = random.SystemRandom().randrange(len(idx) + 1)
        if l < len(idx):
            cheapest = [j for j in range(len(problem.curves[l])) if all(
                problem.cost_tables[r][l][j] <= problem.cost_tables[r][l][idx[l]] for r in problem.resources)]
            idx[l] = min(cheapest, key=lambda j: (problem.cost_tables[problem.resources[0]][l][j], j))
        return finish(problem, self.name, idx, Status.FEASIBLE)


@dataclass(frozen=True)
class FirstComeFirstServed:
    """One budget: components in the given order each take their least-error candidate that still leaves the
    cheapest candidates of the rest within the budget. Feasible, but the first components win."""

    name: str = "broken-order"
    max_budgets: ClassVar[int] = 1

    def solve(self, problem):
        t0 = time.perf_counter()
        if len(problem.budgets) > 1:
            raise ValueError(f"{self.name} handles one budget, received {len(problem.budgets)}")
        if (out := infeasible(problem, self.name, t0)) is not None:
            return out
        table = problem.cost_tables[problem.resources[0]]
        left = float(feasible_limits(problem.limits[problem.resources[0]])) - sum(float(t.min()) for t in table)
        idx = []
        for l, (costs, errors) in enumerate(zip(table, problem.errors)):
            extra = costs - costs.min()
            ok = np.flatnonzero(extra <= left)
            j = int(ok[np.lexsort((costs[ok], errors[ok]))[0]])
            left -= float(extra[j])
            idx.append(j)
        return finish(problem, self.name, idx, Status.FEASIBLE, t0=t0)


@dataclass(frozen=True)
class GivesUpEarly:
    """Says INFEASIBLE, with the minimum achievable cost, whenever the budget removes more than a third."""

    name: str = "broken-infeasible"

    def solve(self, problem):
        r = problem.resources[0]
        dense = problem.dense_costs[r]
        if dense and problem.limits[r] < 2 / 3 * dense:
            idx = [int(np.argmin(t)) for t in problem.cost_tables[r]]
            return finish(problem, self.name, idx, Status.INFEASIBLE,
                          message=f"infeasible: {r} budget {problem.limits[r]:.6g} is below the minimum achievable "
                                  f"cost {problem.min_costs[r]:.6g}; {infeasible_message(problem)}")
        return dataclasses.replace(_greedy(problem), solver=self.name)


@dataclass(frozen=True)
class KeepsEverythingDense:
    """Keeps every matrix at its least-error candidate and calls it FEASIBLE, whatever the budget. It builds the
    Allocation directly, because finish() refuses an over-budget FEASIBLE."""

    name: str = "broken-overbudget"

    def solve(self, problem):
        idx = tuple(int(np.argmin(e)) for e in problem.errors)
        obj, cost = problem.evaluate(idx)
        return Allocation(problem, self.name, Status.FEASIBLE, idx, obj, cost)


@dataclass(frozen=True)
class OneBelowTheGrid:
    """Greedy, then each low-rank choice r >= 1 moves to rank r - 1, off the grid (it is cheaper, so the budget
    still holds), in a copy of the problem on grid 1 that lists those ranks."""

    name: str = "broken-grid"

    def solve(self, problem):
        a = _greedy(problem)
        if problem.grid == 1 or not a.feasible:
            return dataclasses.replace(a, solver=self.name)
        curves, idx = [], []
        for cv, j in zip(problem.curves, a.choice_index):
            r, k = int(cv.ranks[j]), float(cv.sparsity[j])
            if r >= 1 and r != DENSE:
                cv = Curve(cv.component, np.append(cv.ranks, r - 1), np.append(cv.errors, cv.errors[j]),
                           np.append(cv.sparsity, k))
                j = int(np.flatnonzero((cv.ranks == r - 1) & (cv.sparsity == k))[0])
            curves.append(cv)
            idx.append(j)
        off = problem.replace(curves=curves, grid=1)
        obj, cost = off.evaluate(idx)
        return Allocation(off, self.name, Status.FEASIBLE, tuple(idx), obj, cost)


@dataclass(frozen=True)
class IgnoresItsCap:
    """Declares one budget but solves any number (it only looks at the first one)."""

    name: str = "broken-budgets"
    max_budgets: ClassVar[int] = 1

    def solve(self, problem):
        first = problem.with_budgets(problem.budgets[0])
        a = _greedy(first)
        if a.status == Status.INFEASIBLE:
            return finish(problem, self.name, a.choice_index, Status.INFEASIBLE, message=a.message)
        obj, cost = problem.evaluate(a.choice_index)
        return Allocation(problem, self.name, Status.FEASIBLE, a.choice_index, obj, cost)


@dataclass(frozen=True)
class DropsWeights:
    """Clears the problem's weights dict in place (a "normalisation" step), then solves."""

    name: str = "broken-mutates"

    def solve(self, problem):
        a = _greedy(problem)
        problem.weights.clear()
        return dataclasses.replace(a, solver=self.name)


@dataclass(frozen=True)
class RaisesOnSparse:
    """Raises a KeyError on any problem with sparse + low-rank candidates."""

    name: str = "broken-raises"

    def solve(self, problem):
        if any((cv.sparsity > 0).any() for cv in problem.curves):
            raise KeyError("sparsity")
        return dataclasses.replace(_greedy(problem), solver=self.name)


# ----------------------------------------------------------------------------- cost models
@dataclass(frozen=True)
class Falling:
    """The cost falls as the rank grows: ``(min(m, n) - r)(m + n)`` (what a sign slip gives); dense ``m n``."""

    name: str = "broken-falling"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        r = np.asarray(ranks, dtype=np.float64)
        return np.where(r == DENSE, component.m * component.n,
                        (component.max_rank - r) * (component.m + component.n))

    def dense(self, component):
        return float(component.m * component.n)


@dataclass(frozen=True)
class HalfDense:
    """Params, but dense() counts half the matrix (a triangular-storage assumption cost() does not share)."""

    name: str = "broken-dense"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        return Params().cost(component, ranks, sparsity)

    def dense(self, component):
        return component.m * component.n / 2.0


@dataclass(frozen=True)
class SparsityInverted:
    """Params, but the sparse part is priced by the fraction dropped, ``1 - k``, instead of the fraction kept."""

    name: str = "broken-sparse"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        k = np.asarray(sparsity, dtype=np.float64)
        return Params().cost(component, ranks, np.where(k > 0, 1.0 - k, 0.0))

    def dense(self, component):
        return Params().dense(component)


@dataclass(frozen=True)
class FirstRankOnly:
    """Prices every candidate of a call at the first one's rank (a scalar function applied to a vector)."""

    name: str = "broken-scalar"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        r = np.asarray(ranks)
        return Params().cost(component, np.full(r.shape, r.flat[0]), np.zeros(r.shape))

    def dense(self, component):
        return Params().dense(component)


_CALLS = [0]


@dataclass(frozen=True)
class CountsCalls:
    """Params plus one per call made so far (a hidden counter)."""

    name: str = "broken-impure"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        _CALLS[0] += 1
        return Params().cost(component, ranks, sparsity) + np.where(np.asarray(ranks) == DENSE, 0.0, _CALLS[0])

    def dense(self, component):
        return Params().dense(component)


@dataclass(frozen=True)
class Savings:
    """Counts parameters saved relative to dense, ``r(m + n) - m n``: negative below break-even."""

    name: str = "broken-negative"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        r = np.asarray(ranks, dtype=np.float64)
        return np.where(r == DENSE, 0.0, r * (component.m + component.n) - component.m * component.n)

    def dense(self, component):
        return 0.0


SOLVER_CLASSES = {"broken-objective": UnweightedObjective, "broken-bound": ObjectiveAsBound,
                  "broken-optimal": ClaimsOptimal, "broken-random": Unseeded, "broken-order": FirstComeFirstServed,
                  "broken-infeasible": GivesUpEarly, "broken-overbudget": KeepsEverythingDense,
                  "broken-grid": OneBelowTheGrid, "broken-budgets": IgnoresItsCap, "broken-mutates": DropsWeights,
                  "broken-raises": RaisesOnSparse}
COST_CLASSES = {"broken-falling": Falling, "broken-dense": HalfDense, "broken-sparse": SparsityInverted,
                "broken-scalar": FirstRankOnly, "broken-impure": CountsCalls, "broken-negative": Savings}
assert SOLVER_CLASSES.keys() == BROKEN_SOLVERS.keys() and COST_CLASSES.keys() == BROKEN_COST_MODELS.keys()


def register() -> None:
    """Register every broken solver and cost model under its name."""
    for name, cls in SOLVER_CLASSES.items():
        register_solver(name, cls, replace=True)
    for name, cls in COST_CLASSES.items():
        register_cost_model(name, cls, replace=True)


def unregister() -> None:
    """Take every broken solver and cost model out of the registries."""
    from rankalloc.allocators import registry

    for table in (registry.SOLVERS, registry.GROUND_TRUTH, registry.ALL_SOLVERS):
        for name in SOLVER_CLASSES:
            table.pop(name, None)
    for name in COST_CLASSES:
        registry.COST_MODELS.pop(name, None)


register()
