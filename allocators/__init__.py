"""The budget problem, cost models and solvers. Imports no torch."""

if __name__ != "rankalloc.allocators":  # one copy of every module (and registry), whatever sys.path holds
    raise ImportError(f"import this package as rankalloc.allocators, not {__name__}: the repository root is the "
                      f"package rankalloc (pip install -e .)")

from rankalloc.allocators.allocation import Allocation, Solver, Status, finish
from rankalloc.allocators.costs import COST_MODELS, Bytes, CostModel, Flops, KVCache, Params
from rankalloc.allocators.curveset import CurveSet, read_curves
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Choice, Component, Curve

__all__ = [
    "Allocation", "AllocationProblem", "Budget", "Bytes", "COST_MODELS", "Choice", "Component", "CostModel",
    "Curve", "CurveSet", "DENSE", "Flops", "KVCache", "Params", "Solver", "Status", "finish", "read_curves",
]
