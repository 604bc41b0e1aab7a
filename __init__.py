"""rankalloc: spend a parameter budget on low-rank factorizations of an LLM's weight matrices.

The allocation core (:mod:`rankalloc.allocators`) needs only numpy/scipy/ortools/cvxpy;
profiling and decomposition need torch and transformers.
"""

from rankalloc import _ortools_first  # noqa: F401  (must run before anything imports cvxpy)

__version__ = "0.1.0"
