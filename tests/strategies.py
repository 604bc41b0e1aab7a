"""Hypothesis strategies that build valid allocation problems directly (nothing is filtered).

* shapes fit the grid: ``m, n`` are drawn as multiples of ``grid`` times 1..``max_blocks``;
* candidate ranks are a non-empty subset of ``0, grid, ..., min(m, n)``;
* errors are non-increasing: reversed cumulative sums of non-negative increments, so the error
  at the largest rank is the smallest; the dense error (when a dense candidate is drawn) is a
  fraction of that smallest error;
* sparse + low-rank candidates (optional) copy some ranks at one kept fraction ``k`` with
  errors scaled by a factor in [0, 1], which keeps errors non-increasing in rank and in ``k``;
* budgets are removed fractions in [0, 0.99] or absolute limits drawn between a little below the
  minimum achievable cost (so some draws are infeasible) and the dense cost, in steps of 1e-4
  of that range (no subnormal limits);
* resources: ``params`` alone, or ``params`` plus ``kv`` (KV cache), in which case at least one
  component has kind ``k`` or ``v``.

Import from tests with ``from strategies import problems`` (conftest puts tests/ on sys.path).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from rankalloc.allocators.costs import KVCache, Params
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
GRIDS = (1, 2, 4, 8, 16)
SCALES = (1e-3, 1.0, 1e3, 1e6)
"""Error scales: normalized energies are <= 1, whitened errors run to millions."""

_GOLDEN = 0.6180339887498949


@st.composite
def components(draw, index: int, grid: int, max_blocks: int = 4, kind: str | None = None) -> Component:
    """A component ``model.layers.<index>.<kind>`` whose ``m, n`` are multiples of ``grid``."""
    kind = draw(st.sampled_from(KINDS)) if kind is None else kind
    m = grid * draw(st.integers(1, max_blocks))
    n = grid * draw(st.integers(1, max_blocks))
    return Component(f"model.layers.{index}.{kind}", m, n, kind, index)


@st.composite
def curves(draw, component: Component, grid: int, *, max_candidates: int = 4, dense: bool | None = None,
           sparse: bool = False, generic: bool = False, scale: float = 1.0) -> Curve:
    """A valid curve for ``component``.

    ``dense=None`` draws whether a dense candidate is present. ``generic=True`` adds a small
    distinct offset to every increment so that no two candidates or sums tie (used where the
    optimum must be unique).
    """
    grid_ranks = list(range(0, component.max_rank + 1, grid))
    ranks = sorted(draw(st.lists(st.sampled_from(grid_ranks), min_size=1,
                                 max_size=min(max_candidates, len(grid_ranks)), unique=True)))
    k = len(ranks)
    inc = np.array(draw(st.lists(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False),
                                 min_size=k, max_size=k)), dtype=np.float64)
    if generic:  # distinct, strictly positive increments
        salt = (component.layer + 1) * 7.0 + np.arange(k)
        inc = inc + 0.05 + 0.9 * ((salt * _GOLDEN) % 1.0)
    errors = np.cumsum(inc[::-1])[::-1] * scale  # errors[i] = sum_{j >= i} inc[j]: non-increasing
    cand_r, cand_e, cand_s = list(ranks), list(errors), [0.0] * k
    if sparse and draw(st.booleans()):
        kept = draw(st.sampled_from((0.05, 0.1, 0.25)))
        factor = draw(st.floats(0.0, 1.0))
        if generic:
            factor = 0.2 + 0.7 * factor
        chosen = draw(st.lists(st.sampled_from(range(k)), min_size=1, max_size=min(2, k), unique=True))
        for i in sorted(chosen):
            cand_r.append(ranks[i])
            cand_e.append(errors[i] * factor)
            cand_s.append(kept)
    has_dense = draw(st.booleans()) if dense is None else dense
    if has_dense:
        least = min(cand_e)
        frac = draw(st.sampled_from((0.0, 0.5))) if not generic else 0.0
        cand_r.append(DENSE)
        cand_e.append(least * frac)
        cand_s.append(0.0)
    return Curve(component, np.array(cand_r), np.array(cand_e), np.array(cand_s))


@st.composite
def budgets_for(draw, problem: AllocationProblem, resource: str, feasible: bool = False) -> Budget:
    """A budget on ``resource``: a removed fraction in [0, 1), or an absolute limit.

    Limits are drawn from a little below the minimum achievable cost (infeasible) up to the dense
    cost; ``feasible=True`` keeps them at or above the minimum.
    """
    if draw(st.booleans()):
        if feasible:
            dense = problem.dense_costs[resource]
            top = 1.0 - problem.min_costs[resource] / dense if dense else 0.0
            top = min(top, 0.99)
            return Budget(resource, removed=top * draw(st.integers(0, 10_000)) / 10_000 if top > 0 else 0.0)
        return Budget(resource, removed=draw(st.integers(0, 9_900)) / 10_000)
    lo, hi = problem.min_costs[resource], problem.dense_costs[resource]
    u = draw(st.integers(0 if feasible else -2000, 10_000)) / 10_000  # 1e-4 steps: no subnormal limits
    limit = max(0.0, lo + u * max(hi - lo, 0.0) if u >= 0 else lo * (1 + u))
    return Budget(resource, limit=float(limit))


@st.composite
def problems(draw, *, max_components: int = 5, max_candidates: int = 5, two_budgets: bool | None = False,
             dense: bool | None = None, sparse: bool = False, weights: bool | None = None,
             generic: bool = False, feasible: bool = False, grids=GRIDS, max_blocks: int = 4) -> AllocationProblem:
    """A valid :class:`AllocationProblem`.

    Args:
        max_components, max_candidates: size limits (brute force enumerates the product).
        two_budgets: False -> a ``params`` budget; True -> ``params`` and ``kv``; None -> either.
        dense: force (True/False) or draw (None) a dense candidate per component.
        sparse: allow sparse + low-rank candidates.
        weights: force or draw per-component weights alpha_l.
        generic: no ties (distinct increments, dense error 0).
        feasible: every budget can be met (each on its own; with two budgets the pair may still
            be infeasible together).
    """
    grid = draw(st.sampled_from(grids))
    n_comp = draw(st.integers(1, max_components))
    two = draw(st.booleans()) if two_budgets is None else two_budgets
    scale = draw(st.sampled_from(SCALES))
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(n_comp)]
    if two and not set(kinds) & {"k", "v"}:
        kinds[draw(st.integers(0, n_comp - 1))] = draw(st.sampled_from(("k", "v")))
    curve_list = []
    for i, kind in enumerate(kinds):
        comp = draw(components(i, grid, max_blocks=max_blocks, kind=kind))
        curve_list.append(draw(curves(comp, grid, max_candidates=max_candidates, dense=dense, sparse=sparse,
                                      generic=generic, scale=scale)))
    w = None
    if weights or (weights is None and draw(st.booleans())):
        w = {cv.component.name: draw(st.sampled_from((0.0, 0.5, 1.0, 2.0, 3.0))) if not generic
             else 0.5 + 0.1 * i for i, cv in enumerate(curve_list)}
    costs = {"params": Params(), "kv": KVCache()} if two else {"params": Params()}
    layer_scores = {i: 0.1 + 0.8 * ((i * _GOLDEN) % 1.0) for i in range(n_comp)}
    placeholder = tuple(Budget(r, removed=0.0) for r in costs)
    base = AllocationProblem(curve_list, placeholder, costs, weights=w, grid=grid, layer_scores=layer_scores,
                             name="hypothesis")
    budgets = tuple(draw(budgets_for(base, r, feasible=feasible)) for r in costs)
    return base.with_budgets(*budgets)
