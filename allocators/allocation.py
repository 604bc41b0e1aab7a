# Solver results for the MCKP (Kellerer, Pferschy & Pisinger, 2004, Ch. 11): status, certified bound, budget check
"""The result type shared by every solver, and the ``Solver`` contract."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from rankalloc.allocators.problem import AllocationProblem, Choice


class Status(str, Enum):
    """Normalized solver status (solvers map their backend's statuses onto these)."""

    OPTIMAL = "optimal"          # proven optimal for the problem's objective
    FEASIBLE = "feasible"        # meets every budget, optimality not proven
    INFEASIBLE = "infeasible"    # no allocation meets the budgets; message gives the minimum cost
    TIME_LIMIT = "time_limit"    # stopped at a time limit; best feasible allocation found, if any

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, eq=False)
class Allocation:
    """One choice per component, with its objective, cost per resource and solver status.

    ``choice_index[l]`` indexes ``problem.curves[l]``. ``lower_bound`` is a certified lower bound
    on the optimal objective where the method has one (None otherwise).
    """

    problem: AllocationProblem
    solver: str
    status: Status
    choice_index: tuple[int, ...]
    objective: float
    cost: dict[str, float]
    lower_bound: float | None = None
    solve_seconds: float = 0.0
    message: str = ""
    info: dict = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.status in (Status.OPTIMAL, Status.FEASIBLE) or (
            self.status == Status.TIME_LIMIT and self.problem.is_feasible(self.cost))

    @property
    def choices(self) -> dict[str, Choice]:
        return {cv.component.name: cv.choice(j) for cv, j in zip(self.problem.curves, self.choice_index)}

    @property
    def ranks(self) -> dict[str, int]:
        """Rank per component; dense components map to -1."""
        return {cv.component.name: int(cv.ranks[j]) for cv, j in zip(self.problem.curves, self.choice_index)}

    @property
    def budget(self) -> dict[str, float]:
        return dict(self.problem.limits)

    def removed(self, resource: str | None = None) -> float:
        """Fraction of the dense cost of ``resource`` (default: the first budget's) removed."""
        res = resource or self.problem.resources[0]
        dense = self.problem.dense_costs[res]
        return 1.0 - self.cost[res] / dense if dense else 0.0

    def to_dict(self) -> dict:
        return {
            "solver": self.solver,
            "status": str(self.status),
            "objective": self.objective,
            "objective_kind": self.problem.objective,
            "lower_bound": self.lower_bound,
            "cost": dict(self.cost),
            "budget": self.budget,
            "removed": {r: self.removed(r) for r in self.problem.resources},
            "choices": {k: v.to_json() for k, v in self.choices.items()},
            "solve_seconds": self.solve_seconds,
            "message": self.message,
        }

    def to_json(self, path=None, indent: int = 1) -> str:
        """The allocation as JSON text; with ``path``, also written there through a temporary sibling, so the file
        is the old or the new allocation, never a part."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from rankalloc.profiling.files import atomic_write_bytes

            atomic_write_bytes(Path(path), (text + "\n").encode())
        return text

    @classmethod
    def from_dict(cls, problem: AllocationProblem, data: dict) -> "Allocation":
        """Rebuild an allocation of ``problem`` from :meth:`to_dict` output (choices are re-priced)."""
        choices = data["choices"]
        idx = []
        for cv in problem.curves:
            name = cv.component.name
            if name not in choices:
                raise ValueError(f"allocation has no choice for component {name!r}")
            v = choices[name]
            ch = Choice(int(v[0]), float(v[1])) if isinstance(v, list) else v
            idx.append(cv.index_of(ch))
        return finish(problem, data.get("solver", "loaded"), idx, Status(data.get("status", "feasible")),
                      lower_bound=data.get("lower_bound"), seconds=data.get("solve_seconds", 0.0),
                      message=data.get("message", ""))

    def summary(self) -> str:
        cost = ", ".join(f"{r}={v:.6g} ({self.removed(r):.2%} removed)" for r, v in self.cost.items())
        lb = "" if self.lower_bound is None else f", lower bound {self.lower_bound:.6g}"
        return (f"{self.solver}: {self.status}, objective {self.objective:.6g}{lb}, {cost}, "
                f"{self.solve_seconds * 1e3:.1f} ms")


def finish(problem: AllocationProblem, solver: str, choice_index: Sequence[int], status: Status,
           lower_bound: float | None = None, seconds: float | None = None, t0: float | None = None,
           message: str = "", info: dict | None = None) -> Allocation:
    """Price ``choice_index`` and build the :class:`Allocation`.

    A status of OPTIMAL or FEASIBLE whose allocation breaks a budget is a solver bug and
    raises ``RuntimeError``: a solver must report INFEASIBLE instead.
    """
    idx = tuple(int(j) for j in choice_index)
    sizes = np.diff(problem.flat.offsets)
    arr = np.asarray(idx, dtype=np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= sizes)) if arr.shape == sizes.shape else [0]
    if len(bad):
        l = int(bad[0])
        raise RuntimeError(f"{solver}: choice index {idx[l] if l < len(idx) else None} out of range for component "
                           f"{problem.curves[l].component.name!r} (or wrong number of choices: {len(idx)})")
    obj, cost = problem.evaluate(idx)
    if status in (Status.OPTIMAL, Status.FEASIBLE) and not problem.is_feasible(cost):
        over = {r: (cost[r], problem.limits[r]) for r in problem.resources if cost[r] > problem.limits[r]}
        raise RuntimeError(f"{solver}: reported {status} but exceeds budgets (cost, limit): {over}")
    if seconds is None:
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    return Allocation(problem, solver, status, idx, obj, cost, lower_bound, float(seconds), message, info or {})


def solved(solver, problem: AllocationProblem) -> Allocation:
    """``solver.solve(problem)``, held to the contract where a command uses the result (allocate, compare, pareto).

    A solver (a ``--plugin``'s, typically) that returns something other than an :class:`Allocation` of ``problem``,
    one whose choices do not fit it, or whose cost is not what its choices cost raises ``ValueError`` naming the
    solver, rather than failing later in code that trusted it.
    """
    out = solver.solve(problem)
    name = getattr(solver, "name", type(solver).__name__)
    if not isinstance(out, Allocation):
        raise ValueError(f"solver {name!r} returned {type(out).__name__}, not an Allocation: its solve(problem) must "
                         f"return one (rankalloc.allocators.allocation.finish builds it from the choice indices)")
    sizes = np.diff(problem.flat.offsets)
    idx = np.asarray(out.choice_index, dtype=np.int64)
    if idx.shape != sizes.shape or ((idx < 0) | (idx >= sizes)).any():
        raise ValueError(f"solver {name!r} returned {len(idx)} choice indices for {len(sizes)} components, or an "
                         f"index out of range: not an allocation of this problem")
    _, cost = problem.evaluate(out.choice_index)
    off = {r: (out.cost.get(r), c) for r, c in cost.items()
           if out.cost.get(r) is None or not math.isclose(out.cost[r], c, rel_tol=1e-9, abs_tol=1e-6)}
    if off:
        raise ValueError(f"solver {name!r} reports a cost its choices do not have (reported, actual): {off}")
    return out


def infeasible(problem: AllocationProblem, solver: str, t0: float | None = None) -> Allocation | None:
    """The INFEASIBLE allocation (cheapest choices) when the budgets are below the minimum cost, else None."""
    msg = problem.infeasibility_message()
    if msg is None:
        return None
    res = problem.resources[0]
    idx = [int(np.argmin(t)) for t in problem.cost_tables[res]]
    return finish(problem, solver, idx, Status.INFEASIBLE, t0=t0, message=msg)


def infeasible_message(problem: AllocationProblem) -> str:
    """Why no allocation meets the budgets: the per-resource minima, or that they cannot hold together."""
    msg = problem.infeasibility_message()
    if msg is not None:
        return msg
    parts = [f"{r}: budget {problem.limits[r]:.6g}, minimum achievable cost {problem.min_costs[r]:.6g}"
             for r in problem.resources]
    return ("infeasible: each budget can be met on its own but no allocation meets all of them at once ("
            + "; ".join(parts) + ")")


ALLOCATION_FORMAT = "rankalloc.allocation"
"""The ``format`` of an allocation JSON written by rankalloc (``rankalloc allocate --out``, ``compare``)."""


def _digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(data: dict) -> dict:
    """``data`` with ``format`` and the ``sha256`` of its canonical JSON (every other field), so that a damaged or
    edited file is recognised when read back (:func:`check_seal`)."""
    out = dict(data, format=ALLOCATION_FORMAT)
    out["sha256"] = _digest(out)
    return out


def check_seal(data: dict, source) -> None:
    """``ValueError`` naming ``source`` when ``data`` carries a ``sha256`` its contents do not match. A file without
    one (hand-written, or edited and unsealed on purpose) is read and checked on its own merits."""
    want = data.get("sha256")
    if want is not None and _digest(data) != want:
        raise ValueError(f"{source}: its contents differ from the sha256 they were written with (damaged, or edited "
                         f"by hand); write it again, or, to use an edited allocation on purpose, delete its "
                         f"\"sha256\" field")


def is_allocation_file(path) -> bool:
    """Whether ``path`` is an allocation JSON (one rankalloc wrote, or of that shape): safe to replace."""
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("format") == ALLOCATION_FORMAT
                                       or {"choices", "budget", "solver"} <= set(data))


@runtime_checkable
class Solver(Protocol):
    """Contract: ``solve`` is deterministic and never mutates the problem.

    Its allocation meets every budget (status OPTIMAL or FEASIBLE), or it has status INFEASIBLE
    with the minimum achievable cost in its message, or TIME_LIMIT. A solver declares the number of
    budgets it handles in ``max_budgets`` (None: any).

    INFEASIBLE means that no allocation meets the budgets, unless the solver declares otherwise in
    ``exact_feasibility`` (absent or True: always). ``False`` (or 0): a rule-based solver whose rule
    may not meet a budget that another allocation meets (uniform), and then says INFEASIBLE with its
    rule's reason rather than an allocation its rule did not make. An integer ``k``: exact on problems
    with at most ``k`` budgets (the greedy, Lagrangian and epsilon heuristics: 1; with several budgets,
    finding any feasible allocation is itself NP-hard). ``rankalloc.testing.check_solver`` holds every
    solver to its declaration against brute force.
    """

    name: str

    def solve(self, problem: AllocationProblem) -> Allocation: ...
