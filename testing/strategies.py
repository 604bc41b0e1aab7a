# Property-based inputs for the MCKP of rank allocation (Sinha & Zoltners, 1979), built valid by construction
"""Hypothesis strategies that build valid allocation problems directly: nothing is drawn and then filtered.

* **shapes** fit the grid: ``m, n`` are multiples of ``grid`` times 1..``max_blocks``
  (:func:`shapes`, :func:`components`); :data:`GRIDS` are the grids drawn.
* **candidates** are a non-empty subset of the grid ranks ``0, grid, ..., min(m, n)``, so ranks above
  break-even (where ``r(m + n) > mn`` and dense is cheaper) are drawn too; ``break_even=True`` forces one.
  A dense candidate is drawn or forced (``dense=``). Sparse + low-rank candidates (``sparse=True``) copy
  some ranks at one kept fraction ``k``.
* **errors** are non-increasing: reversed cumulative sums of non-negative increments (normal floats, no
  subnormal values), so the largest rank has the least low-rank error and dense (when drawn) a fraction
  of it; sparse copies scale the errors by a factor in [0, 1]. ``generic=True`` makes every increment
  distinct and positive, so the optimum and every ratio are unique.
* **budgets**: ``n_budgets`` of the resources :data:`RESOURCES` (``params``, then ``kv``, then ``bytes``),
  each a removed fraction in [0, 0.99] or an absolute limit drawn from a little below the minimum
  achievable cost (some draws are infeasible) up to the dense cost, in steps of 1e-4 of that range.
  ``feasible=True`` keeps every budget reachable on its own. With a ``kv`` budget some component has
  kind ``k`` or ``v``.
* **weights** ``alpha_l`` per component (drawn or forced with ``weights=``) and **layer scores** ``t_l``
  (every problem has them, for solvers such as IPRS).
* ``removable=True`` gives every component rank 0, which costs nothing in every resource: then every
  budget is feasible. ``layered=True`` builds a model: layers that repeat the same kinds and shapes.

Strategies only build examples; the settings decide how many and in what order. Use :data:`DETERMINISTIC`
(derandomized, no database, no deadline) so a CI run is the same every time::

    from hypothesis import given
    from rankalloc.testing.strategies import DETERMINISTIC, problems

    @DETERMINISTIC
    @given(problems(n_budgets=(1, 2), sparse=True))
    def test_my_solver_meets_budgets(problem):
        assert problem.is_feasible(MySolver().solve(problem).cost) or ...
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from rankalloc.allocators.costs import Bytes, KVCache, Params
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
"""Component kinds drawn (``k`` and ``v`` are the ones the KV-cache model prices)."""
GRIDS = (1, 2, 4, 8, 16)
SCALES = (1e-3, 1.0, 1e3, 1e6)
"""Error scales: normalized energies are <= 1, whitened errors run to millions."""
KEPT = (0.05, 0.1, 0.25)
"""Kept fractions of sparse + low-rank candidates."""
RESOURCES = ("params", "kv", "bytes")
"""Budgeted resources, in the order they are added: one budget is ``params``, two add ``kv``, three ``bytes``."""
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0)

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=50,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
"""Settings for stable CI runs: the same examples every run, nothing saved, no deadline (50 examples)."""

_GOLDEN = 0.6180339887498949


def cost_models(resources=RESOURCES) -> dict:
    """The cost model of each resource of :data:`RESOURCES` (the library's defaults)."""
    models = {"params": Params(), "kv": KVCache(), "bytes": Bytes()}
    return {r: models[r] for r in resources}


def shapes(grid: int = 1, max_blocks: int = 4):
    """``(m, n)``: each a multiple of ``grid`` times 1..``max_blocks``."""
    return st.tuples(st.integers(1, max_blocks), st.integers(1, max_blocks)).map(
        lambda b: (grid * b[0], grid * b[1]))


@st.composite
def components(draw, index: int, grid: int, max_blocks: int = 4, kind: str | None = None,
               layer: int | None = None, shape: tuple[int, int] | None = None) -> Component:
    """A component ``model.layers.<layer>.<kind>`` (layer ``index`` unless given) whose ``m, n`` are multiples of
    ``grid`` (or ``shape``)."""
    kind = draw(st.sampled_from(KINDS)) if kind is None else kind
    m, n = draw(shapes(grid, max_blocks)) if shape is None else shape
    layer = index if layer is None else layer
    return Component(f"model.layers.{layer}.{kind}", m, n, kind, layer)


def break_even_rank(component: Component) -> int:
    """The largest rank whose factors ``r(m + n)`` cost no more parameters than the dense matrix."""
    return component.m * component.n // (component.m + component.n)


@st.composite
def curves(draw, component: Component, grid: int, *, max_candidates: int = 4, dense: bool | None = None,
           sparse: bool = False, generic: bool = False, scale: float = 1.0, removable: bool = False,
           break_even: bool = False) -> Curve:
    """A valid curve for ``component`` (see the module docstring).

    ``dense=None`` draws whether a dense candidate is present. ``removable=True`` always includes rank 0;
    ``break_even=True`` always includes the smallest grid rank above break-even, when the shape has one.
    ``generic=True`` adds a small distinct offset to every increment so that no two candidates or sums tie.
    """
    grid_ranks = list(range(0, component.max_rank + 1, grid))
    ranks = set(draw(st.lists(st.sampled_from(grid_ranks), min_size=1,
                              max_size=min(max_candidates, len(grid_ranks)), unique=True)))
    if removable:
        ranks.add(0)
    above = [r for r in grid_ranks if r > break_even_rank(component)]
    if break_even and above:
        ranks.add(above[0])
    ranks = sorted(ranks)
    k = len(ranks)
    inc = np.array(draw(st.lists(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
                                 min_size=k, max_size=k)), dtype=np.float64)
    if generic:  # distinct, strictly positive increments
        salt = (component.layer + 1) * 7.0 + np.arange(k) + 0.37 * sum(map(ord, component.kind))
        inc = inc + 0.05 + 0.9 * ((salt * _GOLDEN) % 1.0)
    errors = np.cumsum(inc[::-1])[::-1] * scale  # errors[i] = sum_{j >= i} inc[j]: non-increasing
    cand_r, cand_e, cand_s = list(ranks), list(errors), [0.0] * k
    if sparse and draw(st.booleans()):
        kept = draw(st.sampled_from(KEPT))
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


def _budget_range(n_budgets) -> tuple[int, int]:
    lo, hi = (n_budgets, n_budgets) if isinstance(n_budgets, int) else tuple(n_budgets)
    if not 1 <= lo <= hi <= len(RESOURCES):
        raise ValueError(f"n_budgets: expected an int or a (low, high) pair within 1..{len(RESOURCES)}, "
                         f"received {n_budgets!r}")
    return lo, hi


@st.composite
def problems(draw, *, max_components: int = 5, max_candidates: int = 5, n_budgets: int | tuple[int, int] = 1,
             dense: bool | None = None, sparse: bool = False, weights: bool | None = None, generic: bool = False,
             feasible: bool = False, removable: bool = False, layered: bool | None = False,
             break_even: bool = False, grids=GRIDS, max_blocks: int = 4) -> AllocationProblem:
    """A valid :class:`~rankalloc.allocators.problem.AllocationProblem`.

    Args:
        max_components, max_candidates: size limits (brute force enumerates the product).
        n_budgets: the number of budgets, or a ``(low, high)`` range: the first of :data:`RESOURCES`.
        dense: force (True/False) or draw (None) a dense candidate per component.
        sparse: allow sparse + low-rank candidates.
        weights: force or draw per-component weights ``alpha_l`` (:data:`WEIGHTS`).
        generic: no ties (distinct increments, dense error 0, distinct weights).
        feasible: every budget can be met on its own (several may still be infeasible together).
        removable: every component offers rank 0 (cost 0): every budget is feasible.
        layered: True builds 1..3 layers that repeat the same kinds and shapes (a model); False gives
            every component its own layer and shape; None draws which.
        break_even: every component offers a rank above break-even, where it has one.
        grids, max_blocks: the grids drawn and the shape size in grid blocks.
    """
    lo, hi = _budget_range(n_budgets)
    grid = draw(st.sampled_from(grids))
    count = draw(st.integers(lo, hi))
    resources = RESOURCES[:count]
    scale = draw(st.sampled_from(SCALES))
    layered = draw(st.booleans()) if layered is None else layered
    if layered:
        n_layers = draw(st.integers(1, min(3, max_components)))
        per_layer = draw(st.integers(1, max(1, max_components // n_layers)))
        kinds_of_layer = draw(st.lists(st.sampled_from(KINDS), min_size=per_layer, max_size=per_layer, unique=True))
        shape_of = {kind: draw(shapes(grid, max_blocks)) for kind in kinds_of_layer}
        if "kv" in resources and not set(kinds_of_layer) & {"k", "v"}:
            kinds_of_layer[draw(st.integers(0, per_layer - 1))] = draw(st.sampled_from(("k", "v")))
            shape_of = {kind: shape_of.get(kind) or draw(shapes(grid, max_blocks)) for kind in kinds_of_layer}
        slots = [(layer, kind) for layer in range(n_layers) for kind in kinds_of_layer]
    else:
        n_comp = draw(st.integers(1, max_components))
        kinds = [draw(st.sampled_from(KINDS)) for _ in range(n_comp)]
        if "kv" in resources and not set(kinds) & {"k", "v"}:
            kinds[draw(st.integers(0, n_comp - 1))] = draw(st.sampled_from(("k", "v")))
        slots = [(i, kind) for i, kind in enumerate(kinds)]
        shape_of = {}
    curve_list = []
    for i, (layer, kind) in enumerate(slots):
        comp = draw(components(i, grid, max_blocks=max_blocks, kind=kind, layer=layer,
                               shape=shape_of.get(kind)))
        curve_list.append(draw(curves(comp, grid, max_candidates=max_candidates, dense=dense, sparse=sparse,
                                      generic=generic, scale=scale, removable=removable, break_even=break_even)))
    w = None
    if weights or (weights is None and draw(st.booleans())):
        w = {cv.component.name: draw(st.sampled_from(WEIGHTS)) if not generic else 0.5 + 0.1 * i
             for i, cv in enumerate(curve_list)}
    costs = cost_models(resources)
    layers = sorted({cv.component.layer for cv in curve_list})
    layer_scores = {l: 0.1 + 0.8 * ((l * _GOLDEN) % 1.0) for l in layers}
    placeholder = tuple(Budget(r, removed=0.0) for r in costs)
    base = AllocationProblem(curve_list, placeholder, costs, weights=w, grid=grid, layer_scores=layer_scores,
                             name="hypothesis")
    budgets = tuple(draw(budgets_for(base, r, feasible=feasible)) for r in costs)
    return base.with_budgets(*budgets)


# ----------------------------------------------------------------------------- cost-model inputs
KEPT_LEVELS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.9)
"""Kept sparse fractions at which a cost model is priced by :func:`cost_cases`."""


@st.composite
def cost_components(draw, kinds=KINDS + ("vo",), max_dim: int = 8192) -> Component:
    """A component of any kind (``vo`` included, for head-wise models) with ``m, n`` in 1..``max_dim``."""
    dim = st.one_of(st.integers(1, 64), st.integers(1, max_dim), st.sampled_from((128, 1024, 4096, max_dim)))
    kind = draw(st.sampled_from(kinds))
    return Component(f"model.layers.0.{kind}", draw(dim), draw(dim), kind, 0)


@st.composite
def cost_cases(draw, max_ranks: int = 12) -> tuple[Component, np.ndarray, np.ndarray]:
    """``(component, ranks, kept)``: increasing ranks in ``0..min(m, n)`` (both ends included) and increasing
    kept fractions of :data:`KEPT_LEVELS` (0 included), to price every (rank, kept) pair of."""
    component = draw(cost_components())
    top = component.max_rank
    inner = draw(st.lists(st.integers(0, top), max_size=max_ranks, unique=True))
    ranks = np.array(sorted({0, top, *inner}), dtype=np.int64)
    kept = np.array(sorted({0.0, *draw(st.lists(st.sampled_from(KEPT_LEVELS), max_size=3, unique=True))}))
    return component, ranks, kept


@st.composite
def candidates(draw, component: Component, grid: int = 1, *, sparse: bool = True, dense: bool = True,
               max_candidates: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (rank, kept sparsity) candidates of ``component`` in a drawn order: ``(ranks, sparsity)`` arrays
    (``ranks == DENSE`` for dense), as a cost model receives them."""
    grid_ranks = list(range(0, component.max_rank + 1, grid))
    pairs = st.tuples(st.sampled_from(grid_ranks), st.sampled_from(KEPT_LEVELS if sparse else (0.0,)))
    chosen = draw(st.lists(pairs, min_size=1, max_size=max_candidates, unique=True))
    if dense and draw(st.booleans()):
        chosen.insert(draw(st.integers(0, len(chosen))), (DENSE, 0.0))
    return (np.array([r for r, _ in chosen], dtype=np.int64), np.array([k for _, k in chosen], dtype=np.float64))
