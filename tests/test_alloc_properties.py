"""Hypothesis properties of the library's own solvers that the kit does not ask of every solver.

The contract every solver must meet (budgets held, honest INFEASIBLE, objective recomputed from the
choices and never below the brute-force optimum, valid lower bounds, honest OPTIMAL, ranks on the grid,
problem unchanged, deterministic, order-invariant, declared budget count) is checked for every registered
solver through :func:`rankalloc.testing.check_solver` in ``test_alloc_conformance.py``. Here: the search
heuristics always find a feasible allocation when one exists, exact solvers match brute force, the
Lagrangian always reports its bound, the LP bound (cvxpy) sits between, and the exact objective is
monotone in the budget. Problems come from :mod:`rankalloc.testing.strategies` (built valid, no filtering).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alloc_support import EXACT, make_solver
from rankalloc.allocators.allocation import Status
from rankalloc.allocators.problem import AllocationProblem, Budget
from rankalloc.testing import brute_force, contract_violations, tol
from rankalloc.testing.strategies import DETERMINISTIC, problems

FAST = settings(DETERMINISTIC, max_examples=25)
SLOW = settings(DETERMINISTIC, max_examples=12)


def _solvable(name: str, problem: AllocationProblem) -> bool:
    cap = getattr(make_solver(name), "max_budgets", None)
    return cap is None or len(problem.budgets) <= cap


def _solve(name: str, problem: AllocationProblem):
    return make_solver(name).solve(problem)


def _feasible(alloc) -> bool:
    return alloc.status in (Status.OPTIMAL, Status.FEASIBLE)


@pytest.mark.parametrize("name", ["greedy", "lagrangian"])
@FAST
@given(problem=problems(n_budgets=1, sparse=True))
def test_search_heuristics_find_a_feasible_allocation(name, problem):
    """With one budget, the search heuristics (greedy, lagrangian) return a feasible allocation whenever one
    exists. (Rule-based solvers, uniform, epsilon and iprs, may report INFEASIBLE when their rule cannot
    meet the budget, e.g. a matrix with no candidate below (1 - removed) of its dense cost.)"""
    alloc = _solve(name, problem)
    assert not contract_violations(problem, alloc, optimum="unknown")
    assert _feasible(alloc) == (problem.infeasibility_message() is None), (alloc.status, alloc.message)


@FAST
@given(problem=problems(n_budgets=(1, 2), sparse=True))
def test_exact_matches_brute_force(problem):
    """The exact solver's objective equals the brute-force optimum (status OPTIMAL), or both call the
    problem infeasible; so does the dynamic program (on problems within its declared max_budgets)."""
    best, _, _ = brute_force(problem)
    for name in EXACT:
        if not _solvable(name, problem):
            continue
        alloc = _solve(name, problem)
        assert not contract_violations(problem, alloc, optimum=best)
        if best is None:
            assert alloc.status == Status.INFEASIBLE, f"{name}: {alloc.status} on an infeasible problem"
        else:
            assert alloc.status == Status.OPTIMAL, f"{name}: {alloc.status} {alloc.message}"
            assert alloc.objective == pytest.approx(best, abs=tol(problem)), name


@FAST
@given(problem=problems(n_budgets=(1, 2), sparse=True))
def test_lagrangian_bound_below_exact(problem):
    """The Lagrangian dual value is a lower bound: it is <= the exact optimum whenever one exists."""
    exact = _solve("exact", problem)
    lag = _solve("lagrangian", problem) if _solvable("lagrangian", problem) else None
    if lag is None or not _feasible(exact):
        return
    assert lag.lower_bound is not None, "Lagrangian must report its dual bound on a feasible problem"
    assert lag.lower_bound <= exact.objective + tol(problem)


@SLOW
@given(problem=problems(n_budgets=(1, 2), sparse=True))
def test_lp_relaxation_bound_below_exact(problem):
    """The LP relaxation (cvx_models.lp_relaxation_bound) is <= the exact optimum, and >= the Lagrangian bound
    minus tolerance (the LP and the Lagrangian dual share the same optimum on the convex hull)."""
    from cvx_models import lp_relaxation_bound

    exact = _solve("exact", problem)
    if not _feasible(exact):
        return
    bound = lp_relaxation_bound(problem)
    assert bound <= exact.objective + tol(problem)
    if _solvable("lagrangian", problem):
        lag = _solve("lagrangian", problem)
        if lag.lower_bound is not None:
            assert lag.lower_bound <= bound + 10 * tol(problem)


@FAST
@given(problem=problems(n_budgets=(1, 2), sparse=True, feasible=True), data=st.data())
def test_exact_monotone_in_budget(problem, data):
    """Loosening one budget (removing less, or raising the limit) never increases the exact objective."""
    k = data.draw(st.integers(0, len(problem.budgets) - 1), label="budget")
    res = problem.resources[k]
    tight = problem.limits[res]
    looser = tight + data.draw(st.floats(0.0, 1.0), label="extra") * max(problem.dense_costs[res] - tight, 0.0)
    budgets = list(problem.budgets)
    budgets[k] = Budget(res, limit=float(looser))
    loose_problem = problem.with_budgets(*budgets)
    a, b = _solve("exact", problem), _solve("exact", loose_problem)
    if _feasible(a):
        assert _feasible(b)
        assert b.objective <= a.objective + tol(problem)
