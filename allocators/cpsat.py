# CP-SAT (OR-Tools; Perron & Didier) on the one-hot multiple-choice knapsack model (Sinha & Zoltners, 1979)
"""The CP-SAT backend: one boolean per candidate, ``sum_j x_lj = 1`` per component and
``sum_lj c^k_lj x_lj <= B_k`` per budget, minimising ``sum_lj e_lj x_lj``.

This is a backend, not a solver: :class:`~rankalloc.allocators.exact.Exact` calls it on its fixed
core (``method="cpsat"``, or when the core DP does not apply) and on every candidate
(``method="plain"``, the baseline), with its incumbent as the hint.

CP-SAT takes integers only:

* Costs are integer-valued in every built-in cost model. They are divided by the gcd of their
  row, which is exact. Other costs are scaled, rounded UP and the limit DOWN. This keeps every
  answer feasible but can cut feasible choices. ``costs_exact`` is then False, and the bound
  and proof of optimality are dropped.
* Errors are shifted by each component's smallest error (a constant) and scaled by ``scale``,
  so that their sum stays below ``2^bits``. Each component then rounds to within
  ``0.5/scale``. The certified lower bound is ``(best bound - L/2)/scale + shift``. Proven
  optimal means optimal within ``L/scale`` of the float optimum.

Determinism: with ``workers=1`` a solve that finishes is reproducible. With several workers
the proven optimum is the same, but which of several tied optima comes back can vary from
run to run. CP-SAT's deterministic ``interleave_search`` was ~100x slower on these models.

Import-order trap: cvxpy and highspy ship their own ``libhighs.so.1``, and whichever library
loads first wins. When one of them got into this process before OR-tools, CP-SAT cannot load
here. The solve then runs in a fresh interpreter (``python -m rankalloc.allocators.cpsat_worker``,
which imports OR-tools first) on plain numpy arrays, and gives the same result.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible_message
from rankalloc.allocators.core_dp import integer_costs
from rankalloc.allocators.problem import AllocationProblem

STATUS_MAP: dict[str, Status | None] = {
    "OPTIMAL": Status.OPTIMAL,
    "FEASIBLE": Status.TIME_LIMIT,   # a solution, not proven optimal: CP-SAT stopped at its limit
    "INFEASIBLE": Status.INFEASIBLE,
    "UNKNOWN": Status.TIME_LIMIT,    # stopped before finding any solution
    "MODEL_INVALID": None,           # a bug in the model builder: raise
}
"""CP-SAT status name -> :class:`Status`."""


def ortools_in_process() -> bool:
    """Whether CP-SAT can run in this process (OR-tools imported before any cvxpy/highspy)."""
    from rankalloc._ortools_first import ORTOOLS_IN_PROCESS

    return ORTOOLS_IN_PROCESS


def solve_arrays(errors: np.ndarray, costs: np.ndarray, offsets: np.ndarray, limits: np.ndarray,
                 time_limit: float = 60.0, workers: int = 2, hint: np.ndarray | None = None,
                 bits: int = 40, seed: int = 0, floors: np.ndarray | None = None) -> dict:
    """Solve one MCKP given as plain flat arrays (``problem.flat``'s convention) with CP-SAT in this process.

    ``limits`` are the largest accepted costs (:func:`~rankalloc.allocators.segments.feasible_limits`);
    ``hint`` is a candidate index per component (local to the component); ``floors`` (optional,
    per budget, ``-inf`` for none) are valid lower limits on each cost (cuts). Returns a dict of
    plain values: ``status`` (a CP-SAT status name), ``choice`` (local index per component, or
    None), ``bound`` (a certified lower bound on the float objective, or None), ``scale``,
    ``shift``, ``costs_exact``, ``wall``.
    """
    from ortools.sat.python import cp_model

    E = np.asarray(errors, dtype=np.float64)
    C = np.atleast_2d(np.asarray(costs, dtype=np.float64))
    offsets = np.asarray(offsets, dtype=np.int64)
    limits = np.asarray(limits, dtype=np.float64).reshape(-1)
    L = len(offsets) - 1
    owner = np.repeat(np.arange(L), np.diff(offsets))
    Ci, Bi, unit, costs_exact = integer_costs(C, limits)
    shift = np.minimum.reduceat(E, offsets[:-1])
    rel = E - shift[owner]
    top = float(np.maximum.reduceat(rel, offsets[:-1]).sum())
    scale = 2.0 ** math.floor(math.log2(2.0 ** bits / top)) if top > 0 else 1.0
    Ei = np.round(rel * scale).astype(np.int64)

    model = cp_model.CpModel()
    x = [model.new_bool_var(f"x{i}") for i in range(len(E))]
    for l in range(L):
        model.add_exactly_one(x[offsets[l]:offsets[l + 1]])
    for k in range(C.shape[0]):
        row = cp_model.LinearExpr.weighted_sum(x, Ci[k].tolist())
        model.add(row <= int(Bi[k]))
        if floors is not None and np.isfinite(floors[k]) and floors[k] > 0:
            model.add(row >= int(math.floor(floors[k] / unit[k])))  # unit <= true cost per integer step
    model.minimize(cp_model.LinearExpr.weighted_sum(x, Ei.tolist()))
    if hint is not None:
        on = np.zeros(len(E), dtype=bool)
        on[offsets[:-1] + np.asarray(hint, dtype=np.int64)] = True
        for var, v in zip(x, on.tolist()):
            model.add_hint(var, v)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = int(workers)
    solver.parameters.random_seed = int(seed)
    t0 = time.perf_counter()
    code = solver.solve(model)
    wall = time.perf_counter() - t0
    name = solver.status_name(code)
    choice = bound = None
    if name in ("OPTIMAL", "FEASIBLE"):
        val = np.array([solver.boolean_value(v) for v in x], dtype=bool)
        choice = np.array([int(np.flatnonzero(val[offsets[l]:offsets[l + 1]])[0]) for l in range(L)])
        if costs_exact:
            bound = float(shift.sum() + (solver.best_objective_bound - 0.5 * L) / scale)
    return {"status": name, "choice": choice, "bound": bound, "scale": scale, "shift": float(shift.sum()),
            "costs_exact": bool(costs_exact), "wall": wall}


def solve_arrays_anywhere(errors, costs, offsets, limits, time_limit: float = 60.0, workers: int = 2,
                          hint=None, bits: int = 40, seed: int = 0, floors=None, subprocess_only: bool = False) -> dict:
    """:func:`solve_arrays` in this process when OR-tools loaded cleanly, else in a fresh interpreter."""
    if ortools_in_process() and not subprocess_only:
        return solve_arrays(errors, costs, offsets, limits, time_limit, workers, hint, bits, seed, floors)
    with tempfile.TemporaryDirectory(prefix="rankalloc-cpsat-") as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        arrays = dict(errors=np.asarray(errors, dtype=np.float64), costs=np.atleast_2d(costs).astype(np.float64),
                      offsets=np.asarray(offsets, dtype=np.int64), limits=np.asarray(limits, dtype=np.float64),
                      params=np.array([time_limit, workers, bits, seed], dtype=np.float64))
        if hint is not None:
            arrays["hint"] = np.asarray(hint, dtype=np.int64)
        if floors is not None:
            arrays["floors"] = np.asarray(floors, dtype=np.float64)
        np.savez(src, **arrays)
        proc = subprocess.run([sys.executable, "-m", "rankalloc.allocators.cpsat_worker", src, dst],
                              capture_output=True, text=True, timeout=float(time_limit) + 300.0)
        if proc.returncode != 0 or not os.path.exists(dst):
            raise RuntimeError("CP-SAT could not run in this process (cvxpy or highspy was imported before "
                               "rankalloc) and the clean subprocess failed too:\n" + proc.stderr[-2000:])
        with np.load(dst, allow_pickle=False) as out:
            choice = out["choice"] if out["has_choice"] else None
            bound = float(out["bound"]) if out["has_bound"] else None
            return {"status": str(out["status"]), "choice": choice, "bound": bound, "scale": float(out["scale"]),
                    "shift": float(out["shift"]), "costs_exact": bool(out["costs_exact"]),
                    "wall": float(out["wall"])}


def check_cpsat_settings(owner: str, time_limit, workers, bits) -> None:
    """Validate ``Exact``'s CP-SAT settings (ValueError naming ``owner``)."""
    if not (time_limit > 0 and math.isfinite(time_limit)):
        raise ValueError(f"{owner}: expected a finite time_limit > 0 seconds, received {time_limit!r}")
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"{owner}: expected an integer workers >= 1, received {workers!r}")
    if not (isinstance(bits, int) and 10 <= bits <= 52):
        raise ValueError(f"{owner}: expected bits in [10, 52], received {bits!r}")


