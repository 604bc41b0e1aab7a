"""Input validation of the allocation problem, the solver registry, lean imports and the curves CSV."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from rankalloc.allocators.allocation import Status
from rankalloc.allocators.costs import COST_MODELS, KVCache, Params
from rankalloc.allocators.curveset import CurveSet, read_curves
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve


def comp(name="model.layers.0.self_attn.q_proj", m=32, n=32, kind="q", layer=0):
    return Component(name, m, n, kind, layer)


def curve(c=None, ranks=(0, 16, 32, DENSE), errors=(3.0, 1.0, 0.5, 0.0), sparsity=None):
    return Curve(c or comp(), np.array(ranks), np.array(errors), sparsity)


# ----------------------------------------------------------------- bad input: ValueError naming the culprit
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_error_is_reported(bad):
    """A NaN/inf error names the component, the rank and the value (never dropped)."""
    with pytest.raises(ValueError, match=r"q_proj.*expected finite errors.*(nan|inf).*rank 16"):
        curve(errors=(3.0, bad, 0.5, 0.0))


def test_errors_increasing_with_budget_is_reported():
    """Errors that rise with rank name the component and give expected vs received."""
    with pytest.raises(ValueError, match=r"q_proj.*non-increasing.*r32 <= .*r16.*1\.0.*received .*2\.0"):
        curve(errors=(3.0, 1.0, 2.0, 0.0))


def test_negative_error_is_reported():
    with pytest.raises(ValueError, match=r"q_proj.*expected errors >= 0.*-1"):
        curve(errors=(3.0, 1.0, -1.0, 0.0))


def test_duplicate_names_are_reported():
    with pytest.raises(ValueError, match=r"duplicate component name 'model.layers.0.self_attn.q_proj'"):
        AllocationProblem([curve(), curve()], (Budget("params", removed=0.2),))


def test_empty_problem_is_reported():
    with pytest.raises(ValueError, match="empty"):
        AllocationProblem([], (Budget("params", removed=0.2),))


def test_grid_that_does_not_fit_the_shape_is_reported():
    """A grid larger than min(m, n) names the component, its shape and the largest grid that fits."""
    small = curve(comp("model.layers.1.self_attn.k_proj", 8, 32, "k", 1), ranks=(0, DENSE), errors=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"k_proj.*8x32.*grid 16.*expected grid <= min\(m, n\) = 8"):
        AllocationProblem([curve(), small], (Budget("params", removed=0.2),), grid=16)


def test_rank_off_the_grid_is_reported():
    off = curve(ranks=(0, 12, 32, DENSE))
    with pytest.raises(ValueError, match=r"q_proj.*multiples of 16.*received rank 12"):
        AllocationProblem([off], (Budget("params", removed=0.2),), grid=16)


def test_rank_beyond_shape_is_reported():
    with pytest.raises(ValueError, match=r"q_proj.*32x32.*\[0, 32\].*received 48"):
        curve(ranks=(0, 16, 48, DENSE))


def test_unknown_resource_is_reported():
    """A budget on an unknown resource names it and lists the known ones."""
    with pytest.raises(ValueError, match=r"unknown resource 'watts'.*params"):
        AllocationProblem([curve()], (Budget("watts", removed=0.2),))


@pytest.mark.parametrize("removed", [-0.1, 1.0, 1.5, float("nan")])
def test_removed_outside_unit_interval_is_reported(removed):
    with pytest.raises(ValueError, match=r"params.*\[0, 1\).*received"):
        Budget("params", removed=removed)


def test_unknown_weight_is_reported():
    with pytest.raises(ValueError, match=r"weights name unknown components.*nope"):
        AllocationProblem([curve()], (Budget("params", removed=0.2),), weights={"nope": 1.0})


# ----------------------------------------------------------------- edge budgets
def test_removed_zero_is_all_dense():
    """Removing 0% is a valid budget: the limit equals the dense cost and the optimum keeps every matrix dense."""
    from rankalloc.allocators.registry import get_solver

    curves = [curve(), curve(comp("model.layers.0.mlp.up_proj", 64, 32, "up"), ranks=(0, 16, 32, DENSE),
                             errors=(2.0, 1.0, 0.25, 0.0))]
    problem = AllocationProblem(curves, (Budget("params", removed=0.0),), grid=16)
    assert problem.limits["params"] == problem.dense_costs["params"] == 32 * 32 + 64 * 32
    assert problem.infeasibility_message() is None
    alloc = get_solver("exact").solve(problem)
    assert alloc.status == Status.OPTIMAL
    assert all(r == DENSE for r in alloc.ranks.values()), alloc.ranks
    assert alloc.objective == 0.0 and alloc.removed() == 0.0


def test_unreachable_budget_says_what_is_reachable():
    """A budget below the minimum cost is reported with the minimum cost and the largest reachable removal."""
    c = curve(ranks=(16, 32, DENSE), errors=(1.0, 0.5, 0.0))  # no rank 0: at least 16*64 = 1024 of 1024
    problem = AllocationProblem([c, curve(comp("b", 32, 64), ranks=(16, DENSE), errors=(1.0, 0.0))],
                                (Budget("params", removed=0.5),), grid=16)
    msg = problem.infeasibility_message()
    assert msg is not None and "2560" in msg and "16.67%" in msg


# ----------------------------------------------------------------- registry
def test_unknown_solver_lists_known_ones():
    from rankalloc.allocators.registry import SOLVERS, get_solver

    with pytest.raises(ValueError, match="unknown solver 'simplex'") as info:
        get_solver("simplex")
    for name in SOLVERS:
        assert name in str(info.value)


def test_unknown_solver_option_lists_accepted_ones():
    from rankalloc.allocators.registry import get_solver, solver_options

    with pytest.raises(ValueError, match=r"solver 'greedy': unknown option\(s\) \['colour'\]"):
        get_solver("greedy", colour="red")
    assert "name" not in solver_options("exact")


@dataclass(frozen=True)
class _Cheapest:
    name: str = "cheapest-test"

    def solve(self, problem):
        from rankalloc.allocators.allocation import finish

        idx = [int(np.argmin(t)) for t in problem.cost_tables[problem.resources[0]]]
        return finish(problem, self.name, idx, Status.FEASIBLE)


class _Other(_Cheapest):
    pass


@dataclass(frozen=True)
class _Rows:
    """Cost model: one unit per kept rank (dense = min(m, n))."""

    name: str = "rows-test"
    unit: str = "rows"

    def cost(self, component, ranks, sparsity):
        r = np.asarray(ranks, dtype=np.float64)
        return np.where(r == DENSE, component.max_rank, r)

    def dense(self, component):
        return float(component.max_rank)


def test_register_solver_and_cost_model():
    """A user solver and cost model registered by name work through get_solver and budgets on that resource;
    re-registering a taken name needs replace=True."""
    from rankalloc.allocators.registry import ALL_SOLVERS, SOLVERS, get_solver, register_cost_model, register_solver

    try:
        register_solver("cheapest-test", _Cheapest)
        register_cost_model("rows-test", _Rows)
        problem = AllocationProblem([curve()], (Budget("rows-test", removed=0.5),), grid=16)
        assert problem.limits["rows-test"] == 16.0
        alloc = get_solver("cheapest-test").solve(problem)
        assert alloc.ranks == {"model.layers.0.self_attn.q_proj": 0}
        with pytest.raises(ValueError, match="already registered"):
            register_solver("cheapest-test", _Other)
        with pytest.raises(ValueError, match="already registered"):
            register_cost_model("params", _Rows)
        with pytest.raises(ValueError, match="solve"):
            register_solver("not-a-solver", _Rows)
    finally:
        SOLVERS.pop("cheapest-test", None)
        ALL_SOLVERS.pop("cheapest-test", None)
        COST_MODELS.pop("rows-test", None)
    assert COST_MODELS["params"] is Params


def test_load_plugin_registers_from_one_file(tmp_path):
    """A one-file plugin that calls register_solver makes the solver available by name."""
    from rankalloc.allocators.registry import ALL_SOLVERS, SOLVERS, get_solver, load_plugin

    plugin = tmp_path / "my_solver.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from rankalloc.allocators.allocation import Status, finish\n"
        "from rankalloc.allocators.registry import register_solver\n"
        "@dataclass(frozen=True)\n"
        "class AllDense:\n"
        "    name: str = 'all-dense-plugin'\n"
        "    def solve(self, problem):\n"
        "        idx = [len(cv) - 1 for cv in problem.curves]\n"
        "        return finish(problem, self.name, idx, Status.FEASIBLE)\n"
        "register_solver('all-dense-plugin', AllDense)\n")
    try:
        load_plugin(plugin)
        problem = AllocationProblem([curve()], (Budget("params", removed=0.0),), grid=16)
        assert get_solver("all-dense-plugin").solve(problem).ranks == {"model.layers.0.self_attn.q_proj": DENSE}
    finally:
        SOLVERS.pop("all-dense-plugin", None)
        ALL_SOLVERS.pop("all-dense-plugin", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plugin(tmp_path / "missing.py")


# ----------------------------------------------------------------- lean import
def test_allocators_import_no_torch():
    """The allocation core and its registry (every solver) import without torch."""
    code = ("import sys, rankalloc.allocators, rankalloc.allocators.registry, rankalloc.allocators.synthetic; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'cvxpy' not in sys.modules, 'cvxpy must be imported lazily'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ----------------------------------------------------------------- CSV round trip
def test_curve_set_csv_round_trip(tmp_path):
    """write_csv then read_curves gives the same components, candidates (incl. sparse and dense), errors
    bit for bit, and weights."""
    comps = (comp(), Component("model.layers.0.self_attn.k_proj", 16, 32, "k", 0),
             Component("model.layers.1.mlp.down_proj", 32, 48, "down", 1))
    rng = np.random.default_rng(0)
    ranks, sparsity, errors = {}, {}, {"whitened": {}, "fisher": {}}
    for c in comps:
        r = np.array(list(range(0, c.max_rank + 1, 8)) + [4, 8, DENSE])
        s = np.array([0.0] * (len(r) - 3) + [0.05, 0.05, 0.0])
        ranks[c.name], sparsity[c.name] = r, s
        for kind in errors:
            errors[kind][c.name] = np.sort(rng.random(len(r)))[::-1] * 1e3 / 3
    cs = CurveSet(comps, ranks, errors, sparsity, weights={c.name: 0.5 + i for i, c in enumerate(comps)},
                  name="roundtrip")
    path = tmp_path / "curves.csv"
    cs.write_csv(path)
    back = read_curves(path)
    assert back.components == comps
    assert back.kinds == ("whitened", "fisher")
    for c in comps:
        assert np.array_equal(back.ranks[c.name], ranks[c.name])
        assert np.array_equal(back.sparsity[c.name], sparsity[c.name])
        for kind in errors:
            assert np.array_equal(back.errors[kind][c.name], errors[kind][c.name])
    assert back.weights == cs.weights
    assert [len(cv) for cv in back.curves("fisher", grid=8)] == [len(cv) for cv in cs.curves("fisher", grid=8)]


def test_read_curves_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_curves(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="rankalloc profile"):
        read_curves(tmp_path)


def test_sparse_parts_are_priced_with_their_csr_indices():
    """Params and Bytes charge a sparse part its values plus CSR indices (costs.SPARSE_FORMAT): an int16 column per
    value (int32 past 2**15 columns) and m+1 int32 row pointers, none when nothing is kept; FLOPs stay 2 per value."""
    from rankalloc.allocators.costs import Bytes, Flops

    small, wide = Component("a", 100, 300), Component("b", 10, 40000)
    r, k = np.array([4, 4, 0]), np.array([0.0, 0.01, 0.01])
    assert Params().cost(small, r, k).tolist() == [1600, 1600 + 300 + 300 + 2 * 101, 300 + 300 + 2 * 101]
    nnz = 4000  # ceil(0.01 * 10 * 40000)
    assert Params().cost(wide, [0], [0.01]).tolist() == [nnz + 2 * nnz + 2 * 11]
    assert Bytes(dtype="bf16").cost(small, [4], [0.01]).tolist() == [1600 * 2 + 300 * 2 + 300 * 2 + 4 * 101]
    assert Bytes(dtype="fp32").cost(wide, [0], [0.01]).tolist() == [nnz * 4 + nnz * 4 + 4 * 11]
    assert Flops().cost(small, [4], [0.01]).tolist() == [2 * 1600 + 2 * 300]
