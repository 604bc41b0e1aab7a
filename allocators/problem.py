# The multiple-choice knapsack of rank allocation (Sinha & Zoltners, 1979): components, error curves, budgets
"""The budget problem: components, their error curves, cost models and budgets.

A problem is a multiple-choice knapsack (MCKP). Component ``l`` picks one candidate ``j`` from
its curve. The objective is ``sum_l alpha_l * e_l[j_l]``, subject to
``sum_l c^k_l[j_l] <= B_k`` for every budgeted resource ``k``.

Curves carry no cost. A cost model prices each candidate, so one profile serves every cost
model. This module imports numpy only: no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np

from rankalloc.allocators.costs import DENSE, CostModel
from rankalloc.allocators.registry import get_cost_model
from rankalloc.allocators.segments import FlatTables, feasible_limits


@dataclass(frozen=True)
class Component:
    """One weight matrix ``W`` of shape ``m x n`` (out x in, as in ``torch.nn.Linear``)."""

    name: str
    m: int
    n: int
    kind: str = ""
    layer: int = -1

    def __post_init__(self):
        if not self.name:
            raise ValueError("component name must be a non-empty string")
        for dim in ("m", "n"):
            v = getattr(self, dim)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"component {self.name!r}: expected a positive integer {dim}, received {v!r}")

    @property
    def max_rank(self) -> int:
        return min(self.m, self.n)


@dataclass(frozen=True)
class Choice:
    """One candidate: a rank (``DENSE`` for the dense matrix) and a kept sparse fraction ``k``."""

    rank: int
    sparsity: float = 0.0

    @property
    def is_dense(self) -> bool:
        return self.rank == DENSE

    def to_json(self):
        """``"dense"``, an integer rank, or ``[rank, sparsity]`` for sparse + low-rank."""
        if self.is_dense:
            return "dense"
        if self.sparsity:
            return [int(self.rank), float(self.sparsity)]
        return int(self.rank)

    def __str__(self) -> str:
        if self.is_dense:
            return "dense"
        return f"r{self.rank}" + (f"+k{self.sparsity:g}" if self.sparsity else "")


@dataclass(frozen=True, eq=False)
class Curve:
    """Candidates of one component and the error of each (float64, non-increasing in budget).

    ``ranks[j] == DENSE`` marks the dense candidate. ``sparsity[j]`` is the kept fraction ``k``
    of a sparse + low-rank candidate, 0 for pure low-rank. Errors must not increase with rank at
    a fixed sparsity, nor with sparsity at a fixed rank, and dense must be the least error.
    """

    component: Component
    ranks: np.ndarray
    errors: np.ndarray
    sparsity: np.ndarray | None = None

    def __post_init__(self):
        c = self.component
        ranks = np.asarray(self.ranks, dtype=np.int64).reshape(-1)
        errors = np.asarray(self.errors, dtype=np.float64).reshape(-1)
        sparsity = (np.zeros(len(ranks)) if self.sparsity is None
                    else np.asarray(self.sparsity, dtype=np.float64).reshape(-1))
        if len(ranks) == 0:
            raise ValueError(f"component {c.name!r}: expected at least one candidate, received an empty curve")
        if not (len(ranks) == len(errors) == len(sparsity)):
            raise ValueError(f"component {c.name!r}: ranks, errors and sparsity must have equal length, "
                             f"received {len(ranks)}, {len(errors)}, {len(sparsity)}")
        bad = ~np.isfinite(errors)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(f"component {c.name!r}: expected finite errors, received {float(errors[j])!r} "
                             f"at rank {int(ranks[j])} ({int(bad.sum())} non-finite values)")
        if (errors < 0).any():
            j = int(np.flatnonzero(errors < 0)[0])
            raise ValueError(f"component {c.name!r}: expected errors >= 0, received {float(errors[j])!r} at rank {int(ranks[j])}")
        bad_rank = (ranks != DENSE) & ((ranks < 0) | (ranks > c.max_rank))
        if bad_rank.any():
            raise ValueError(f"component {c.name!r} ({c.m}x{c.n}): expected ranks in [0, {c.max_rank}] or dense, "
                             f"received {int(ranks[bad_rank][0])}")
        if ((sparsity < 0) | (sparsity >= 1)).any() or (sparsity[ranks == DENSE] != 0).any():
            raise ValueError(f"component {c.name!r}: expected sparsity in [0, 1) and 0 for dense, "
                             f"received {sparsity.tolist()}")
        keys = list(zip(ranks.tolist(), sparsity.tolist()))
        if len(set(keys)) != len(keys):
            raise ValueError(f"component {c.name!r}: duplicate candidates in its curve")
        # canonical order: by sparsity, then rank, dense last
        order = np.lexsort((np.where(ranks == DENSE, np.iinfo(np.int64).max, ranks), sparsity))
        ranks, errors, sparsity = ranks[order], errors[order], sparsity[order]
        tol = 1e-12 * max(1.0, float(errors.max()))
        multi_sparsity = len(np.unique(sparsity)) > 1
        for k in (np.unique(sparsity) if multi_sparsity else (0.0,)):
            sel = np.flatnonzero(sparsity == k) if multi_sparsity else np.arange(len(errors))
            rise = np.flatnonzero(np.diff(errors[sel]) > tol)
            if len(rise):
                a, b = sel[rise[0]], sel[rise[0] + 1]
                raise ValueError(
                    f"component {c.name!r}: errors must be non-increasing in budget; expected error at "
                    f"{Choice(int(ranks[b]), float(k))} <= error at {Choice(int(ranks[a]), float(k))} "
                    f"= {float(errors[a])!r}, received {float(errors[b])!r}")
        for r in (np.unique(ranks[ranks != DENSE]) if multi_sparsity else ()):
            sel = np.flatnonzero(ranks == r)  # increasing sparsity
            rise = np.flatnonzero(np.diff(errors[sel]) > tol)
            if len(rise):
                a, b = sel[rise[0]], sel[rise[0] + 1]
                raise ValueError(
                    f"component {c.name!r}: errors must be non-increasing in budget; error at "
                    f"{Choice(int(r), float(sparsity[b]))} = {float(errors[b])!r} exceeds error at "
                    f"{Choice(int(r), float(sparsity[a]))} = {float(errors[a])!r}")
        dense = ranks == DENSE
        if dense.any() and errors[dense][0] > errors.min() + tol:
            raise ValueError(f"component {c.name!r}: expected the dense error to be the smallest, received "
                             f"{float(errors[dense][0])!r} > {float(errors.min())!r}")
        for name, value in (("ranks", ranks), ("errors", errors), ("sparsity", sparsity)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.ranks)

    def choice(self, j: int) -> Choice:
        return Choice(int(self.ranks[j]), float(self.sparsity[j]))

    def index_of(self, choice: Choice | int | str) -> int:
        """Index of a candidate given as a :class:`Choice`, an int rank, or ``"dense"``."""
        if isinstance(choice, str):
            if choice != "dense":
                raise ValueError(f"component {self.component.name!r}: unknown choice {choice!r}")
            choice = Choice(DENSE)
        elif not isinstance(choice, Choice):
            choice = Choice(int(choice))
        hit = np.flatnonzero((self.ranks == choice.rank) & np.isclose(self.sparsity, choice.sparsity))
        if not len(hit):
            raise ValueError(f"component {self.component.name!r}: {choice} is not one of its candidates")
        return int(hit[0])

    def with_dense(self, error: float = 0.0) -> "Curve":
        """This curve plus a dense candidate (error ``error``), if it has none."""
        if (self.ranks == DENSE).any():
            return self
        return Curve(self.component, np.append(self.ranks, DENSE), np.append(self.errors, error),
                     np.append(self.sparsity, 0.0))


def removed_fraction(value, what: str = "budget") -> float:
    """``value`` as a fraction REMOVED in [0, 1) (the one check of every "removed" budget); ``ValueError`` naming
    ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what}: expected a fraction removed in [0, 1), received {value!r}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """A limit on one resource, as an absolute amount or as the fraction of dense cost removed.

    ``Budget("params", removed=0.4)`` keeps at most 60% of the dense parameter count of the
    components; ``Budget("kv", limit=1e5)`` caps the KV-cache bytes per token at 1e5.
    """

    resource: str = "params"
    removed: float | None = None
    limit: float | None = None

    def __post_init__(self):
        if (self.removed is None) == (self.limit is None):
            raise ValueError(f"budget on {self.resource!r}: give exactly one of removed= or limit=")
        if self.removed is not None:
            removed_fraction(self.removed, f"budget on {self.resource!r}")
        if self.limit is not None and not (self.limit >= 0 and math.isfinite(self.limit)):
            raise ValueError(f"budget on {self.resource!r}: expected a finite limit >= 0, received {float(self.limit)!r}")

    def resolve(self, dense_total: float) -> float:
        """The absolute limit, given the total dense cost of the resource."""
        return self.limit if self.limit is not None else (1.0 - self.removed) * dense_total

    def describe(self) -> str:
        return (f"{self.resource}: {self.removed:.0%} removed" if self.removed is not None
                else f"{self.resource} <= {self.limit:g}")


