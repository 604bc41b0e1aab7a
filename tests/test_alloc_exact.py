"""Exact MCKP solvers: Exact (fixing + core DP / CP-SAT, and plain CP-SAT), DynamicProgram, against brute force."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

import rankalloc  # noqa: F401  (loads OR-tools first)
from rankalloc.allocators.allocation import Status
from rankalloc.allocators.costs import Params
from rankalloc.allocators.dp import DynamicProgram
from rankalloc.allocators.exact import Exact
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve
from rankalloc.allocators.synthetic import llama_like_problem, small_random_problem


def brute_force(problem: AllocationProblem):
    """Least objective over every combination that ``problem.is_feasible`` accepts (None if none)."""
    best = None
    for idx in itertools.product(*[range(len(cv)) for cv in problem.curves]):
        obj, cost = problem.evaluate(idx)
        if problem.is_feasible(cost) and (best is None or obj < best):
            best = obj
    return best


def assert_optimal(alloc, optimum, what=""):
    assert alloc.status == Status.OPTIMAL, (what, alloc.status, alloc.message)
    assert alloc.problem.is_feasible(alloc.cost), what
    assert alloc.objective == pytest.approx(optimum, rel=1e-9, abs=1e-9), what
    assert alloc.lower_bound is not None and alloc.lower_bound <= alloc.objective + 1e-12, what


def assert_infeasible(alloc, problem):
    assert alloc.status == Status.INFEASIBLE, alloc.status
    assert "infeasible" in alloc.message
    for r in problem.resources:
        assert f"{problem.min_costs[r]:.6g}" in alloc.message


SOLVERS = {
    "exact": Exact(),
    "exact-cpsat-core": Exact(method="cpsat", workers=1),
    "dp": DynamicProgram(max_cells=1e8),
}


@pytest.mark.parametrize("seed", range(40))
def test_single_budget_matches_brute_force(seed):
    """Exact (both core solvers), plain CP-SAT and the DP reach the brute-force optimum on random
    one-budget instances (weights, sparse candidates, params or FLOPs), with a certified bound."""
    rng = np.random.default_rng(seed)
    p = small_random_problem(rng, components=int(rng.integers(2, 6)), max_dim=10, sparse=bool(seed % 2),
                             budgets=("params",) if seed % 3 else ("flops",))
    opt = brute_force(p)
    solvers = dict(SOLVERS, plain=Exact(method="plain", workers=1)) if seed % 4 == 0 else SOLVERS
    for name, solver in solvers.items():
        alloc = solver.solve(p)
        if opt is None:
            assert alloc.status == Status.INFEASIBLE, name
        else:
            assert_optimal(alloc, opt, name)


@pytest.mark.parametrize("seed", range(25))
def test_two_budgets_match_brute_force(seed):
    """With params and KV-cache budgets (or params and FLOPs) Exact and the 2-D DP reach the
    brute-force optimum; infeasible instances are reported INFEASIBLE by both."""
    rng = np.random.default_rng(1000 + seed)
    budgets = ("params", "kv") if seed % 3 else ("params", "flops")
    p = small_random_problem(rng, components=int(rng.integers(2, 6)), max_dim=8, sparse=bool(seed % 2),
                             budgets=budgets, kinds=("k", "v", "q"))
    opt = brute_force(p)
    for name, solver in SOLVERS.items():
        alloc = solver.solve(p)
        if opt is None:
            assert alloc.status == Status.INFEASIBLE, name
            assert "infeasible" in alloc.message
        else:
            assert_optimal(alloc, opt, name)


def medium_problem(budgets=("params",), removed=0.4, seed=0):
    return llama_like_problem(layers=3, hidden=256, mlp=704, kv=64, grid=16, removed=removed, budgets=budgets,
                              kv_removed=0.5, seed=seed)


@pytest.mark.parametrize("removed", [0.1, 0.3, 0.6])
def test_medium_instance_matches_dp(removed):
    """On a 21-matrix LLaMA-shaped instance (too big for brute force), Exact's fixed core, solved by
    the window DP or by CP-SAT, reaches the full DP's optimum, and the core is smaller than the problem."""
    p = medium_problem(removed=removed)
    ref = DynamicProgram(max_cells=1e8).solve(p)
    for solver in (Exact(), Exact(method="cpsat")):
        alloc = solver.solve(p)
        assert_optimal(alloc, ref.objective, solver.method)
        assert alloc.info["core"] < alloc.info["undominated"] <= alloc.info["candidates"]
        assert alloc.info["lagrangian_bound"] <= alloc.objective + 1e-12 <= alloc.info["incumbent"] + 2e-12


