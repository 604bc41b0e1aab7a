# Plugin registry: solver and cost-model names -> classes; each built-in registers itself in its own module
"""Solver and cost-model registries: plain dicts from a name to a class.

``SOLVERS`` lists the solvers offered to users (``rankalloc allocate --solver NAME``).
``GROUND_TRUTH`` holds the solvers kept for tests (``dp``: a pseudo-polynomial dynamic program for
small instances), ``ALL_SOLVERS`` both. ``COST_MODELS`` maps a resource name to its cost model.

There is no central list: every solver and cost model registers itself where it is defined
(``@register_solver("greedy")`` on the class). The first lookup (:func:`get_solver`,
:func:`get_cost_model`, or reading ``SOLVERS``/``ALL_SOLVERS``/``GROUND_TRUTH``/``COST_MODELS``
from this module) imports every module of :mod:`rankalloc.allocators` once, so a new built-in only
needs its file. This module imports nothing from the package at import time, so any module may
import it.

Adding your own solver or cost model takes one file::

    # my_solver.py
    from dataclasses import dataclass
    import time
    from rankalloc.allocators.allocation import Status, finish, infeasible
    from rankalloc.allocators.registry import register_solver

    @register_solver("cheapest")          # or, after the class: register_solver("cheapest", Cheapest)
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

then ``import my_solver`` in Python, or ``rankalloc allocate --plugin my_solver.py --solver cheapest``
on the command line (:func:`load_plugin`). A cost model is registered the same way with
:func:`register_cost_model` (see :mod:`rankalloc.allocators.costs` for its contract); budgets
on that resource name then price candidates with it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

_SOLVERS: dict[str, type] = {}
"""``SOLVERS``: user-facing solvers, name -> class (a frozen dataclass with ``name`` and ``solve(problem)``)."""
_GROUND_TRUTH: dict[str, type] = {}
"""``GROUND_TRUTH``: solvers kept for tests and checks, not offered on the command line."""
_ALL_SOLVERS: dict[str, type] = {}
"""``ALL_SOLVERS``: every registered solver; the shared test table runs all of them."""
_COST_MODELS: dict[str, type] = {}
"""``COST_MODELS``: resource name -> cost model class (constructed with defaults)."""
_PUBLIC = {"SOLVERS": _SOLVERS, "GROUND_TRUTH": _GROUND_TRUTH, "ALL_SOLVERS": _ALL_SOLVERS,
           "COST_MODELS": _COST_MODELS}
_discovered = False

__all__ = ["ALL_SOLVERS", "COST_MODELS", "GROUND_TRUTH", "SOLVERS", "get_cost_model", "get_solver", "load_plugin",
           "register_cost_model", "register_solver", "solver_options"]


def __getattr__(name: str):
    """``SOLVERS``, ``GROUND_TRUTH``, ``ALL_SOLVERS``, ``COST_MODELS``: the registries, built-ins discovered."""
    if name in _PUBLIC:
        _discover()
        return _PUBLIC[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))


def _discover() -> None:
    """Import every module of the package once, so each built-in solver and cost model registers itself.

    The built-in solvers are then listed by name, ahead of any plugin (whatever the import order was).
    """
    global _discovered
    if _discovered:
        return
    _discovered = True  # before importing: a module that reads the registry while loading must not recurse
    package = __name__.rpartition(".")[0]
    try:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
    except BaseException:
        _discovered = False
        raise
    for table in (_SOLVERS, _GROUND_TRUTH, _ALL_SOLVERS):
        builtin = sorted((k, v) for k, v in table.items() if v.__module__.startswith(package + "."))
        plugins = [(k, v) for k, v in table.items() if not v.__module__.startswith(package + ".")]
        table.clear()
        table.update(builtin + plugins)


def _check_name(what: str, name) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or " " in name:
        raise ValueError(f"{what}: expected a non-empty name without spaces, received {name!r}")


def _lookup(name: str) -> type:
    """The one check of a solver name (ValueError listing the user-facing solvers)."""
    _discover()
    if name not in _ALL_SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {', '.join(_SOLVERS)}")
    return _ALL_SOLVERS[name]


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options a registered solver accepts (its dataclass fields other than ``name``)."""
    cls = _lookup(name)
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name != "name")
    return ()


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


