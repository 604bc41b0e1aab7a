"""One table of problems with hand-derived optima, run against every registered solver.

Every (solver, problem) pair checks the solver contract:
  * the allocation meets every budget, or has status INFEASIBLE and names the minimum cost;
  * its objective is >= the known optimum, and its lower bound (if any) is <= the optimum;
  * the exact-type solvers (``exact``, ``dp``) return the optimum with status OPTIMAL.

A solver that declares ``max_budgets`` must refuse a problem with more budgets with a
``ValueError`` that names the budgets. A registered solver whose module is missing fails here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from alloc_support import EXACT, brute_force, check_contract, make_solver, max_budgets, tol
from rankalloc.allocators.allocation import Status
from rankalloc.allocators.costs import KVCache, Params
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Choice, Component, Curve
from rankalloc.allocators.registry import ALL_SOLVERS  # a missing solver module fails collection, loudly

EXPECTED_SOLVERS = ("uniform", "greedy", "lagrangian", "exact", "iprs", "epsilon", "dp")
"""Every solver the project ships; the registry must hold them all."""

SOLVER_NAMES = tuple(dict.fromkeys((*EXPECTED_SOLVERS, *ALL_SOLVERS)))
"""The table runs every registered solver (and every expected one: an unregistered one fails)."""


def _curve(name, m, n, ranks, errors, kind="", layer=0, sparsity=None):
    return Curve(Component(name, m, n, kind, layer), np.array(ranks), np.array(errors, dtype=float),
                 None if sparsity is None else np.array(sparsity))


def _problem(curves, budgets, *, grid, weights=None, name=""):
    layers = sorted({cv.component.layer for cv in curves})
    return AllocationProblem(curves, budgets, {b.resource: {"params": Params(), "kv": KVCache()}[b.resource]
                                               for b in budgets},
                             weights=weights, grid=grid, layer_scores={l: 0.2 + 0.1 * l for l in layers}, name=name)


@dataclass(frozen=True)
class Known:
    """A problem, its hand-derived optimal objective (None: infeasible) and its unique optimal choices."""

    build: Callable[[], AllocationProblem]
    optimum: float | None
    choices: dict[str, Choice] | None
    why: str


D = DENSE


def convex_threshold() -> AllocationProblem:
    # Two 128x128 matrices on grid 16: each rank step of 16 costs 16*256 = 4096 params, dense 16384 (= rank 64).
    # Marginal gains per step: A 4,2,1,1(->dense); B 3,1.5,.75,.75. Budget 50% = 4 steps: take 4,3,2,1.5.
    return _problem([_curve("A", 128, 128, [0, 16, 32, 48, D], [8, 4, 2, 1, 0], layer=0),
                     _curve("B", 128, 128, [0, 16, 32, 48, D], [6, 3, 1.5, .75, 0], layer=1)],
                    (Budget("params", removed=0.5),), grid=16, name="convex_threshold")


def weighted_threshold() -> AllocationProblem:
    # As convex_threshold with alpha_B = 4: B's gains become 12,6,3,3. The 4 best steps are B12, B6, A4, B3:
    # B at rank 48 (weighted error 3) and A at rank 16 (error 4). Unweighted, the answer would be (32, 32).
    return _problem([_curve("A", 128, 128, [0, 16, 32, 48, D], [8, 4, 2, 1, 0], layer=0),
                     _curve("B", 128, 128, [0, 16, 32, 48, D], [6, 3, 1.5, .75, 0], layer=1)],
                    (Budget("params", removed=0.5),), grid=16, weights={"B": 4.0}, name="weighted_threshold")


def grid_greedy_trap() -> AllocationProblem:
    # On grid 16 each matrix has one low-rank step: A (32x88) 1920 params for gain 10, B (32x68) 1600 for 5,
    # C (32x50) 1312 for 6; dense is dominated (same error, more params). Limit 3000. Ratio-greedy takes A
    # first (best gain per param) and strands 1080 params (error 11); the optimum is B + C (error 10).
    return _problem([_curve("A", 32, 88, [0, 16, D], [10, 0, 0], layer=0),
                     _curve("B", 32, 68, [0, 16, D], [5, 0, 0], layer=1),
                     _curve("C", 32, 50, [0, 16, D], [6, 0, 0], layer=2)],
                    (Budget("params", limit=3000.0),), grid=16, name="grid_greedy_trap")


def dense_break_even() -> AllocationProblem:
    # 8x8 matrices, rank r costs 16r, dense 64 = rank 4: ranks above 4 cost more than dense for more error.
    # Limit 96 (25% removed). Best: A dense (error 0) + B rank 2 (error 1) = 1; A rank 4 + B rank 2 = 2.
    a = [16, 8, 4, 2, 1, .5, .25, .1, .05]
    b = [4, 2, 1, .5, .25, .125, .0625, .03125, .015]
    return _problem([_curve("A", 8, 8, list(range(9)) + [D], a + [0], layer=0),
                     _curve("B", 8, 8, list(range(9)) + [D], b + [0], layer=1)],
                    (Budget("params", removed=0.25),), grid=1, name="dense_break_even")


def two_budgets() -> AllocationProblem:
    # q, k, v are 8x8 (rank r: 16r params, 2r KV bytes for k/v; dense 64 params, 16 KV bytes).
    # params <= 96 (6 steps), KV <= 4 bytes (k and v ranks sum <= 2). Params alone would give
    # q3 k2 v1 (error 4.5); with the KV cap, k1 v1 (errors 3 + 2) and q takes the rest: dense (0). Total 5.
    return _problem([_curve("q", 8, 8, [0, 1, 2, 3, D], [8, 4, 2, 1, 0], kind="q"),
                     _curve("k", 8, 8, [0, 1, 2, 3, D], [6, 3, 1.5, .75, 0], kind="k"),
                     _curve("v", 8, 8, [0, 1, 2, 3, D], [4, 2, 1, .5, 0], kind="v")],
                    (Budget("params", removed=0.5), Budget("kv", limit=4.0)), grid=1, name="two_budgets")


def sparse_plus_low_rank() -> AllocationProblem:
    # A (8x8) offers rank r plus a kept sparse fraction k: (1, 25%) costs 16 + 16 = 32 for error 2, beating
    # rank 2 (32 params, error 3). Candidates are ordered by sparsity first, so cost is not monotone in index.
    # Limit 48: A (1, 0.25) + B rank 1 = 2 + 2.5 = 4.5.
    return _problem([_curve("A", 8, 8, [0, 1, 2, 0, 1, D], [10, 6, 3, 7, 2, 0], sparsity=[0, 0, 0, .25, .25, 0]),
                     _curve("B", 8, 8, [0, 1, 2, 3, D], [5, 2.5, 1.25, .6, 0], layer=1)],
                    (Budget("params", limit=48.0),), grid=1, name="sparse_plus_low_rank")


def all_dense_at_zero_removed() -> AllocationProblem:
    # Removing 0% leaves exactly the dense cost: every matrix stays dense (error 0); any low-rank choice
    # has a positive error (even full rank, which also costs more than dense).
    return _problem([_curve("A", 8, 8, [0, 4, 8, D], [5, 1, .01, 0], layer=0),
                     _curve("B", 8, 16, [0, 4, 8, D], [3, 2, .02, 0], layer=1)],
                    (Budget("params", removed=0.0),), grid=4, name="all_dense_at_zero_removed")


def infeasible_budget() -> AllocationProblem:
    # No rank 0: the cheapest choices cost 1024 (A, rank 16 = dense) + 1536 (B, rank 16) = 2560 of 3072
    # dense, so at most 16.7% can be removed. Removing 90% must be reported INFEASIBLE with that minimum.
    return _problem([_curve("A", 32, 32, [16, D], [1, 0], layer=0),
                     _curve("B", 32, 64, [16, 32, D], [2, 1, 0], layer=1)],
                    (Budget("params", removed=0.9),), grid=16, name="infeasible_budget")


C = Choice
KNOWN: dict[str, Known] = {
    "convex_threshold": Known(convex_threshold, 3.5, {"A": C(32), "B": C(32)},
                              "convex curves: a global threshold on gain per parameter is optimal"),
    "weighted_threshold": Known(weighted_threshold, 7.0, {"A": C(16), "B": C(48)},
                                "sensitivity weights move the threshold"),
    "grid_greedy_trap": Known(grid_greedy_trap, 10.0, {"A": C(0), "B": C(16), "C": C(16)},
                              "coarse grid: best-ratio-first strands budget"),
    "dense_break_even": Known(dense_break_even, 1.0, {"A": C(D), "B": C(2)},
                              "above break-even rank, dense is the cheaper choice"),
    "two_budgets": Known(two_budgets, 5.0, {"q": C(D), "k": C(1), "v": C(1)},
                         "a KV-cache cap changes the params-optimal answer"),
    "sparse_plus_low_rank": Known(sparse_plus_low_rank, 4.5, {"A": C(1, .25), "B": C(1)},
                                  "two-dimensional (rank, sparsity) choices"),
    "all_dense_at_zero_removed": Known(all_dense_at_zero_removed, 0.0, {"A": C(D), "B": C(D)},
                                       "0% removed is all dense, not an error"),
    "infeasible_budget": Known(infeasible_budget, None, None, "below the minimum achievable cost"),
}

_PROBLEMS: dict[str, AllocationProblem] = {}


def problem_named(name: str) -> AllocationProblem:
    if name not in _PROBLEMS:
        _PROBLEMS[name] = KNOWN[name].build()
    return _PROBLEMS[name]


def test_every_expected_solver_is_registered():
    """The registry lists every solver module the project ships (importing it fails loudly if one is missing)."""
    from rankalloc.allocators.registry import SOLVERS

    assert set(EXPECTED_SOLVERS) <= set(ALL_SOLVERS), sorted(set(EXPECTED_SOLVERS) - set(ALL_SOLVERS))
    assert "dp" not in SOLVERS, "the dynamic program is a test ground truth, not a user-facing solver"
    for name, cls in ALL_SOLVERS.items():
        assert cls().name == name, f"registered {name!r} but {cls.__name__}().name == {cls().name!r}"


@pytest.mark.parametrize("problem_name", list(KNOWN))
def test_table_optimum_matches_brute_force(problem_name):
    """The hand-derived optimum (and its unique choices) equals exhaustive enumeration."""
    known, problem = KNOWN[problem_name], problem_named(problem_name)
    best, idx, count = brute_force(problem)
    if known.optimum is None:
        assert best is None
        return
    assert best == pytest.approx(known.optimum, abs=1e-12)
    assert count == 1, f"{problem_name}: the optimum should be unique, found {count}"
    chosen = {cv.component.name: cv.choice(j) for cv, j in zip(problem.curves, idx)}
    assert chosen == known.choices


@pytest.mark.parametrize("problem_name", list(KNOWN))
@pytest.mark.parametrize("solver_name", SOLVER_NAMES)
def test_solver_on_known_problem(solver_name, problem_name):
    """Contract on a known problem: budgets met (or INFEASIBLE naming the minimum cost), objective >= optimum,
    lower bound <= optimum; exact-type solvers return the optimal choices with status OPTIMAL."""
    known, problem = KNOWN[problem_name], problem_named(problem_name)
    solver = make_solver(solver_name)
    cap = max_budgets(solver)
    if cap is not None and len(problem.budgets) > cap:
        with pytest.raises(ValueError, match="budget"):
            solver.solve(problem)
        return
    alloc = solver.solve(problem)
    check_contract(problem, alloc, known.optimum)
    if solver_name in EXACT:
        if known.optimum is None:
            return
        assert alloc.status == Status.OPTIMAL, f"{solver_name}: expected status optimal, received {alloc.status}"
        assert alloc.objective == pytest.approx(known.optimum, abs=tol(problem))
        assert alloc.choices == known.choices
        if alloc.lower_bound is not None:
            assert alloc.lower_bound == pytest.approx(known.optimum, abs=tol(problem) + 1e-6 * known.optimum)
