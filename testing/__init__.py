"""A testing kit for your own solvers, cost models and methods: ``pip install rankalloc[testing]`` (it needs hypothesis).

* :func:`check_solver` runs the solver conformance suite (the table of problems with known optima, then
  the contract's properties on random problems) and returns a :class:`pandas.DataFrame`, one row per
  check, with a minimal failing example for each failure; :func:`check_cost_model` does the same for a
  cost model; :func:`~rankalloc.testing.methods.check_method` does it for a decomposition method, end to end on a
  tiny random-weight model (it needs torch and transformers). ``rankalloc check --solver NAME`` / ``--cost NAME``
  / ``--method NAME`` (with ``--plugin FILE.py``) print them.
* :mod:`rankalloc.testing.strategies`: Hypothesis strategies that build valid problems directly, and
  :data:`~rankalloc.testing.strategies.DETERMINISTIC` settings for stable CI runs.
* :data:`KNOWN` (:mod:`rankalloc.testing.conformance`): the problems with hand-derived optima;
  :func:`brute_force` and :func:`tol`: the ground truth of small problems; :func:`contract_violations`:
  every violation of the solver contract by one allocation.

In a test suite::

    from rankalloc.testing import check_solver

    def test_my_solver():
        table = check_solver(MySolver())
        assert table.passed.all(), table[~table.passed].to_string()
"""

if __name__ != "rankalloc.testing":  # one copy of every module (and registry), whatever sys.path holds
    raise ImportError(f"import this package as rankalloc.testing, not {__name__}: the repository root is the "
                      f"package rankalloc (pip install -e .)")

try:
    import hypothesis  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("rankalloc.testing needs hypothesis (and pandas): pip install rankalloc[testing]") from exc

from rankalloc.testing import strategies
from rankalloc.testing.brute import REL_TOL, brute_force, tol
from rankalloc.testing.checks import (COLUMNS, COST_CHECKS, SOLVER_CHECKS, check_cost_model, check_solver,
                                      contract_violations, describe_allocation, describe_problem,
                                      evident_feasible)
from rankalloc.testing.conformance import KNOWN, Known, known_problem

__all__ = ["COLUMNS", "COST_CHECKS", "KNOWN", "Known", "REL_TOL", "SOLVER_CHECKS", "brute_force", "check_cost_model",
           "check_solver", "contract_violations", "describe_allocation", "describe_problem", "evident_feasible",
           "known_problem", "strategies", "tol"]
