# FLAT-LLM (Tian et al., 2025), Sec. 3.3: importance-preserving rank selection (IPRS)
"""IPRS: layer ``l`` keeps a fraction ``w_l`` proportional to its importance ``t_l``, capped at 1.

With ``L`` layers and removed fraction ``s`` of the budget, the kept fractions solve

    w_l = min(1, c * t_l),   sum_l w_l = L (1 - s),

a water-filling on the capped simplex (:func:`capped_proportional`). FLAT-LLM's layer importance
is ``t_l = arccos(mean cos(x_l, x_{l+1})) / pi`` (``problem.layer_scores``). Every component of
layer ``l`` then takes its most expensive candidate costing at most ``w_l`` times its dense cost.

**When the rule breaks the budget.** The paper's rule (FLAT-LLM Sec. 3.3) gives every layer the
same weight in ``sum_l w_l``, while the budget is in parameters: FLAT-LLM's layers all have one
size, where ``sum_l w_l D_l = (1 - s) D`` is exactly the budget. When the important layers are
also the larger ones, ``sum_l w_l D_l`` exceeds it (``D_l`` = the dense cost of layer ``l``) and
the snapped allocation may break the budget although a feasible one exists. Then, and only then
(the paper's allocation is kept whenever it fits), IPRS shrinks the same water-filling until it
meets the budget in parameters: the scale ``c`` solves the monotone 1-D problem

    sum_l D_l min(1, c * t_l) = B,

(:func:`capped_proportional` with weights ``D_l``; ``c`` only decreases, so every layer keeps at
most what the paper's rule gave it and the ordering by importance is unchanged). A component with
no candidate within its cap takes its cheapest one, which can still break the budget. Then ``c``
is lowered further to the largest value at which the snapped allocation fits: the snapped cost
is non-decreasing in ``c`` and changes only where a cap reaches a candidate's cost, so this is a
search over those points, exact, and it ends at ``c = 0`` (every component at its cheapest
candidate) at worst. So IPRS returns a feasible allocation whenever one exists; INFEASIBLE means
that even every component at its cheapest candidate breaks the budget, and its message gives
that minimum cost. ``info["rule"]`` says which step decided: ``"paper"``, ``"rescaled"`` or
``"shrunk"``, with the scale ``c`` and the kept fractions used (``info["kept_fraction"]``).

Snapping to the rank grid leaves budget unspent. So a fill pass (``fill=True``, on by default;
FLAT-LLM has no such pass) visits the layers by decreasing ``t_l``, and the components of a
layer by name. Each component moves to its least-error candidate whose extra cost still
fits the budget left. IPRS allocates one resource, so problems with several budgets are refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankalloc.allocators.allocation import Allocation, Status, finish, infeasible
from rankalloc.allocators.problem import AllocationProblem
from rankalloc.allocators.registry import register_solver
from rankalloc.allocators.segments import feasible_limits, fits, limits_of, segment_pick
from rankalloc.allocators.uniform import component_dense_costs, largest_within


def capped_proportional(t, total: float, weights=None) -> np.ndarray:
    """Kept fractions proportional to ``t``, capped at 1, whose (weighted) sum is ``total``.

    Solves for ``w``: ``w_l = min(1, c * t_l)`` with ``sum_l d_l w_l = total`` and ``c >= 0``, where
    ``d_l`` are the ``weights`` (default 1: the paper's equal weight per layer). Needs ``t_l >= 0``,
    ``d_l >= 0`` and ``0 <= total <= sum {d_l : t_l > 0}``. Sort ``t`` decreasingly. If the ``k``
    largest are capped, ``c = (total - sum_{i < k} d_(i)) / sum_{i >= k} d_(i) t_(i)``. The answer is
    the smallest ``k`` with ``c * t_(k) <= 1``: one sort, no iteration, exact up to rounding.

    >>> capped_proportional([1.0, 2.0, 4.0], 2.0).round(4).tolist()
    [0.3333, 0.6667, 1.0]
    >>> capped_proportional([0.9, 0.1], 2080.0, weights=[4096.0, 64.0]).round(4).tolist()
    [0.5069, 0.0563]
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    if len(t) == 0 or not np.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"capped_proportional: expected a non-empty vector of finite scores >= 0, received {t!r}")
    d = np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if d.shape != t.shape or not np.isfinite(d).all() or (d < 0).any():
        raise ValueError(f"capped_proportional: expected {len(t)} finite weights >= 0, received {weights!r}")
    reach = float(d[t > 0].sum())
    if not (np.isfinite(total) and 0 <= total <= reach * (1 + 1e-12)):
        what = "the number of positive scores" if weights is None else "the weight of the positive scores"
        raise ValueError(f"capped_proportional: expected 0 <= total <= {reach:g} ({what}), received {total!r}")
    order = np.argsort(-t, kind="stable")
    ts, ds = t[order], d[order]
    tail = np.cumsum((ds * ts)[::-1])[::-1]  # tail[k] = sum_{i >= k} d_(i) t_(i)
    head = np.concatenate([[0.0], np.cumsum(ds)[:-1]])  # head[k] = sum_{i < k} d_(i)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (total - head) / tail
        ok = (tail > 0) & (c * ts <= 1.0)
    w_sorted = (ts > 0).astype(np.float64)  # every positive score capped: total == the reach
    if ok.any():
        k0 = int(np.argmax(ok))
        w_sorted = np.concatenate([np.ones(k0), np.minimum(1.0, c[k0] * ts[k0:])])
    w = np.empty_like(w_sorted)
    w[order] = w_sorted
    return w


