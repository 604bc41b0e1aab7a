# Exact MCKP: Lagrangian reduced-cost fixing, then an exact core solve (Kellerer, Pferschy & Pisinger, 2004, Ch. 11)
r"""The solver the library calls "exact": a proven optimum of the multiple-choice knapsack.

Plain CP-SAT cannot prove optimality on a LLaMA-70B-sized instance (560 components, ~2e5
candidates) in useful time. Near the optimum there are too many allocations within 1e-6 of
each other. This solver first removes every candidate that no optimal allocation can use. It
then solves the small core that remains exactly.

**Method** (notation of :mod:`rankalloc.allocators.dual`; ``B`` are the largest accepted totals,
:func:`~rankalloc.allocators.segments.feasible_limits`):

1. Drop dominated candidates, i.e. those with another candidate no worse in error and in every
   cost. Some optimum avoids them.
2. Compute multipliers ``lambda >= 0``. One budget: the exact LP price ``lambda*`` from the
   lower convex hulls (:func:`~rankalloc.allocators.dual.multiplier_search`). Several budgets:
   LP duals by column generation (:func:`~rankalloc.allocators.dual.lp_multipliers`). The dual
   bound is ``LB = L(lambda) = sum_l mu_l - lambda . B``.
3. Take an incumbent ``x^``: the search's choice (one budget) or the argmin of
   ``e + lambda . c`` (several), repaired by greedy descent and filled
   (:mod:`rankalloc.allocators.moves`). Its objective is ``UB``.
4. Fix: keep only the candidates with ``rc_lj <= UB - LB`` (plus a float tolerance).
5. Solve the core exactly. With integer costs this is a DP over the cost in gcd units, one
   axis per budget (:mod:`rankalloc.allocators.core_dp`). It keeps only the totals that can still be optimal (a window) and the
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

``method="plain"`` skips all of this: CP-SAT (:mod:`rankalloc.allocators.cpsat`) on every
candidate, hinted with the same incumbent (the baseline). Status OPTIMAL only when proven. Otherwise TIME_LIMIT, with the best allocation and the
certified bound ``max(LB, core bound)``. ``info`` records the multipliers, ``LB``, ``UB``,
the core size, the DP cells or the CP-SAT objective scale, and the time of each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.core_dp import budget_floor, core_dp
from rankalloc.allocators.cpsat import check_cpsat_settings, from_result, solve_arrays_anywhere
from rankalloc.allocators.dual import lp_multipliers, multiplier_search, reduced_costs
from rankalloc.allocators.hull import pareto_mask
from rankalloc.allocators.moves import fill_upgrades, greedy_descent
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import FlatTables, feasible_limits, group_first_min, limits_of, scalar_weights

DEEPEN = 8.0
"""Growth factor of the fixing threshold between core-DP attempts."""

FIXING_RTOL = 1e-9
"""Float slack of the fixing thresholds, relative to ``1 + |UB| + |LB|`` (objective units; the budget
tolerance is :data:`~rankalloc.allocators.segments.FEASIBILITY_RTOL`)."""

METHODS = ("auto", "dp", "cpsat", "plain")
"""``auto``: core DP when it applies (one budget, integer costs, table within ``max_cells``),
else CP-SAT on the core. ``dp``/``cpsat``: force the core solver. ``plain``: CP-SAT on every
candidate without fixing (the baseline)."""


@register_solver("exact")
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
        limits, w = limits_of(problem), scalar_weights(problem)
        B = feasible_limits(limits)
        if self.method == "plain":  # CP-SAT on every candidate, hinted with the incumbent
            hint = incumbent(problem.flat, limits, w)[1]
            out = self._cpsat(problem.flat, B, hint, t0)
            return from_result(problem, self.name, out, hint, t0, info={"method": "plain"})
        info: dict = {"method": self.method, "candidates": int(len(problem.flat.errors))}
        times: dict = {}

        # 1. dominated candidates out
        F, sel = problem.flat.subset(pareto_mask(problem.flat))
        info["undominated"] = int(len(F.errors))
        times["dominance"] = time.perf_counter() - t0

        # 2.-3. multipliers, dual bound, incumbent
        t = time.perf_counter()
        lam, inc = incumbent(F, limits, w)
        LB, _, rc = reduced_costs(F, lam, B)
        times["dual"] = time.perf_counter() - t
        info.update(multipliers=lam.tolist(), lagrangian_bound=LB)
        if inc is None:  # no incumbent, no fixing: CP-SAT on all undominated candidates
            info["core"] = int(len(F.errors))
            out = self._cpsat(F, B, None, t0)
            return self._finish(problem, out, None, F.offsets, sel, t0, info, times, LB)
        UB = float(F.errors[F.offsets[:-1] + inc].sum())
        tol = FIXING_RTOL * (1.0 + abs(UB) + abs(LB))
        info.update(incumbent=UB, gap=max(UB - LB, 0.0))

        # 4.-5. fixing and core DP, by iterative deepening of the threshold tau (module docstring)
        t = time.perf_counter()
        levels: list = []
        if self.method in ("auto", "dp"):
            done, inc, UB = self._deepen(problem, F, sel, (B, rc, lam, LB), inc, UB, tol, levels, info)
            if done is not None:
                times["core_dp"] = time.perf_counter() - t
                info.update(levels[-1], method="fixing+dp", levels=levels, seconds=times, best_incumbent=UB)
                return finish(problem, self.name, done, Status.OPTIMAL, lower_bound=problem.evaluate(done)[0],
                              t0=t0, info=info)

        # 5'. CP-SAT on the full core (several budgets with a large table, non-integer costs, or asked for)
        gap = max(UB - LB, 0.0)
        core = rc <= gap + tol
        Fc, selc = F.subset(core)
        inc_core = _local(inc, F.offsets, core, Fc.offsets)
        info.update(core=int(len(Fc.errors)), core_components=int((np.diff(Fc.offsets) > 1).sum()), levels=levels,
                    best_incumbent=UB, method="fixing+cpsat")
        floors = np.array([budget_floor(float(b), gap + tol, float(l)) for b, l in zip(B, lam)])  # 0: no floor
        out = self._cpsat(Fc, B, inc_core, t0, floors)
        times["core_cpsat"] = time.perf_counter() - t
        return self._finish(problem, out, inc_core, Fc.offsets, sel[selc], t0, info, times, LB)

    # ----------------------------------------------------------------------------- helpers
    def _deepen(self, problem, F: FlatTables, sel, dual, inc, UB: float, tol: float, levels: list, info: dict):
        """Steps 4-5 by the core DP at thresholds ``tau = gap/64, 8 tau, ...`` (module docstring).

        Returns ``(proven optimal choice per curve or None, incumbent over F, UB)``; None when the DP
        does not apply (``info["dp_skipped"]``) or, which cannot happen, finds nothing in the full core.
        """
        B, rc, lam, LB = dual
        offsets = problem.flat.offsets
        gap = max(UB - LB, 0.0)
        tau = max(gap / DEEPEN ** 2, tol)
        while True:
            full = tau >= gap
            tau = min(tau, gap)
            core = rc <= tau + tol
            Fc, selc = F.subset(core)
            level = {"threshold": tau, "core": int(len(Fc.errors)),
                     "core_components": int((np.diff(Fc.offsets) > 1).sum())}
            levels.append(level)
            try:
                choice = core_dp(Fc, B, rc[core], lam, tau + tol, self.max_cells, level)
            except ValueError as err:
                if self.method == "dp":
                    raise
                info["dp_skipped"] = str(err)
                return None, inc, UB
            if choice is not None:
                idx = _to_problem(choice, Fc.offsets, sel[selc], offsets)
                obj = problem.evaluate(idx)[0]
                if obj < UB:
                    inc, UB = _to_local(idx, offsets, sel, F.offsets), obj
                    gap = max(UB - LB, 0.0)
                if full or obj <= LB + tau + tol:  # every allocation better than obj was searched
                    if obj > UB + tol:
                        raise RuntimeError(f"exact: core DP returned {obj!r}, worse than the incumbent {UB!r}")
                    return idx, inc, UB
            elif full:  # cannot happen: the incumbent lies in the full core
                return None, inc, UB
            tau *= DEEPEN

    def _cpsat(self, F: FlatTables, B, hint, t0, floors=None) -> dict:
        left = max(self.time_limit - (time.perf_counter() - t0), 0.01)
        return solve_arrays_anywhere(F.errors, F.costs, F.offsets, B, left, self.workers, hint, self.bits,
                                     floors=floors)

    def _finish(self, problem, out, inc, off, pos_map, t0, info, times, LB):
        info["seconds"] = times
        offsets = problem.flat.offsets
        out = dict(out)
        if out["choice"] is not None:
            out["choice"] = _to_problem(out["choice"], off, pos_map, offsets)
        inc = None if inc is None else _to_problem(inc, off, pos_map, offsets)
        return from_result(problem, self.name, out, inc, t0, info=info, lower_bound=LB)


def incumbent(flat: FlatTables, limits: np.ndarray, weights: np.ndarray):
    """Multipliers ``lambda`` and a feasible choice near the Lagrangian optimum (None when repair fails).

    One budget: the exact multiplier search's ``lambda*`` and choice. Several budgets: the LP
    multipliers (column generation) and the argmin of ``e + lambda . c``. The choice is then
    repaired by greedy descent (a no-op when it fits) and filled. ``limits`` are the problem's
    limits, ``weights`` its :func:`~rankalloc.allocators.segments.scalar_weights`.
    """
    starts = flat.offsets[:-1]
    if flat.costs.shape[0] == 1:
        start, lam0 = multiplier_search(flat, flat.errors, 0, limits[0])
        lam = np.array([max(lam0, 0.0)])
    else:
        lam = lp_multipliers(flat, feasible_limits(limits))
        start = group_first_min(flat.errors + lam @ flat.costs, starts) - starts
    idx, ok, _ = greedy_descent(flat, start, limits, weights)
    return lam, (fill_upgrades(flat, idx, limits, weights)[0] if ok else None)


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
