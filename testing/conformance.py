# Shared benchmark problems with hand-derived optima (as cvxpy runs against every solver), for the MCKP of ranks
"""The conformance table: small allocation problems with hand-derived optima, the single source of truth.

:func:`rankalloc.testing.check_solver` runs every problem of :data:`KNOWN` against a solver, and the
library's own tests run every built-in solver through it. Each entry gives a builder, the optimal
objective (``None``: infeasible), the unique optimal choices and why the problem is there: the trap it
sets (a coarse grid that strands budget, dense above break-even, a KV-cache cap, two-dimensional
(rank, sparsity) choices, 0% removed, a budget below the minimum cost). Every optimum is derived by hand
in the builder's comment and checked against :func:`rankalloc.testing.brute_force` by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rankalloc.allocators.costs import KVCache, Params
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Choice, Component, Curve

__all__ = ["KNOWN", "Known", "known_problem"]


def _curve(name, m, n, ranks, errors, kind="", layer=0, sparsity=None):
    return Curve(Component(name, m, n, kind, layer), np.array(ranks), np.array(errors, dtype=float),
                 None if sparsity is None else np.array(sparsity))


def _problem(curves, budgets, *, grid, weights=None, name=""):
    layers = sorted({cv.component.layer for cv in curves})
    return AllocationProblem(curves, budgets, {b.resource: {"params": Params(), "kv": KVCache()}[b.resource]
                                               for b in budgets},
                             weights=weights, grid=grid, layer_scores={l: 0.2 + 0.1 * l for l in layers}, name=name)


@dataclass(frozen=True)
class Known:
    """A problem, its hand-derived optimal objective (None: infeasible) and its unique optimal choices."""

    build: Callable[[], AllocationProblem]
    optimum: float | None
    choices: dict[str, Choice] | None
    why: str

    def __post_init__(self):
        if not callable(self.build):
            raise ValueError(f"Known: expected a callable that builds the problem, received {self.build!r}")
        if (self.optimum is None) != (self.choices is None):
            raise ValueError(f"Known: an infeasible problem (optimum None) has no optimal choices, and a feasible "
                             f"one lists them; received optimum {self.optimum!r}, choices {self.choices!r}")
        if not self.why:
            raise ValueError("Known: expected a reason (why) the problem is in the table")


D = DENSE


def convex_threshold() -> AllocationProblem:
    # Two 128x128 matrices on grid 16: each rank step of 16 costs 16*256 = 4096 params, dense 16384 (= rank 64).
    # Marginal gains per step: A 4,2,1,1(->dense); B 3,1.5,.75,.75. Budget 50% = 4 steps: take 4,3,2,1.5.
    return _problem([_curve("A", 128, 128, [0, 16, 32, 48, D], [8, 4, 2, 1, 0], layer=0),
                     _curve("B", 128, 128, [0, 16, 32, 48, D], [6, 3, 1.5, .75, 0], layer=1)],
                    (Budget("params", removed=0.5),), grid=16, name="convex_threshold")


def weighted_threshold() -> AllocationProblem:
    # As convex_threshold with alpha_B = 4: B's gains become 12,6,3,3. The 4 best steps are B12, B6, A4, B3:
    # B at rank 48 (weighted error 3) and A at rank 16 (error 4). Unweighted, the answer would be (32, 32).
    return _problem([_curve("A", 128, 128, [0, 16, 32, 48, D], [8, 4, 2, 1, 0], layer=0),
                     _curve("B", 128, 128, [0, 16, 32, 48, D], [6, 3, 1.5, .75, 0], layer=1)],
                    (Budget("params", removed=0.5),), grid=16, weights={"B": 4.0}, name="weighted_threshold")


def grid_greedy_trap() -> AllocationProblem:
    # On grid 16 each matrix has one low-rank step: A (32x88) 1920 params for gain 10, B (32x68) 1600 for 5,
    # C (32x50) 1312 for 6; dense is dominated (same error, more params). Limit 3000. Ratio-greedy takes A
    # first (best gain per param) and strands 1080 params (error 11); the optimum is B + C (error 10).
    return _problem([_curve("A", 32, 88, [0, 16, D], [10, 0, 0], layer=0),
                     _curve("B", 32, 68, [0, 16, D], [5, 0, 0], layer=1),
                     _curve("C", 32, 50, [0, 16, D], [6, 0, 0], layer=2)],
                    (Budget("params", limit=3000.0),), grid=16, name="grid_greedy_trap")


def dense_break_even() -> AllocationProblem:
    # 8x8 matrices, rank r costs 16r, dense 64 = rank 4: ranks above 4 cost more than dense for more error.
    # Limit 96 (25% removed). Best: A dense (error 0) + B rank 2 (error 1) = 1; A rank 4 + B rank 2 = 2.
    a = [16, 8, 4, 2, 1, .5, .25, .1, .05]
    b = [4, 2, 1, .5, .25, .125, .0625, .03125, .015]
    return _problem([_curve("A", 8, 8, list(range(9)) + [D], a + [0], layer=0),
                     _curve("B", 8, 8, list(range(9)) + [D], b + [0], layer=1)],
                    (Budget("params", removed=0.25),), grid=1, name="dense_break_even")


def two_budgets() -> AllocationProblem:
    # q, k, v are 8x8 (rank r: 16r params, 2r KV bytes for k/v; dense 64 params, 16 KV bytes).
    # params <= 96 (6 steps), KV <= 4 bytes (k and v ranks sum <= 2). Params alone would give
    # q3 k2 v1 (error 4.5); with the KV cap, k1 v1 (errors 3 + 2) and q takes the rest: dense (0). Total 5.
    return _problem([_curve("q", 8, 8, [0, 1, 2, 3, D], [8, 4, 2, 1, 0], kind="q"),
                     _curve("k", 8, 8, [0, 1, 2, 3, D], [6, 3, 1.5, .75, 0], kind="k"),
                     _curve("v", 8, 8, [0, 1, 2, 3, D], [4, 2, 1, .5, 0], kind="v")],
                    (Budget("params", removed=0.5), Budget("kv", limit=4.0)), grid=1, name="two_budgets")


def sparse_plus_low_rank() -> AllocationProblem:
    # A (8x64) offers rank r plus a kept sparse fraction k = 1/16 (32 values), priced with its CSR indices: 32 values
    # + 32 int16 columns + 9 int32 row pointers (18) = 82. (1, 1/16) costs 72 + 82 = 154 for error 2, beating rank 2
    # (144 params, error 3). Candidates are ordered by sparsity first, so cost is not monotone in index.
    # Limit 170: A (1, 1/16) + B rank 1 = 2 + 2.5 = 4.5 (next best: A rank 2 + B rank 1 = 5.5).
    return _problem([_curve("A", 8, 64, [0, 1, 2, 3, 0, 1, D], [10, 6, 3, 2, 7, 2, 0],
                            sparsity=[0, 0, 0, 0, 1 / 16, 1 / 16, 0]),
                     _curve("B", 8, 8, [0, 1, 2, 3, D], [5, 2.5, 1.25, .6, 0], layer=1)],
                    (Budget("params", limit=170.0),), grid=1, name="sparse_plus_low_rank")


def all_dense_at_zero_removed() -> AllocationProblem:
    # Removing 0% leaves exactly the dense cost: every matrix stays dense (error 0); any low-rank choice
    # has a positive error (even full rank, which also costs more than dense).
    return _problem([_curve("A", 8, 8, [0, 4, 8, D], [5, 1, .01, 0], layer=0),
                     _curve("B", 8, 16, [0, 4, 8, D], [3, 2, .02, 0], layer=1)],
                    (Budget("params", removed=0.0),), grid=4, name="all_dense_at_zero_removed")


def infeasible_budget() -> AllocationProblem:
    # No rank 0: the cheapest choices cost 1024 (A, rank 16 = dense) + 1536 (B, rank 16) = 2560 of 3072
    # dense, so at most 16.7% can be removed. Removing 90% must be reported INFEASIBLE with that minimum.
    return _problem([_curve("A", 32, 32, [16, D], [1, 0], layer=0),
                     _curve("B", 32, 64, [16, 32, D], [2, 1, 0], layer=1)],
                    (Budget("params", removed=0.9),), grid=16, name="infeasible_budget")


C = Choice
KNOWN: dict[str, Known] = {
    "convex_threshold": Known(convex_threshold, 3.5, {"A": C(32), "B": C(32)},
                              "convex curves: a global threshold on gain per parameter is optimal"),
    "weighted_threshold": Known(weighted_threshold, 7.0, {"A": C(16), "B": C(48)},
                                "sensitivity weights move the threshold"),
    "grid_greedy_trap": Known(grid_greedy_trap, 10.0, {"A": C(0), "B": C(16), "C": C(16)},
                              "coarse grid: best-ratio-first strands budget"),
    "dense_break_even": Known(dense_break_even, 1.0, {"A": C(D), "B": C(2)},
                              "above break-even rank, dense is the cheaper choice"),
    "two_budgets": Known(two_budgets, 5.0, {"q": C(D), "k": C(1), "v": C(1)},
                         "a KV-cache cap changes the params-optimal answer"),
    "sparse_plus_low_rank": Known(sparse_plus_low_rank, 4.5, {"A": C(1, 1 / 16), "B": C(1)},
                                  "two-dimensional (rank, sparsity) choices"),
    "all_dense_at_zero_removed": Known(all_dense_at_zero_removed, 0.0, {"A": C(D), "B": C(D)},
                                       "0% removed is all dense, not an error"),
    "infeasible_budget": Known(infeasible_budget, None, None, "below the minimum achievable cost"),
}

def known_problem(name: str) -> AllocationProblem:
    """A fresh copy of the problem of :data:`KNOWN` ``[name]`` (built on every call, so a solver that mutates
    its problem cannot spoil the table for the next one)."""
    if name not in KNOWN:
        raise ValueError(f"unknown conformance problem {name!r}: expected one of {', '.join(KNOWN)}")
    return KNOWN[name].build()
