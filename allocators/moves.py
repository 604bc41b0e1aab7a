# Local moves on an MCKP choice: SoLA's greedy descent (Huang et al., 2025, Sec. 3.3) to repair, an upgrade fill to spend
"""Two moves every solver that needs them shares: *repair* (greedy descent until the budgets hold)
and *fill* (greedy upgrades while they still fit). Both work on flat arrays
(:class:`~rankalloc.allocators.segments.FlatTables`), so they run on a whole problem or on a subset
of its candidates, and test budgets with :func:`~rankalloc.allocators.segments.fits`.

**Greedy descent** (:func:`greedy_descent`). Each component ``l`` walks down its *path*: its
candidates in decreasing cost, starting from the start candidate, keeping the least error at each
distinct cost and skipping every candidate that costs more than the start. A step ``p -> p+1``
raises the error by ``de = e_{p+1} - e_p`` and saves ``ds = sum_k w_k (c^k_p - c^k_{p+1})`` (``w_k =
1 / B_k``; with one budget this is the plain cost saved, up to the factor ``1/B``). The descent
takes the step with the smallest ratio ``de / ds`` among the next steps of all components, and
repeats until every budget holds.

A heap does this in ``O(N log L)`` Python steps. The vectorised form relies on this fact. The heap
pops a component's steps in order, and it pops steps by increasing *prefix maximum*
``P_p = max(ratio_1, ..., ratio_p)`` of their component's ratios, ties going to the lower
component and then the earlier step. Once a step with ratio ``P`` is popped, every head left in
the heap has key ``>= P``. A later step of the same component with a smaller ratio is therefore
popped at once, as if its key were ``P``. So the pop order is a stable sort of the per-step
prefix maxima in (component, step) order. The stopping point is the first prefix of that order
whose cumulative savings meet every budget. The test suite checks this against a literal heap
implementation.

**Fill** (:func:`fill_upgrades`): repeatedly take the upgrade with the best error decrease per
extra (scalarised) cost that still fits, free upgrades first.
"""

from __future__ import annotations

import numpy as np

from rankalloc.allocators.segments import (FlatTables, feasible_limits, fits, group_first_min, offsets_of,
                                           segment_cummax, sort_within, stable_argsort)


def greedy_descent(flat: FlatTables, start, limits: np.ndarray, weights: np.ndarray):
    """Greedy descent from ``start`` (one candidate index per component) until every budget holds.

    ``weights`` scalarise the resources (:func:`~rankalloc.allocators.segments.scalar_weights`).
    Returns ``(choice_index, ok, steps)``: ``ok`` is False when every path is exhausted and a
    budget still fails (then every component sits at the end of its path). A start that fits
    comes back unchanged (0 steps).
    """
    F = flat
    L = len(F.offsets) - 1
    s = np.asarray(weights, dtype=np.float64) @ F.costs
    start_pos = F.offsets[:-1] + np.asarray(start, dtype=np.int64)
    cur = s[start_pos][F.owner]
    mask = s < cur
    mask[start_pos] = True
    eligible = np.flatnonzero(mask)
    own = F.owner[eligible]
    seg = offsets_of(own, L)
    order = eligible[sort_within(-s[eligible], seg)]  # each component by decreasing cost, start first
    so = F.owner[order]
    level = np.concatenate([[True], (so[1:] != so[:-1]) | (s[order][1:] != s[order][:-1])])
    path = order[group_first_min(F.errors[order], np.flatnonzero(level))]  # least error per cost
    po = F.owner[path]
    step = np.flatnonzero(po[1:] == po[:-1])  # step k goes path[k] -> path[k+1]
    a, b = path[step], path[step + 1]
    de = F.errors[b] - F.errors[a]
    saved = F.costs[:, a] - F.costs[:, b]  # (R, S)
    ratio = de / (s[a] - s[b])  # s strictly decreases along a path
    P = segment_cummax(ratio, offsets_of(po[step], L))
    pop = stable_argsort(P)
    total = F.costs[:, start_pos].sum(axis=1)
    remaining = total[:, None] - np.cumsum(saved[:, pop], axis=1)
    hit = np.flatnonzero(np.concatenate([[fits(total, limits)], fits(remaining, limits)]))  # after 0, 1, ... steps
    ok = bool(len(hit))
    t = int(hit[0]) if ok else len(pop)
    moves = np.bincount(po[step][pop[:t]], minlength=L)
    first = offsets_of(po, L)[:-1]
    idx = path[first + moves] - F.offsets[:-1]
    return idx, ok, t


def fill_upgrades(flat: FlatTables, choice_index, limits: np.ndarray, weights: np.ndarray):
    """Spend the unused budget: repeatedly take the upgrade with the best error decrease per extra cost.

    An upgrade moves one component to any candidate of smaller error whose extra cost fits what
    is left of every budget. Its value is the decrease divided by the scalarised extra cost
    (``weights``; free upgrades first). Returns ``(choice_index, number of upgrades)``.

    Only candidates that fitted in the previous round are re-examined after an upgrade that
    frees no resource. For another component nothing changed but the budget left, which shrank.
    For the upgraded one, a candidate that fits and improves on the new choice also fitted and
    improved on the old one. An upgrade that frees some resource re-examines everything.
    """
    F = flat
    w = np.asarray(weights, dtype=np.float64)
    slack = feasible_limits(limits)
    pos = F.offsets[:-1] + np.asarray(choice_index, dtype=np.int64)
    pool = np.arange(len(F.errors))
    steps = 0
    while len(pool):
        own = F.owner[pool]
        cur = pos[own]
        extra = F.costs[:, pool] - F.costs[:, cur]
        gain = F.errors[cur] - F.errors[pool]
        left = slack - F.costs[:, pos].sum(axis=1)
        ok = (gain > 0) & np.all(extra <= left[:, None], axis=0)
        if not ok.any():
            break
        ds = w @ extra
        value = np.where(ds > 0, gain / np.where(ds > 0, ds, 1.0), np.inf)
        cand = np.flatnonzero(ok)
        j = cand[np.argmax(value[cand])]
        pos[own[j]] = pool[j]
        steps += 1
        pool = pool[ok] if (extra[:, j] >= 0).all() else np.arange(len(F.errors))
    return pos - F.offsets[:-1], steps
