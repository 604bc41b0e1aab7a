# A conformance suite for any solver or cost model, run on demand (as scikit-learn's check_estimator)
"""``check_solver`` and ``check_cost_model``: the library's contracts, checked on anyone's solver or cost model.

Each returns a :class:`pandas.DataFrame` with one row per check and the columns :data:`COLUMNS`:
``check`` (its name), ``passed``, ``examples`` (how many problems or inputs it tried, up to and
including the first failure), ``seconds``, ``detail`` (what failed, or what was checked) and ``example``
(the minimal failing example, shrunk by Hypothesis, or ``""``). A solver that raises on a problem it
should handle fails that check; nothing is raised to the caller. Every run is derandomized: the same
examples each time.

The solver checks (:data:`SOLVER_CHECKS`) run on random problems from
:func:`rankalloc.testing.strategies.problems` (a few components: brute force gives the exact optimum)
and on the conformance table :data:`rankalloc.testing.conformance.KNOWN`:

* ``known_optima``: every table problem; the checks below, against its hand-derived optimum; a problem
  with more budgets than the solver declares (``max_budgets``) must be refused.
* ``budgets_held``: an OPTIMAL or FEASIBLE allocation meets every budget (re-priced from its choices).
* ``infeasible_is_true``: INFEASIBLE gives the minimum achievable cost in its message when a budget is
  below it (a reason otherwise), and is never reported on a feasible problem: the ground truth is brute
  force (the table's hand-derived optimum on the table). A solver whose INFEASIBLE cannot be exact says so
  in the solver contract's ``exact_feasibility`` (:class:`~rankalloc.allocators.allocation.Solver`):
  ``False`` (or 0) for a rule that may not meet a budget another allocation meets (``uniform``), an
  integer ``k`` for a heuristic that is exact with at most ``k`` budgets (``greedy``, ``lagrangian`` and
  ``epsilon``: 1, as finding any allocation within several budgets is NP-hard). Beyond its declaration
  it may refuse a feasible problem, with a reason; the row's detail gives the declaration and how many
  feasible problems it refused. An undeclared solver is held to the truth everywhere.
* ``objective_matches_choices``: the allocation refers to the problem solved, has one valid choice per
  component, and its objective and costs equal those recomputed from its choices.
* ``objective_not_below_optimum``: a feasible allocation's objective is >= the exact optimum.
* ``lower_bound_valid``: a reported lower bound is a number <= the exact optimum.
* ``optimal_claims_true``: OPTIMAL is reported only with the optimal objective, never on an
  infeasible problem.
* ``ranks_on_grid``: every choice is a candidate of the problem, its rank on the grid (or dense).
* ``problem_unchanged``: solving leaves the problem as it was.
* ``deterministic``: solving the same problem again, and an equal copy of it, gives the same status,
  choices, objective, costs and bound.
* ``order_invariant``: reordering the components changes nothing (problems without ties).
* ``budget_count``: the solver handles the number of budgets it declares in ``max_budgets`` (None:
  any; checked with three) and refuses one more with a ``ValueError`` that mentions the budgets.

The cost-model checks (:data:`COST_CHECKS`) price random components of every kind at every rank from 0 to
``min(m, n)``, several kept sparsities and dense: ``interface``, ``finite_nonnegative``,
``monotone_in_rank``, ``monotone_in_sparsity``, ``dense_matches``, ``vectorized_matches_scalar`` and
``pure`` (the same call gives the same costs; inputs are read-only; no state changes).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, Phase, Verbosity, find, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException, NoSuchExample

from rankalloc.allocators.allocation import Allocation, Status
from rankalloc.allocators.costs import Params
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component
from rankalloc.allocators.segments import feasible_limits
from rankalloc.testing import strategies as S
from rankalloc.testing.brute import brute_force, tol
from rankalloc.testing.conformance import KNOWN, known_problem

COLUMNS = ("check", "passed", "examples", "seconds", "detail", "example")
"""The columns of the tables :func:`check_solver` and :func:`check_cost_model` return."""

DEFAULT_EXAMPLES = 200
"""Random examples per group of checks in a default run (``thorough=True``: :data:`THOROUGH_EXAMPLES`). On a
loaded 2-core machine a default ``check_solver`` took 6 to 10 s for the heuristics, 12 to 22 s for ``exact``."""

THOROUGH_EXAMPLES = 1000
"""Random examples per group of checks with ``thorough=True`` (about a minute for ``exact`` on 2 cores)."""

SOLVER_CHECKS = ("known_optima", "budgets_held", "infeasible_is_true", "objective_matches_choices",
                 "objective_not_below_optimum", "lower_bound_valid", "optimal_claims_true", "ranks_on_grid",
                 "problem_unchanged", "deterministic", "order_invariant", "budget_count")
"""The rows of :func:`check_solver`, in order."""

COST_CHECKS = ("interface", "finite_nonnegative", "monotone_in_rank", "monotone_in_sparsity", "dense_matches",
               "vectorized_matches_scalar", "pure")
"""The rows of :func:`check_cost_model`, in order."""

OBJECTIVE_RTOL = 1e-9
"""A reported objective or cost may differ from the recomputed one by this fraction (float summation order)."""

EXAMPLE_CHARS = 1500
"""The longest ``example`` text kept in a row."""


@dataclass(frozen=True)
class CheckRow:
    """One row of a check table (see :data:`COLUMNS`)."""

    check: str
    passed: bool
    examples: int
    seconds: float
    detail: str
    example: str = ""

    def __post_init__(self):
        if not self.check:
            raise ValueError("CheckRow: expected a check name")
        if self.examples < 0 or not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"CheckRow {self.check!r}: expected examples >= 0 and seconds >= 0, received "
                             f"{self.examples!r}, {self.seconds!r}")


def _table(rows) -> pd.DataFrame:
    return pd.DataFrame([[getattr(r, c) for c in COLUMNS] for r in rows], columns=list(COLUMNS))


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
                    suppress_health_check=list(HealthCheck))


def _short(text: str, limit: int = EXAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_short(str(exc), 300)}"


# ----------------------------------------------------------------------------- describing examples
def describe_problem(problem: AllocationProblem) -> str:
    """A short text that rebuilds ``problem`` by hand: its summary, then every curve and weight."""
    parts = [problem.describe()]
    for l, cv in enumerate(problem.curves):
        c = cv.component
        cands = ", ".join(f"{cv.choice(j)}={float(cv.errors[j]):.6g}" for j in range(len(cv)))
        w = problem.weights.get(c.name)
        parts.append(f"{c.name} {c.m}x{c.n} kind {c.kind!r} layer {c.layer}"
                     + ("" if w is None else f" weight {w:g}") + f": {cands}")
    parts.append("limits " + ", ".join(f"{r} {v:.10g}" for r, v in problem.limits.items()))
    return "; ".join(parts)


def describe_cost_case(component: Component, ranks, kept) -> str:
    """The input of a cost-model check: the component, then the ranks and kept sparsities priced."""
    c = component
    return (f"component {c.name!r} {c.m}x{c.n} kind {c.kind!r}; ranks {[int(r) for r in ranks]} and dense; "
            f"kept sparsities {[float(k) for k in kept]}")


def describe_allocation(alloc) -> str:
    """Status, objective, bound, costs and choices of an allocation (robust to a malformed one)."""
    if not isinstance(alloc, Allocation):
        return f"returned {type(alloc).__name__}"
    try:
        choices = ", ".join(f"{k}: {v}" for k, v in alloc.choices.items())
    except Exception:  # an index out of range
        choices = f"choice_index {alloc.choice_index!r}"
    lb = "" if alloc.lower_bound is None else f", lower bound {alloc.lower_bound!r}"
    msg = f", message {alloc.message!r}" if alloc.message else ""
    return f"{alloc.status}, objective {alloc.objective!r}{lb}, cost {alloc.cost!r}, choices {{{choices}}}{msg}"


# ----------------------------------------------------------------------------- running one solve
def _solve(solver, problem: AllocationProblem):
    """``(allocation, None)`` or ``(None, why)`` when the solver raised or returned something else."""
    try:
        alloc = solver.solve(problem)
    except Exception as exc:  # a verdict, not a traceback
        return None, f"solve raised {_error(exc)}"
    if not isinstance(alloc, Allocation):
        return None, f"solve returned {type(alloc).__name__}, expected an Allocation"
    return alloc, None


def _snapshot(problem: AllocationProblem):
    return (problem.curves, problem.budgets, dict(problem.weights), dict(problem.layer_scores or {}),
            problem.grid, dict(problem.costs), dict(problem.limits), problem.flat.errors.copy(),
            problem.flat.costs.copy(), tuple(cv.errors.copy() for cv in problem.curves))


def _same_snapshot(a, b) -> str | None:
    names = ("curves", "budgets", "weights", "layer_scores", "grid", "costs", "limits", "flat errors",
             "flat costs", "curve errors")
    for name, x, y in zip(names, a, b):
        if isinstance(x, np.ndarray):
            same = x.shape == y.shape and np.array_equal(x, y)
        elif name == "curve errors":
            same = len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
        elif name in ("curves", "budgets"):
            same = len(x) == len(y) and all(u is v for u, v in zip(x, y))
        else:
            same = x == y
        if not same:
            return f"the problem's {name} changed during solve"
    return None


@dataclass
class Case:
    """One problem, the solver's allocation of it, and the ground truth (computed when first needed)."""

    solver: object
    problem: AllocationProblem
    optimum: object = "brute force"  # or a known optimum (None: infeasible), or "unknown" (not computed)
    alloc: Allocation | None = None
    error: str | None = None
    changed: str | None = None

    @classmethod
    def solve(cls, solver, problem, optimum="brute force") -> "Case":
        before = _snapshot(problem)
        alloc, error = _solve(solver, problem)
        return cls(solver, problem, optimum, alloc, error, _same_snapshot(before, _snapshot(problem)))

    @cached_property
    def best(self) -> float | None:
        """The optimal objective (None: infeasible)."""
        if self.optimum == "brute force":
            return brute_force(self.problem)[0]
        if self.optimum == "unknown":
            raise RuntimeError("Case.best: the optimum is unknown here (optimum='unknown'); no check may need it")
        return self.optimum

    @cached_property
    def priced(self):
        """``(objective, cost)`` recomputed from the choices on the problem solved, or a string saying why not."""
        a, p = self.alloc, self.problem
        idx = a.choice_index
        try:
            idx = tuple(idx)
        except TypeError:
            return f"choice_index {idx!r} is not a sequence"
        if len(idx) != len(p.curves):
            return f"expected one choice per component ({len(p.curves)}), received {len(idx)}"
        for cv, j in zip(p.curves, idx):
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not 0 <= j < len(cv):
                return f"choice {j!r} of {cv.component.name!r} is not an index into its {len(cv)} candidates"
        return p.evaluate(idx)

    def describe(self) -> str:
        out = describe_problem(self.problem)
        if self.alloc is not None:
            out += " -> " + describe_allocation(self.alloc)
        return out


