# MCKP Lagrangian relaxation, reduced-cost fixing, core DP (Kellerer, Pferschy & Pisinger, 2004, Ch. 11)
"""Private numeric helpers of the exact solvers: the Lagrangian dual of the multiple-choice
knapsack, its multipliers, a greedy incumbent and the integer scaling of costs.

Notation: component ``l`` picks candidate ``j`` with error ``e_lj`` and costs ``c^k_lj`` under
limits ``B_k``. For multipliers ``lambda >= 0``:

    mu_l(lambda)  = min_j  e_lj + lambda . c_lj
    rc_lj         = e_lj + lambda . c_lj - mu_l        >= 0     (reduced cost)
    L(lambda)     = sum_l mu_l - lambda . B                     (Lagrangian dual)

Every feasible ``x`` (``cost(x) <= B``) satisfies the identity
``obj(x) = L(lambda) + sum_l rc_{l x_l} + lambda . (B - cost(x)) >= L(lambda) + sum_l rc_{l x_l}``.
Arrays follow ``problem.flat``: ``E (N,)``, ``C (R, N)``, ``offsets (L+1,)``, ``owner (N,)``.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

FEAS_RTOL = 1e-9
"""Relative slack on every limit; the same one ``AllocationProblem.is_feasible`` allows."""


def feasible_limits(limits) -> np.ndarray:
    """The largest cost per resource that ``AllocationProblem.is_feasible`` accepts."""
    b = np.asarray(limits, dtype=np.float64)
    return b * (1 + FEAS_RTOL) + 1e-9


def group_argmin(values: np.ndarray, offsets: np.ndarray):
    """Per component: the smallest value and the first (component-local) index attaining it."""
    sizes = np.diff(offsets)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    order = np.lexsort((values, owner))
    first = order[offsets[:-1]]
    return values[first], first - offsets[:-1]


def lagrangian(E: np.ndarray, C: np.ndarray, offsets: np.ndarray, lam: np.ndarray, limits: np.ndarray):
    """``(L(lambda), mu, rc)`` for multipliers ``lam >= 0`` (any such ``lam`` gives a valid bound)."""
    lam = np.asarray(lam, dtype=np.float64)
    v = E + lam @ C
    mu = np.minimum.reduceat(v, offsets[:-1])
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    rc = np.maximum(v - mu[owner], 0.0)
    return float(mu.sum() - lam @ limits), mu, rc


def lower_hull(c: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Indices of the lower-left convex hull of points ``(c_j, e_j)``: increasing cost, strictly falling error."""
    order = np.lexsort((e, c))
    keep = []
    best = math.inf
    for j in order:  # Pareto filter: cost ascending, keep only strict error improvements
        if e[j] < best:
            keep.append(j)
            best = e[j]
    hull: list[int] = []
    for j in keep:  # monotone chain, lower side
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> j
            if (e[b] - e[a]) * (c[j] - c[a]) >= (e[j] - e[a]) * (c[b] - c[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return np.asarray(hull, dtype=np.int64)


def hull_greedy(E: np.ndarray, c: np.ndarray, offsets: np.ndarray, limit: float) -> tuple[float, np.ndarray]:
    """The optimal multiplier ``lambda*`` of a single budget and the greedy choice that goes with it.

    Walk the hull segments of all components in order of decreasing efficiency
    ``-(delta e)/(delta c)``, starting from the cheapest hull vertex of each. ``lambda*`` is the
    efficiency of the first segment that no longer fits (the LP relaxation's dual price), or 0
    if all fit. The choice takes every segment before it, so it fits whenever the cheapest
    vertices do.
    """
    L = len(offsets) - 1
    hulls, eff, dc, seg_owner, seg_pos = [], [], [], [], []
    base = 0.0
    for l in range(L):
        s = slice(offsets[l], offsets[l + 1])
        h = lower_hull(c[s], E[s])
        ch, eh = c[s][h], E[s][h]
        hulls.append(h)
        base += ch[0]
        d = np.diff(ch)
        eff.append(-np.diff(eh) / d)
        dc.append(d)
        seg_owner.append(np.full(len(d), l))
        seg_pos.append(np.arange(1, len(h)))
    eff_all, dc_all = np.concatenate(eff), np.concatenate(dc)
    owner_all, pos_all = np.concatenate(seg_owner), np.concatenate(seg_pos)
    order = np.argsort(-eff_all, kind="stable")
    used = base + np.cumsum(dc_all[order])
    over = np.flatnonzero(used > limit)
    stop = int(over[0]) if len(over) else len(order)
    lam = float(eff_all[order[stop]]) if len(over) else 0.0
    # efficiency falls along each hull, so the segments taken from a component are a prefix of its hull
    reach = np.zeros(L, dtype=np.int64)
    np.maximum.at(reach, owner_all[order[:stop]], pos_all[order[:stop]])
    idx = np.array([h[r] for h, r in zip(hulls, reach)], dtype=np.int64)
    return max(lam, 0.0), idx


def pareto_mask(E: np.ndarray, C: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Candidates not dominated within their component (another has <= error and <= every cost,
    one strictly, or is identical with a lower index). Some optimum uses only these."""
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


def lp_multipliers(E: np.ndarray, C: np.ndarray, offsets: np.ndarray, limits: np.ndarray,
                   start: np.ndarray | None = None, max_rounds: int = 30) -> np.ndarray:
    """Dual prices ``lambda >= 0`` of the budget rows of the LP relaxation, by column generation.

    The restricted LP holds a few candidates per component (the cheapest per resource, the
    argmins of ``e + lambda . c`` at ``start``); each round adds the candidates with negative
    reduced cost under the current duals, until none is left (then ``lambda`` is LP-optimal)
    or ``max_rounds`` passes. Budget rows carry a penalised overflow so the restricted LP is
    always feasible. Any ``lambda >= 0`` gives a valid bound, so stopping early only loosens it.
    Uses scipy's HiGHS.
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity

    L, R = len(offsets) - 1, C.shape[0]
    owner = np.repeat(np.arange(L), np.diff(offsets))
    norm = np.where(limits > 0, limits, 1.0)
    Cn = C / norm[:, None]
    cols = set()
    for k in range(R):
        cols.update((offsets[:-1] + group_argmin(C[k], offsets)[1]).tolist())
    for lam in ([np.zeros(R)] + ([np.asarray(start, dtype=np.float64)] if start is not None else [])):
        cols.update((offsets[:-1] + group_argmin(E + lam @ C, offsets)[1]).tolist())
    penalty = 10.0 * (float(np.abs(E).max(initial=0.0)) * L + 1.0)
    lam = np.zeros(R)
    for _ in range(max_rounds):
        idx = np.array(sorted(cols))
        A_eq = csr_matrix((np.ones(len(idx)), (owner[idx], np.arange(len(idx)))), shape=(L, len(idx)))
        A_eq = hstack([A_eq, csr_matrix((L, R))])
        A_ub = hstack([csr_matrix(Cn[:, idx]), -identity(R)])
        cost = np.concatenate([E[idx], np.full(R, penalty)])
        res = linprog(cost, A_ub=A_ub, b_ub=np.ones(R), A_eq=A_eq, b_eq=np.ones(L), bounds=(0, None),
                      method="highs")
        if res.status != 0:
            break
        lam_n = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
        mu = np.asarray(res.eqlin.marginals)
        lam = lam_n / norm
        rc = E + lam @ C - mu[owner]
        tol = 1e-12 * (1.0 + np.abs(mu[owner]))
        neg = np.flatnonzero(rc < -tol)
        if not len(neg):
            break
        # the most negative candidate of each component that has one
        _, best = group_argmin(np.where(rc < -tol, rc, np.inf), offsets)
        new = offsets[:-1] + best
        new = new[rc[new] < -tol[new]]
        before = len(cols)
        cols.update(new.tolist())
        if len(cols) == before:
            break
    return lam


def repair_and_fill(E: np.ndarray, C: np.ndarray, offsets: np.ndarray, limits: np.ndarray,
                    idx: np.ndarray, max_moves: int | None = None) -> np.ndarray | None:
    """A feasible choice near ``idx``: downgrade until every budget holds, then upgrade greedily.

    Repair makes the move with the least error increase per unit of total overflow
    ``sum_k max(0, cost_k - B_k) / B_k`` removed. The overflow falls strictly, so repair cannot
    cycle. Fill first takes the best error decrease per unit of (room-normalised) cost that
    still fits, then the largest decrease that fits. Returns None when repair gets stuck
    (no move lowers the overflow within ``max_moves``).
    """
    L = len(offsets) - 1
    owner = np.repeat(np.arange(L), np.diff(offsets))
    idx = np.array(idx, dtype=np.int64)
    norm = np.where(limits > 0, limits, 1.0)
    max_moves = max_moves or 4 * L + 16
    for _ in range(max_moves):
        pos = offsets[:-1] + idx
        used = C[:, pos].sum(axis=1)
        now = np.maximum(used - limits, 0.0) / norm
        if not now.any():
            break
        after = np.maximum(used[:, None] - C[:, pos][:, owner] + C - limits[:, None], 0.0) / norm[:, None]
        drop = now.sum() - after.sum(axis=0)  # normalised overflow removed by moving to each candidate
        rise = E - E[pos][owner]
        ok = drop > 0
        if not ok.any():
            return None
        score = np.where(ok, rise / np.where(ok, drop, 1.0), np.inf)
        k = int(np.argmin(score))
        idx[owner[k]] = k - offsets[owner[k]]
    else:
        return None
    for by_ratio in (True, False):  # best error drop per unit of cost, then the largest drop that fits
        for _ in range(max_moves):
            pos = offsets[:-1] + idx
            room = limits - C[:, pos].sum(axis=1)
            delta = C - C[:, pos][:, owner]
            fits = (delta <= room[:, None]).all(axis=0)
            gain = np.where(fits, E[pos][owner] - E, 0.0)
            if by_ratio:
                # a resource with no room left admits no positive spend (``fits`` is False), so it weighs 0
                inv = np.divide(1.0, room, out=np.zeros_like(room), where=room > 0)
                spend = np.maximum(delta, 0.0).T @ inv
                free = (gain > 0) & (spend <= 0)  # an error drop that spends nothing comes first, largest first
                if free.any():
                    gain = np.where(free, gain, 0.0)
                else:
                    gain = np.divide(gain, spend, out=np.zeros_like(gain), where=(gain > 0) & (spend > 0))
            k = int(np.argmax(gain))
            if gain[k] <= 0:
                break
            idx[owner[k]] = k - offsets[owner[k]]
    return idx


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
        new = np.full(tuple(b1 - b0 + 1), np.inf)
        arg = np.full(new.shape, -1, dtype=np.int16 if len(values[t]) < 2 ** 15 else np.int32)
        for j, v in enumerate(values[t].tolist()):
            d = deltas[t][j]
            s0, s1 = np.maximum(a0, b0 - d), np.minimum(a1, b1 - d)  # sources landing in the new window
            if (s1 < s0).any():
                continue
            src = f[tuple(slice(x0 - y0, x1 - y0 + 1) for x0, x1, y0 in zip(s0, s1, a0))] + v
            tgt = tuple(slice(x0 + dd - y0, x1 + dd - y0 + 1) for x0, x1, dd, y0 in zip(s0, s1, d, b0))
            better = src < new[tgt]
            new[tgt] = np.where(better, src, new[tgt])
            arg[tgt] = np.where(better, j, arg[tgt])
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


def infeasible_message(problem) -> str:
    """Why no allocation meets the budgets: the per-resource minima, or that they cannot hold together."""
    msg = problem.infeasibility_message()
    if msg is not None:
        return msg
    parts = [f"{r}: budget {problem.limits[r]:.6g}, minimum achievable cost {problem.min_costs[r]:.6g}"
             for r in problem.resources]
    return ("infeasible: each budget can be met on its own but no allocation meets all of them at once ("
            + "; ".join(parts) + ")")


def dual_and_incumbent(E: np.ndarray, C: np.ndarray, offsets: np.ndarray, limits: np.ndarray):
    """Multipliers ``lambda`` (exact hull price for one budget, LP duals for several) and a feasible
    incumbent built from the Lagrangian choice (None when repair fails)."""
    if C.shape[0] == 1:
        lam0, start = hull_greedy(E, C[0], offsets, float(limits[0]))
        lam = np.array([lam0])
    else:
        lam = lp_multipliers(E, C, offsets, limits)
        start = group_argmin(E + lam @ C, offsets)[1]
    return lam, repair_and_fill(E, C, offsets, limits, start)
