"""The test suite's solver helpers; the ground truth and the contract checks live in the kit (rankalloc.testing).

Import with ``from alloc_support import ...`` (conftest puts tests/ on sys.path).
"""

from __future__ import annotations

EXACT = ("exact", "dp")
"""Solvers that must return the proven optimum (status OPTIMAL)."""

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