# ----------------------------------------------------------------------------- the checks of one case
def _close(a: float, b: float, scale: float = 0.0) -> bool:
    return abs(a - b) <= OBJECTIVE_RTOL * max(abs(a), abs(b), scale) + 1e-12


def _feasible_status(case: Case) -> bool:
    return case.alloc.status in (Status.OPTIMAL, Status.FEASIBLE)


def _held(case: Case) -> bool:
    """Whether the allocation's re-priced choices meet every budget."""
    return not isinstance(case.priced, str) and case.problem.is_feasible(case.priced[1])


def evident_feasible(problem: AllocationProblem) -> bool:
    """Whether a feasible allocation is evident: every layer has the same matrices (kinds and shapes), and every
    component has a candidate that costs nothing in every budgeted resource. (The model-shaped problems that
    :func:`check_solver` draws besides the general ones; ``infeasible_is_true`` itself asks brute force.)"""
    tables = [problem.cost_tables[r] for r in problem.resources]
    free = all(bool(np.any(np.all([t[l] == 0 for t in tables], axis=0))) for l in range(len(problem.curves)))
    layers: dict[int, list] = {}
    for c in problem.components:
        layers.setdefault(c.layer, []).append((c.kind, c.m, c.n))
    return free and len({tuple(sorted(v)) for v in layers.values()}) == 1


