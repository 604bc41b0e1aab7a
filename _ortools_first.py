"""Load OR-tools before cvxpy/highspy can load their own ``libhighs.so.1``.

Both wheels ship a HiGHS library with the same soname. Whichever is loaded first wins, and
OR-tools then fails with an undefined HiGHS symbol. Importing OR-tools here, as the first
thing ``import rankalloc`` does, fixes the common order. When the user imported cvxpy or
highspy before rankalloc, this import fails. :mod:`rankalloc.allocators.cpsat` then runs
CP-SAT in a clean subprocess instead (see ``cpsat.ortools_in_process``).
"""

try:  # pragma: no cover - depends on import order of the host process
    from ortools.sat.python import cp_model as _cp_model  # noqa: F401

    ORTOOLS_IN_PROCESS = True
except ImportError:  # highspy got there first, or ortools is missing
    ORTOOLS_IN_PROCESS = False
