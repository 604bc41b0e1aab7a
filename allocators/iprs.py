# FLAT-LLM (Tian et al., 2025), Sec. 3.3: importance-preserving rank selection (IPRS)
"""IPRS: layer ``l`` keeps a fraction ``w_l`` proportional to its importance ``t_l``, capped at 1.

With ``L`` layers and removed fraction ``s`` of the budget, the kept fractions solve

    w_l = min(1, c * t_l),   sum_l w_l = L (1 - s),

a water-filling on the capped simplex (:func:`capped_proportional`). FLAT-LLM's layer importance
is ``t_l = arccos(mean cos(x_l, x_{l+1})) / pi`` (``problem.layer_scores``). Every component of
layer ``l`` then takes its most expensive candidate costing at most ``w_l`` times its dense cost.

Snapping to the rank grid leaves budget unspent. So a fill pass (``fill=True``, on by default;
FLAT-LLM has no such pass) visits the layers by decreasing ``t_l``, and the components of a
layer by name. Each component moves to its least-error candidate whose extra cost still
fits the budget left. IPRS allocates one resource, so problems with several budgets are refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import feasible_limits, fits, limits_of
from rankalloc.allocators.uniform import component_dense_costs, largest_within


def capped_proportional(t, total: float) -> np.ndarray:
    """Kept fractions proportional to ``t``, capped at 1, summing to ``total``.

    Solves for ``w``: ``w_l = min(1, c * t_l)`` with ``sum_l w_l = total`` and ``c >= 0``. Needs
    ``t_l >= 0`` and ``0 <= total <= #{l : t_l > 0}``. Sort ``t`` decreasingly. If the ``k``
    largest are capped, ``c = (total - k) / sum_{i >= k} t_(i)``. The answer is the smallest ``k``
    with ``c * t_(k) <= 1``: one sort, no iteration, exact up to rounding.

    >>> capped_proportional([1.0, 2.0, 4.0], 2.0).round(4).tolist()
    [0.3333, 0.6667, 1.0]
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    if len(t) == 0 or not np.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"capped_proportional: expected a non-empty vector of finite scores >= 0, received {t!r}")
    positive = int((t > 0).sum())
    if not (np.isfinite(total) and 0 <= total <= positive * (1 + 1e-12)):
        raise ValueError(f"capped_proportional: expected 0 <= total <= {positive} (the number of positive scores), "
                         f"received {total!r}")
    order = np.argsort(-t, kind="stable")
    ts = t[order]
    tail = np.cumsum(ts[::-1])[::-1]  # tail[k] = sum_{i >= k} t_(i)
    k = np.arange(len(t))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (total - k) / tail
        ok = (tail > 0) & (c * ts <= 1.0)
    w_sorted = (ts > 0).astype(np.float64)  # every positive score capped: total == #positive
    if ok.any():
        k0 = int(np.argmax(ok))
        w_sorted = np.concatenate([np.ones(k0), np.minimum(1.0, c[k0] * ts[k0:])])
    w = np.empty_like(w_sorted)
    w[order] = w_sorted
    return w