def get_cost_model(name: str) -> type:
    """The cost model class registered as resource ``name`` (``ValueError`` listing the known names)."""
    _discover()
    if name not in _COST_MODELS:
        raise ValueError(f"unknown cost {name!r}: expected one of {', '.join(_COST_MODELS)}")
    return _COST_MODELS[name]


def register_solver(name: str, cls: type | None = None, *, replace: bool = False, ground_truth: bool = False):
    """Make ``cls`` available as solver ``name``; returns ``cls``. Without ``cls``, a class decorator.

    The solver goes in ``SOLVERS`` and ``ALL_SOLVERS``, or with ``ground_truth=True`` in
    ``GROUND_TRUTH`` and ``ALL_SOLVERS`` only (kept for tests, not offered to users). ``cls()`` must
    construct without arguments and have ``solve(problem) -> Allocation``. Re-registering an
    existing name raises ``ValueError`` unless ``replace=True``.
    """
    _check_name("register_solver", name)
    if cls is None:
        return lambda c: register_solver(name, c, replace=replace, ground_truth=ground_truth)
    if not isinstance(cls, type) or not callable(getattr(cls, "solve", None)):
        raise ValueError(f"register_solver({name!r}): expected a class with a solve(problem) method, "
                         f"received {cls!r}")
    if name in _ALL_SOLVERS and _ALL_SOLVERS[name] is not cls and not replace:
        raise ValueError(f"register_solver: a solver named {name!r} is already registered "
                         f"({_ALL_SOLVERS[name].__name__}); pass replace=True to override it")
    _SOLVERS.pop(name, None)
    _GROUND_TRUTH.pop(name, None)
    (_GROUND_TRUTH if ground_truth else _SOLVERS)[name] = cls
    _ALL_SOLVERS[name] = cls
    return cls


def register_cost_model(name: str, cls: type | None = None, *, replace: bool = False):
    """Make cost model ``cls`` available as resource ``name`` (in ``COST_MODELS``); returns ``cls``.
    Without ``cls``, a class decorator.

    ``cls()`` must construct without arguments and provide ``cost(component, ranks, sparsity)``
    and ``dense(component)``. Re-registering an existing name raises ``ValueError`` unless
    ``replace=True``.
    """
    _check_name("register_cost_model", name)
    if cls is None:
        return lambda c: register_cost_model(name, c, replace=replace)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("cost", "dense")):
        raise ValueError(f"register_cost_model({name!r}): expected a class with cost(component, ranks, "
                         f"sparsity) and dense(component) methods, received {cls!r}")
    if name in _COST_MODELS and _COST_MODELS[name] is not cls and not replace:
        raise ValueError(f"register_cost_model: a cost model named {name!r} is already registered "
                         f"({_COST_MODELS[name].__name__}); pass replace=True to override it")
    _COST_MODELS[name] = cls
    return cls


PLUGIN_PREFIX = "rankalloc_plugin_"  # the module name of every file load_plugin executes starts with it


def load_plugin(path) -> object:
    """Execute the Python file ``path`` once (it calls :func:`register_solver` / :func:`register_cost_model`).

    Returns the loaded module. Raises ``FileNotFoundError`` for a missing file, and ``ValueError`` naming the file and
    its line when executing it fails (a syntax error, an exception it raises, a registration it gets wrong): the
    plugin's fault, one line, not a bug report for rankalloc.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"plugin file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"plugin {path}: is not a file; expected a Python file ending in .py")
    if path.suffix != ".py":
        raise ValueError(f"plugin {path}: expected a Python file ending in .py, received {path.name!r}")
    module_name = f"{PLUGIN_PREFIX}{path.stem}_{abs(hash(str(path))):x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        syntax = isinstance(exc, SyntaxError) and exc.lineno is not None
        line = exc.lineno if syntax else (plugin_frame(exc) or (path, 0))[1]
        raise ValueError(f"plugin file {path}{f', line {line}' if line else ''}: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def plugin_frame(exc: BaseException) -> tuple[str, int] | None:
    """``(file, line)`` of the deepest frame of ``exc``'s traceback that runs in a file :func:`load_plugin` executed
    (its module name starts with ``PLUGIN_PREFIX``), or None: whether the fault is a plugin's, and where."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(PLUGIN_PREFIX):
            found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return found
