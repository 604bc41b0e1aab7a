"""Hypothesis properties of every registered solver on small random problems (built valid by strategies.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alloc_support import EXACT, brute_force, check_contract, make_solver, max_budgets, tol
from rankalloc.allocators.allocation import Status
from rankalloc.allocators.problem import AllocationProblem, Budget
from rankalloc.allocators.registry import ALL_SOLVERS  # a missing solver module fails collection, loudly
from strategies import problems

SOLVER_NAMES = tuple(dict.fromkeys(("uniform", "greedy", "lagrangian", "exact", "iprs", "epsilon", "dp",
                                    *ALL_SOLVERS)))

FAST = settings(derandomize=True, deadline=None, max_examples=25, database=None)
SLOW = settings(derandomize=True, deadline=None, max_examples=12, database=None)


def _solvable(name: str, problem: AllocationProblem) -> bool:
    cap = max_budgets(make_solver(name))
    return cap is None or len(problem.budgets) <= cap


def _solve(name: str, problem: AllocationProblem):
    return make_solver(name).solve(problem)


def _feasible(alloc) -> bool:
    return alloc.status in (Status.OPTIMAL, Status.FEASIBLE)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@FAST
@given(problem=problems(two_budgets=None, sparse=True))
def test_budgets_met_or_infeasible(name, problem):
    """Every solver's allocation meets every budget with its ranks on the grid, or has status INFEASIBLE
    with the minimum achievable cost in its message (a solver over its declared budget count raises
    ValueError). Exact-type solvers call a problem infeasible exactly when brute force finds none."""
    if not _solvable(name, problem):
        with pytest.raises(ValueError, match="budget"):
            _solve(name, problem)
        return
    alloc = _solve(name, problem)
    check_contract(problem, alloc)
    best, _, _ = brute_force(problem)
    if best is None:
        assert not _feasible(alloc), f"{name}: {alloc.status} on an infeasible problem"
    elif name in EXACT:
        assert _feasible(alloc), f"{name}: brute force finds a feasible allocation, received {alloc.status}"


@pytest.mark.parametrize("name", ["greedy", "lagrangian"])
@FAST
@given(problem=problems(two_budgets=False, sparse=True))
def test_search_heuristics_find_a_feasible_allocation(name, problem):
    """With one budget, the search heuristics (greedy, lagrangian) return a feasible allocation whenever one
    exists. (Rule-based solvers, uniform, epsilon and iprs, may report INFEASIBLE when their rule cannot
    meet the budget, e.g. a matrix with no candidate below (1 - removed) of its dense cost.)"""
    alloc = _solve(name, problem)
    check_contract(problem, alloc)
    assert _feasible(alloc) == (problem.infeasibility_message() is None), (alloc.status, alloc.message)


@FAST
@given(problem=problems(two_budgets=None, sparse=True))
def test_exact_matches_brute_force(problem):
    """The exact solver's objective equals the brute-force optimum (status OPTIMAL), or both call the
    problem infeasible; so does the dynamic program (on problems within its declared max_budgets)."""
    best, _, _ = brute_force(problem)
    for name in EXACT:
        if not _solvable(name, problem):
            continue
        alloc = _solve(name, problem)
        check_contract(problem, alloc, best)
        if best is not None:
            assert alloc.status == Status.OPTIMAL, f"{name}: {alloc.status} {alloc.message}"
            assert alloc.objective == pytest.approx(best, abs=tol(problem)), name


@FAST
@given(problem=problems(two_budgets=None, sparse=True))
def test_exact_no_worse_than_any_solver(problem):
    """The exact objective is <= the objective of every other solver's feasible allocation, and every
    reported lower bound (Lagrangian's included) is <= the exact objective."""
    exact = _solve("exact", problem)
    if not _feasible(exact):
        return
    for name in SOLVER_NAMES:
        if name == "exact" or not _solvable(name, problem):
            continue
        alloc = _solve(name, problem)
        if _feasible(alloc):
            assert exact.objective <= alloc.objective + tol(problem), \
                f"exact {exact.objective!r} > {name} {alloc.objective!r}"
        if alloc.lower_bound is not None:
            assert alloc.lower_bound <= exact.objective + tol(problem), \
                f"{name} lower bound {alloc.lower_bound!r} > exact objective {exact.objective!r}"


@FAST
@given(problem=problems(two_budgets=None, sparse=True))
def test_lagrangian_bound_below_exact(problem):
    """The Lagrangian dual value is a lower bound: it is <= the exact optimum whenever one exists."""
    exact = _solve("exact", problem)
    lag = _solve("lagrangian", problem) if _solvable("lagrangian", problem) else None
    if lag is None or not _feasible(exact):
        return
    assert lag.lower_bound is not None, "Lagrangian must report its dual bound on a feasible problem"
    assert lag.lower_bound <= exact.objective + tol(problem)


@SLOW
@given(problem=problems(two_budgets=None, sparse=True))
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
@given(problem=problems(two_budgets=None, sparse=True, feasible=True), data=st.data())
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


@pytest.mark.parametrize("name", SOLVER_NAMES)
@FAST
@given(problem=problems(two_budgets=None, sparse=True, generic=True), data=st.data())
def test_permutation_invariant(name, problem, data):
    """Reordering the components changes nothing: same status, same objective, same choice per name
    (errors are generic, so the optimum and every ratio are unique)."""
    if not _solvable(name, problem):
        return
    order = data.draw(st.permutations(range(len(problem.curves))), label="order")
    shuffled = problem.replace(curves=[problem.curves[i] for i in order])
    a, b = _solve(name, problem), _solve(name, shuffled)
    assert a.status == b.status
    assert a.objective == pytest.approx(b.objective, abs=tol(problem))
    if _feasible(a):
        assert a.choices == b.choices


@pytest.mark.parametrize("name", SOLVER_NAMES)
@FAST
@given(problem=problems(two_budgets=None, sparse=True))
def test_deterministic(name, problem):
    """Solving the same problem twice gives the same choices, status, objective and bound."""
    if not _solvable(name, problem):
        return
    a, b = _solve(name, problem), _solve(name, problem)
    assert (a.status, a.choice_index, a.lower_bound) == (b.status, b.choice_index, b.lower_bound)
    assert a.objective == b.objective


@pytest.mark.parametrize("name", SOLVER_NAMES)
@SLOW
@given(problem=problems(two_budgets=None, sparse=True))
def test_problem_not_mutated(name, problem):
    """A solve leaves the problem's tables unchanged (they are read-only arrays; nothing writes into them)."""
    if not _solvable(name, problem):
        return
    before = (problem.flat.errors.copy(), problem.flat.costs.copy(), dict(problem.limits))
    _solve(name, problem)
    assert np.array_equal(before[0], problem.flat.errors) and np.array_equal(before[1], problem.flat.costs)
    assert before[2] == problem.limits