COST_RTOL = 1e-12
"""Relative slack of the cost-model monotonicity test (a cost may fall by this fraction of itself, float rounding)."""

DENSE_RTOL = 1e-9
"""Relative slack of the test ``cost(component, [DENSE], [0]) == dense(component)``."""


def check_cost_model_on(model, resource: str, curves: Sequence[Curve], rows: Sequence[np.ndarray]) -> None:
    """Refuse a broken cost model on the candidates of a problem (``ValueError`` naming the model and component).

    ``rows[l]`` holds the costs (finite, >= 0) of ``curves[l]``'s candidates. Low-rank costs must not fall as
    the rank grows at a fixed kept sparsity, nor as the kept sparsity grows at a fixed rank, and the dense
    candidate must cost ``model.dense(component)``. (Dense itself may cost less than a high rank: above
    break-even it does.) Vectorised over every candidate of every component at once: a curve is in canonical
    order (by sparsity, then rank, dense last), so the rank test compares neighbours of one flat array.
    """
    costs = np.concatenate(rows)
    ranks = np.concatenate([cv.ranks for cv in curves])
    kept = np.concatenate([cv.sparsity for cv in curves])
    counts = np.array([len(cv) for cv in curves], dtype=np.int64)
    ends = np.cumsum(counts)
    low = ranks != DENSE
    neighbours = low[1:] & low[:-1] & (kept[1:] == kept[:-1])
    neighbours[ends[:-1] - 1] = False  # the last candidate of one component and the first of the next
    tests = [("rank", None, neighbours & (costs[1:] < costs[:-1] * (1 - COST_RTOL)))]
    if (kept != 0).any():  # at each rank by increasing kept sparsity, in the components with sparse candidates
        owner = np.repeat(np.arange(len(curves)), counts)
        sel = np.flatnonzero(low & np.isin(owner, owner[kept != 0]))
        order = sel[np.lexsort((kept[sel], ranks[sel], owner[sel]))]
        same = (owner[order[1:]] == owner[order[:-1]]) & (ranks[order[1:]] == ranks[order[:-1]])
        tests.append(("kept sparsity", order, same & (costs[order[1:]] < costs[order[:-1]] * (1 - COST_RTOL))))
    label = (f"cost model {getattr(model, 'name', type(model).__name__)!r} ({type(model).__name__}) "
             f"of budget {resource!r}")
    hint = "a broken cost model; rankalloc.testing.check_cost_model(model) tests one"
    for axis, order, falls in tests:
        if falls.any():
            i = int(np.flatnonzero(falls)[0])
            j, k = (i, i + 1) if order is None else (int(order[i]), int(order[i + 1]))
            name = curves[int(np.searchsorted(ends, j, side="right"))].component.name
            fixed = f"kept sparsity {float(kept[j]):g}" if axis == "rank" else f"rank {int(ranks[j])}"
            raise ValueError(
                f"{label}, component {name!r}: expected a cost non-decreasing in {axis} at {fixed}, received "
                f"{float(costs[k])!r} at {Choice(int(ranks[k]), float(kept[k]))} below {float(costs[j])!r} at "
                f"{Choice(int(ranks[j]), float(kept[j]))} ({hint})")
    at = np.flatnonzero(~low)
    owners = np.searchsorted(ends, at, side="right")
    d = np.array([model.dense(curves[l].component) for l in owners.tolist()], dtype=np.float64).reshape(-1)
    c = costs[at]
    off = ~np.isfinite(d) | (np.abs(c - d) > DENSE_RTOL * np.maximum(np.abs(c), np.abs(d)))
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(f"{label}, component {curves[int(owners[i])].component.name!r}: expected the dense candidate "
                         f"to cost dense(component) = {float(d[i])!r}, received cost(component, [DENSE], [0]) = "
                         f"{float(c[i])!r} ({hint})")


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Choose one candidate per component to minimise the weighted error within every budget.

    Args:
        curves: one :class:`Curve` per component (unique names).
        budgets: one or more :class:`Budget`; each names a resource.
        costs: resource name -> cost model. Resources named in ``budgets`` but absent here are
            looked up in :data:`rankalloc.allocators.costs.COST_MODELS`.
        weights: optional sensitivity ``alpha_l`` per component name (default 1).
        grid: every low-rank candidate's rank must be a multiple of ``grid``.
        objective: the curve kind, recorded for reports.
        layer_scores: optional importance ``t_l`` per layer index (FLAT-LLM's IPRS uses it).
        name: a label for reports.
    """

    curves: Sequence[Curve]
    budgets: Sequence[Budget] = (Budget("params", removed=0.2),)
    costs: Mapping[str, CostModel] = field(default_factory=dict)
    weights: Mapping[str, float] | None = None
    grid: int = 16
    objective: str = "whitened"
    layer_scores: Mapping[int, float] | None = None
    name: str = ""

    def __post_init__(self):
        curves = tuple(self.curves)
        budgets = (self.budgets,) if isinstance(self.budgets, Budget) else tuple(self.budgets)
        if not curves:
            raise ValueError("the problem is empty: expected at least one component curve, received none")
        if not budgets:
            raise ValueError("expected at least one budget, received none")
        seen: set[str] = set()
        for nm in (c.component.name for c in curves):
            if nm in seen:
                raise ValueError(f"duplicate component name {nm!r}: expected unique names")
            seen.add(nm)
        if not isinstance(self.grid, (int, np.integer)) or self.grid < 1:
            raise ValueError(f"expected a grid that is a positive integer, received {self.grid!r}")
        for cv in curves:
            c = cv.component
            if self.grid > c.max_rank:
                raise ValueError(f"component {c.name!r} ({c.m}x{c.n}): grid {self.grid} does not fit the shape; "
                                 f"expected grid <= min(m, n) = {c.max_rank}")
            low = cv.ranks[cv.ranks != DENSE]
            off = low[low % self.grid != 0]
            if len(off):
                raise ValueError(f"component {c.name!r}: expected ranks on the grid (multiples of {self.grid}), "
                                 f"received rank {int(off[0])}")
        costs = dict(self.costs)
        resources = list(dict.fromkeys(b.resource for b in budgets))
        if len(resources) != len(budgets):
            raise ValueError(f"expected one budget per resource, received {[b.resource for b in budgets]}")
        for res in resources:
            if res not in costs:
                try:
                    costs[res] = get_cost_model(res)()
                except ValueError as err:
                    raise ValueError(f"budget on unknown resource {res!r}; {err}, or a cost model in costs=") from None
        weights = dict(self.weights or {})
        unknown = set(weights) - seen
        if unknown:
            raise ValueError(f"weights name unknown components: {sorted(unknown)[:5]}")
        for nm, w in weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"component {nm!r}: expected a finite weight >= 0, received {w!r}")
        object.__setattr__(self, "curves", curves)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "weights", weights)

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_profiles(cls, profiles, cost: CostModel | str | Mapping[str, CostModel] = "params",
                      budget: float | Budget | Sequence[Budget] = 0.2, *, kind: str = "fisher",
                      grid: int = 16, weights: Mapping[str, float] | None = None,
                      components: Sequence[str] | None = None, name: str = "") -> "AllocationProblem":
        """Build a problem from a profile (or a :class:`CurveSet`) for one curve kind.

        ``profiles`` is anything with ``curve_set()`` (a profile store) or a :class:`CurveSet`.
        Ranks are kept at multiples of ``grid`` (rank 0 included) and the dense candidate is
        added at error 0. A float ``budget`` is the fraction of the ``cost`` resource removed.
        """
        from rankalloc.allocators.curveset import CurveSet

        cs = profiles if isinstance(profiles, CurveSet) else profiles.curve_set()
        if isinstance(cost, str):
            costs = {cost: get_cost_model(cost)()}
        elif isinstance(cost, Mapping):
            costs = dict(cost)
        else:
            costs = {cost.name: cost}
        if isinstance(budget, (int, float)):
            budgets: tuple[Budget, ...] = (Budget(next(iter(costs)), removed=float(budget)),)
        elif isinstance(budget, Budget):
            budgets = (budget,)
        else:
            budgets = tuple(budget)
        curves = cs.curves(kind, grid=grid, components=components)
        return cls(curves, budgets, costs, weights=weights, grid=grid, objective=kind,
                   layer_scores=cs.layer_scores, name=name or cs.name)

    def replace(self, **changes) -> "AllocationProblem":
        return dataclasses.replace(self, **changes)

    def with_budgets(self, *budgets: Budget) -> "AllocationProblem":
        return dataclasses.replace(self, budgets=budgets)

    # ----------------------------------------------------------------- tables used by solvers
    @property
    def components(self) -> tuple[Component, ...]:
        return tuple(c.component for c in self.curves)

    @property
    def resources(self) -> tuple[str, ...]:
        return tuple(b.resource for b in self.budgets)

    @cached_property
    def errors(self) -> tuple[np.ndarray, ...]:
        """Weighted error ``alpha_l * e_l`` of each candidate, per component."""
        out = []
        for cv in self.curves:
            w = self.weights.get(cv.component.name, 1.0)
            e = np.array(cv.errors * w if w != 1.0 else cv.errors, dtype=np.float64)
            e.setflags(write=False)
            out.append(e)
        return tuple(out)

    @cached_property
    def cost_tables(self) -> dict[str, tuple[np.ndarray, ...]]:
        """``cost_tables[resource][l][j]``: cost of candidate ``j`` of component ``l``."""
        tables = {}
        for res in self.resources:
            model = self.costs[res]
            rows = []
            for cv in self.curves:
                c = np.asarray(model.cost(cv.component, cv.ranks, cv.sparsity), dtype=np.float64)
                if c.shape != cv.ranks.shape or not np.isfinite(c).all() or (c < 0).any():
                    raise ValueError(f"cost model {res!r} returned invalid costs for component "
                                     f"{cv.component.name!r}: expected {len(cv)} finite values >= 0")
                c.setflags(write=False)
                rows.append(c)
            check_cost_model_on(model, res, self.curves, rows)
            tables[res] = tuple(rows)
        return tables

    @cached_property
    def dense_costs(self) -> dict[str, float]:
        """Total dense cost per resource (the reference of every "removed" fraction)."""
        return {res: float(sum(self.costs[res].dense(c) for c in self.components)) for res in self.resources}

    @cached_property
    def limits(self) -> dict[str, float]:
        """Absolute limit per resource."""
        return {b.resource: float(b.resolve(self.dense_costs[b.resource])) for b in self.budgets}

    @cached_property
    def min_costs(self) -> dict[str, float]:
        """Smallest achievable cost per resource, each on its own."""
        return {res: float(sum(t.min() for t in self.cost_tables[res])) for res in self.resources}

    @cached_property
    def flat(self) -> "FlatTables":
        """All candidates in one flat array, for vectorised solvers."""
        C = np.stack([np.concatenate(self.cost_tables[r]) for r in self.resources])
        return FlatTables.of(np.concatenate(self.errors), C, [len(cv) for cv in self.curves])

    def evaluate(self, choice_index: Sequence[int]) -> tuple[float, dict[str, float]]:
        """Objective and cost per resource of a choice index per component."""
        idx = np.asarray(choice_index, dtype=np.int64)
        if idx.shape != (len(self.curves),):
            raise ValueError(f"expected one choice per component ({len(self.curves)}), received shape {idx.shape}")
        pos = self.flat.offsets[:-1] + idx
        obj = float(np.sum(self.flat.errors[pos]))
        cost = {r: float(np.sum(self.flat.costs[k, pos])) for k, r in enumerate(self.resources)}
        return obj, cost

    def is_feasible(self, cost: Mapping[str, float]) -> bool:
        """Whether ``cost`` meets every limit, up to :data:`~rankalloc.allocators.segments.FEASIBILITY_RTOL`."""
        return all(cost[r] <= float(feasible_limits(self.limits[r])) for r in self.resources)

    def infeasibility_message(self) -> str | None:
        """Why no allocation can meet the budgets (None when the per-resource minima fit)."""
        short = [r for r in self.resources if self.min_costs[r] > float(feasible_limits(self.limits[r]))]
        if not short:
            return None
        parts = []
        for r in short:
            dense = self.dense_costs[r]
            best = 1 - self.min_costs[r] / dense if dense else 0.0
            parts.append(f"{r}: budget {self.limits[r]:.6g} is below the minimum achievable cost "
                         f"{self.min_costs[r]:.6g} (at most {best:.2%} of dense {r} can be removed on this grid)")
        return "infeasible: " + "; ".join(parts)

    def describe(self) -> str:
        return (f"{len(self.curves)} components, {sum(len(c) for c in self.curves)} candidates, "
                f"objective {self.objective!r}, grid {self.grid}, budgets "
                + ", ".join(b.describe() for b in self.budgets))
