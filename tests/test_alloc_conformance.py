"""The library's own solvers and cost models, run through the kit users run on theirs (rankalloc.testing).

* every registered solver passes :func:`rankalloc.testing.check_solver`: the conformance table
  (:data:`rankalloc.testing.KNOWN`, problems with hand-derived optima) and the contract's properties on
  random problems (budgets held, honest INFEASIBLE, objective recomputed from the choices, never below the
  brute-force optimum, valid lower bounds, honest OPTIMAL, ranks on the grid, problem unchanged,
  deterministic, order-invariant, the declared number of budgets refused beyond it);
* every built-in cost model passes :func:`rankalloc.testing.check_cost_model`;
* what the kit does not ask of every solver: the table's optima equal brute force and are unique, and the
  exact-type solvers (``exact``, ``dp``) return the optimal choices with status OPTIMAL.

A registered solver whose module is missing fails here.
"""

from __future__ import annotations

import pytest

from alloc_support import EXACT, make_solver
from rankalloc.allocators.allocation import Status
from rankalloc.allocators.costs import Bytes, FlatParams, KVCache
from rankalloc.allocators.registry import ALL_SOLVERS, COST_MODELS  # a missing module fails collection, loudly
from rankalloc.testing import KNOWN, SOLVER_CHECKS, brute_force, check_cost_model, check_solver, known_problem, tol

EXPECTED_SOLVERS = ("uniform", "greedy", "lagrangian", "exact", "iprs", "epsilon", "dp")
"""Every solver the project ships; the registry must hold them all."""

SOLVER_NAMES = tuple(dict.fromkeys((*EXPECTED_SOLVERS, *ALL_SOLVERS)))
"""Every registered solver (and every expected one: an unregistered one fails)."""

EXAMPLES = 100
"""Random problems per group of checks here (``rankalloc check`` runs 200): about 3 s a solver, 6 s for exact."""

COSTS = {**{name: None for name in COST_MODELS}, "kv-all-kinds": KVCache(bytes_per_value=1.0, kinds=("k", "v", "q")),
         "bytes-fp8": Bytes(dtype="fp8"), "flat-params": FlatParams(head_dim=64, heads=8, kv_heads=2)}
"""The registered cost models (built with defaults) and a few built-ins with other settings."""


def test_every_expected_solver_is_registered():
    """The registry lists every solver module the project ships (importing it fails loudly if one is missing)."""
    from rankalloc.allocators.registry import SOLVERS

    assert set(EXPECTED_SOLVERS) <= set(ALL_SOLVERS), sorted(set(EXPECTED_SOLVERS) - set(ALL_SOLVERS))
    assert "dp" not in SOLVERS, "the dynamic program is a test ground truth, not a user-facing solver"
    for name, cls in ALL_SOLVERS.items():
        assert cls().name == name, f"registered {name!r} but {cls.__name__}().name == {cls().name!r}"


@pytest.mark.parametrize("solver_name", SOLVER_NAMES)
def test_solver_passes_the_kit(solver_name):
    """check_solver passes every check (IPRS's two-budget table problem counts as a correct refusal)."""
    table = check_solver(make_solver(solver_name), examples=EXAMPLES)
    failed = table[~table.passed]
    assert failed.empty, "\n".join(f"{r.check}: {r.detail}\n  {r.example}" for r in failed.itertuples())
    assert tuple(table.check) == SOLVER_CHECKS


@pytest.mark.parametrize("cost_name", list(COSTS))
def test_cost_model_passes_the_kit(cost_name):
    """check_cost_model passes every check for every registered cost model and a few other settings."""
    table = check_cost_model(COSTS[cost_name] or cost_name, examples=EXAMPLES)
    failed = table[~table.passed]
    assert failed.empty, "\n".join(f"{r.check}: {r.detail}\n  {r.example}" for r in failed.itertuples())


@pytest.mark.parametrize("problem_name", list(KNOWN))
def test_table_optimum_matches_brute_force(problem_name):
    """The hand-derived optimum (and its unique choices) equals exhaustive enumeration."""
    known, problem = KNOWN[problem_name], known_problem(problem_name)
    best, idx, count = brute_force(problem)
    if known.optimum is None:
        assert best is None
        return
    assert best == pytest.approx(known.optimum, abs=1e-12)
    assert count == 1, f"{problem_name}: the optimum should be unique, found {count}"
    chosen = {cv.component.name: cv.choice(j) for cv, j in zip(problem.curves, idx)}
    assert chosen == known.choices


@pytest.mark.parametrize("problem_name", [n for n, k in KNOWN.items() if k.optimum is not None])
@pytest.mark.parametrize("solver_name", EXACT)
def test_exact_solvers_return_the_known_optimum(solver_name, problem_name):
    """exact and dp return the table's optimal choices with status OPTIMAL and a tight lower bound."""
    known, problem = KNOWN[problem_name], known_problem(problem_name)
    alloc = make_solver(solver_name).solve(problem)
    assert alloc.status == Status.OPTIMAL, f"{solver_name}: expected status optimal, received {alloc.status}"
    assert alloc.objective == pytest.approx(known.optimum, abs=tol(problem))
    assert alloc.choices == known.choices
    if alloc.lower_bound is not None:
        assert alloc.lower_bound == pytest.approx(known.optimum, abs=tol(problem) + 1e-6 * known.optimum)
