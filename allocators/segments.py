# MCKP on flat arrays (Kellerer, Pferschy & Pisinger, 2004, Ch. 11): per-component segments and the budget test
"""Per-component (segmented) array helpers shared by every solver, and the one feasibility tolerance.

The solvers work on :attr:`AllocationProblem.flat` (a :class:`FlatTables`): every candidate of
every component in one flat array, component ``l`` owning positions ``offsets[l]:offsets[l+1]``:
``errors (N,)``, ``costs (R, N)``, ``offsets (L+1,)``, ``owner (N,)``. The helpers here sort, scan,
subset and test budgets on such arrays without a Python loop per candidate. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEASIBILITY_RTOL = 1e-9
"""The one feasibility tolerance: a total cost ``c`` meets limit ``B`` when ``c <= B (1 + t) + t``.

``AllocationProblem.is_feasible``, ``infeasibility_message``, :func:`fits` (every solver's budget
test), the DP capacities and the CP-SAT limits all use it, through :func:`feasible_limits`.
1e-9 is what ``is_feasible``, the DP and CP-SAT always accepted; the heuristics used to test
against 1e-12. The two differ only on a total over its limit by between about ``1e-12 B`` and
``1e-9 B``. On model-sized problems the built-in cost models put totals on a lattice far coarser
than that (multiples of 16384 parameters on the bench_solvers instance, where ``1e-9 B`` is 27 to
55) and removed-fraction limits sit far from its points, so the benchmark stays bit-identical.
"""


@dataclass(frozen=True)
class FlatTables:
    """Every candidate of every component in flat arrays (component ``l`` owns ``offsets[l]:offsets[l+1]``)."""

    offsets: np.ndarray  # (L+1,) start of each component's candidates
    owner: np.ndarray    # (N,) component of each candidate
    errors: np.ndarray   # (N,) weighted errors
    costs: np.ndarray    # (R, N) cost per resource

    @classmethod
    def of(cls, errors: np.ndarray, costs: np.ndarray, counts: np.ndarray) -> "FlatTables":
        """Tables from flat ``errors``/``costs`` and the number of candidates of each component."""
        counts = np.asarray(counts, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        owner = np.repeat(np.arange(len(counts)), counts)
        return cls(offsets=offsets, owner=owner, errors=errors, costs=np.atleast_2d(costs))

    def subset(self, mask: np.ndarray) -> tuple["FlatTables", np.ndarray]:
        """The candidates under ``mask`` (every component keeps one or more) and their positions here."""
        sel = np.flatnonzero(mask)
        counts = np.add.reduceat(np.asarray(mask, dtype=np.int64), self.offsets[:-1])
        if (counts == 0).any():
            raise RuntimeError("a component lost all its candidates (internal error)")
        return FlatTables.of(self.errors[sel], self.costs[:, sel], counts), sel

    def total(self, choice_index) -> np.ndarray:
        """Cost per resource ``(R,)`` of a choice (one component-local index per component)."""
        return self.costs[:, self.offsets[:-1] + np.asarray(choice_index, dtype=np.int64)].sum(axis=1)


def feasible_limits(limits) -> np.ndarray:
    """The largest total cost per resource that meets ``limits``: ``B (1 + t) + t``, ``t`` = :data:`FEASIBILITY_RTOL`."""
    b = np.asarray(limits, dtype=np.float64)
    return b * (1 + FEASIBILITY_RTOL) + FEASIBILITY_RTOL


def fits(cost: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Whether ``cost`` (shape ``(R,)`` or ``(R, T)``) meets every limit (shape ``(R,)``); bool or ``(T,)``."""
    cost = np.asarray(cost, dtype=np.float64)
    lim = feasible_limits(limits).reshape((-1,) + (1,) * (cost.ndim - 1))
    return np.all(cost <= lim, axis=0)


def limits_of(problem) -> np.ndarray:
    """The absolute limit of each budgeted resource, in ``problem.resources`` order."""
    return np.array([problem.limits[r] for r in problem.resources], dtype=np.float64)


def scalar_weights(problem) -> np.ndarray:
    """Weights ``w_k = 1 / B_k`` that scalarise several resources into one cost ``sum_k w_k c_k``.

    A resource with limit 0 must be removed entirely; it gets the weight of a limit of
    ``1e-9`` of its dense total (or 1 when its dense total is 0 too, where it costs nothing).
    """
    w = []
    for r in problem.resources:
        limit, dense = problem.limits[r], problem.dense_costs[r]
        w.append(1.0 / limit if limit > 0 else (1.0 / (1e-9 * dense) if dense > 0 else 1.0))
    return np.array(w, dtype=np.float64)