def check_budgets_held(case: Case) -> str | None:
    if not _feasible_status(case) or isinstance(case.priced, str):
        return None
    cost = case.priced[1]
    if not case.problem.is_feasible(cost):
        over = {r: (cost[r], case.problem.limits[r]) for r in case.problem.resources
                if cost[r] > case.problem.limits[r]}
        return f"reported {case.alloc.status} but its choices exceed the budgets (cost, limit): {over}"
    return None


def declared_feasibility(solver) -> tuple[int | None, str | None]:
    """What ``solver`` declares in ``exact_feasibility``: ``(k, None)``, INFEASIBLE is exact on problems with at
    most ``k`` budgets (``None``: any number, also when it declares nothing or True; 0: never), or
    ``(None, why)`` when the declaration is neither a bool nor an integer >= 0 (it is then held to the truth)."""
    value = getattr(solver, "exact_feasibility", True)
    if isinstance(value, (bool, np.bool_)):
        return (None if value else 0), None
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value), None
    return None, (f"exact_feasibility must be True, False or an integer >= 0 (the number of budgets up to which "
                  f"INFEASIBLE is exact), received {value!r}")


def _excused(case: Case) -> bool:
    """Whether the solver's declaration lets it refuse this (feasible) problem."""
    k = declared_feasibility(case.solver)[0]
    return k is not None and len(case.problem.budgets) > k


def check_infeasible_is_true(case: Case) -> str | None:
    """INFEASIBLE names the minimum cost when a budget is below it, and gives a reason otherwise. It is false
    wherever a feasible allocation exists (brute force, or the known optimum), unless the solver declares, in
    ``exact_feasibility``, that its INFEASIBLE is not exact on problems with this many budgets. With
    ``case.optimum == "unknown"`` only the message is checked."""
    a, p = case.alloc, case.problem
    if a.status != Status.INFEASIBLE:
        return None
    for r in [r for r in p.resources if p.min_costs[r] > float(feasible_limits(p.limits[r]))]:
        if f"{p.min_costs[r]:.6g}" not in a.message:
            return (f"INFEASIBLE: the {r} budget {p.limits[r]:.6g} is below the minimum achievable cost "
                    f"{p.min_costs[r]:.6g}, which the message must give; received {a.message!r}")
    if not a.message:
        return "INFEASIBLE with an empty message: expected the reason (the minimum achievable cost)"
    if case.optimum == "unknown" or case.best is None or _excused(case):
        return None
    k = declared_feasibility(case.solver)[0]
    promise = "" if k is None else f" (it declares exact_feasibility={k}: exact with up to {k} budget(s))"
    return (f"reported INFEASIBLE, but a feasible allocation exists (optimum {case.best!r}){promise}: "
            f"{a.message!r}")


def check_objective_matches_choices(case: Case) -> str | None:
    a, p = case.alloc, case.problem
    if a.problem is not p:
        return "the allocation refers to another problem than the one solved"
    if isinstance(case.priced, str):
        return case.priced
    obj, cost = case.priced
    if not isinstance(a.objective, (int, float, np.floating, np.integer)) or not _close(float(a.objective), obj):
        return f"reported objective {a.objective!r}, but its choices give {obj!r}"
    if not isinstance(a.cost, dict) or set(a.cost) != set(p.resources):
        return f"expected a cost for each budgeted resource {list(p.resources)}, received {a.cost!r}"
    for r in p.resources:
        if not _close(float(a.cost[r]), cost[r], p.limits[r] * 1e-6):
            return f"reported {r} cost {a.cost[r]!r}, but its choices cost {cost[r]!r}"
    if not isinstance(a.status, Status):
        return f"expected a Status, received {a.status!r}"
    return None


def check_objective_not_below_optimum(case: Case) -> str | None:
    a = case.alloc
    if a.status == Status.INFEASIBLE or not _held(case) or case.best is None:
        return None
    if float(a.objective) < case.best - tol(case.problem):
        return f"objective {a.objective!r} of a feasible allocation is below the exact optimum {case.best!r}"
    return None


def check_lower_bound_valid(case: Case) -> str | None:
    lb = case.alloc.lower_bound
    if lb is None:
        return None
    if isinstance(lb, bool) or not isinstance(lb, (int, float, np.floating, np.integer)) or math.isnan(lb):
        return f"expected a lower bound that is a number or None, received {lb!r}"
    if case.best is not None and float(lb) > case.best + tol(case.problem):
        return f"lower bound {lb!r} is above the exact optimum {case.best!r}"
    return None