def water_level(t, w) -> float:
    """The scale ``c`` of kept fractions ``w = min(1, c t)`` (inf when every positive score is capped)."""
    t, w = np.asarray(t, dtype=np.float64), np.asarray(w, dtype=np.float64)
    free = (t > 0) & (w < 1)
    return float(np.max(w[free] / t[free])) if free.any() else math.inf


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
    exact_feasibility: ClassVar[bool | int] = True  # INFEASIBLE only when the cheapest candidates break the budget

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
        limit = problem.limits[res]
        s = min(max(1.0 - limit / D, 0.0), 1.0) if D > 0 else 0.0
        total = len(layers) * (1.0 - s)
        if total > np.count_nonzero(t > 0):
            zero = [l for l, v in zip(layers, t) if v == 0]
            raise ValueError(f"IPRS: layer(s) {zero[:8]} have importance t_l = 0 and keep nothing, so the other "
                             f"{len(layers) - len(zero)} layers cannot hold the kept fraction {1 - s:.2%} of all "
                             f"{len(layers)} layers; expected positive layer scores")
        if (out := infeasible(problem, self.name, t0)) is not None:  # even the cheapest candidates break it
            return out
        pos_of = {l: i for i, l in enumerate(layers)}
        layer_of = np.array([pos_of[c.layer] for c in problem.components])
        F = problem.flat
        B = limits_of(problem)

        def allocate(w):  # snap to the grid, fill (fill never breaks a budget), test the budget
            idx, _ = largest_within(problem, w[layer_of][None, :] * dense)
            steps = 0
            if self.fill:
                idx, steps = fill_by_layer(problem, idx, layer_of, t)
            return idx, steps, bool(fits(F.total(idx), B))

        # the paper's rule: equal weight per layer, sum_l w_l = L (1 - s)
        w_paper = capped_proportional(t, total)
        w, rule = w_paper, "paper"
        idx, steps, ok = allocate(w)
        if not ok:  # rescale: the parameter-weighted kept fractions meet the budget, sum_l D_l w_l = B
            d_layer = np.bincount(layer_of, weights=dense[0], minlength=len(layers))
            reach = float(d_layer[t > 0].sum())
            w_budget = capped_proportional(t, max(0.0, min(limit, reach)), weights=d_layer)
            w, rule = np.minimum(w_paper, w_budget), "rescaled"  # one scale, min(c_paper, c_budget)
            idx, steps, ok = allocate(w)
        if not ok:  # components short of their caps took their cheapest candidate: lower c until it fits
            c_max = min(water_level(t, w), 1.0 / float(t[t > 0].min())) if (t > 0).any() else 0.0
            c = largest_fitting_scale(problem, t[layer_of], dense[0], c_max)
            w, rule = np.minimum(1.0, c * t), "shrunk"
            idx, steps, ok = allocate(w)
        if not ok:  # only by rounding at c = 0: every component at its cheapest candidate
            idx, steps = cheapest(problem), 0
            if self.fill:
                idx, steps = fill_by_layer(problem, idx, layer_of, t)
            ok = bool(fits(F.total(idx), B))
        c = water_level(t, w)
        info = {"removed": s, "rule": rule, "scale": c if math.isfinite(c) else None,
                "kept_fraction": dict(zip(layers, w.tolist())), "fill_steps": steps}
        if rule != "paper":
            info["paper_kept_fraction"] = dict(zip(layers, w_paper.tolist()))
        msg = ""
        if not ok:  # the float sum of the cheapest candidates is above the limit, problem.min_costs is not
            msg = problem.infeasibility_message() or (
                f"infeasible: {res}: every component at its cheapest candidate costs {float(F.total(idx)[0]):.6g}, "
                f"above the budget {limit:.6g} (minimum achievable cost {problem.min_costs[res]:.6g})")
        return finish(problem, self.name, idx, Status.FEASIBLE if ok else Status.INFEASIBLE, t0=t0,
                      message=msg, info=info)


def cheapest(problem: AllocationProblem) -> np.ndarray:
    """Per component, its cheapest candidate in the first resource (ties: smaller error, then earlier)."""
    F = problem.flat
    pos = segment_pick(F.offsets, np.ones(len(F.errors), dtype=bool), -F.costs[0], F.errors)
    return pos - F.offsets[:-1]


def largest_fitting_scale(problem: AllocationProblem, t_comp: np.ndarray, dense: np.ndarray, c_max: float) -> float:
    """The largest ``c`` in ``[0, c_max]`` whose snapped allocation (caps ``min(1, c t_l) d_l``) meets the budget.

    The snapped cost is non-decreasing in ``c`` (a larger cap never picks a cheaper candidate; a component with
    nothing within its cap takes its cheapest) and changes only where a cap reaches a candidate's cost,
    ``c = cost / (t_l d_l)``. So a binary search over those points (and 0) is exact. Returns 0 when none fits.
    """
    F = problem.flat
    B = limits_of(problem)
    tc, dc = t_comp[F.owner], dense[F.owner]
    with np.errstate(divide="ignore", invalid="ignore"):
        points = F.costs[0] / (tc * dc)
    points = np.unique(points[np.isfinite(points) & (points > 0) & (points <= c_max)])
    points = np.concatenate([[0.0], points])

    def fits_at(c):
        caps = np.minimum(1.0, c * t_comp)[None, :] * dense[None, :]
        idx, _ = largest_within(problem, caps)
        return bool(fits(F.total(idx), B))

    lo, hi = 0, len(points) - 1  # invariant: points[lo] fits (or lo == 0); above hi nothing is known to fit
    if not fits_at(points[0]):
        return 0.0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits_at(points[mid]):
            lo = mid
        else:
            hi = mid - 1
    return float(points[lo])


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