def stable_argsort(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, kind="stable")``, computed faster: an unstable sort, then equal keys by position.

    ``x`` must hold no NaN (``inf`` is fine).
    """
    x = np.asarray(x)
    if len(x) < 2:
        return np.arange(len(x))
    order = np.argsort(x)
    xs = x[order]
    tie = xs[1:] == xs[:-1]
    if not tie.any():
        return order
    group = np.concatenate([[0], np.cumsum(~tie)])
    key = group * len(x) + order
    return np.sort(key, kind="stable") % len(x)


def sort_within(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stable permutation of flat positions ordering each component's candidates by ``values``.

    Components stay in place (``offsets`` delimits them); ties keep their flat order. A fast
    composite key is tried first and checked; when rounding makes it inexact, ``np.lexsort``
    decides.
    """
    values = np.asarray(values, dtype=np.float64)
    sizes = np.diff(offsets)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.isfinite(values).all():
        return np.lexsort((np.arange(len(values)), values, owner))
    nonempty = sizes > 0
    lo = np.zeros(len(sizes))
    lo[nonempty] = np.minimum.reduceat(values, offsets[:-1][nonempty])
    shifted = values - lo[owner]
    span = float(shifted.max()) + 1.0
    # within a component the candidates come in rank order, so the key is nearly sorted and
    # numpy's stable sort (timsort on floats) runs in about linear time
    order = np.argsort(owner * span + shifted, kind="stable")
    ov, vv = owner[order], values[order]
    same = ov[1:] == ov[:-1]
    if np.all(ov[1:] >= ov[:-1]) and np.all(~same | (vv[1:] >= vv[:-1])):
        ties = same & (vv[1:] == vv[:-1])
        if np.all(~ties | (order[1:] > order[:-1])):
            return order
    return np.lexsort((np.arange(len(values)), values, owner))


def segment_cummax(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Running maximum of ``x`` restarted at every segment start ``offsets[:-1]`` (exact)."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    if len(x) < 2:
        return out
    drop = np.flatnonzero(x[1:] < x[:-1]) + 1  # positions where the running max differs from x
    seg = np.searchsorted(offsets, drop, side="right") - 1
    seg = seg[drop > offsets[seg]]  # a drop at a segment start is no drop
    for l in np.unique(seg):  # only segments that are not already non-decreasing
        a, b = offsets[l], offsets[l + 1]
        np.maximum.accumulate(x[a:b], out=out[a:b])
    return out


def group_first_min(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Position of the first minimum of each contiguous group of ``values`` (groups begin at ``starts``)."""
    values = np.asarray(values)
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.diff(np.append(starts, len(values)))
    multi = np.flatnonzero(sizes > 1)
    if len(multi) == 0:  # every group a single element
        return starts
    out = starts.copy()
    msz = sizes[multi]  # only the groups of two or more elements are searched
    first_of = np.concatenate([[0], np.cumsum(msz)[:-1]])
    elem = np.repeat(starts[multi] - first_of, msz) + np.arange(int(msz.sum()))
    gid = np.repeat(np.arange(len(multi)), msz)
    sub = values[elem]
    hit = np.flatnonzero(sub == np.minimum.reduceat(sub, first_of)[gid])
    keep = np.concatenate([[True], gid[hit][1:] != gid[hit][:-1]])
    out[multi] = elem[hit[keep]]
    return out


def segment_pick(offsets: np.ndarray, allowed: np.ndarray, primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per segment, the first ``allowed`` position with the largest ``primary``, ties to the smallest ``secondary``.

    Returns flat positions, ``-1`` for a segment with no allowed position.
    """
    starts = offsets[:-1]
    owner = np.repeat(np.arange(len(starts)), np.diff(offsets))
    top = np.maximum.reduceat(np.where(allowed, primary, -np.inf), starts)
    pick = allowed & (primary == top[owner])
    low = np.minimum.reduceat(np.where(pick, secondary, np.inf), starts)
    hit = np.flatnonzero(pick & (secondary == low[owner]))
    out = np.full(len(starts), -1, dtype=np.int64)
    if len(hit):
        oh = owner[hit]
        first = np.concatenate([[True], oh[1:] != oh[:-1]])
        out[oh[first]] = hit[first]
    return out


def offsets_of(owner_sorted: np.ndarray, n_components: int) -> np.ndarray:
    """Segment offsets ``(L+1,)`` of a flat array whose owners are sorted (components may be empty)."""
    return np.searchsorted(owner_sorted, np.arange(n_components + 1))