def check_optimal_claims_true(case: Case) -> str | None:
    a = case.alloc
    if a.status != Status.OPTIMAL:
        return None
    if case.best is None:
        return "reported OPTIMAL on an infeasible problem"
    obj = case.priced[0] if not isinstance(case.priced, str) else float(a.objective)
    if max(obj, float(a.objective)) > case.best + tol(case.problem):
        return f"reported OPTIMAL with objective {obj!r}, but the optimum is {case.best!r}"
    return None


def check_ranks_on_grid(case: Case) -> str | None:
    a, p = case.alloc, case.problem
    try:
        choices = a.choices
    except Exception as exc:
        return f"its choices cannot be read ({_error(exc)})"
    for cv in p.curves:
        c = cv.component
        if c.name not in choices:
            return f"no choice for component {c.name!r}"
        ch = choices[c.name]
        r = int(ch.rank)
        if r != DENSE and (r % p.grid or not 0 <= r <= c.max_rank):
            return f"rank {r} of {c.name!r} ({c.m}x{c.n}) is off the grid {p.grid} (multiples up to {c.max_rank})"
        try:
            cv.index_of(ch)
        except ValueError:
            return f"{ch} of {c.name!r} is not one of its candidates"
    return None


def check_problem_unchanged(case: Case) -> str | None:
    return case.changed


SINGLE: dict[str, Callable[[Case], str | None]] = {
    "budgets_held": check_budgets_held,
    "infeasible_is_true": check_infeasible_is_true,
    "objective_matches_choices": check_objective_matches_choices,
    "objective_not_below_optimum": check_objective_not_below_optimum,
    "lower_bound_valid": check_lower_bound_valid,
    "optimal_claims_true": check_optimal_claims_true,
    "ranks_on_grid": check_ranks_on_grid,
    "problem_unchanged": check_problem_unchanged,
}
"""The checks of one allocation of one problem."""


def contract_violations(problem: AllocationProblem, alloc: Allocation, optimum="brute force",
                        solver=None) -> list[str]:
    """Every solver-contract violation of ``alloc``, a solution of ``problem``, as ``"check: why"`` lines.

    ``optimum`` is the known optimal objective (``None``: infeasible), ``"brute force"`` (enumerate it) or
    ``"unknown"`` (only the checks that need no optimum; INFEASIBLE is then checked for its message only).
    ``solver`` (optional) is the solver that made ``alloc``: its ``exact_feasibility`` declaration applies;
    without it an INFEASIBLE on a feasible problem is a violation. An empty list means the allocation is sound.
    """
    case = Case(solver, problem, optimum, alloc)
    need_truth = {"objective_not_below_optimum", "lower_bound_valid", "optimal_claims_true"}
    out = []
    for name, fn in SINGLE.items():
        if optimum == "unknown" and name in need_truth:
            continue
        why = _verdict(fn, case)
        if why:
            out.append(f"{name}: {why}")
    return out


def _verdict(fn, case: Case) -> str | None:
    """``fn(case)``; the solver's error when it raised; a malformed allocation (say, a cost that is no number) is
    a failure too."""
    if case.error is not None:
        return case.error
    try:
        return fn(case)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        return f"malformed allocation ({_error(exc)}): {describe_allocation(case.alloc)}"


def check_deterministic(case: Case) -> str | None:
    for label, problem in (("again", case.problem), ("on an equal copy of the problem", case.problem.replace())):
        other, error = _solve(case.solver, problem)
        if error is not None:
            return f"solving {label}: {error}"
        a, b = case.alloc, other
        if (a.status, tuple(a.choice_index)) != (b.status, tuple(b.choice_index)):
            return (f"solving {label} gave {b.status} with choices {tuple(b.choice_index)}, first "
                    f"{a.status} with {tuple(a.choice_index)}")
        if not _same_number(a.objective, b.objective) or not _same_number(a.lower_bound, b.lower_bound):
            return (f"solving {label} gave objective {b.objective!r} (bound {b.lower_bound!r}), first "
                    f"{a.objective!r} (bound {a.lower_bound!r})")
        if a.cost != b.cost:
            return f"solving {label} gave cost {b.cost!r}, first {a.cost!r}"
    return None


def _same_number(x, y) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return x == y or (math.isnan(x) and math.isnan(y))


# ----------------------------------------------------------------------------- hypothesis plumbing
@dataclass
class _Probe:
    """The first failure of one check over a derandomized run, then shrunk to a minimal example."""

    examples: int = 0
    first: int | None = None
    detail: str = ""
    example: str = ""
    seconds: float = 0.0


