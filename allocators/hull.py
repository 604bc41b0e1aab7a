# MCKP relaxation (Sinha & Zoltners, 1979): lower convex hull of each (cost, error) curve
"""Lower convex hulls of (cost, error) curves, the only candidates a Lagrangian relaxation can pick.

For a multiplier ``lambda >= 0``, ``argmin_j e_j + lambda * c_j`` is a vertex of the lower convex
hull of the points ``(c_j, e_j)``, on its decreasing part: from the cheapest point (least error
among the cheapest) to the least-error point (cheapest among those). We call this chain the
*lower-left hull*. Going from vertex ``i`` to vertex ``i+1`` costs ``c_{i+1} - c_i > 0`` and saves
``e_i - e_{i+1} > 0``. Its *breakpoint* ``lambda_i = (e_i - e_{i+1}) / (c_{i+1} - c_i)`` decreases
along the chain: for ``lambda > lambda_i`` vertex ``i`` beats ``i+1``.

:func:`lower_hulls` computes every component's chain at once:

1. Sort each curve by cost. Keep the least error per cost, then only the points whose error is
   below that of every cheaper point (dominated points are never on the lower-left hull).
2. Repeatedly delete, in all components at once, every point strictly above a chord between two
   other current points around it. The chords tried are to its two neighbours, from its left
   neighbour to the last point, and from the first point to its right neighbour. Such a point
   lies above a segment between two points of the set, so it is never a hull vertex. Deleting it
   only lowers the piecewise-linear interpolant, so every deleted point stays above the final
   chain. Near-convex curves need one or two passes. The far chords remove in one pass the run
   of points that a cheap dense candidate "shadows".
3. After a few passes, components that still have a reflex point finish with Andrew's monotone
   chain, run in lockstep over those components (one position per step, pops vectorised).

The result is convex, holds every hull vertex, and is therefore the lower hull.
"""

from __future__ import annotations

import numpy as np

from rankalloc.allocators.segments import group_first_min, offsets_of, segment_cummax, sort_within


def lower_hull(costs, errors, collinear: bool = False) -> np.ndarray:
    """Indices of the lower-left hull vertices of one curve, in increasing cost.

    Args:
        costs, errors: one value per candidate (finite).
        collinear: keep points that lie exactly on a hull edge (default: drop them).

    >>> lower_hull([0, 1, 2, 3, 4], [10.0, 6.0, 5.0, 1.0, 1.0]).tolist()   # (2, 5) lies above the chord
    [0, 1, 3]
    """
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    if c.shape != e.shape or len(c) == 0:
        raise ValueError(f"lower_hull: expected equal-length non-empty costs and errors, "
                         f"received {c.shape} and {e.shape}")
    return lower_hulls(c, e, np.array([0, len(c)]), collinear=collinear)


MAX_PASSES = 6
"""Deletion passes before the remaining reflex components go to the monotone chain."""


def lower_hulls(costs: np.ndarray, errors: np.ndarray, offsets: np.ndarray, collinear: bool = False) -> np.ndarray:
    """Flat positions of the lower-left hull of every component, by component then increasing cost.

    Only the decreasing part is returned: from the cheapest point to the least-error one. ``offsets`` (``L+1``) delimits the components in the flat ``costs``/``errors`` arrays; every
    component must own at least one candidate. Ties (equal cost and error) keep the first position.
    """
    c = np.asarray(costs, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if not (np.isfinite(c).all() and np.isfinite(e).all()):
        raise ValueError("lower_hulls: expected finite costs and errors")
    sizes = np.diff(offsets)
    if (sizes < 1).any():
        raise ValueError(f"lower_hulls: component {int(np.flatnonzero(sizes < 1)[0])} has no candidate")
    L = len(sizes)
    owner = np.repeat(np.arange(L), sizes)
    order = sort_within(c, offsets)
    co, oo = c[order], owner[order]
    new = np.concatenate([[True], (oo[1:] != oo[:-1]) | (co[1:] != co[:-1])])
    idx = order[group_first_min(e[order], np.flatnonzero(new))]  # least error per (component, cost)
    ee, seg = e[idx], offsets_of(owner[idx], L)
    best_before = np.concatenate([[np.inf], -segment_cummax(-ee, seg)[:-1]])  # least error of cheaper points
    best_before[seg[:-1]] = np.inf
    idx = idx[ee < best_before]  # Pareto front: strictly cheaper and strictly worse along the chain
    above = (lambda x: x > 0) if collinear else (lambda x: x >= 0)
    for _ in range(MAX_PASSES):
        reflex = _reflex(c, e, idx, owner, above)
        if not reflex.any():
            return idx
        idx = idx[~reflex]
    reflex = _reflex(c, e, idx, owner, above)
    if not reflex.any():
        return idx
    todo = np.zeros(L, dtype=bool)
    todo[owner[idx[reflex]]] = True
    keep = ~todo[owner[idx]]
    done = _monotone_chain(c, e, idx[~keep], owner, above)
    merged = np.concatenate([idx[keep], done])
    return merged[np.lexsort((c[merged], owner[merged]))]


def _cross(ca, ea, cq, eq, cb, eb):
    """Positive when point q lies above the chord from a to b (``c_a < c_q < c_b``)."""
    return (eq - ea) * (cb - ca) - (eb - ea) * (cq - ca)


def _reflex(c, e, idx, owner, above) -> np.ndarray:
    """Mask of chain points above a chord between two other points around them (see module doc)."""
    cc, ee, oc = c[idx], e[idx], owner[idx]
    n = len(idx)
    out = np.zeros(n, dtype=bool)
    if n < 3:
        return out
    inner = (oc[1:-1] == oc[:-2]) & (oc[1:-1] == oc[2:])
    starts = np.flatnonzero(np.concatenate([[True], oc[1:] != oc[:-1]]))
    ends = np.concatenate([starts[1:], [n]]) - 1
    seg = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))[1:-1]
    f, z = starts[seg], ends[seg]
    L_, M, R_ = slice(None, -2), slice(1, -1), slice(2, None)
    near = above(_cross(cc[L_], ee[L_], cc[M], ee[M], cc[R_], ee[R_]))
    to_last = above(_cross(cc[L_], ee[L_], cc[M], ee[M], cc[z], ee[z])) & (z > np.arange(1, n - 1) + 1)
    from_first = above(_cross(cc[f], ee[f], cc[M], ee[M], cc[R_], ee[R_])) & (f < np.arange(1, n - 1) - 1)
    out[1:-1] = inner & (near | to_last | from_first)
    return out


