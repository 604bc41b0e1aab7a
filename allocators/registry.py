"""Solver and cost-model registries: plain dicts from a name to a class.

``SOLVERS`` lists the solvers offered to users (``rankalloc allocate --solver NAME``).
``ALL_SOLVERS`` adds the ground-truth solvers kept for tests (``dp``: a pseudo-polynomial
dynamic program for small single-budget instances).

Adding your own solver or cost model takes one file::

    # my_solver.py
    from dataclasses import dataclass
    import time
    from rankalloc.allocators.allocation import Status, finish, infeasible
    from rankalloc.allocators.registry import register_solver

    @dataclass(frozen=True)
    class Cheapest:
        name: str = "cheapest"

        def solve(self, problem):
            t0 = time.perf_counter()
            if (out := infeasible(problem, self.name, t0)) is not None:
                return out
            res = problem.resources[0]
            idx = [int(t.argmin()) for t in problem.cost_tables[res]]
            return finish(problem, self.name, idx, Status.FEASIBLE, t0=t0)

    register_solver("cheapest", Cheapest)

then ``import my_solver`` in Python, or ``rankalloc allocate --plugin my_solver.py --solver cheapest``
on the command line (:func:`load_plugin`). A cost model is registered the same way with
:func:`register_cost_model` (see :mod:`rankalloc.allocators.costs` for its contract); budgets
on that resource name then price candidates with it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from rankalloc.allocators.costs import COST_MODELS
from rankalloc.allocators.dp import DynamicProgram
from rankalloc.allocators.epsilon import UniformEpsilon
from rankalloc.allocators.exact import Exact
from rankalloc.allocators.greedy import Greedy
from rankalloc.allocators.iprs import IPRS
from rankalloc.allocators.lagrangian import Lagrangian
from rankalloc.allocators.uniform import Uniform

SOLVERS: dict[str, type] = {
    "uniform": Uniform,
    "greedy": Greedy,
    "lagrangian": Lagrangian,
    "exact": Exact,
    "iprs": IPRS,
    "epsilon": UniformEpsilon,
}
"""User-facing solvers: name -> class (a frozen dataclass with ``name`` and ``solve(problem)``)."""

GROUND_TRUTH: dict[str, type] = {"dp": DynamicProgram}
"""Solvers kept for tests and checks, not offered on the command line."""

ALL_SOLVERS: dict[str, type] = {**SOLVERS, **GROUND_TRUTH}
"""Every registered solver; the shared test table runs all of them."""

__all__ = ["ALL_SOLVERS", "COST_MODELS", "GROUND_TRUTH", "SOLVERS", "get_solver", "load_plugin",
           "register_cost_model", "register_solver", "solver_options"]


def _check_name(what: str, name) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or " " in name:
        raise ValueError(f"{what}: expected a non-empty name without spaces, received {name!r}")


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options a registered solver accepts (its dataclass fields other than ``name``)."""
    cls = _lookup(name)
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name != "name")
    return ()


def _lookup(name: str) -> type:
    if name not in ALL_SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {', '.join(SOLVERS)}")
    return ALL_SOLVERS[name]


def get_solver(name: str, **options):
    """Construct the solver registered as ``name`` with keyword ``options`` (e.g. ``time_limit=5``).

    Raises ``ValueError`` listing the known solvers for an unknown name, and listing the
    accepted options for an unknown option.
    """
    cls = _lookup(name)
    accepted = solver_options(name)
    unknown = [k for k in options if k not in accepted]
    if unknown and dataclasses.is_dataclass(cls):
        raise ValueError(f"solver {name!r}: unknown option(s) {unknown}; expected a subset of "
                         f"{list(accepted) or '(no options)'}")
    return cls(**options)


def register_solver(name: str, cls: type, *, replace: bool = False) -> type:
    """Make ``cls`` available as solver ``name`` (in ``SOLVERS`` and ``ALL_SOLVERS``); returns ``cls``.

    ``cls()`` must construct without arguments and have ``solve(problem) -> Allocation``.
    Re-registering an existing name raises ``ValueError`` unless ``replace=True``.
    """
    _check_name("register_solver", name)
    if not isinstance(cls, type) or not callable(getattr(cls, "solve", None)):
        raise ValueError(f"register_solver({name!r}): expected a class with a solve(problem) method, "
                         f"received {cls!r}")
    if name in ALL_SOLVERS and ALL_SOLVERS[name] is not cls and not replace:
        raise ValueError(f"register_solver: a solver named {name!r} is already registered "
                         f"({ALL_SOLVERS[name].__name__}); pass replace=True to override it")
    SOLVERS[name] = cls
    ALL_SOLVERS[name] = cls
    return cls


def register_cost_model(name: str, cls: type, *, replace: bool = False) -> type:
    """Make cost model ``cls`` available as resource ``name`` (in ``COST_MODELS``); returns ``cls``.

    ``cls()`` must construct without arguments and provide ``cost(component, ranks, sparsity)``
    and ``dense(component)``. Re-registering an existing name raises ``ValueError`` unless
    ``replace=True``.
    """
    _check_name("register_cost_model", name)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("cost", "dense")):
        raise ValueError(f"register_cost_model({name!r}): expected a class with cost(component, ranks, "
                         f"sparsity) and dense(component) methods, received {cls!r}")
    if name in COST_MODELS and COST_MODELS[name] is not cls and not replace:
        raise ValueError(f"register_cost_model: a cost model named {name!r} is already registered "
                         f"({COST_MODELS[name].__name__}); pass replace=True to override it")
    COST_MODELS[name] = cls
    return cls


def load_plugin(path) -> object:
    """Execute the Python file ``path`` once (it calls :func:`register_solver` / :func:`register_cost_model`).

    Returns the loaded module. Raises ``FileNotFoundError`` for a missing file.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plugin file {path} does not exist")
    if path.suffix != ".py":
        raise ValueError(f"plugin {path}: expected a Python file ending in .py, received {path.name!r}")
    module_name = f"rankalloc_plugin_{path.stem}_{abs(hash(str(path))):x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