def test_core_dp_too_large_falls_back_to_cpsat():
    """When the core DP table would exceed max_cells, method='dp' refuses with ValueError and 'auto'
    solves the core with CP-SAT instead, still to the proven optimum."""
    p = medium_problem(removed=0.3)
    ref = DynamicProgram(max_cells=1e8).solve(p)
    with pytest.raises(ValueError, match="max_cells"):
        Exact(method="dp", max_cells=10).solve(p)
    alloc = Exact(max_cells=10).solve(p)
    assert alloc.info["method"] == "fixing+cpsat" and "dp_skipped" in alloc.info
    assert_optimal(alloc, ref.objective)
    auto = Exact().solve(p)
    assert auto.info["method"] == "fixing+dp"
    assert 0 <= auto.info["threshold"] <= auto.info["gap"] and auto.info["levels"]


def test_medium_two_budget_instance_matches_2d_dp():
    """Params + KV cache on the LLaMA-shaped instance: Exact equals the exact 2-D DP and the KV budget binds."""
    p = medium_problem(budgets=("params", "kv"), removed=0.3)
    ref = DynamicProgram(max_cells=2e8).solve(p)
    alloc = Exact().solve(p)
    assert_optimal(alloc, ref.objective)
    single = Exact().solve(p.with_budgets(p.budgets[0]))
    assert single.cost["params"] <= p.limits["params"]
    assert single.objective <= alloc.objective + 1e-12  # a second budget can only cost error
    assert alloc.cost["kv"] <= p.limits["kv"]


def test_time_limit_returns_incumbent():
    """A time limit too short to prove optimality gives TIME_LIMIT with a feasible incumbent and a
    bound below it (or INFEASIBLE), never a false OPTIMAL."""
    p = llama_like_problem(layers=6, hidden=512, mlp=1408, kv=128, grid=16, removed=0.35, seed=3)
    for solver in (Exact(method="plain", time_limit=0.02, workers=1),):
        alloc = solver.solve(p)
        assert alloc.status in (Status.TIME_LIMIT, Status.INFEASIBLE, Status.OPTIMAL)
        if alloc.status == Status.TIME_LIMIT:
            assert alloc.feasible and p.is_feasible(alloc.cost)
            assert alloc.lower_bound is None or alloc.lower_bound <= alloc.objective + 1e-12
        if alloc.status == Status.OPTIMAL:  # only acceptable if it really is
            assert alloc.objective == pytest.approx(Exact().solve(p).objective, rel=1e-9)
    assert Exact(method="plain", time_limit=0.02, workers=1).solve(p).status == Status.TIME_LIMIT


def test_infeasible_budget_reports_minimum_cost():
    """A limit below the cheapest allocation: every solver says INFEASIBLE and names the minimum cost."""
    comps = [Component(f"model.layers.{i}.self_attn.q_proj", 8, 6, "q", i) for i in range(3)]
    curves = [Curve(c, [2, 4, DENSE], [3.0, 1.0, 0.0]) for c in comps]
    p = AllocationProblem(curves, Budget("params", limit=50), grid=2)
    assert p.min_costs["params"] == 3 * 2 * 14
    for solver in (Exact(), Exact(method="plain"), DynamicProgram()):
        assert_infeasible(solver.solve(p), p)


@dataclass(frozen=True)
class Latent:
    """Test cost model: a low-rank candidate keeps a latent of r + 1 values, dense keeps none. It is monotone in
    rank and consistent with dense, yet its cheapest choice (dense) is the dearest in parameters, so a budget on
    it pulls against a params budget. (A model whose cost falls with rank is refused by the problem.)"""

    name: str = "latent"
    unit: str = "values"

    def cost(self, component, ranks, sparsity):
        r = np.asarray(ranks, dtype=np.float64)
        return np.where(r == DENSE, 0.0, r + 1.0)

    def dense(self, component):
        return 0.0


def test_jointly_infeasible_budgets():
    """Each budget can be met alone but not both at once: Exact and the DP report INFEASIBLE and say so.
    (params <= 20 rules out dense, 24 each; latent <= 2 then fails, as each low-rank matrix costs >= 1.)"""
    comps = [Component(f"model.layers.{i}.mlp.up_proj", 6, 4, "up", i) for i in range(3)]
    curves = [Curve(c, [0, 2, 4, DENSE], [4.0, 2.0, 1.0, 0.0]) for c in comps]
    p = AllocationProblem(curves, (Budget("params", limit=20), Budget("latent", limit=2)),
                          costs={"latent": Latent()}, grid=2)
    assert p.infeasibility_message() is None
    assert brute_force(p) is None
    for solver in (Exact(), Exact(method="cpsat"), DynamicProgram()):
        alloc = solver.solve(p)
        assert alloc.status == Status.INFEASIBLE
        assert "at once" in alloc.message


