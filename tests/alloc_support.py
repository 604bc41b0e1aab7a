"""Shared checks for the solver tests: brute force, tolerances and the solver contract.

Import with ``from alloc_support import ...`` (conftest puts tests/ on sys.path).
"""

from __future__ import annotations

import itertools

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status
from rankalloc.allocators.problem import DENSE, AllocationProblem
from rankalloc.allocators.segments import feasible_limits

EXACT = ("exact", "dp")
"""Solvers that must return the proven optimum (status OPTIMAL)."""

REL_TOL = 1e-6
"""Objective tolerance, relative to the problem's error scale (exact solvers may scale errors to integers)."""

TEST_OPTIONS = {"exact": {"time_limit": 60.0}}
"""Options the tests pass to a solver (a time limit generous enough never to bind on test sizes)."""


def make_solver(name: str):
    """The registered solver ``name`` built with :data:`TEST_OPTIONS` (imports the registry: a missing
    solver module fails loudly here)."""
    from rankalloc.allocators.registry import ALL_SOLVERS, get_solver, solver_options

    if name not in ALL_SOLVERS:
        raise AssertionError(f"solver {name!r} is not registered; registered: {sorted(ALL_SOLVERS)}")
    opts = {k: v for k, v in TEST_OPTIONS.get(name, {}).items() if k in solver_options(name)}
    return get_solver(name, **opts)


def tol(problem: AllocationProblem) -> float:
    """Absolute objective tolerance: REL_TOL times the sum of the largest error of each component."""
    scale = float(sum(e.max() for e in problem.errors))
    return REL_TOL * max(scale, 1e-12) + 1e-12


def brute_force(problem: AllocationProblem) -> tuple[float | None, tuple[int, ...] | None, int]:
    """Enumerate every combination: ``(optimal objective or None if infeasible, one optimal index, #optimal)``.

    ``#optimal`` counts the combinations within :func:`tol` of the optimum (1 = unique optimum).
    """
    sizes = [len(cv) for cv in problem.curves]
    total = int(np.prod(sizes))
    if total > 200_000:
        raise ValueError(f"brute force: {total} combinations is too many for a test")
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


def max_budgets(solver) -> int | None:
    """How many budgets ``solver`` declares it handles (None: any)."""
    return getattr(solver, "max_budgets", None)


def check_contract(problem: AllocationProblem, alloc: Allocation, optimum: float | None | str = "unknown") -> None:
    """Assert the solver contract for one allocation of ``problem``.

    ``optimum`` is the known optimal objective, ``None`` for an infeasible problem, or
    ``"unknown"`` (then only the self-consistency checks run).
    """
    name = alloc.solver
    assert isinstance(alloc, Allocation), f"{name}: expected an Allocation, received {type(alloc).__name__}"
    assert alloc.problem is problem, f"{name}: the allocation must refer to the problem it solved"
    assert len(alloc.choice_index) == len(problem.curves), f"{name}: expected one choice per component"
    for cv, j in zip(problem.curves, alloc.choice_index):
        assert 0 <= j < len(cv), f"{name}: choice {j} out of range for {cv.component.name}"
        r = int(cv.ranks[j])
        assert r == DENSE or (r % problem.grid == 0 and 0 <= r <= cv.component.max_rank), \
            f"{name}: rank {r} of {cv.component.name} is off the grid {problem.grid}"
    obj, cost = problem.evaluate(alloc.choice_index)
    assert np.isclose(alloc.objective, obj, rtol=1e-9, atol=1e-12), f"{name}: objective {alloc.objective} != {obj}"
    for r in problem.resources:
        assert np.isclose(alloc.cost[r], cost[r], rtol=1e-9), f"{name}: cost[{r}] {alloc.cost[r]} != {cost[r]}"
    assert isinstance(alloc.status, Status)
    if alloc.status in (Status.OPTIMAL, Status.FEASIBLE):
        assert problem.is_feasible(alloc.cost), f"{name}: status {alloc.status} but cost {alloc.cost} > {problem.limits}"
    if alloc.status == Status.INFEASIBLE:
        why = problem.infeasibility_message()
        if why is not None:  # some resource cannot be met on its own: its minimum cost must be in the message
            for r in problem.resources:
                if problem.min_costs[r] > feasible_limits(problem.limits[r]):
                    assert f"{problem.min_costs[r]:.6g}" in alloc.message, \
                        f"{name}: infeasible message must give the minimum {r} cost " \
                        f"{problem.min_costs[r]:.6g}; received {alloc.message!r}"
        else:
            assert alloc.message, f"{name}: an infeasible allocation must say why (empty message)"
    if optimum == "unknown":
        return
    t = tol(problem)
    if optimum is None:
        assert alloc.status == Status.INFEASIBLE, f"{name}: the problem is infeasible, received {alloc.status}"
        return
    assert alloc.status in (Status.OPTIMAL, Status.FEASIBLE), \
        f"{name}: the problem is feasible (optimum {optimum:.6g}), received {alloc.status}: {alloc.message}"
    assert alloc.objective >= optimum - t, f"{name}: objective {alloc.objective!r} below the optimum {optimum!r}"
    if alloc.lower_bound is not None:
        assert alloc.lower_bound <= optimum + t, \
            f"{name}: lower bound {alloc.lower_bound!r} exceeds the optimum {optimum!r}"
    if alloc.status == Status.OPTIMAL:
        assert alloc.objective <= optimum + t, \
            f"{name}: status optimal but objective {alloc.objective!r} > optimum {optimum!r}"
