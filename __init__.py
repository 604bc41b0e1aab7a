"""rankalloc: spend a parameter budget on low-rank factorizations of an LLM's weight matrices.

The pipeline in a few calls (budgets are fractions REMOVED)::

    import rankalloc
    run = rankalloc.prepare()                          # default SmolLM2-135M + gensim Wikipedia text
    prof = rankalloc.profile(run)                      # cached profile store
    problem = rankalloc.problem_for(prof, method="fisher_svd", kind="fisher", removed=0.3)
    allocation = rankalloc.get_solver("exact").solve(problem)
    model, report = rankalloc.compress(run, prof, allocation, method="fisher_svd")
    print(allocation.summary(), rankalloc.evaluate(model, run).ppl)

The allocation core (:mod:`rankalloc.allocators`) needs only numpy, scipy and OR-tools; profiling and
decomposition need torch and transformers. The names above are imported on first use, so ``import rankalloc``
loads no torch.
"""

from rankalloc import _ortools_first  # noqa: F401  (must run before anything imports cvxpy)

__version__ = "0.1.0"

_API = {
    "prepare": "rankalloc.profiling.run",
    "profile": "rankalloc.profiling.run",
    "Run": "rankalloc.profiling.run",
    "method_curves": "rankalloc.decomposers.problems",
    "problem_for": "rankalloc.decomposers.problems",
    "load_allocation": "rankalloc.decomposers.problems",
    "compress": "rankalloc.decomposers.problems",
    "SequentialConfig": "rankalloc.decomposers.sequential",
    "ReprofileConfig": "rankalloc.decomposers.reprofile",
    "reprofile_loop": "rankalloc.decomposers.reprofile",
    "evaluate": "rankalloc.decomposers.evaluate",
    "get_solver": "rankalloc.allocators.registry",
    "get_method": "rankalloc.decomposers.registry",
    "AllocationProblem": "rankalloc.allocators.problem",
    "Budget": "rankalloc.allocators.problem",
    "Allocation": "rankalloc.allocators.allocation",
}
"""Public name -> the module that defines it."""

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rankalloc' has no attribute {name!r}")