def _search(strategy, evaluate: Callable, names, examples: int):
    """Run ``evaluate`` on ``examples`` derandomized examples, then shrink the first failure of each failing check
    to a minimal example (a second :func:`hypothesis.find` on the same sequence). Returns ``{check: _Probe}``.

    ``evaluate(example, only=None)`` returns ``({check: failure or None}, describe)``, ``describe()`` being the
    text of the example and of what the solver or model made of it.
    """
    probes = {n: _Probe() for n in names}
    calls = 0

    def everything(ex) -> bool:
        nonlocal calls
        calls += 1
        verdicts, describe = evaluate(ex)
        for name, why in verdicts.items():
            p = probes[name]
            if p.first is None:
                p.examples = calls
                if why:
                    p.first, p.detail, p.example = calls, why, _short(describe())
        return False

    t0 = time.perf_counter()
    try:
        find(strategy, everything, settings=_settings(examples))
    except NoSuchExample:
        pass
    share = (time.perf_counter() - t0) / max(1, len(probes))
    for p in probes.values():
        p.seconds = share
        if p.first is None:
            p.examples = calls
    for name, p in probes.items():
        if p.first is None:
            continue
        last: dict = {}
        t0 = time.perf_counter()

        def fails(ex, name=name, last=last) -> bool:
            verdicts, describe = evaluate(ex, only=name)
            why = verdicts[name]
            if why:
                last["detail"], last["example"] = why, _short(describe())
            return bool(why)

        try:
            find(strategy, fails, settings=_settings(max(examples, p.first)))
            p.detail, p.example = last["detail"], last["example"]
        except NoSuchExample:  # did not fail again: keep the first failure as found
            p.detail += " (the failure did not reproduce on a second run)"
        except HypothesisException as exc:  # e.g. Flaky: it failed, then passed on the same example
            if last:
                p.detail, p.example = last["detail"], last["example"]
            p.detail += f" (not reproducible on the same example: {type(exc).__name__})"
        p.seconds += time.perf_counter() - t0
    return probes


# ----------------------------------------------------------------------------- check_solver
def _resolve_solver(solver_or_name):
    if isinstance(solver_or_name, str):
        from rankalloc.allocators.registry import get_solver

        return get_solver(solver_or_name)
    if isinstance(solver_or_name, type):
        return solver_or_name()
    return solver_or_name


def _declared_budgets(solver):
    """``(cap, None)`` or ``(None, why)`` when ``max_budgets`` is neither None nor a positive integer."""
    cap = getattr(solver, "max_budgets", None)
    if cap is None:
        return None, None
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        return None, f"max_budgets must be None (any number) or a positive integer, received {cap!r}"
    return int(cap), None


@dataclass(frozen=True)
class _ScaledParams:
    """An extra resource for problems with more budgets than :data:`~rankalloc.testing.strategies.RESOURCES`:
    ``factor`` times the parameter count."""

    factor: float
    name: str
    unit: str = "scaled parameters"

    def cost(self, component, ranks, sparsity):
        return Params().cost(component, ranks, sparsity) * self.factor

    def dense(self, component) -> float:
        return Params().dense(component) * self.factor


def _with_budgets(problem: AllocationProblem, count: int) -> AllocationProblem:
    """``problem`` with ``count`` budgets: its own, then more on scaled parameter counts (a fifth removed each)."""
    costs, budgets = dict(problem.costs), list(problem.budgets)
    k = 2
    while len(budgets) < count:
        name = f"params_x{k}"
        costs[name] = _ScaledParams(float(k), name)
        budgets.append(Budget(name, removed=0.2))
        k += 1
    return problem.replace(costs=costs, budgets=tuple(budgets[:count]))


def _problem_strategies(cap: int | None):
    """Random problems within the declared budget count: any, the evidently feasible ones, and ones without ties.
    At most 5 components of at most 8 candidates: brute force enumerates <= 32768 combinations."""
    top = min(cap or len(S.RESOURCES), len(S.RESOURCES))
    size = dict(n_budgets=(1, top), sparse=True, max_components=5, max_candidates=5)
    general = S.problems(weights=None, layered=None, **size)
    evident = S.problems(weights=None, layered=True, removable=True, **size)
    generic = S.problems(generic=True, layered=None, **size)
    return general, evident, generic


@st.composite
def _permuted(draw, problems):
    problem = draw(problems)
    order = draw(st.permutations(range(len(problem.curves))))
    return problem, tuple(order)