def project_capped_simplex(y, S: float) -> np.ndarray:
    """Euclidean projection of ``y`` onto ``{w in [0, 1]^L : sum_l w_l = S}``.

    The projection is ``w = clip(y - tau, 0, 1)`` with the shift ``tau`` that makes the sum ``S``.
    ``tau`` is found by bisection: the sum is non-increasing in ``tau``. Then it is solved exactly
    on the free coordinates, those with ``0 < w_l < 1``.

    >>> project_capped_simplex([0.2, 0.6, 0.9], 1.0).round(6).tolist()
    [0.0, 0.35, 0.65]
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) == 0 or not np.isfinite(y).all():
        raise ValueError(f"project_capped_simplex: expected a non-empty finite vector, received {y!r}")
    if not (np.isfinite(S) and 0 <= S <= len(y)):
        raise ValueError(f"project_capped_simplex: expected 0 <= S <= {len(y)}, received {S!r}")
    lo, hi = float(y.min()) - 1.0, float(y.max())  # sum(lo) = L >= S >= 0 = sum(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if np.clip(y - mid, 0.0, 1.0).sum() > S:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    free = (y - tau > 0) & (y - tau < 1)
    if free.any():
        exact = (y[free].sum() + (y - tau >= 1).sum() - S) / free.sum()
        w = np.clip(y - exact, 0.0, 1.0)
        if abs(w.sum() - S) <= abs(np.clip(y - tau, 0.0, 1.0).sum() - S):
            return w
    return np.clip(y - tau, 0.0, 1.0)


@register_solver("iprs")
@dataclass(frozen=True)
class IPRS:
    """FLAT-LLM's importance-preserving rank selection over the layers, plus an optional fill pass.

    Args:
        fill: spend what grid snapping left, layer by layer in decreasing importance.
        name: label in reports.
    """

    fill: bool = True
    name: str = "iprs"
    max_budgets: ClassVar[int | None] = 1

    def __post_init__(self):
        if not isinstance(self.fill, bool):
            raise ValueError(f"IPRS: expected fill to be True or False, received {self.fill!r}")

    def solve(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        if len(problem.budgets) != 1:
            raise ValueError(f"IPRS allocates one resource; received budgets on {list(problem.resources)} "
                             f"(use the lagrangian, greedy or exact solver for several budgets)")
        layers = sorted({c.layer for c in problem.components})
        scores = problem.layer_scores
        missing = [l for l in layers if not scores or l not in scores]
        if missing:
            raise ValueError(f"IPRS needs layer importance scores t_l from a profile (problem.layer_scores, "
                             f"written by `rankalloc profile`); missing for layer(s) {missing[:8]}"
                             + ("" if scores else ", received none"))
        t = np.array([scores[l] for l in layers], dtype=np.float64)
        bad = ~np.isfinite(t) | (t < 0)
        if bad.any():
            raise ValueError(f"IPRS: expected finite layer scores >= 0, received {t[bad][0]!r} for layer "
                             f"{layers[int(np.flatnonzero(bad)[0])]}")
        res = problem.resources[0]
        dense = component_dense_costs(problem)  # (1, L_components)
        D = float(dense.sum())
        s = min(max(1.0 - problem.limits[res] / D, 0.0), 1.0) if D > 0 else 0.0
        total = len(layers) * (1.0 - s)
        if total > np.count_nonzero(t > 0):
            zero = [l for l, v in zip(layers, t) if v == 0]
            raise ValueError(f"IPRS: layer(s) {zero[:8]} have importance t_l = 0 and keep nothing, so the other "
                             f"{len(layers) - len(zero)} layers cannot hold the kept fraction {1 - s:.2%} of all "
                             f"{len(layers)} layers; expected positive layer scores")
        w = capped_proportional(t, total)
        pos_of = {l: i for i, l in enumerate(layers)}
        layer_of = np.array([pos_of[c.layer] for c in problem.components])
        idx, short = largest_within(problem, w[layer_of][None, :] * dense)
        steps = 0
        if self.fill:
            idx, steps = fill_by_layer(problem, idx, layer_of, t)
        F = problem.flat
        ok = bool(fits(F.costs[:, F.offsets[:-1] + idx].sum(axis=1), limits_of(problem)))
        info = {"removed": s, "kept_fraction": dict(zip(layers, w.tolist())), "fill_steps": steps}
        msg = "" if ok else (problem.infeasibility_message() or
                             f"iprs: {int(short.sum())} component(s) have no candidate within w_l of their dense "
                             f"cost and their cheapest candidates break the budget")
        return finish(problem, self.name, idx, Status.FEASIBLE if ok else Status.INFEASIBLE, t0=t0,
                      message=msg, info=info)


def fill_by_layer(problem: AllocationProblem, choice_index, layer_of: np.ndarray, t: np.ndarray):
    """Layers by decreasing score (ties: lower layer first), a layer's components by name: each moves to its
    least-error candidate (ties: cheaper) whose extra cost fits the budget left. Returns ``(choice_index, moves)``."""
    F = problem.flat
    idx = np.array(choice_index, dtype=np.int64)
    left = feasible_limits(limits_of(problem)) - F.costs[:, F.offsets[:-1] + idx].sum(axis=1)
    moves = 0
    names = [c.name for c in problem.components]
    for li in np.lexsort((np.arange(len(t)), -t)):
        for l in sorted(np.flatnonzero(layer_of == li), key=names.__getitem__):
            a, b = F.offsets[l], F.offsets[l + 1]
            extra = F.costs[:, a:b] - F.costs[:, a + idx[l], None]
            e = F.errors[a:b]
            ok = np.all(extra <= left[:, None], axis=0) & (e < e[idx[l]])
            if not ok.any():
                continue
            cand = np.flatnonzero(ok)
            best = cand[np.lexsort((extra[0, cand], e[cand]))[0]]
            left -= extra[:, best]
            idx[l] = best
            moves += 1
    return idx, moves