def _monotone_chain(c, e, idx, owner, above) -> np.ndarray:
    """Andrew's monotone chain (lower hull) for the components of ``idx``, all advanced in lockstep.

    ``idx`` is sorted by component, then strictly increasing cost. Returns the hull positions.
    """
    if len(idx) == 0:
        return idx
    oc = owner[idx]
    rows, row = np.unique(oc, return_inverse=True)
    counts = np.bincount(row)
    col = np.arange(len(idx)) - np.concatenate([[0], np.cumsum(counts)])[:-1][row]
    M = int(counts.max())
    X = np.zeros((len(rows), M))
    Y = np.zeros((len(rows), M))
    X[row, col], Y[row, col] = c[idx], e[idx]
    stack = np.zeros((len(rows), M), dtype=np.int64)
    top = np.zeros(len(rows), dtype=np.int64)
    for p in range(M):
        act = np.flatnonzero(counts > p)
        check = act[top[act] >= 2]
        while len(check):
            i, j = stack[check, top[check] - 2], stack[check, top[check] - 1]
            pop = above(_cross(X[check, i], Y[check, i], X[check, j], Y[check, j], X[check, p], Y[check, p]))
            check = check[pop]
            top[check] -= 1
            check = check[top[check] >= 2]
        stack[act, top[act]] = p
        top[act] += 1
    keep = np.arange(M)[None, :] < top[:, None]
    r, k = np.nonzero(keep)
    base = np.concatenate([[0], np.cumsum(counts)])[:-1]
    return idx[base[r] + stack[r, k]]


def breakpoints(costs: np.ndarray, errors: np.ndarray, hull: np.ndarray, owner: np.ndarray):
    """The edges of the hull chains: ``(left, right, lam)`` with ``lam = (e_left - e_right) / (c_right - c_left)``.

    ``hull`` are flat positions from :func:`lower_hulls`; ``owner`` maps a flat position to its
    component. Edges join consecutive vertices of the same component.
    """
    same = owner[hull[1:]] == owner[hull[:-1]]
    left, right = hull[:-1][same], hull[1:][same]
    lam = (errors[left] - errors[right]) / (costs[right] - costs[left])
    return left, right, lam


def pareto_mask(flat) -> np.ndarray:
    """Candidates of ``flat`` (:class:`~rankalloc.allocators.segments.FlatTables`) not dominated within their
    component: another one has <= error and <= every cost, one strictly, or is identical with a lower
    index. Some optimum uses only these; with one resource they hold the whole lower-left hull."""
    E, C, offsets = flat.errors, flat.costs, flat.offsets
    keep = np.ones(len(E), dtype=bool)
    R = C.shape[0]
    for l in range(len(offsets) - 1):
        s = slice(offsets[l], offsets[l + 1])
        e, c = E[s], C[:, s]
        if R == 1:
            order = np.lexsort((e, c[0]))  # cost ascending, then error
            best = np.minimum.accumulate(e[order])
            ok = np.ones(len(order), dtype=bool)
            ok[1:] = e[order][1:] < best[:-1]
            k = np.zeros(len(order), dtype=bool)
            k[order] = ok
        else:
            le = (e[:, None] <= e[None, :]) & (c[:, :, None] <= c[:, None, :]).all(axis=0)  # i no worse than j
            eq = (e[:, None] == e[None, :]) & (c[:, :, None] == c[:, None, :]).all(axis=0)
            n = len(e)
            earlier = np.arange(n)[:, None] < np.arange(n)[None, :]
            dom = le & (~eq | earlier)
            np.fill_diagonal(dom, False)
            k = ~dom.any(axis=0)
        keep[s] = k
    return keep
