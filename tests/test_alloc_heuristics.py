"""Heuristic solvers (uniform, greedy, lagrangian, iprs, epsilon), their helpers, the Pareto sweep and
the cvxpy cross-checks: hand-made problems with known answers, literal reference implementations
(heap greedy, monotone-chain hull, naive fill, brute force) on small random instances."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest

import rankalloc  # noqa: F401  (loads OR-tools before cvxpy)
from rankalloc.allocators import hull as hull_mod
from rankalloc.allocators.allocation import Status, finish
from rankalloc.allocators.costs import KVCache, Params
from rankalloc.allocators.epsilon import UniformEpsilon
from rankalloc.allocators.dual import dual_value
from rankalloc.allocators.greedy import Greedy, start_choices
from rankalloc.allocators.hull import lower_hull, lower_hulls
from rankalloc.allocators.iprs import IPRS, capped_proportional, project_capped_simplex
from rankalloc.allocators.lagrangian import Lagrangian
from rankalloc.allocators.moves import fill_upgrades, greedy_descent
from rankalloc.allocators.pareto import ParetoFront, pareto_sweep
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve
from rankalloc.allocators.segments import (feasible_limits, fits, group_first_min, limits_of, scalar_weights,
                                           segment_cummax, sort_within, stable_argsort)
from rankalloc.allocators.uniform import Uniform

D = DENSE
HEURISTICS = (Uniform(), Greedy(), Greedy(start="full"), Lagrangian(), Lagrangian(fill=False), UniformEpsilon())


# ----------------------------------------------------------------------------- builders and references
def curve(name, m, n, ranks, errors, kind="", layer=0, sparsity=None):
    return Curve(Component(name, m, n, kind, layer), np.array(ranks), np.array(errors, dtype=float),
                 None if sparsity is None else np.array(sparsity))


def random_problem(rng, n_comp=4, grid=4, budgets=(Budget("params", removed=0.4),), integer=False,
                   weights=False, kinds=("q", "k", "v", "o")):
    """Small random problem: shapes on the grid, non-increasing errors (integers when ``integer``), dense last."""
    curves = []
    for l in range(n_comp):
        m, n = (int(x) * grid for x in rng.integers(1, 5, size=2))
        ranks = np.arange(0, min(m, n) + 1, grid)
        steps = rng.integers(0, 6, size=len(ranks)) if integer else rng.exponential(1.0, size=len(ranks))
        errors = np.cumsum(steps[::-1])[::-1].astype(float)  # non-increasing, last >= 0
        curves.append(curve(f"c{l}", m, n, np.append(ranks, D), np.append(errors, 0.0), kind=kinds[l % len(kinds)],
                            layer=l // 2))
    costs = {b.resource: {"params": Params(), "kv": KVCache()}[b.resource] for b in budgets}
    w = {f"c{l}": float(rng.uniform(0.5, 3)) for l in range(n_comp)} if weights else None
    return AllocationProblem(curves, budgets, costs, weights=w, grid=grid,
                             layer_scores={l: float(rng.uniform(0.1, 1)) for l in range(n_comp)})


def brute_optimum(problem):
    """Least objective over all combinations meeting every budget (solvers' own tolerance), or None."""
    best = None
    B = limits_of(problem)
    F = problem.flat
    for combo in itertools.product(*[range(len(cv)) for cv in problem.curves]):
        pos = F.offsets[:-1] + np.array(combo)
        if fits(F.costs[:, pos].sum(axis=1), B):
            obj = float(F.errors[pos].sum())
            best = obj if best is None else min(best, obj)
    return best


def heap_greedy(problem, start, weights):
    """The literal greedy: a heap of each component's next step, keyed (ratio, component, step)."""
    B = limits_of(problem)
    costs = [np.array([problem.cost_tables[r][l] for r in problem.resources]) for l in range(len(problem.curves))]
    paths = []
    for l, C in enumerate(costs):
        e, s = problem.errors[l], weights @ C
        j0 = int(start[l])
        path = [j0]
        for j in sorted((j for j in range(len(e)) if s[j] < s[j0]), key=lambda j: (-s[j], e[j], j)):
            if s[j] < s[path[-1]]:
                path.append(j)
        paths.append((path, e, s, C))

    def step(l, k):
        path, e, s, _ = paths[l]
        return (e[path[k + 1]] - e[path[k]]) / (s[path[k]] - s[path[k + 1]])

    at = [0] * len(paths)
    total = sum(C[:, p[0]] for p, _, _, C in paths)
    heap = [(step(l, 0), l, 0) for l in range(len(paths)) if len(paths[l][0]) > 1]
    heapq.heapify(heap)
    while not fits(total, B) and heap:
        _, l, k = heapq.heappop(heap)
        path, _, _, C = paths[l]
        total = total - C[:, path[k]] + C[:, path[k + 1]]
        at[l] = k + 1
        if k + 2 < len(path):
            heapq.heappush(heap, (step(l, k + 1), l, k + 1))
    return [paths[l][0][at[l]] for l in range(len(paths))], bool(fits(total, B))


def chain_hull(c, e, collinear=False):
    """Reference lower-left hull: Pareto front then Andrew's monotone chain, one point at a time."""
    pts = sorted(range(len(c)), key=lambda j: (c[j], e[j], j))
    front = []
    for j in pts:
        if not front or (e[j] < e[front[-1]] and c[j] > c[front[-1]]):
            front.append(j)
    hull = []
    for j in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (e[b] - e[a]) * (c[j] - c[a]) - (e[j] - e[a]) * (c[b] - c[a])
            if cross > 0 or (cross == 0 and not collinear):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


# ----------------------------------------------------------------------------- segment helpers
def test_sort_helpers_match_numpy():
    """stable_argsort equals numpy's stable argsort; sort_within equals a lexsort by (component, value, position);
    segment_cummax equals a per-segment running max."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=3000).astype(float)
    assert np.array_equal(stable_argsort(x), np.argsort(x, kind="stable"))
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 40, size=100))])
    v = rng.integers(0, 10, size=offsets[-1]).astype(float) * rng.choice([1.0, 1e-13], size=offsets[-1])
    owner = np.repeat(np.arange(100), np.diff(offsets))
    assert np.array_equal(sort_within(v, offsets), np.lexsort((np.arange(len(v)), v, owner)))
    ref = np.concatenate([np.maximum.accumulate(v[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    assert np.array_equal(segment_cummax(v, offsets), ref)
    starts = offsets[:-1]
    ref = [a + int(np.argmin(v[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
    assert group_first_min(v, starts).tolist() == ref


def test_doctests():
    """The docstring examples of the hull and IPRS modules hold."""
    import doctest

    from rankalloc.allocators import iprs

    for mod in (hull_mod, iprs):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- uniform
def test_uniform_is_the_svdllm_rule():
    """With parameters and low-rank candidates, every matrix gets r = floor(mn(1-rho)/(m+n)) snapped down to
    the grid, and dense only at rho = 0."""
    shapes = [(64, 64), (64, 176), (192, 48), (128, 256)]
    curves = [curve(f"w{i}", m, n, np.append(np.arange(0, min(m, n) + 1, 16), D),
                    np.append(np.linspace(1, 0.01, min(m, n) // 16 + 1), 0.0)) for i, (m, n) in enumerate(shapes)]
    for rho in (0.0, 0.1, 0.35, 0.5, 0.8):
        a = Uniform().solve(AllocationProblem(curves, Budget("params", removed=rho), grid=16))
        assert a.status == Status.FEASIBLE
        for (m, n), r in zip(shapes, a.ranks.values()):
            expected = D if rho == 0 else (m * n * (1 - rho) // (m + n)) // 16 * 16
            assert r == expected, (m, n, rho, r, expected)


def test_uniform_short_component_and_infeasible():
    """A component without a candidate under (1-rho) of its dense cost takes its cheapest one: FEASIBLE when the
    total still fits (with a message), INFEASIBLE naming the minimum achievable cost when it cannot."""
    curves = [curve("A", 64, 64, [16, D], [1, 0]), curve("B", 64, 64, [0, 16, 32, D], [5, 2, 1, 0])]
    ok = Uniform().solve(AllocationProblem(curves, Budget("params", removed=0.75), grid=16))
    assert ok.status == Status.FEASIBLE and ok.ranks == {"A": 16, "B": 0}
    assert "A" in ok.message and "uniformly" in ok.message
    bad = Uniform().solve(AllocationProblem(curves, Budget("params", limit=1000.0), grid=16))
    assert bad.status == Status.INFEASIBLE and "minimum achievable cost 2048" in bad.message
    no_zero = [curve("A", 64, 64, [16, D], [1, 0]), curve("B", 64, 64, [16, 32, D], [2, 1, 0])]
    worst = Uniform().solve(AllocationProblem(no_zero, Budget("params", removed=0.9), grid=16))
    assert worst.status == Status.INFEASIBLE and worst.ranks == {"A": 16, "B": 16}  # every component short


# ----------------------------------------------------------------------------- greedy
def test_greedy_hand_made():
    """Dense 4096 each, limit 4096: B's first step (3 per 2048 saved) then A's (4 per 2048) meet the budget;
    candidates costing the same as dense (rank 32) or more (rank 48) are skipped."""
    curves = [curve("A", 64, 64, [0, 16, 32, 48, D], [8, 4, 1, 0.5, 0]),
              curve("B", 64, 64, [0, 16, 32, 48, D], [9, 3, 2, 1, 0])]
    p = AllocationProblem(curves, Budget("params", removed=0.5), grid=16)
    a = Greedy().solve(p)
    assert a.status == Status.FEASIBLE and a.ranks == {"A": 16, "B": 16} and a.objective == 7.0
    assert Greedy(start="full").solve(p.with_budgets(Budget("params", removed=0.0))).ranks == {"A": D, "B": D}
    with pytest.raises(ValueError, match="start"):
        Greedy(start="half")


@pytest.mark.parametrize("budgets", [(Budget("params", removed=0.45),),
                                     (Budget("params", removed=0.3), Budget("kv", removed=0.5))])
def test_greedy_prefix_max_equals_heap(budgets):
    """The vectorised greedy (stable sort of per-step prefix-max ratios) picks exactly what the literal heap
    greedy picks, ties included (integer errors), from both starts."""
    rng = np.random.default_rng(2)
    for trial in range(40):
        p = random_problem(rng, n_comp=int(rng.integers(2, 7)), budgets=budgets, integer=trial % 2 == 0,
                           weights=trial % 3 == 0)
        w = scalar_weights(p)
        for start in ("dense", "full"):
            s = start_choices(p, start, w)
            idx, ok, _ = greedy_descent(p.flat, s, limits_of(p), w)
            ref, ref_ok = heap_greedy(p, s, w)
            assert ok == ref_ok and list(idx) == ref, (trial, start)


# ----------------------------------------------------------------------------- hull and lagrangian
@pytest.mark.parametrize("collinear", [False, True])
def test_lower_hull_matches_monotone_chain(monkeypatch, collinear):
    """lower_hulls (vectorised deletion passes, then the lockstep chain) equals a one-point-at-a-time monotone
    chain, on random curves (integer ones have collinear points), a dense point that shadows the tail, and with
    the passes cut short."""
    rng = np.random.default_rng(3)
    cs, es = [], []
    for i in range(60):
        k = int(rng.integers(1, 30))
        c = rng.integers(0, 40, size=k).astype(float)
        e = rng.integers(0, 40, size=k).astype(float) if i % 2 else rng.exponential(size=k)
        cs.append(c)
        es.append(e)
    k = 200  # convex tail plus a cheap dense point: the tail is deleted in one far-chord pass
    cs.append(np.append(np.arange(k, dtype=float), 120.0))
    es.append(np.append(1.0 / (1.0 + np.arange(k)), 0.0))
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cs])])
    C, E = np.concatenate(cs), np.concatenate(es)
    ref = np.concatenate([np.array(chain_hull(c, e, collinear), dtype=int) + o for c, e, o in zip(cs, es, offsets)])
    assert np.array_equal(lower_hulls(C, E, offsets, collinear), ref)
    monkeypatch.setattr(hull_mod, "MAX_PASSES", 0)
    assert np.array_equal(lower_hulls(C, E, offsets, collinear), ref)
    assert lower_hull([0, 1, 2, 3], [3.0, 2.0, 1.0, 0.0]).tolist() == [0, 3]
    assert lower_hull([0, 1, 2, 3], [3.0, 2.0, 1.0, 0.0], collinear=True).tolist() == [0, 1, 2, 3]


def test_lagrangian_bound_and_objective_bracket_the_optimum():
    """lower bound <= brute-force optimum <= objective, with the budgets met, on random problems with one or two
    budgets and weights; with one budget the exact multiplier search finds what bisection on lambda converges to."""
    rng = np.random.default_rng(4)
    for trial in range(30):
        budgets = ((Budget("params", removed=float(rng.uniform(0.1, 0.8))),) if trial % 3 else
                   (Budget("params", removed=0.3), Budget("kv", removed=float(rng.uniform(0.2, 0.7)))))
        p = random_problem(rng, n_comp=4, budgets=budgets, integer=trial % 2 == 0, weights=trial % 4 == 0)
        opt = brute_optimum(p)
        a = Lagrangian().solve(p)
        assert opt is not None
        assert a.feasible and a.lower_bound <= opt + 1e-9 * max(1, opt) and opt <= a.objective + 1e-9
        if a.status == Status.OPTIMAL:
            assert a.objective == pytest.approx(opt, rel=1e-12, abs=1e-12)
        if len(budgets) == 1 and a.info["lambda"]["params"] > 0:
            lo, hi = 0.0, 1e6  # bisection: smallest lambda whose relaxed solution fits
            F, B = p.flat, p.limits["params"]
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                pick = np.array([F.offsets[l] + np.argmin(p.errors[l] + mid * p.cost_tables["params"][l])
                                 for l in range(len(p.curves))])
                lo, hi = (lo, mid) if F.costs[0, pick].sum() <= B else (mid, hi)
            assert a.info["lambda"]["params"] == pytest.approx(hi, rel=1e-9)


def test_lagrangian_exact_on_separable_and_all_dense():
    """At 0% removed the min-error solution fits: lambda = 0, all dense, bound == objective, OPTIMAL."""
    p = AllocationProblem([curve("A", 64, 64, [0, 16, 32, D], [4, 2, 1, 0]),
                           curve("B", 64, 32, [0, 16, 32, D], [3, 1, 0.5, 0])], Budget("params", removed=0.0), grid=16)
    a = Lagrangian().solve(p)
    assert a.status == Status.OPTIMAL and a.ranks == {"A": D, "B": D} and a.lower_bound == a.objective == 0.0


def test_fill_upgrades_matches_naive_fill():
    """fill_upgrades (which re-examines only candidates that fitted before) equals a fill that re-examines every
    candidate after every upgrade."""
    rng = np.random.default_rng(5)

    def naive(p, idx):
        F, w, B = p.flat, scalar_weights(p), feasible_limits(limits_of(p))
        pos = F.offsets[:-1] + np.array(idx)
        while True:
            cur = pos[F.owner]
            extra = F.costs - F.costs[:, cur]
            gain = F.errors[cur] - F.errors
            ok = (gain > 0) & np.all(extra <= (B - F.costs[:, pos].sum(axis=1))[:, None], axis=0)
            if not ok.any():
                return list(pos - F.offsets[:-1])
            ds = w @ extra
            value = np.where(ds > 0, gain / np.where(ds > 0, ds, 1), np.inf)
            cand = np.flatnonzero(ok)
            j = cand[np.argmax(value[cand])]
            pos[F.owner[j]] = j

    for trial in range(30):
        budgets = ((Budget("params", removed=0.5),) if trial % 2 else
                   (Budget("params", removed=0.4), Budget("kv", removed=0.3)))
        p = random_problem(rng, n_comp=6, budgets=budgets, integer=True)
        start = [int(np.argmin(p.cost_tables["params"][l])) for l in range(len(p.curves))]
        assert list(fill_upgrades(p.flat, start, limits_of(p), scalar_weights(p))[0]) == naive(p, start)


def test_lp_bound_equals_lagrangian_bound():
    """The cvxpy LP relaxation optimum equals the Lagrangian dual value at lambda* (one budget, weights
    included); with two budgets the coordinate-ascent bound is <= the LP optimum."""
    from cvx_models import lp_relaxation_bound

    rng = np.random.default_rng(6)
    for trial in range(4):
        p = random_problem(rng, n_comp=5, weights=trial % 2 == 0,
                           budgets=(Budget("params", removed=float(rng.uniform(0.2, 0.7))),))
        lp = lp_relaxation_bound(p)
        assert Lagrangian().solve(p).lower_bound == pytest.approx(lp, rel=1e-6, abs=1e-9)
    p = random_problem(rng, n_comp=5, budgets=(Budget("params", removed=0.4), Budget("kv", removed=0.5)))
    a = Lagrangian().solve(p)
    assert a.lower_bound <= lp_relaxation_bound(p) * (1 + 1e-6) + 1e-9
    assert dual_value(p.flat, np.zeros(2), limits_of(p)) <= a.lower_bound


# ----------------------------------------------------------------------------- iprs
def test_capped_proportional_properties():
    """w sums to total, lies in [0, 1], and w_l = min(1, c t_l) for one c: uncapped ratios w_l / t_l are equal
    and every capped layer has c t_l >= 1."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        t = rng.exponential(size=int(rng.integers(1, 12)))
        total = float(rng.uniform(0, len(t)))
        w = capped_proportional(t, total)
        assert w.sum() == pytest.approx(total, abs=1e-9) and (w >= 0).all() and (w <= 1).all()
        free = w < 1 - 1e-12
        if free.any():
            c = (w[free] / t[free]).max()
            assert np.allclose(w[free] / t[free], c, rtol=1e-9)
            assert (c * t[~free] >= 1 - 1e-9).all()
    assert capped_proportional([1.0, 2.0], 2.0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="total"):
        capped_proportional([1.0, 0.0], 1.5)


def test_capped_proportional_with_weights():
    """With weights d, sum_l d_l w_l = total and w_l = min(1, c t_l) for one c; unit weights give the unweighted
    answer; the weight of the positive scores bounds the total."""
    rng = np.random.default_rng(17)
    for _ in range(50):
        k = int(rng.integers(1, 12))
        t, d = rng.exponential(size=k), rng.choice([64.0, 4096.0, 65536.0], size=k)
        total = float(rng.uniform(0, d.sum()))
        w = capped_proportional(t, total, weights=d)
        assert d @ w == pytest.approx(total, rel=1e-9) and (w >= 0).all() and (w <= 1).all()
        free = w < 1 - 1e-12
        if free.any():
            c = (w[free] / t[free]).max()
            assert np.allclose(w[free] / t[free], c, rtol=1e-9) and (c * t[~free] >= 1 - 1e-9).all()
        u = float(rng.uniform(0, k))
        np.testing.assert_allclose(capped_proportional(t, u, weights=np.ones(k)), capped_proportional(t, u),
                                   rtol=1e-12, atol=1e-15)
    assert capped_proportional([1.0, 0.0], 10.0, weights=[10.0, 5.0]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="weight of the positive scores"):
        capped_proportional([1.0, 0.0], 11.0, weights=[10.0, 5.0])
    with pytest.raises(ValueError, match="weights"):
        capped_proportional([1.0, 2.0], 1.0, weights=[1.0, -1.0])


def test_projection_bisection_matches_cvxpy():
    """project_capped_simplex (bisection on the shift) equals the cvxpy QP solution, sums to S and stays in
    [0, 1]."""
    from cvx_models import project_capped_simplex_cvx

    rng = np.random.default_rng(8)
    for _ in range(5):
        y = rng.normal(size=int(rng.integers(2, 10))) * 2
        S = float(rng.uniform(0, len(y)))
        w = project_capped_simplex(y, S)
        assert w.sum() == pytest.approx(S, abs=1e-10) and (w >= 0).all() and (w <= 1).all()
        np.testing.assert_allclose(w, project_capped_simplex_cvx(y, S), atol=1e-6)


def test_iprs_hand_made_and_refusals():
    """Scores (1, 3), 50% removed: w = (0.25, 0.75), caps 1024 and 3072 give ranks 0 and 16; the fill pass gives
    the leftover 2048 to the more important layer, whose least-error candidate within it is dense (4096, as
    rank 32). Missing scores and two budgets are refused."""
    curves = [curve("A", 64, 64, [0, 16, 32, D], [4, 2, 1, 0], layer=0),
              curve("B", 64, 64, [0, 16, 32, D], [4, 2, 1, 0], layer=1)]
    p = AllocationProblem(curves, Budget("params", removed=0.5), grid=16, layer_scores={0: 1.0, 1: 3.0})
    assert IPRS(fill=False).solve(p).ranks == {"A": 0, "B": 16}
    a = IPRS().solve(p)
    assert a.status == Status.FEASIBLE and a.ranks == {"A": 0, "B": D}
    assert a.info["kept_fraction"] == {0: 0.25, 1: 0.75}
    assert a.info["rule"] == "paper" and a.info["scale"] == 0.25 and "paper_kept_fraction" not in a.info
    with pytest.raises(ValueError, match="layer importance scores"):
        IPRS().solve(p.replace(layer_scores=None))
    with pytest.raises(ValueError, match="kv"):
        IPRS().solve(p.with_budgets(Budget("params", removed=0.5), Budget("kv", removed=0.5)))



def test_iprs_unequal_layers_stay_feasible():
    """Layer 0 (64x64, t = 0.9) and layer 1 (8x8, t = 0.1), 50% removed (limit 2080): w = (0.9, 0.1) lets A take
    rank 24 (3072 params), over the budget; every matrix at rank 0 fits. IPRS rescales the water-filling so that
    4096 w_0 + 64 w_1 = 2080 with w = c (0.9, 0.1): c = 2080 / 3692.8, A's cap 2076 gives rank 16 (2048), B's cap
    3.6 gives rank 0; the 32 left buy nothing (B's rank 8 costs 128)."""
    curves = [curve("A", 64, 64, [0, 16, 24, D], [10, 5, 3, 0], layer=0),
              curve("B", 8, 8, [0, 8, D], [1, .5, 0], layer=1)]
    p = AllocationProblem(curves, Budget("params", removed=0.5), grid=8, layer_scores={0: 0.9, 1: 0.1})
    for fill in (True, False):
        a = IPRS(fill=fill).solve(p)
        assert a.status == Status.FEASIBLE and a.ranks == {"A": 16, "B": 0} and a.cost["params"] == 2048
        assert a.info["rule"] == "rescaled" and a.info["paper_kept_fraction"] == {0: 0.9, 1: 0.1}
        c = 2080 / (4096 * 0.9 + 64 * 0.1)
        assert a.info["scale"] == pytest.approx(c, rel=1e-12)
        assert a.info["kept_fraction"] == pytest.approx({0: 0.9 * c, 1: 0.1 * c}, rel=1e-12)
        assert a.message == ""


def test_iprs_shrinks_the_scale_when_a_matrix_has_nothing_within_its_cap():
    """Two 64x64 layers (equal sizes: rescaling changes nothing), 50% removed (limit 4096), t = (0.1, 0.9): A has no
    candidate below rank 16 (2048), so at w = (0.1, 0.9) it takes rank 16 and B's rank 24 (3072) breaks the budget.
    IPRS lowers c to the largest value at which the snapped allocation fits: 2048 / (0.9 * 4096), where B's cap
    reaches its rank 16. Both rank 16: 4096 params, exactly the limit."""
    curves = [curve("A", 64, 64, [16, D], [1, 0], layer=0),
              curve("B", 64, 64, [0, 16, 24, D], [4, 2, 1, 0], layer=1)]
    p = AllocationProblem(curves, Budget("params", removed=0.5), grid=8, layer_scores={0: 0.1, 1: 0.9})
    a = IPRS().solve(p)
    assert a.status == Status.FEASIBLE and a.ranks == {"A": 16, "B": 16} and a.cost["params"] == 4096
    assert a.info["rule"] == "shrunk" and a.info["scale"] == pytest.approx(2048 / (0.9 * 4096), rel=1e-12)
    assert a.info["kept_fraction"][1] == pytest.approx(0.5, rel=1e-12)


def test_iprs_infeasible_names_the_minimum_cost():
    """A budget below every matrix at its cheapest candidate (2048 + 0): INFEASIBLE with the minimum cost 2048 in
    the message (as every solver), and no count of components."""
    curves = [curve("A", 64, 64, [16, D], [1, 0], layer=0), curve("B", 8, 8, [0, 8, D], [1, .5, 0], layer=1)]
    p = AllocationProblem(curves, Budget("params", limit=1000.0), grid=8, layer_scores={0: 0.9, 1: 0.1})
    a = IPRS().solve(p)
    assert a.status == Status.INFEASIBLE and "2048" in a.message and "component(s)" not in a.message
    assert a.message == p.infeasibility_message()


def test_iprs_keeps_the_paper_rule_where_it_fits_and_never_refuses_a_feasible_problem():
    """On random problems (layers of different sizes, matrices without rank 0, sparse candidates), IPRS is
    FEASIBLE exactly when every matrix at its cheapest candidate fits. Where the paper's allocation (equal weight
    per layer, snapped and filled) meets the budget, it is returned unchanged (rule "paper"); otherwise the kept
    fractions are the paper's shrunk by one scale: w = min(1, c t) with c below the paper's, so no layer keeps
    more than the paper gave it, and after rescaling sum_l D_l w_l meets the budget."""
    from hypothesis import given, settings

    from rankalloc.allocators.iprs import fill_by_layer
    from rankalloc.allocators.uniform import component_dense_costs, largest_within
    from rankalloc.testing.strategies import DETERMINISTIC, problems

    rules = set()

    @settings(DETERMINISTIC, max_examples=300)
    @given(p=problems(n_budgets=1, sparse=True, weights=None, layered=None))
    def check(p):
        layers = sorted({c.layer for c in p.components})
        t = np.array([p.layer_scores[l] for l in layers])
        layer_of = np.array([layers.index(c.layer) for c in p.components])
        dense = component_dense_costs(p)
        s = min(max(1 - p.limits["params"] / dense.sum(), 0.0), 1.0)
        w_paper = capped_proportional(t, len(layers) * (1 - s))
        idx, _ = largest_within(p, w_paper[layer_of][None, :] * dense)
        idx, _ = fill_by_layer(p, idx, layer_of, t)
        paper_fits = bool(fits(p.flat.total(idx), limits_of(p)))
        a = IPRS().solve(p)
        assert (a.status == Status.FEASIBLE) == (p.infeasibility_message() is None), (a.status, a.message)
        if a.status == Status.INFEASIBLE:
            assert a.message == p.infeasibility_message()
            return
        rules.add(a.info["rule"])
        if paper_fits:
            assert a.info["rule"] == "paper" and tuple(a.choice_index) == tuple(int(j) for j in idx)
            return
        w = np.array([a.info["kept_fraction"][l] for l in layers])
        assert a.info["rule"] in ("rescaled", "shrunk") and (w <= w_paper + 1e-12).all()
        c = a.info["scale"]
        assert c is None or np.allclose(w, np.minimum(1.0, c * t), rtol=1e-12, atol=1e-15)
        if a.info["rule"] == "rescaled":
            d_layer = np.bincount(layer_of, weights=dense[0], minlength=len(layers))
            assert d_layer @ w <= p.limits["params"] * (1 + 1e-9) + 1e-9

    check()
    # the generator reaches the paper rule and at least one fallback; "rescaled" and "shrunk" each also have a
    # hand-made problem above (random problems rarely have layers whose sizes differ enough for "rescaled")
    assert "paper" in rules and rules & {"rescaled", "shrunk"}, rules


# ----------------------------------------------------------------------------- epsilon
def test_epsilon_smallest_tolerance_that_fits():
    """Each component takes its cheapest candidate with weighted error <= epsilon, the budgets hold, and the next
    smaller candidate tolerance breaks a budget (checked by direct evaluation)."""
    rng = np.random.default_rng(9)
    for trial in range(25):
        budgets = ((Budget("params", removed=float(rng.uniform(0.1, 0.8))),) if trial % 2 else
                   (Budget("params", removed=0.3), Budget("kv", removed=0.4)))
        p = random_problem(rng, n_comp=5, budgets=budgets, integer=trial % 3 == 0, weights=trial % 4 == 0)
        a = UniformEpsilon().solve(p)
        eps = a.info["epsilon"]
        w, B = scalar_weights(p), limits_of(p)

        def at(level):
            idx = []
            for l in range(len(p.curves)):
                s = w @ np.array([p.cost_tables[r][l] for r in p.resources])
                ok = np.flatnonzero(p.errors[l] <= level)
                idx.append(int(ok[np.lexsort((p.errors[l][ok], s[ok]))[0]]))
            return idx

        assert a.status == Status.FEASIBLE and list(a.choice_index) == at(eps)
        floor = max(e.min() for e in p.errors)
        smaller = sorted({float(x) for e in p.errors for x in e if floor <= x < eps})
        for level in smaller:
            cost = np.array([p.evaluate(at(level))[1][r] for r in p.resources])
            assert not fits(cost, B), (trial, level, eps)


def test_epsilon_uses_weighted_errors():
    """A weight alpha = 4 on A makes its weighted errors (4, 2, 0.8, 0) and so A keeps more rank at the same
    epsilon than the unweighted B (errors 1, 0.5, 0.2, 0)."""
    curves = [curve("A", 64, 128, [0, 16, 32, D], [1, 0.5, 0.2, 0]),
              curve("B", 64, 128, [0, 16, 32, D], [1, 0.5, 0.2, 0])]
    # rank r costs 192 r (3072, 6144), dense 8192; limit 8192. At epsilon 0.8, B would need rank 16: 9216.
    p = AllocationProblem(curves, Budget("params", removed=0.5), grid=16, weights={"A": 4.0})
    a = UniformEpsilon().solve(p)
    assert a.ranks == {"A": 32, "B": 0} and a.info["epsilon"] == 1.0


# ----------------------------------------------------------------------------- every heuristic
@pytest.mark.parametrize("solver", [s for s in HEURISTICS if s != Greedy(start="full")] + [IPRS()],
                         ids=lambda s: f"{s.name}-{s!r}")
def test_no_removal_is_all_dense(solver):
    """removed = 0, or a limit above the dense total, leaves every matrix dense. (Greedy from "full" starts above
    the dense cost and may cut a cheap step of another matrix before a full -> dense step; not tested here.)"""
    rng = np.random.default_rng(10)
    p = random_problem(rng, n_comp=5, budgets=(Budget("params", removed=0.0),))
    over = p.with_budgets(Budget("params", limit=2 * p.dense_costs["params"]))
    for q in (p, over):
        a = solver.solve(q)
        assert a.feasible and all(r == D for r in a.ranks.values()), (solver, a.ranks)


@pytest.mark.parametrize("solver", HEURISTICS, ids=lambda s: f"{s.name}-{s!r}")
def test_params_and_kv_budgets_both_hold(solver):
    """With a params budget and a KV-cache budget (KVCache prices k/v ranks), the result meets both."""
    rng = np.random.default_rng(11)
    for _ in range(10):
        p = random_problem(rng, n_comp=6, budgets=(Budget("params", removed=float(rng.uniform(0.2, 0.6))),
                                                   Budget("kv", removed=float(rng.uniform(0.2, 0.8)))))
        a = solver.solve(p)
        assert a.status in (Status.FEASIBLE, Status.OPTIMAL), a.message
        assert a.cost["params"] <= p.limits["params"] * (1 + 1e-12) and a.cost["kv"] <= p.limits["kv"] * (1 + 1e-12)


# ----------------------------------------------------------------------------- pareto
class Scripted:
    """A stub solver that returns a fixed choice per removed fraction (to build dominated points)."""

    name = "scripted"

    def __init__(self, table):
        self.table = table

    def solve(self, problem):
        removed = problem.budgets[0].removed
        return finish(problem, self.name, self.table[removed], Status.FEASIBLE)


def test_pareto_sweep_removes_dominated_points():
    """Points are kept by increasing cost with strictly decreasing objective: a point costing more for no less
    error is dropped, so is an exact duplicate; infeasible solves are set aside."""
    p = AllocationProblem([curve("A", 64, 64, [0, 16, 32, D], [4, 2, 1, 0]),
                           curve("B", 64, 64, [0, 16, 32, D], [4, 2, 1, 0])], Budget("params", removed=0.5), grid=16)
    # removed 0.2 -> ranks (32, 16): cost 6144, error 3; removed 0.5 -> (16, 16): cost 4096, error 4;
    # removed 0.3 -> (0, 32): cost 4096, error 5 (dominated); removed 0.1 -> (32, 16) again (duplicate)
    stub = Scripted({0.2: [2, 1], 0.5: [1, 1], 0.3: [0, 2], 0.1: [2, 1]})
    front = pareto_sweep(stub, p, [0.2, 0.5, 0.3, 0.1], progress=False)
    assert isinstance(front, ParetoFront) and front.resource == "params"
    assert front.costs.tolist() == [4096.0, 6144.0] and front.objectives.tolist() == [4.0, 3.0]
    assert len(front.dominated) == 2
    lag = pareto_sweep(Lagrangian(), p, [0.1, 0.4, Budget("params", removed=0.7), 0.99], progress=False)
    assert np.all(np.diff(lag.costs) > 0) and np.all(np.diff(lag.objectives) < 0)
    assert lag.removed.min() >= 0.1 - 1e-12 and len(lag.infeasible) == 0


def test_pareto_sweep_validates_inputs():
    """Empty budgets, a non-solver, a bare float and budgets on two resources are refused with ValueError."""
    p = AllocationProblem([curve("A", 64, 64, [0, 16, D], [2, 1, 0])], Budget("params", removed=0.5), grid=16)
    for bad_solver, budgets, match in [(Lagrangian(), [], "at least one"), (object(), [0.2], "solve"),
                                       (Lagrangian(), 0.2, "sequence"),
                                       (Lagrangian(), [0.2, Budget("kv", removed=0.1)], "one resource"),
                                       (Lagrangian(), ["0.2"], "float")]:
        with pytest.raises(ValueError, match=match):
            pareto_sweep(bad_solver, p, budgets, progress=False)