def from_result(problem: AllocationProblem, name: str, out: dict, incumbent, t0: float,
                info: dict | None = None, lower_bound: float | None = None) -> Allocation:
    """The :class:`Allocation` of a :func:`solve_arrays` result (choice indices over all candidates)."""
    status = STATUS_MAP.get(out["status"])
    if status is None:
        raise RuntimeError(f"{name}: CP-SAT returned {out['status']}; the model builder has a bug")
    info = dict(info or {}, scale=out["scale"], objective_shift=out["shift"], costs_exact=out["costs_exact"],
                cpsat_status=out["status"], cpsat_seconds=out["wall"])
    bound = out["bound"]
    if lower_bound is not None:
        bound = lower_bound if bound is None else max(bound, lower_bound)
    if status == Status.INFEASIBLE and not out["costs_exact"] and incumbent is not None:
        status, out = Status.FEASIBLE, dict(out, choice=None)
    if status == Status.INFEASIBLE:
        msg = infeasible_message(problem)
        if not out["costs_exact"]:
            msg += " (with costs rounded up to integers for CP-SAT)"
        res = problem.resources[0]
        idx = [int(np.argmin(t)) for t in problem.cost_tables[res]]
        return finish(problem, name, idx, Status.INFEASIBLE, t0=t0, message=msg, info=info)
    choice = out["choice"]
    if choice is None:
        if incumbent is None:  # nothing feasible known: cheapest choice, flagged
            res = problem.resources[0]
            idx = [int(np.argmin(t)) for t in problem.cost_tables[res]]
            return finish(problem, name, idx, Status.TIME_LIMIT, lower_bound=bound, t0=t0, info=info,
                          message="time limit reached before any allocation within the budgets was found")
        choice = incumbent
    elif status != Status.OPTIMAL and incumbent is not None:  # keep the better of CP-SAT's and the incumbent
        if problem.evaluate(incumbent)[0] < problem.evaluate(choice)[0]:
            choice = incumbent
    message = ""
    if status == Status.FEASIBLE:
        bound = lower_bound
        message = "costs are not integers: CP-SAT found no allocation with costs rounded up; greedy incumbent"
    elif status == Status.OPTIMAL and not out["costs_exact"]:
        status, bound = Status.FEASIBLE, lower_bound
        message = "costs are not integers: rounded up for CP-SAT, so optimality is not proven"
    elif status == Status.TIME_LIMIT:
        message = "time limit reached; best allocation found and a certified lower bound"
    if status == Status.OPTIMAL and bound is not None:
        obj = problem.evaluate(choice)[0]
        bound = min(bound, obj)
    return finish(problem, name, choice, status, lower_bound=bound, t0=t0, message=message, info=info)
