# MCKP Lagrangian dual (Sinha & Zoltners, 1979; Fisher, 1981; Kellerer, Pferschy & Pisinger, 2004, Ch. 11)
"""The Lagrangian dual of the multiple-choice knapsack: its value, reduced costs and multipliers.

Notation: component ``l`` picks candidate ``j`` with error ``e_lj`` and costs ``c^k_lj`` under
limits ``B_k``. For multipliers ``lambda >= 0``:

    mu_l(lambda)  = min_j  e_lj + lambda . c_lj
    rc_lj         = e_lj + lambda . c_lj - mu_l        >= 0     (reduced cost)
    L(lambda)     = sum_l mu_l - lambda . B                     (Lagrangian dual)

By weak duality ``L(lambda) <= OPT`` for every ``lambda >= 0``, and ``max_lambda L`` is the optimum
of the LP relaxation. Every feasible ``x`` (``cost(x) <= B``) satisfies the identity
``obj(x) = L(lambda) + sum_l rc_{l x_l} + lambda . (B - cost(x)) >= L(lambda) + sum_l rc_{l x_l}``.

**One budget** (:func:`multiplier_search`). As ``lambda`` falls, component ``l`` moves up its
lower-left hull (:mod:`rankalloc.allocators.hull`) exactly at its breakpoints, so the relaxed cost
is a step function of ``lambda``. Sort all breakpoints in decreasing order and take hull edges in
that order while the cost fits ``B``: this is the fitting relaxed solution of the smallest
``lambda``, and ``lambda*`` is the breakpoint of the first edge that does not fit. Bisection on
``lambda`` converges to the same ``lambda*``; here it is found exactly, in one sort. ``lambda*``
maximises ``L`` (its slope ``C(lambda) - B`` changes sign there), so ``L(lambda*)`` is the LP bound.

**Several budgets** (:func:`lp_multipliers`). The LP duals of the budget rows, by column
generation on scipy's HiGHS. (The Lagrangian solver instead runs cyclic coordinate ascent with
:func:`multiplier_search` on one resource at a time.)

Arrays follow ``problem.flat`` (:class:`~rankalloc.allocators.segments.FlatTables`).
"""

from __future__ import annotations

import numpy as np

from rankalloc.allocators.hull import breakpoints, lower_hulls
from rankalloc.allocators.segments import (FlatTables, feasible_limits, group_first_min, offsets_of, segment_cummax,
                                           stable_argsort)


def dual_value(flat: FlatTables, lam, limits) -> float:
    """``L(lambda) = sum_l min_j (e_lj + lambda . c_lj) - lambda . B``, a lower bound for ``lambda >= 0``."""
    lam = np.asarray(lam, dtype=np.float64)
    priced = flat.errors + lam @ flat.costs
    return float(np.minimum.reduceat(priced, flat.offsets[:-1]).sum() - lam @ np.asarray(limits, dtype=np.float64))


def reduced_costs(flat: FlatTables, lam, limits):
    """``(L(lambda), mu, rc)`` for multipliers ``lam >= 0`` (any such ``lam`` gives a valid bound)."""
    lam = np.asarray(lam, dtype=np.float64)
    v = flat.errors + lam @ flat.costs
    mu = np.minimum.reduceat(v, flat.offsets[:-1])
    rc = np.maximum(v - mu[flat.owner], 0.0)
    return float(mu.sum() - lam @ np.asarray(limits, dtype=np.float64)), mu, rc


def multiplier_search(flat: FlatTables, priced: np.ndarray, k: int, limit: float):
    """Exact search for the smallest ``lambda_k`` whose relaxed solution fits resource ``k`` (limit ``limit``).

    ``priced`` is each candidate's error plus the other resources' priced costs (just the errors
    for one budget). Returns ``(choice_index, lambda_k)``: the choice takes the hull edges of
    breakpoint ``> lambda_k`` and, among edges at ``lambda_k`` itself, those that still fit (every
    such choice minimises the relaxed objective at ``lambda_k``). It fits whenever the cheapest
    candidates do; ``lambda_k`` is 0 when the least-error hull vertices fit.
    """
    F = flat
    L = len(F.offsets) - 1
    c = F.costs[k]
    hull = lower_hulls(c, priced, F.offsets, collinear=True)
    left, right, lam = breakpoints(c, priced, hull, F.owner)
    edge_owner = F.owner[left]
    # breakpoints decrease along a chain; enforce it against rounding so that a prefix of the
    # global order is a prefix of every chain
    lam = -segment_cummax(-lam, offsets_of(edge_owner, L))
    order = stable_argsort(-lam)
    first = offsets_of(F.owner[hull], L)[:-1]
    spent = c[hull[first]].sum() + np.cumsum(c[right[order]] - c[left[order]])
    t = int(np.searchsorted(spent, float(feasible_limits(limit)), side="right"))
    lam_k = float(lam[order[t]]) if t < len(order) else 0.0
    moves = np.bincount(edge_owner[order[:t]], minlength=L)
    return hull[first + moves] - F.offsets[:-1], lam_k


def lp_multipliers(flat: FlatTables, limits: np.ndarray, start: np.ndarray | None = None,
                   max_rounds: int = 30) -> np.ndarray:
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

    E, C, offsets, owner = flat.errors, flat.costs, flat.offsets, flat.owner
    limits = np.asarray(limits, dtype=np.float64)
    L, R = len(offsets) - 1, C.shape[0]
    starts = offsets[:-1]
    norm = np.where(limits > 0, limits, 1.0)
    Cn = C / norm[:, None]
    cols = set()
    for k in range(R):
        cols.update(group_first_min(C[k], starts).tolist())
    for lam in ([np.zeros(R)] + ([np.asarray(start, dtype=np.float64)] if start is not None else [])):
        cols.update(group_first_min(E + lam @ C, starts).tolist())
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
        if not (rc < -tol).any():
            break
        # the most negative candidate of each component that has one
        new = group_first_min(np.where(rc < -tol, rc, np.inf), starts)
        new = new[rc[new] < -tol[new]]
        before = len(cols)
        cols.update(new.tolist())
        if len(cols) == before:
            break
    return lam