def check_solver(solver_or_name, *, examples: int | None = None, thorough: bool = False) -> pd.DataFrame:
    """Run the solver conformance suite on a solver: one row per check of :data:`SOLVER_CHECKS`.

    Args:
        solver_or_name: a solver object (with ``name`` and ``solve(problem) -> Allocation``), a solver
            class (built without arguments) or a registered solver name.
        examples: random problems per group of checks (default :data:`DEFAULT_EXAMPLES`, or
            :data:`THOROUGH_EXAMPLES` with ``thorough``).
        thorough: run :data:`THOROUGH_EXAMPLES` examples per group.

    Returns:
        a :class:`pandas.DataFrame` with the columns :data:`COLUMNS`; ``table.passed.all()`` is the verdict.

    Raises ``ValueError`` only for an unknown solver name or ``examples < 1``; whatever the solver does is a row.

    >>> from rankalloc.testing import check_solver
    >>> table = check_solver("greedy", examples=5)
    >>> bool(table.passed.all()), list(table.columns)
    (True, ['check', 'passed', 'examples', 'seconds', 'detail', 'example'])
    """
    solver = _resolve_solver(solver_or_name)
    n = int(examples) if examples is not None else (THOROUGH_EXAMPLES if thorough else DEFAULT_EXAMPLES)
    if n < 1:
        raise ValueError(f"check_solver: expected examples >= 1, received {examples!r}")
    rows: dict[str, CheckRow] = {}
    cap, bad_cap = _declared_budgets(solver)
    t0 = time.perf_counter()
    rows["known_optima"] = _known_optima(solver, cap)
    rows["known_optima"] = _timed(rows["known_optima"], t0)
    general, evident, generic = _problem_strategies(cap)
    names = [*SINGLE, "deterministic"]
    refused = {"feasible": 0, "refused": 0}  # feasible problems seen and refused (declared exact_feasibility)
    promise, bad_promise = declared_feasibility(solver)

    def evaluate(ex, only=None):
        case = Case.solve(solver, ex)
        if case.error and cap is None and len(ex.budgets) > 1 and "budget" in case.error.lower():
            case.error += " (a solver that handles fewer budgets declares max_budgets)"
        out = {}
        for name in ([only] if only else names):
            out[name] = _verdict(check_deterministic if name == "deterministic" else SINGLE[name], case)
        if only is None and case.alloc is not None and _excused(case) and case.best is not None:
            refused["feasible"] += 1
            refused["refused"] += case.alloc.status == Status.INFEASIBLE
        return out, case.describe

    probes = _search(st.one_of(general, evident), evaluate, names, n)
    for name in names:
        detail = SOLVER_DETAIL[name] if name != "infeasible_is_true" else _feasibility_detail(promise, refused)
        rows[name] = _row(name, probes[name], detail)
    if bad_promise:  # a malformed declaration fails the row; the solver was held to the truth meanwhile
        row = rows["infeasible_is_true"]
        rows["infeasible_is_true"] = CheckRow(row.check, False, row.examples, row.seconds,
                                              _short(f"{bad_promise}; {row.detail}", 600), row.example)
    rows["order_invariant"] = _order_invariant(solver, generic, n)
    rows["budget_count"] = _budget_count(solver, cap, bad_cap, max(5, n // 3))
    return _table(rows[name] for name in SOLVER_CHECKS)


SOLVER_DETAIL = {
    "budgets_held": "every OPTIMAL or FEASIBLE allocation meets every budget",
    "infeasible_is_true": "INFEASIBLE names the minimum cost, and is never reported on a feasible problem "
                          "(brute force)",
    "objective_matches_choices": "objective and costs equal those recomputed from the choices",
    "objective_not_below_optimum": "no feasible objective below the brute-force optimum",
    "lower_bound_valid": "every lower bound <= the brute-force optimum",
    "optimal_claims_true": "OPTIMAL only with the optimal objective",
    "ranks_on_grid": "every choice is a candidate on the grid",
    "problem_unchanged": "solving leaves the problem unchanged",
    "deterministic": "solving again, and an equal copy, gives the same allocation",
}


def _feasibility_detail(promise: int | None, refused: dict) -> str:
    """The passed detail of ``infeasible_is_true``: the solver's ``exact_feasibility`` and what it refused."""
    if promise is None:
        return SOLVER_DETAIL["infeasible_is_true"]
    if promise == 0:
        said = ("exact_feasibility=False (a rule that may not meet a feasible budget): INFEASIBLE names the minimum "
                "cost or gives its reason")
        where = "feasible problems"
    else:
        said = (f"exact_feasibility={promise}: INFEASIBLE never on a feasible problem with up to {promise} "
                f"budget(s) (brute force), and names the minimum cost or gives its reason")
        where = f"feasible problems with more than {promise} budget(s)"
    return f"{said}; it refused {refused['refused']} of {refused['feasible']} {where}"


def _row(name: str, probe: _Probe, passed_detail: str) -> CheckRow:
    if probe.first is None:
        return CheckRow(name, True, probe.examples, probe.seconds, f"{passed_detail} ({probe.examples} examples)")
    return CheckRow(name, False, probe.first, probe.seconds, _short(probe.detail, 600), probe.example)


def _timed(row: CheckRow, t0: float) -> CheckRow:
    return CheckRow(row.check, row.passed, row.examples, time.perf_counter() - t0, row.detail, row.example)


def _refusal(solver, problem: AllocationProblem) -> str | None:
    """None when ``solve`` refuses ``problem`` with a ValueError that mentions the budgets, else why not."""
    try:
        alloc = solver.solve(problem)
    except ValueError as exc:
        return None if "budget" in str(exc).lower() else (
            f"refused {len(problem.budgets)} budgets with a ValueError that does not mention the budgets: "
            f"{_short(str(exc), 200)!r}")
    except Exception as exc:
        return f"expected a ValueError for {len(problem.budgets)} budgets, received {_error(exc)}"
    return (f"declares max_budgets={getattr(solver, 'max_budgets', None)} but solved a problem with "
            f"{len(problem.budgets)} budgets ({describe_allocation(alloc)}) instead of refusing it")


def _known_optima(solver, cap: int | None) -> CheckRow:
    failures, tried = [], 0
    for name, known in KNOWN.items():
        problem = known_problem(name)
        tried += 1
        if cap is not None and len(problem.budgets) > cap:
            why = _refusal(solver, problem)
            if why:
                failures.append((name, why, describe_problem(problem)))
            continue
        case = Case.solve(solver, problem, optimum=known.optimum)
        for check, fn in SINGLE.items():
            why = _verdict(fn, case)
            if why:
                failures.append((name, f"{check}: {why}", case.describe()))
                break
    if not failures:
        return CheckRow("known_optima", True, tried, 0.0,
                        f"{tried} problems with hand-derived optima: " + ", ".join(KNOWN))
    name, why, example = failures[0]
    more = f" (and {len(failures) - 1} more: {', '.join(f[0] for f in failures[1:])})" if len(failures) > 1 else ""
    return CheckRow("known_optima", False, tried, 0.0, _short(f"{name}: {why}{more}", 600),
                    _short(f"{name} ({KNOWN[name].why}): {example}"))


def _order_invariant(solver, generic, n: int) -> CheckRow:
    def evaluate(ex, only=None):
        problem, order = ex
        shuffled = problem.replace(curves=[problem.curves[i] for i in order])
        a, b = Case.solve(solver, problem), Case.solve(solver, shuffled)
        why = a.error or b.error
        if why is None:
            x, y = a.alloc, b.alloc
            if x.status != y.status:
                why = f"status {x.status} in the given order, {y.status} with the components in order {order}"
            elif not _close(float(x.objective), float(y.objective), tol(problem) / OBJECTIVE_RTOL):
                why = f"objective {x.objective!r} in the given order, {y.objective!r} in order {order}"
            elif x.status != Status.INFEASIBLE:
                try:
                    cx, cy = x.choices, y.choices
                except Exception as exc:
                    cx, cy, why = None, None, f"its choices cannot be read ({_error(exc)})"
                if why is None and cx != cy:
                    diff = {k: (str(cx[k]), str(cy.get(k))) for k in cx if cx[k] != cy.get(k)}
                    why = f"choices differ with the components in order {order}: {diff}"

        def describe():
            return (f"{a.describe()} | components in order {order} -> "
                    + (b.error or describe_allocation(b.alloc)))
        return {"order_invariant": why}, describe

    probes = _search(_permuted(generic), evaluate, ["order_invariant"], n)
    return _row("order_invariant", probes["order_invariant"],
                "the same status, objective and choices with the components reordered")


def _budget_count(solver, cap: int | None, bad_cap: str | None, n: int) -> CheckRow:
    if bad_cap:
        return CheckRow("budget_count", False, 0, 0.0, bad_cap)
    count = len(S.RESOURCES) if cap is None else cap + 1
    base = S.problems(n_budgets=min(count, len(S.RESOURCES)), sparse=True, max_components=4)

    def evaluate(ex, only=None):
        problem = _with_budgets(ex, count)
        if cap is not None:
            return {"budget_count": _refusal(solver, problem)}, lambda: describe_problem(problem)
        case = Case.solve(solver, problem)
        why = (case.error or check_objective_matches_choices(case) or check_budgets_held(case))
        return {"budget_count": None if why is None else f"with {count} budgets: {why}"}, case.describe

    probes = _search(base, evaluate, ["budget_count"], n)
    what = (f"declares any number of budgets (max_budgets None) and handles {count}" if cap is None else
            f"declares max_budgets={cap}, handles up to {cap} (in the other checks) and refuses {count}")
    return _row("budget_count", probes["budget_count"], what)


# ----------------------------------------------------------------------------- check_cost_model
def _resolve_cost(cost):
    if isinstance(cost, str):
        from rankalloc.allocators.registry import get_cost_model

        return get_cost_model(cost)()
    if isinstance(cost, type):
        return cost()
    return cost


def _label(model) -> str:
    return f"{getattr(model, 'name', '?')!r} ({type(model).__name__})"


def _priced(model, component, ranks, kept):
    """Costs of every (rank, kept) pair plus dense: ``(costs (K, R), dense candidate cost)``, or a string why not."""
    rr, kk = np.meshgrid(ranks, kept)
    r = np.append(rr.ravel(), DENSE).astype(np.int64)
    k = np.append(kk.ravel(), 0.0)
    r.setflags(write=False)
    k.setflags(write=False)
    try:
        out = np.asarray(model.cost(component, r, k), dtype=np.float64)
    except Exception as exc:
        return f"cost(component, ranks, sparsity) raised {_error(exc)}"
    if out.shape != r.shape:
        return f"expected {r.shape[0]} costs for {r.shape[0]} candidates, received shape {out.shape}"
    return out[:-1].reshape(rr.shape), float(out[-1]), r, k, out


def check_cost_model(cost, *, examples: int | None = None, thorough: bool = False) -> pd.DataFrame:
    """Run the cost-model conformance suite: one row per check of :data:`COST_CHECKS`.

    ``cost`` is a cost model object, a class (built without arguments) or a registered resource name. Each
    random example is a component of any kind and shape, priced at every rank of a set from 0 to
    ``min(m, n)`` (both included), at kept sparsities from 0 up, and dense.

    >>> from rankalloc.testing import check_cost_model
    >>> bool(check_cost_model("params", examples=10).passed.all())
    True
    """
    model = _resolve_cost(cost)
    n = int(examples) if examples is not None else (THOROUGH_EXAMPLES if thorough else DEFAULT_EXAMPLES)
    if n < 1:
        raise ValueError(f"check_cost_model: expected examples >= 1, received {examples!r}")
    t0 = time.perf_counter()
    problems = []
    for attr in ("name", "unit"):
        if not isinstance(getattr(model, attr, None), str) or not getattr(model, attr):
            problems.append(f"expected a non-empty string {attr}, received {getattr(model, attr, None)!r}")
    for method in ("cost", "dense"):
        if not callable(getattr(model, method, None)):
            problems.append(f"expected a method {method}()")
    interface = CheckRow("interface", not problems, 1, time.perf_counter() - t0,
                         "; ".join(problems) or "name, unit, cost(component, ranks, sparsity) and dense(component)")
    if problems:
        rest = [CheckRow(c, False, 0, 0.0, "not run: the interface check failed") for c in COST_CHECKS[1:]]
        return _table([interface, *rest])
    names = list(COST_CHECKS[1:])

    def evaluate(ex, only=None):
        component, ranks, kept = ex
        out = {}
        for name in ([only] if only else names):
            try:
                out[name] = COST_FUNCTIONS[name](model, component, ranks, kept)
            except Exception as exc:  # e.g. dense() raising: a verdict, not a traceback
                out[name] = f"raised {_error(exc)}"
        return out, lambda: describe_cost_case(component, ranks, kept)

    probes = _search(S.cost_cases(), evaluate, names, n)
    rows = [interface] + [_row(name, probes[name], COST_DETAIL[name]) for name in names]
    return _table(rows)


def _cost_finite(model, component, ranks, kept):
    got = _priced(model, component, ranks, kept)
    if isinstance(got, str):
        return got
    out = got[4]
    bad = ~np.isfinite(out) | (out < 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        return (f"cost at rank {int(got[2][j])}, kept {float(got[3][j]):g} is {float(out[j])!r}: "
                f"expected finite and >= 0")
    try:
        d = float(model.dense(component))
    except Exception as exc:
        return f"dense(component) raised {_error(exc)}"
    if not (math.isfinite(d) and d >= 0):
        return f"dense(component) = {d!r}: expected finite and >= 0"
    return None


def _cost_monotone(axis):
    def check(model, component, ranks, kept):
        got = _priced(model, component, ranks, kept)
        if isinstance(got, str):
            return got
        table = got[0]  # (kept, rank)
        diffs = np.diff(table, axis=1 if axis == "rank" else 0)
        ref = np.maximum(table[:, :-1], table[:, 1:]) if axis == "rank" else np.maximum(table[:-1], table[1:])
        falls = diffs < -1e-12 * np.abs(ref)
        if falls.any():
            i, j = (int(v) for v in np.argwhere(falls)[0])
            if axis == "rank":
                a, b, k = ranks[j], ranks[j + 1], kept[i]
                return (f"cost falls as rank grows: {float(table[i, j + 1])!r} at rank {int(b)} < "
                        f"{float(table[i, j])!r} at rank {int(a)} (kept sparsity {float(k):g})")
            return (f"cost falls as kept sparsity grows: {float(table[i + 1, j])!r} at kept {float(kept[i + 1]):g} "
                    f"< {float(table[i, j])!r} at kept {float(kept[i]):g} (rank {int(ranks[j])})")
        return None
    return check


def _cost_dense(model, component, ranks, kept):
    got = _priced(model, component, ranks, kept)
    if isinstance(got, str):
        return got
    try:
        d = float(model.dense(component))
    except Exception as exc:
        return f"dense(component) raised {_error(exc)}"
    c = got[1]
    if not abs(c - d) <= 1e-9 * max(abs(c), abs(d)):
        return f"cost(component, [DENSE], [0]) = {c!r}, but dense(component) = {d!r}"
    return None


def _cost_vectorized(model, component, ranks, kept):
    got = _priced(model, component, ranks, kept)
    if isinstance(got, str):
        return got
    r, k, out = got[2], got[3], got[4]
    for j in range(len(r)):
        try:
            one = np.asarray(model.cost(component, r[j:j + 1], k[j:j + 1]), dtype=np.float64).reshape(-1)
        except Exception as exc:
            return f"cost of the single candidate rank {int(r[j])}, kept {float(k[j]):g} raised {_error(exc)}"
        if one.shape != (1,) or not _close(float(one[0]), float(out[j])):
            return (f"the single call at rank {int(r[j])}, kept {float(k[j]):g} gives {one.tolist()}, the "
                    f"vectorized call {float(out[j])!r}")
    order = np.arange(len(r))[::-1]
    try:
        rev = np.asarray(model.cost(component, r[order], k[order]), dtype=np.float64)
    except Exception as exc:
        return f"cost of the candidates in reverse order raised {_error(exc)}"
    if rev.shape != out.shape or not np.allclose(rev, out[order], rtol=1e-12, atol=0):
        return "the costs depend on the order of the candidates in the call (expected an elementwise function)"
    return None


def _cost_pure(model, component, ranks, kept):
    before = repr(model)
    state = _state(model)
    first = _priced(model, component, ranks, kept)
    if isinstance(first, str):
        return first
    other = Component(component.name + "_other", max(1, component.n // 2 + 1), component.m + 3,
                      component.kind, component.layer)
    try:
        model.cost(other, np.array([0, 1, DENSE]), np.zeros(3))
        model.dense(other)
    except Exception:
        pass  # a shape the model refuses; only the repeated call matters
    again = _priced(model, component, ranks, kept)
    if isinstance(again, str):
        return "a repeated call failed: " + again
    if not np.array_equal(first[4], again[4]):
        j = int(np.flatnonzero(first[4] != again[4])[0])
        return (f"the same call gave {float(again[4][j])!r}, first {float(first[4][j])!r} "
                f"(rank {int(first[2][j])}, kept "
                f"{float(first[3][j]):g}): expected a pure function")
    d1, d2 = model.dense(component), model.dense(component)
    if not _same_number(float(d1), float(d2)):
        return f"dense(component) gave {d2!r}, first {d1!r}"
    if repr(model) != before or (state is not None and _state(model) != state):
        return "pricing changed the model's state"
    return None


def _state(model):
    """A deep copy of the model's attributes (None when they cannot be copied or compared)."""
    try:
        state = copy.deepcopy(getattr(model, "__dict__", {}))
        state == state  # noqa: B015 (comparable?)
        return state
    except Exception:
        return None


COST_FUNCTIONS = {
    "finite_nonnegative": _cost_finite,
    "monotone_in_rank": _cost_monotone("rank"),
    "monotone_in_sparsity": _cost_monotone("sparsity"),
    "dense_matches": _cost_dense,
    "vectorized_matches_scalar": _cost_vectorized,
    "pure": _cost_pure,
}

COST_DETAIL = {
    "finite_nonnegative": "costs and dense() finite and >= 0",
    "monotone_in_rank": "non-decreasing in rank at each kept sparsity",
    "monotone_in_sparsity": "non-decreasing in kept sparsity at each rank",
    "dense_matches": "cost(component, [DENSE], [0]) == dense(component)",
    "vectorized_matches_scalar": "the vectorized call equals one call per candidate, in any order",
    "pure": "the same call gives the same costs, inputs read-only, no state changed",
}