@pytest.mark.parametrize("seed", range(5))
def test_nothing_removed_keeps_everything_dense(seed):
    """removed=0: the only zero-error allocation that fits is all dense, and every exact solver finds it."""
    rng = np.random.default_rng(seed)
    p = small_random_problem(rng, components=5, max_dim=10, removed=0.0)
    for solver in (Exact(), Exact(method="cpsat"), DynamicProgram()):
        alloc = solver.solve(p)
        assert alloc.status == Status.OPTIMAL
        assert all(r == DENSE for r in alloc.ranks.values())
        assert alloc.objective == 0.0
    big = llama_like_problem(layers=2, hidden=256, mlp=704, kv=64, removed=0.0)
    alloc = Exact().solve(big)
    assert alloc.status == Status.OPTIMAL and alloc.objective == 0.0
    assert alloc.cost["params"] == big.dense_costs["params"]


def test_non_integer_costs_are_not_claimed_optimal():
    """Fractional costs: the DP refuses them; Exact rounds costs up for CP-SAT, stays feasible and no
    better than the optimum, and does not claim a proof it does not have."""

    @dataclass(frozen=True)
    class Fractional:
        name: str = "params"
        unit: str = "parameters"

        def cost(self, component, ranks, sparsity):
            return Params().cost(component, ranks, sparsity) * 0.37

        def dense(self, component):
            return Params().dense(component) * 0.37

    rng = np.random.default_rng(5)
    base = small_random_problem(rng, components=4, max_dim=9, removed=0.2)
    p = AllocationProblem(base.curves, base.budgets, costs={"params": Fractional()}, weights=base.weights, grid=1)
    assert p.infeasibility_message() is None
    opt = brute_force(p)
    with pytest.raises(ValueError, match="integer"):
        DynamicProgram().solve(p)
    alloc = Exact().solve(p)
    assert alloc.status in (Status.FEASIBLE, Status.OPTIMAL)
    assert p.is_feasible(alloc.cost) and alloc.objective >= opt - 1e-12
    if alloc.status == Status.OPTIMAL:
        assert alloc.objective == pytest.approx(opt, rel=1e-9)


def test_dp_refuses_large_or_many_budgets():
    """The ground-truth DP refuses tables over max_cells and three budgets with a ValueError."""
    p = medium_problem()
    with pytest.raises(ValueError, match="max_cells"):
        DynamicProgram(max_cells=1e3).solve(p)
    rng = np.random.default_rng(0)
    p3 = small_random_problem(rng, budgets=("params", "flops", "kv"), removed=0.2, kinds=("k", "v", "q"))
    with pytest.raises(ValueError, match="one or two budgets"):
        DynamicProgram().solve(p3)
    assert_optimal(Exact().solve(p3), brute_force(p3))


