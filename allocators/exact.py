# Exact MCKP: Lagrangian reduced-cost fixing, then an exact core solve (Kellerer, Pferschy & Pisinger, 2004, Ch. 11)
r"""The solver the library calls "exact": a proven optimum of the multiple-choice knapsack.

Plain CP-SAT cannot prove optimality on a LLaMA-70B-sized instance (560 components, ~2e5
candidates) in useful time. Near the optimum there are too many allocations within 1e-6 of
each other. This solver first removes every candidate that no optimal allocation can use. It
then solves the small core that remains exactly.

**Method** (notation of :mod:`rankalloc.allocators._mckp`):

1. Drop dominated candidates, i.e. those with another candidate no worse in error and in every
   cost. Some optimum avoids them.
2. Compute multipliers ``lambda >= 0``. One budget: the exact LP price ``lambda*`` from the
   lower convex hulls. Several budgets: LP duals by column generation. The dual bound is
   ``LB = L(lambda) = sum_l mu_l - lambda . B``.
3. Take an incumbent ``x^`` (the hull greedy or the LP argmin, repaired and filled). Its
   objective is ``UB``.
4. Fix: keep only the candidates with ``rc_lj <= UB - LB`` (plus a float tolerance).
5. Solve the core exactly. With integer costs this is a DP over the cost in gcd units, one
   axis per budget. It keeps only the totals that can still be optimal (a window) and the
   partial sums of ``rc`` that are ``<= UB - LB``. Otherwise, or when the table would be too
   large, CP-SAT solves the core, hinted with ``x^``.

The DP deepens a threshold ``tau``. It first searches the smaller core ``rc <= tau`` for
``tau = (UB - LB)/64``, then ``8 tau``, and so on up to ``UB - LB``. That space holds every
allocation with ``obj <= LB + tau``. If its best allocation ``x`` has ``obj(x) <= LB + tau``,
nothing better can exist outside it, so ``x`` is optimal. Otherwise ``x`` may still lower
``UB``. The optimum usually lies within a few percent of the gap above ``LB``, so the first
level usually decides.

**Why the core's optimum is the optimum.** For any feasible ``x`` and any ``lambda >= 0``:

    obj(x) = sum_l (mu_l + rc_{l x_l}) - lambda . cost(x)
           = L(lambda) + sum_l rc_{l x_l} + lambda . (B - cost(x))
          >= LB + sum_l rc_{l x_l},

because ``cost(x) <= B``. An optimal ``x*`` has ``obj(x*) <= UB``, so
``sum_l rc_{l x*_l} <= UB - LB``. Every term is ``>= 0``, so each one is ``<= UB - LB``.
Every candidate of ``x*`` therefore survives step 4, and ``x*`` is feasible in the core. The
core is a subset of the problem, so its optimum equals the problem's optimum. A proof of
optimality on the core (DP, or CP-SAT status OPTIMAL) is thus a proof for the whole problem.
Any lower bound on the core is also a lower bound on the problem. The same identity gives
``lambda_k (B_k - cost_k(x*)) <= UB - LB``. So an optimum leaves at most ``(UB - LB)/lambda_k``
of budget ``k`` unused. The DP keeps only final totals in that window, and CP-SAT gets it as a
valid cut.

Status OPTIMAL only when proven. Otherwise TIME_LIMIT, with the best allocation and the
certified bound ``max(LB, core bound)``. ``info`` records the multipliers, ``LB``, ``UB``,
the core size, the DP cells or the CP-SAT objective scale, and the time of each step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from rankalloc.allocators import _mckp
from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.cpsat import CPSat, check_cpsat_settings, from_result, solve_arrays_anywhere
from rankalloc.allocators.problem import AllocationProblem

DEEPEN = 8.0
"""Growth factor of the fixing threshold between core-DP attempts."""

METHODS = ("auto", "dp", "cpsat", "plain")
"""``auto``: core DP when it applies (one budget, integer costs, table within ``max_cells``),
else CP-SAT on the core. ``dp``/``cpsat``: force the core solver. ``plain``: CP-SAT on every
candidate without fixing (the baseline)."""


@dataclass(frozen=True)
class Exact:
    """Proven-optimal MCKP allocation; see the module docstring for the method and the proof.

    Args:
        time_limit: seconds for the CP-SAT part (the DP is bounded by ``max_cells`` instead).
        workers: CP-SAT worker threads. The core DP is deterministic; with CP-SAT and more than one
            worker, which of several tied optima comes back can vary (use 1 for bitwise reproducibility).
        method: one of :data:`METHODS`.
        max_cells: largest core-DP table (candidates x cost states) tried before falling back to CP-SAT.
        bits: CP-SAT objective scale: the scaled errors sum to at most ``2^bits``.
    """

    time_limit: float = 60.0
    workers: int = 2
    method: str = "auto"
    max_cells: float = 2e9
    bits: int = 40
    name: str = "exact"
    max_budgets = None

    def __post_init__(self):
        check_cpsat_settings("Exact", self.time_limit, self.workers, self.bits)
        if self.method not in METHODS:
            raise ValueError(f"Exact: expected method in {METHODS}, received {self.method!r}")
        if not self.max_cells > 0:
            raise ValueError(f"Exact: expected max_cells > 0, received {self.max_cells!r}")

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        bad = infeasible(problem, self.name, t0)
        if bad is not None:
            return bad
        f = problem.flat
        R = len(problem.resources)
        B = _mckp.feasible_limits([problem.limits[r] for r in problem.resources])
        if self.method == "plain":
            out = CPSat(self.time_limit, self.workers, self.bits, name=self.name).solve(problem)
            out.info["method"] = "plain"
            return out
        info: dict = {"method": self.method, "candidates": int(len(f.errors))}
        times: dict = {}

        # 1. dominated candidates out
        keep = _mckp.pareto_mask(f.errors, f.costs, f.offsets)
        E, C, off, sel = _subset(f.errors, f.costs, f.offsets, keep)
        info["undominated"] = int(len(E))
        times["dominance"] = time.perf_counter() - t0

        # 2.-3. multipliers, dual bound, incumbent
        t = time.perf_counter()
        lam, inc = _mckp.dual_and_incumbent(E, C, off, B)
        LB, _, rc = _mckp.lagrangian(E, C, off, lam, B)
        times["dual"] = time.perf_counter() - t
        info.update(multipliers=lam.tolist(), lagrangian_bound=LB)
        if inc is None:  # no incumbent, no fixing: CP-SAT on all undominated candidates
            info["core"] = int(len(E))
            out = self._cpsat(E, C, off, B, None, t0)
            return self._finish(problem, out, None, off, sel, t0, info, times, LB)
        UB = float(E[off[:-1] + inc].sum())
        gap = max(UB - LB, 0.0)
        tol = 1e-9 * (1.0 + abs(UB) + abs(LB))
        info.update(incumbent=UB, gap=gap)

        # 4.-5. fixing and core DP, by iterative deepening of the threshold tau (module docstring)
        t = time.perf_counter()
        tau = max(gap / DEEPEN ** 2, tol) if self.method in ("auto", "dp") else gap
        levels = []
        while self.method in ("auto", "dp"):
            full = tau >= gap
            tau = min(tau, gap)
            core = rc <= tau + tol
            Ec, Cc, offc, selc = _subset(E, C, off, core)
            level = {"threshold": tau, "core": int(len(Ec)), "core_components": int((np.diff(offc) > 1).sum())}
            levels.append(level)
            try:
                choice = _core_dp(Ec, Cc, offc, B, rc[core], lam, tau + tol, self.max_cells, level)
            except ValueError as err:
                if self.method == "dp":
                    raise
                info["dp_skipped"] = str(err)
                break
            if choice is not None:
                idx = _to_problem(choice, offc, sel[selc], f.offsets)
                obj = problem.evaluate(idx)[0]
                if obj < UB:
                    inc, UB = _to_local(idx, f.offsets, sel, off), obj
                    gap = max(UB - LB, 0.0)
                if full or obj <= LB + tau + tol:  # every allocation better than obj was searched
                    if obj > UB + tol:
                        raise RuntimeError(f"exact: core DP returned {obj!r}, worse than the incumbent {UB!r}")
                    times["core_dp"] = time.perf_counter() - t
                    info.update(levels[-1], method="fixing+dp", levels=levels, seconds=times, best_incumbent=UB)
                    return finish(problem, self.name, idx, Status.OPTIMAL, lower_bound=obj, t0=t0, info=info)
            elif full:  # cannot happen: the incumbent lies in the full core
                break
            tau *= DEEPEN

        # 5'. CP-SAT on the full core (several budgets with a large table, non-integer costs, or asked for)
        core = rc <= gap + tol
        Ec, Cc, offc, selc = _subset(E, C, off, core)
        inc_core = _local(inc, off, core, offc)
        info.update(core=int(len(Ec)), core_components=int((np.diff(offc) > 1).sum()), levels=levels,
                    best_incumbent=UB, method="fixing+cpsat")
        floors = np.where(lam > 0, B - (gap + tol) / np.where(lam > 0, lam, 1.0), -np.inf)
        out = self._cpsat(Ec, Cc, offc, B, inc_core, t0, floors)
        times["core_cpsat"] = time.perf_counter() - t
        return self._finish(problem, out, inc_core, offc, sel[selc], t0, info, times, LB)

    # ----------------------------------------------------------------------------- helpers
    def _cpsat(self, E, C, off, B, hint, t0, floors=None) -> dict:
        left = max(self.time_limit - (time.perf_counter() - t0), 0.01)
        return solve_arrays_anywhere(E, C, off, B, left, self.workers, hint, self.bits, floors=floors)

    def _finish(self, problem, out, inc, off, pos_map, t0, info, times, LB):
        info["seconds"] = times
        offsets = problem.flat.offsets
        out = dict(out)
        if out["choice"] is not None:
            out["choice"] = _to_problem(out["choice"], off, pos_map, offsets)
        inc = None if inc is None else _to_problem(inc, off, pos_map, offsets)
        return from_result(problem, self.name, out, inc, t0, info=info, lower_bound=LB)


def _subset(E, C, off, mask):
    """The candidates under ``mask`` as new flat arrays, and their positions in the input arrays."""
    sel = np.flatnonzero(mask)
    counts = np.add.reduceat(mask.astype(np.int64), off[:-1])
    if (counts == 0).any():
        raise RuntimeError("exact: a component lost all its candidates (internal error)")
    return E[sel], C[:, sel], np.concatenate([[0], np.cumsum(counts)]), sel


def _local(idx, off, mask, new_off):
    """Component-local indices ``idx`` (over ``off``) re-expressed over the masked arrays."""
    rank_in_mask = np.cumsum(mask) - 1
    pos = off[:-1] + np.asarray(idx)
    if not mask[pos].all():
        raise RuntimeError("exact: the incumbent left the core (internal error)")
    return rank_in_mask[pos] - new_off[:-1]


def _to_local(idx, offsets, sel, off):
    """Index per curve -> component-local index over the subset ``sel`` (offsets ``off``)."""
    pos = offsets[:-1] + np.asarray(idx, dtype=np.int64)
    return np.searchsorted(sel, pos) - off[:-1]


def _to_problem(choice, off, pos_map, offsets):
    """Component-local ``choice`` over a subset (offsets ``off``, flat positions ``pos_map``) -> index per curve."""
    pos = pos_map[off[:-1] + np.asarray(choice, dtype=np.int64)]
    return (pos - offsets[:-1]).astype(np.int64)


def _core_dp(E, C, off, B, rc, lam, threshold, max_cells, info):
    """Exact solve of the core by the window DP (integer costs only); None if no state survives.

    Raises ValueError when the costs are not integers or the tables would exceed ``max_cells``.
    """
    Ci, Bi, unit, exact = _mckp.integer_costs(C, B)
    if not exact:
        raise ValueError("core DP needs integer-valued costs")
    L, R = len(off) - 1, C.shape[0]
    values, deltas, base = [], [], np.zeros(R, dtype=np.int64)
    for l in range(L):
        ci = Ci[:, off[l]:off[l + 1]].T  # (k, R)
        cmin = ci.min(axis=0)
        base += cmin
        values.append(rc[off[l]:off[l + 1]])
        deltas.append(ci - cmin)
    cap = Bi - base
    if (cap < 0).any():
        return None
    # an optimum leaves at most threshold / lam_k of budget k unused (module docstring)
    lo = np.zeros(R, dtype=np.int64)
    for k in range(R):
        if lam[k] > 0:
            lo[k] = max(int(math.floor((float(B[k]) - threshold / lam[k]) / unit[k])) - int(base[k]) - 1, 0)
    # components that vary in later budgets first: those axes then close early
    varies = np.array([[int((d[:, k] > 0).any()) for k in range(1, R)] for d in deltas]).reshape(L, R - 1)
    order = np.lexsort(tuple(-varies[:, k] for k in range(R - 2, -1, -1))) if R > 1 else np.arange(L)
    info.update(dp_cost_unit=unit.tolist(), dp_window=[lo.tolist(), cap.tolist()], scale=1.0)
    out = _mckp.window_dp([values[l] for l in order], [deltas[l] for l in order], cap, lo, lam * unit,
                          threshold, max_cells)
    if out is None:
        return None
    info["dp_cells"] = out[2]
    choice = np.empty(L, dtype=np.int64)
    choice[order] = out[0]
    return choice
