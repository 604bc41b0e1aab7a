"""The registry (one file per solver, built-ins discovered without a list) and the one feasibility tolerance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rankalloc.allocators.allocation import Status, finish
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve
from rankalloc.allocators.segments import FEASIBILITY_RTOL, feasible_limits, fits

TOY = '''\
from dataclasses import dataclass
from rankalloc.allocators.allocation import Status, finish, infeasible
from rankalloc.allocators.registry import register_solver

@register_solver("cheapest-toy")
@dataclass(frozen=True)
class CheapestToy:
    name: str = "cheapest-toy"

    def solve(self, problem):
        if (out := infeasible(problem, self.name)) is not None:
            return out
        return finish(problem, self.name, [int(t.argmin()) for t in problem.cost_tables["params"]], Status.FEASIBLE)
'''


def one_component(limit: float, layer_scores=True) -> AllocationProblem:
    """One 64x64 matrix: rank 0 (cost 0, error 2), rank 16 (2048, 1), dense (4096, 0), under a params limit."""
    c = Curve(Component("model.layers.0.self_attn.q_proj", 64, 64, "q", 0), [0, 16, DENSE], [2.0, 1.0, 0.0])
    return AllocationProblem([c], Budget("params", limit=limit), grid=16,
                             layer_scores={0: 1.0} if layer_scores else None)


def test_a_toy_solver_takes_one_file(tmp_path):
    """A plugin file that defines and registers a solver (decorator form) makes it a user-facing solver:
    listed in SOLVERS and ALL_SOLVERS, constructed by get_solver, solving a problem."""
    from rankalloc.allocators.registry import ALL_SOLVERS, GROUND_TRUTH, SOLVERS, get_solver, load_plugin

    plugin = tmp_path / "toy_solver.py"
    plugin.write_text(TOY)
    assert len(TOY.strip().splitlines()) <= 14
    try:
        module = load_plugin(plugin)
        assert SOLVERS["cheapest-toy"] is module.CheapestToy is ALL_SOLVERS["cheapest-toy"]
        assert "cheapest-toy" not in GROUND_TRUTH
        alloc = get_solver("cheapest-toy").solve(one_component(3000.0))
        assert alloc.status == Status.FEASIBLE and alloc.ranks == {"model.layers.0.self_attn.q_proj": 0}
        assert alloc.solver == "cheapest-toy" and alloc.objective == 2.0
    finally:
        SOLVERS.pop("cheapest-toy", None)
        ALL_SOLVERS.pop("cheapest-toy", None)


def test_builtins_are_discovered_lazily_and_dp_stays_ground_truth():
    """Importing the registry imports no solver module; the first read of SOLVERS discovers every built-in,
    each registered in its own module, with the DP only among the ground-truth solvers."""
    code = ("import sys, rankalloc.allocators.registry as r\n"
            "mods = ('greedy', 'lagrangian', 'exact', 'uniform', 'iprs', 'epsilon', 'dp')\n"
            "assert not any(f'rankalloc.allocators.{m}' in sys.modules for m in mods), 'imported eagerly'\n"
            "assert sorted(r.SOLVERS) == ['epsilon', 'exact', 'greedy', 'iprs', 'lagrangian', 'uniform'], r.SOLVERS\n"
            "assert list(r.GROUND_TRUTH) == ['dp'] and sorted(r.ALL_SOLVERS) == sorted([*r.SOLVERS, 'dp'])\n"
            "for name, cls in r.ALL_SOLVERS.items():\n"
            "    assert cls.__module__ == 'rankalloc.allocators.' + name, (name, cls)  # each in its own file\n"
            "assert list(r.COST_MODELS) == ['params', 'flops', 'kv', 'bytes']\n"
            "assert 'torch' not in sys.modules and 'cvxpy' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_get_cost_model_is_the_one_name_check():
    """get_cost_model returns the registered class or raises ValueError listing the known names; the problem's
    budget check and from_profiles go through it."""
    from rankalloc.allocators.costs import COST_MODELS, KVCache, Params
    from rankalloc.allocators.registry import COST_MODELS as REGISTERED
    from rankalloc.allocators.registry import get_cost_model

    assert COST_MODELS is REGISTERED
    assert get_cost_model("params") is Params and get_cost_model("kv") is KVCache
    with pytest.raises(ValueError, match=r"unknown cost 'watts': expected one of params, flops, kv, bytes"):
        get_cost_model("watts")
    c = Curve(Component("model.layers.0.self_attn.q_proj", 64, 64, "q", 0), [0, DENSE], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"unknown resource 'watts'.*unknown cost 'watts'.*params"):
        AllocationProblem([c], Budget("watts", removed=0.5), grid=16)


def test_register_solver_called_or_as_decorator():
    """register_solver(name, cls) (the plugin form) and @register_solver(name) both register and return cls;
    ground_truth=True keeps a solver out of SOLVERS."""
    from rankalloc.allocators.registry import ALL_SOLVERS, GROUND_TRUTH, SOLVERS, register_solver

    class A:
        def solve(self, problem):
            raise NotImplementedError

    try:
        assert register_solver("called-test", A) is A and SOLVERS["called-test"] is A
        B = register_solver("decorated-test", ground_truth=True)(type("B", (A,), {}))
        assert GROUND_TRUTH["decorated-test"] is B is ALL_SOLVERS["decorated-test"] and "decorated-test" not in SOLVERS
    finally:
        for table in (SOLVERS, GROUND_TRUTH, ALL_SOLVERS):
            table.pop("called-test", None)
            table.pop("decorated-test", None)


@pytest.mark.parametrize("over", [False, True], ids=["within", "beyond"])
def test_one_feasibility_tolerance_everywhere(over):
    """Dense costs 4096. With the limit 4096 (1 - t/2), dense is over the limit but within the tolerance t:
    is_feasible and finish accept it and every solver keeps the matrix dense (error 0). With 4096 (1 - 2t) it is
    beyond: is_feasible refuses it, finish raises on a FEASIBLE claim, and every solver drops to rank 16."""
    from rankalloc.allocators.registry import ALL_SOLVERS, get_solver

    t = FEASIBILITY_RTOL
    limit = 4096.0 * (1 - (2 * t if over else t / 2))
    p = one_component(limit)
    assert 4096.0 > limit
    assert bool(fits(np.array([4096.0]), np.array([limit]))) is not over
    assert (4096.0 <= float(feasible_limits(limit))) is not over
    assert p.is_feasible({"params": 4096.0}) is not over
    if over:
        with pytest.raises(RuntimeError, match="exceeds budgets"):
            finish(p, "claims-dense", [2], Status.FEASIBLE)
    else:
        assert finish(p, "claims-dense", [2], Status.FEASIBLE).cost == {"params": 4096.0}
    builtin = [n for n, cls in ALL_SOLVERS.items() if cls.__module__.startswith("rankalloc.allocators.")]
    assert len(builtin) == 7
    for name in builtin:
        alloc = get_solver(name).solve(p)
        assert alloc.status in (Status.OPTIMAL, Status.FEASIBLE), (name, alloc.status, alloc.message)
        assert alloc.ranks == {"model.layers.0.self_attn.q_proj": 16 if over else DENSE}, name
        assert alloc.objective == (1.0 if over else 0.0), name
