# Exact core of the MCKP by dynamic programming (Kellerer, Pferschy & Pisinger, 2004, Ch. 11)
"""Integer cost scaling and the window DP that solves exact's fixed core.

:func:`integer_costs` turns costs into integers for an integer-only backend (this DP, CP-SAT).
:func:`window_dp` minimises a sum of per-component values minus a price of the total cost over
the choices whose total lies in a box, keeping only partial totals that can still end in the box
and partial values under a threshold. :func:`core_dp` sets it up for exact's core: values are the
reduced costs, the box is the budget and the window an optimum can leave unused
(:mod:`rankalloc.allocators.exact` gives the proof).
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from rankalloc.allocators.segments import FlatTables


def integer_costs(C: np.ndarray, limits: np.ndarray, bits: int = 50):
    """Integer costs and limits for an integer-only backend, one row per resource.

    Integer-valued costs are divided by the gcd of the row (exact). Other rows are scaled by
    ``2^k`` so the largest total fits in ``2^bits``, costs rounded UP and the limit DOWN, which
    keeps every integer-feasible choice feasible but may cut feasible ones: ``exact`` is then False.
    Returns ``(Ci (R,N) int64, Bi (R,) int64, unit (R,) float, exact: bool)``.
    """
    R = C.shape[0]
    Ci = np.zeros(C.shape, dtype=np.int64)
    Bi = np.zeros(R, dtype=np.int64)
    unit = np.ones(R)
    exact = True
    for k in range(R):
        row = C[k]
        if np.all(row == np.round(row)) and row.max(initial=0) < 2 ** 53:
            ints = row.astype(np.int64)
            g = reduce(math.gcd, np.unique(ints).tolist(), 0) or 1
            Ci[k] = ints // g
            Bi[k] = int(math.floor(limits[k] / g)) if limits[k] < 2 ** 62 else 2 ** 62
            unit[k] = g
        else:
            exact = False
            total = max(float(row.max(initial=0)) * 1.0, 1e-300)
            s = 2.0 ** math.floor(math.log2(2 ** (bits - 10) / total))
            Ci[k] = np.ceil(row * s).astype(np.int64)
            Bi[k] = int(math.floor(limits[k] * s))
            unit[k] = 1.0 / s
        Bi[k] = max(Bi[k], -1)
    return Ci, Bi, unit, exact


def window_dp(values: list[np.ndarray], deltas: list[np.ndarray], cap, lo, price, threshold: float,
              max_cells: float = 2e9):
    """Exact min of ``sum_l values_l[j_l] - price . s`` over choices whose total ``s = sum_l deltas_l[j_l]``
    lies in the box ``[lo, cap]`` (one axis per budget).

    ``deltas[l]`` is a ``(k_l, R)`` array of non-negative integers, the cost above the cheapest
    candidate in cost units. A partial state whose value exceeds ``threshold`` is dropped: values
    are >= 0, so no completion can bring it back under. Only partial totals that can still end in
    the box are kept, so the table is a moving window on every axis. Components should come with
    the ones that vary in later budgets first (their axes then collapse early). Returns
    ``(choice per component, best value, cells)`` or None when no state survives. Raises
    ValueError when the tables would exceed ``max_cells``.
    """
    from tqdm.auto import tqdm

    n = len(values)
    deltas = [np.asarray(d, dtype=np.int64).reshape(len(v), -1) for v, d in zip(values, deltas)]
    R = deltas[0].shape[1]
    cap = np.asarray(cap, dtype=np.int64).reshape(R)
    lo = np.asarray(lo, dtype=np.int64).reshape(R)
    price = np.asarray(price, dtype=np.float64).reshape(R)
    maxd = np.array([d.max(axis=0) for d in deltas]).reshape(n, R)
    done_max = np.vstack([np.zeros((1, R), dtype=np.int64), np.cumsum(maxd, axis=0)])
    lo_t = np.maximum(0, lo - (done_max[-1] - done_max))
    hi_t = np.minimum(cap, done_max)
    width = np.maximum(hi_t - lo_t + 1, 0)
    cells = float(sum(len(values[t]) * np.prod(width[t + 1].astype(np.float64)) for t in range(n)))
    if cells > max_cells:
        raise ValueError(f"window DP needs {cells:.3g} cells, above max_cells={max_cells:.3g}")
    f = np.zeros((1,) * R)
    arg_tables = []
    for t in tqdm(range(n), desc="exact core DP", unit="component", leave=False, disable=cells < 5e8):
        a0, a1 = lo_t[t], hi_t[t]          # window of f (absolute partial totals a0..a1 per axis)
        b0, b1 = lo_t[t + 1], hi_t[t + 1]  # window of the new table
        if (b1 < b0).any():
            return None
        new, arg = _dp_step(f, a0, a1, b0, b1, values[t], deltas[t])
        new[new > threshold] = np.inf
        if not np.isfinite(new).any():
            return None
        f = new
        arg_tables.append(arg)
    axes = np.ix_(*[np.arange(lo_t[n][k], hi_t[n][k] + 1) for k in range(R)])
    total = f - sum(price[k] * axes[k] for k in range(R))
    flat = int(np.argmin(total))
    if not np.isfinite(total.flat[flat]):
        return None
    best = float(total.flat[flat])
    pos = np.array(np.unravel_index(flat, total.shape)) + lo_t[n]
    choice = np.zeros(n, dtype=np.int64)
    for t in range(n - 1, -1, -1):
        j = int(arg_tables[t][tuple(pos - lo_t[t + 1])])
        choice[t] = j
        pos = pos - deltas[t][j]
    return choice, best, cells


def _dp_step(f, a0, a1, b0, b1, values: np.ndarray, deltas: np.ndarray):
    """One component of :func:`window_dp`: the table over window ``[b0, b1]`` from ``f`` over ``[a0, a1]``
    (least value per total; ties keep the earlier candidate) and its arg-min candidate per cell."""
    new = np.full(tuple(b1 - b0 + 1), np.inf)
    arg = np.full(new.shape, -1, dtype=np.int16 if len(values) < 2 ** 15 else np.int32)
    for j, v in enumerate(values.tolist()):
        d = deltas[j]
        s0, s1 = np.maximum(a0, b0 - d), np.minimum(a1, b1 - d)  # sources landing in the new window
        if (s1 < s0).any():
            continue
        src = f[tuple(slice(x0 - y0, x1 - y0 + 1) for x0, x1, y0 in zip(s0, s1, a0))] + v
        tgt = tuple(slice(x0 + dd - y0, x1 + dd - y0 + 1) for x0, x1, dd, y0 in zip(s0, s1, d, b0))
        better = src < new[tgt]
        new[tgt] = np.where(better, src, new[tgt])
        arg[tgt] = np.where(better, j, arg[tgt])
    return new, arg


def budget_floor(limit: float, threshold: float, lam: float) -> float:
    """The least total of a budget an optimum can use: ``limit - threshold / lam``, or 0 when there is no floor.

    An optimum leaves at most ``threshold / lam`` of the budget unused (exact's module docstring). When
    ``lam`` is 0, or so small (a subnormal price, from errors that differ by a subnormal amount) that
    ``threshold / lam`` overflows or reaches ``limit``, the window is unbounded below and the floor is 0:
    dropping a floor only keeps more states, so the DP stays exact. Never raises, never returns inf.
    """
    if not (lam > 0 and threshold >= 0 and math.isfinite(limit) and limit > 0):
        return 0.0
    # threshold / lam >= limit  <=>  threshold >= limit * lam (lam > 0); this product cannot overflow
    # for the budget to have any floor, and it underflows only towards "no floor" (0 < threshold)
    if threshold >= limit * lam:
        return 0.0
    slack = threshold / lam  # < limit, so finite
    return max(limit - slack, 0.0)


def core_dp(core: FlatTables, limits, rc, lam, threshold: float, max_cells: float, info: dict):
    """Exact solve of the core by the window DP (integer costs only); None if no state survives.

    ``limits`` are the largest accepted totals (:func:`~rankalloc.allocators.segments.feasible_limits`),
    ``rc`` the reduced costs of the core's candidates under the multipliers ``lam``, and
    ``threshold`` the largest sum of reduced costs kept. Records the cost unit, the window and the
    cells in ``info``; returns the choice per component. Raises ValueError when the costs are not
    integers or the tables would exceed ``max_cells``.
    """
    C, off, B = core.costs, core.offsets, np.asarray(limits, dtype=np.float64)
    Ci, Bi, unit, exact = integer_costs(C, B)
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
    # an optimum leaves at most threshold / lam_k of budget k unused (exact's module docstring)
    lo = np.zeros(R, dtype=np.int64)
    for k in range(R):
        floor_k = budget_floor(float(B[k]), threshold, float(lam[k]))
        if floor_k > 0:
            lo[k] = max(int(math.floor(floor_k / unit[k])) - int(base[k]) - 1, 0)
    # components that vary in later budgets first: those axes then close early
    varies = np.array([[int((d[:, k] > 0).any()) for k in range(1, R)] for d in deltas]).reshape(L, R - 1)
    order = np.lexsort(tuple(-varies[:, k] for k in range(R - 2, -1, -1))) if R > 1 else np.arange(L)
    info.update(dp_cost_unit=unit.tolist(), dp_window=[lo.tolist(), cap.tolist()], scale=1.0)
    out = window_dp([values[l] for l in order], [deltas[l] for l in order], cap, lo, lam * unit,
                    threshold, max_cells)
    if out is None:
        return None
    info["dp_cells"] = out[2]
    choice = np.empty(L, dtype=np.int64)
    choice[order] = out[0]
    return choice