def test_deterministic_and_config_validation():
    """Two solves give the same choices; bad configs raise ValueError naming the field."""
    p = medium_problem(budgets=("params", "kv"), removed=0.3)
    a, b = Exact().solve(p), Exact().solve(p)
    assert a.choice_index == b.choice_index
    c, d = Exact(method="cpsat", workers=1).solve(p), Exact(method="cpsat", workers=1).solve(p)
    assert c.choice_index == d.choice_index
    for bad in (dict(time_limit=0), dict(workers=0), dict(method="fast"), dict(bits=70), dict(max_cells=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Exact(**bad)
    with pytest.raises(ValueError, match="objective"):
        llama_like_problem(layers=1, objective="raw")


CHILD = r"""
import json
import numpy as np
import cvxpy  # noqa: F401  first: its libhighs wins, so OR-tools cannot load in this process
import rankalloc
from rankalloc._ortools_first import ORTOOLS_IN_PROCESS
from rankalloc.allocators.dp import DynamicProgram
from rankalloc.allocators.exact import Exact
from rankalloc.allocators.synthetic import small_random_problem

rng = np.random.default_rng(11)
rows = []
for budgets in (("params",), ("params", "kv")):
    p = small_random_problem(rng, components=5, max_dim=8, budgets=budgets, kinds=("k", "v", "q"))
    core = Exact(method="cpsat").solve(p)  # CP-SAT on the fixed core, in a clean subprocess
    rows.append([core.objective] + [s.solve(p).objective for s in (Exact(method="plain"), Exact(), DynamicProgram())]
                + [str(core.status)])
print(json.dumps({"in_process": ORTOOLS_IN_PROCESS, "rows": rows}))
"""


def test_cvxpy_imported_first_still_solves():
    """In a process that imported cvxpy before rankalloc, the exact solvers still return the DP's optimum.

    Whether the two wheels' ``libhighs.so.1`` clash depends on the installed versions: where they do,
    OR-tools cannot load in-process and CP-SAT runs in a clean subprocess; where they don't, it runs here.
    Either way the answer users rely on is the same, and that is what is asserted."""
    pytest.importorskip("cvxpy")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(out["in_process"], bool)
    for *objs, status in out["rows"]:
        assert status == "optimal"
        assert objs[:3] == pytest.approx([objs[3]] * 3, rel=1e-9, abs=1e-12)


def test_clean_subprocess_cpsat_matches_in_process():
    """The fallback that runs CP-SAT in a fresh interpreter (used when cvxpy loaded its HiGHS first) gives the
    same status, choice and bound as the in-process solve, whether or not this environment needs it."""
    from rankalloc.allocators.cpsat import solve_arrays_anywhere
    from rankalloc.allocators.segments import feasible_limits

    rng = np.random.default_rng(5)
    p = small_random_problem(rng, components=6, max_dim=8, budgets=("params", "kv"), removed=0.3,
                             kinds=("k", "v", "q"))
    f = p.flat
    limits = feasible_limits([p.limits[r] for r in p.resources])
    here = solve_arrays_anywhere(f.errors, f.costs, f.offsets, limits, 30.0, 1)
    there = solve_arrays_anywhere(f.errors, f.costs, f.offsets, limits, 30.0, 1, subprocess_only=True)
    assert there["status"] == here["status"] == "OPTIMAL"
    assert np.array_equal(there["choice"], here["choice"])
    assert there["bound"] == pytest.approx(here["bound"], rel=1e-12)


def test_subnormal_error_differences_do_not_overflow_the_core_dp():
    """Two 1x1 matrices, limit 0: B's rank 0 costs nothing with error 5e-324 (subnormal) or 0 with a sparse part.
    The multiplier is then subnormal and threshold / lambda overflowed in the budget window (OverflowError); now
    the window has no floor there and the DP proves the optimum, without a floating-point warning."""
    a = Curve(Component("model.layers.0.q", 1, 1, "q", 0), [0], [0.0])
    b = Curve(Component("model.layers.1.q", 1, 1, "q", 1), [0, 0], [5e-324, 0.0], [0.0, 0.05])
    p = AllocationProblem([a, b], Budget("params", limit=0.0), grid=1)
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("auto", "dp"):
            alloc = Exact(method=method).solve(p)
            assert alloc.status == Status.OPTIMAL and alloc.objective == 5e-324, method
            assert alloc.info["method"] == "fixing+dp" and alloc.lower_bound == 5e-324


def test_budget_floor_of_the_dp_window():
    """limit - threshold / lambda where that is positive and finite; 0 (no floor, which keeps the DP exact) for
    lambda 0, a subnormal lambda whose quotient overflows, or a threshold that would leave the whole budget."""
    from rankalloc.allocators.core_dp import budget_floor

    assert budget_floor(1000.0, 10.0, 0.5) == 980.0
    assert budget_floor(1000.0, 0.0, 0.5) == 1000.0
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        for lam in (0.0, 5e-324, 1e-310, -1.0, float("nan")):
            assert budget_floor(1000.0, 1e-3, lam) == 0.0, lam
        assert budget_floor(1000.0, 600.0, 0.5) == 0.0  # 1200 unused would be more than the budget
        assert budget_floor(0.0, 1.0, 1.0) == 0.0 and budget_floor(float("inf"), 1.0, 1.0) == 0.0
        assert budget_floor(1e300, 1e-300, 1e300) == 1e300  # threshold / lambda underflows to 0: the full floor


def test_exact_on_subnormal_errors_matches_brute_force():
    """Errors that are multiples of the smallest subnormal (the differences, the multipliers and the gaps all
    subnormal): exact (auto and dp) is OPTIMAL with the brute-force optimum, or INFEASIBLE with it."""
    rng = np.random.default_rng(31)
    for trial in range(25):
        curves = []
        for l in range(4):
            m, n = (int(x) for x in rng.integers(1, 5, size=2))
            ranks = list(range(0, min(m, n) + 1)) + [DENSE]
            steps = np.sort(rng.integers(0, 4, size=len(ranks)))[::-1].astype(float)
            curves.append(Curve(Component(f"model.layers.{l}.q", m, n, "q", l), ranks,
                                steps * 5e-324 * float(rng.choice([1, 3, 1e5]))))
        p = AllocationProblem(curves, Budget("params", removed=float(rng.uniform(0, 0.9))), grid=1)
        best = brute_force(p)
        for method in ("auto", "dp"):
            alloc = Exact(method=method).solve(p)
            if best is None:
                assert alloc.status == Status.INFEASIBLE, (trial, method)
            else:
                assert alloc.status == Status.OPTIMAL and alloc.objective == best, (trial, method, alloc.objective)
