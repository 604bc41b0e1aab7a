"""The testing kit itself (rankalloc.testing, `rankalloc check`): it fails every deliberately broken solver and
cost model of tests/broken_plugins.py on the check it breaks, prints a verdict rather than a traceback, builds
valid problems without filtering, and the library refuses a broken cost model when a problem uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import broken_plugins as broken
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve
from rankalloc.testing import COLUMNS, COST_CHECKS, SOLVER_CHECKS, check_cost_model, check_solver, evident_feasible
from rankalloc.testing.strategies import DETERMINISTIC, RESOURCES, cost_cases, problems

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "broken_plugins.py"

EXAMPLES = 60
"""Enough for every broken solver to fail its check here (the objective-as-bound one first fails at about 30)."""

broken.unregister()  # importing the plugin registered them: keep them out of the registries other tests read


@pytest.fixture(autouse=True)
def broken_registered():
    """The broken solvers and cost models are registered during each test of this file only."""
    broken.register()
    yield
    broken.unregister()


def rankalloc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankalloc.studies.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.parametrize("name", list(broken.BROKEN_SOLVERS))
def test_each_broken_solver_fails_its_check(name):
    """check_solver returns a table (no exception) whose row for the broken rule failed, with a minimal
    example naming the problem; the rules the solver keeps still pass where it breaks only one."""
    table = check_solver(name, examples=EXAMPLES)
    assert list(table.columns) == list(COLUMNS) and tuple(table.check) == SOLVER_CHECKS
    row = table.set_index("check").loc[broken.BROKEN_SOLVERS[name]]
    assert not row.passed, f"{name} passed {broken.BROKEN_SOLVERS[name]}: {row.detail}"
    assert row.detail and "components" in row.example and row.examples >= 1
    if name != "broken-raises":  # the rest break one rule (and, through it, at most a few neighbours)
        assert table.passed.sum() >= 6, table[~table.passed][["check", "detail"]].to_string()


@pytest.mark.parametrize("name", list(broken.BROKEN_COST_MODELS))
def test_each_broken_cost_model_fails_its_check(name):
    table = check_cost_model(name, examples=EXAMPLES)
    assert list(table.columns) == list(COLUMNS) and tuple(table.check) == COST_CHECKS
    row = table.set_index("check").loc[broken.BROKEN_COST_MODELS[name]]
    assert not row.passed, f"{name} passed {broken.BROKEN_COST_MODELS[name]}: {row.detail}"
    assert "component" in row.example
    assert table.set_index("check").loc["interface"].passed


def test_broken_examples_are_minimal():
    """Hypothesis shrinks the failure: an over-budget FEASIBLE shows on one 1x1 matrix, with its choices."""
    row = check_solver("broken-overbudget", examples=EXAMPLES).set_index("check").loc["budgets_held"]
    assert row.example.startswith("1 components, 1 candidates") and "choices {" in row.example
    assert "exceed the budgets" in row.detail


def test_a_solver_without_solve_or_with_a_bad_cap_is_a_verdict():
    """A solver whose solve raises, or whose max_budgets is no positive integer, fails rows; nothing is raised."""

    class NoCap:
        name = "no-cap"
        max_budgets = 0

        def solve(self, problem):
            raise RuntimeError("not implemented")

    table = check_solver(NoCap(), examples=5).set_index("check")
    assert not table.passed.any()
    assert "RuntimeError: not implemented" in table.loc["budgets_held"].detail
    assert "max_budgets must be None" in table.loc["budget_count"].detail
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        check_solver("nope")
    with pytest.raises(ValueError, match="examples >= 1"):
        check_solver("greedy", examples=0)


# ----------------------------------------------------------------------------- INFEASIBLE is true
def _uniform_like(declared=None):
    """The uniform rule under another name, with ``exact_feasibility`` set to ``declared`` (None: not declared)."""
    from rankalloc.allocators.uniform import Uniform

    class UniformRule:
        name = "uniform-rule"
        max_budgets = None

        def solve(self, problem):
            return Uniform().solve(problem)

    if declared is not None:
        UniformRule.exact_feasibility = declared
    return UniformRule()


def _refused_by_uniform():
    """A (dense only) and B (rank 0, 16, 32, dense), 64x64 each, 50% removed: the uniform caps (2048 each) fit
    nothing of A, which stays dense, and B's rank 16 breaks the limit 4096; A dense with B at rank 0 fits."""
    a = Curve(Component("model.layers.0.q", 64, 64, "q", 0), [DENSE], [0.0])
    b = Curve(Component("model.layers.1.q", 64, 64, "q", 1), [0, 16, 32, DENSE], [4.0, 2.0, 1.0, 0.0])
    return AllocationProblem([a, b], Budget("params", removed=0.5), grid=16, layer_scores={0: 0.5, 1: 0.5})


def test_infeasible_on_a_feasible_problem_fails_unless_declared():
    """The strict check: INFEASIBLE where brute force finds an allocation fails an undeclared solver on any
    problem (not only model-shaped ones, which excused a rule such as the old IPRS); exact_feasibility=False lets
    a rule refuse, with its reason, and the row says so and counts the refusals."""
    from rankalloc.allocators.allocation import Status
    from rankalloc.testing import contract_violations

    p = _refused_by_uniform()
    alloc = _uniform_like().solve(p)
    assert alloc.status == Status.INFEASIBLE and p.infeasibility_message() is None
    why = contract_violations(p, alloc)
    assert any(w.startswith("infeasible_is_true: reported INFEASIBLE, but a feasible allocation exists") for w in why)
    assert not contract_violations(p, alloc, solver=_uniform_like(False))
    assert not contract_violations(p, alloc, optimum="unknown")  # the message alone is sound

    row = check_solver(_uniform_like(), examples=EXAMPLES).set_index("check").loc["infeasible_is_true"]
    assert not row.passed and "a feasible allocation exists" in row.detail and "components" in row.example
    table = check_solver(_uniform_like(False), examples=EXAMPLES).set_index("check")
    assert table.passed.all(), table[~table.passed].detail.to_string()
    detail = table.loc["infeasible_is_true"].detail
    assert detail.startswith("exact_feasibility=False") and "it refused" in detail
    refused, seen = (int(x) for x in detail.split("it refused ")[1].split(" feasible")[0].split(" of "))
    assert 0 < refused <= seen


def test_a_declaration_holds_up_to_its_budgets():
    """exact_feasibility=1 holds the solver to the truth with one budget (the uniform rule fails there) and excuses
    it with more; a malformed declaration fails the row and the solver is held to the truth."""
    from rankalloc.testing import contract_violations

    p = _refused_by_uniform()
    two = p.with_budgets(Budget("params", removed=0.5), Budget("kv", removed=0.0))
    solver = _uniform_like(1)
    why = contract_violations(p, solver.solve(p), solver=solver)
    assert len(why) == 1 and "it declares exact_feasibility=1: exact with up to 1 budget(s)" in why[0]
    alloc = solver.solve(two)
    assert alloc.status.value == "infeasible" and not contract_violations(two, alloc, solver=solver)
    assert contract_violations(two, alloc)  # undeclared: held to the truth
    greedy = check_solver("greedy", examples=EXAMPLES).set_index("check").loc["infeasible_is_true"]
    assert greedy.passed and greedy.detail.startswith("exact_feasibility=1: INFEASIBLE never on a feasible problem")
    bad = check_solver(_uniform_like("sometimes"), examples=5).set_index("check").loc["infeasible_is_true"]
    assert not bad.passed and bad.detail.startswith("exact_feasibility must be True, False or an integer >= 0")


def test_builtin_declarations():
    """uniform may refuse (its rule), greedy, lagrangian and epsilon are exact with one budget, the others always."""
    from rankalloc.allocators.registry import get_solver
    from rankalloc.testing.checks import declared_feasibility

    expected = {"uniform": 0, "greedy": 1, "lagrangian": 1, "epsilon": 1, "exact": None, "iprs": None, "dp": None}
    assert {name: declared_feasibility(get_solver(name))[0] for name in expected} == expected


# ----------------------------------------------------------------------------- the problem refuses broken models
def _problem(cost, *, sparse=False):
    c = Component("model.layers.0.self_attn.q_proj", 64, 64, "q", 0)
    ranks, errors, kept = [0, 16, 32, DENSE], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]
    if sparse:
        ranks, errors, kept = ranks + [16, 16], errors + [1.5, 1.2], kept + [0.05, 0.1]
    return AllocationProblem([Curve(c, ranks, errors, kept)], Budget("custom", removed=0.5),
                             costs={"custom": cost}, grid=16)


@pytest.mark.parametrize("model, match", [
    (broken.Falling(), r"cost model 'broken-falling' \(Falling\) of budget 'custom', component "
                       r"'model.layers.0.self_attn.q_proj': expected a cost non-decreasing in rank"),
    (broken.HalfDense(), r"cost model 'broken-dense' \(HalfDense\).*q_proj': expected the dense candidate to cost "
                         r"dense\(component\) = 2048.0, received .* = 4096.0"),
    (broken.SparsityInverted(), r"'broken-sparse'.*non-decreasing in kept sparsity at rank 16"),
    (broken.Savings(), r"cost model 'custom' returned invalid costs for component"),
], ids=["falling", "dense", "sparsity", "negative"])
def test_the_problem_refuses_a_broken_cost_model(model, match):
    """Using a broken model (building the cost tables, as every solver does) raises a ValueError naming the
    model, its class, the budget and the component; the kit is named as the way to test a model."""
    problem = _problem(model, sparse=True)
    with pytest.raises(ValueError, match=match):
        problem.cost_tables
    with pytest.raises(ValueError, match="cost model"):
        __import__("rankalloc.allocators.greedy", fromlist=["Greedy"]).Greedy().solve(_problem(model, sparse=True))


def test_dense_may_cost_less_than_a_high_rank():
    """Above break-even a rank costs more than dense; that is no broken model (only low ranks must be ordered)."""
    from rankalloc.allocators.costs import Params

    p = _problem(Params())
    assert p.cost_tables["custom"][0].tolist() == [0.0, 2048.0, 4096.0, 4096.0]
    c = Component("x", 8, 8, "q", 0)
    q = AllocationProblem([Curve(c, [0, 6, 8, DENSE], [3.0, 1.0, 0.5, 0.0])], Budget("params", removed=0.1), grid=1)
    assert q.cost_tables["params"][0].tolist() == [0.0, 96.0, 128.0, 64.0]


# ----------------------------------------------------------------------------- the command line
def test_rankalloc_check_passes_a_builtin_solver():
    proc = rankalloc("check", "--solver", "greedy", "--examples", "20")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0].split() == ["check", "result", "examples", "seconds", "detail"]
    assert all(f"{name}" in out for name in SOLVER_CHECKS) and "FAIL" not in out
    assert "solver 'greedy': 12/12 checks passed in" in out.splitlines()[-1]


def test_rankalloc_check_fails_a_broken_plugin_solver():
    """A failed check exits 1 with its row marked FAIL, its reason and a minimal example; no traceback."""
    proc = rankalloc("check", "--plugin", str(PLUGIN), "--solver", "broken-objective", "--examples", "30")
    assert proc.returncode == 1, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("objective_matches_choices"))
    assert row.split()[1] == "FAIL"
    assert "FAIL objective_matches_choices: reported objective" in proc.stdout
    assert "minimal example: 1 components" in proc.stdout
    assert "failed: " in proc.stdout.splitlines()[-1] and "Traceback" not in proc.stderr + proc.stdout


def test_rankalloc_check_cost_models():
    ok = rankalloc("check", "--cost", "kv", "--examples", "20")
    assert ok.returncode == 0 and "cost model 'kv': 7/7 checks passed" in ok.stdout, ok.stderr
    bad = rankalloc("check", "--plugin", str(PLUGIN), "--cost", "broken-falling", "--examples", "20")
    assert bad.returncode == 1 and "FAIL monotone_in_rank: cost falls as rank grows" in bad.stdout


def test_rankalloc_check_usage_and_input_errors(capsys):
    """Exactly one of --solver/--cost (usage error 2); an unknown name or a missing plugin is one line, exit 1."""
    from rankalloc.studies.cli import main

    assert main(["check"]) == 2
    assert main(["check", "--solver", "greedy", "--cost", "params"]) == 2
    capsys.readouterr()
    assert main(["check", "--solver", "simplex"]) == 1
    err = capsys.readouterr().err
    assert "unknown solver 'simplex'" in err and len(err.strip().splitlines()) == 1
    assert main(["check", "--cost", "watts"]) == 1
    assert "unknown cost 'watts'" in capsys.readouterr().err
    assert main(["check", "--plugin", "missing.py", "--solver", "greedy"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["check", "--solver", "greedy", "--examples", "0"]) == 1
    help_text = rankalloc("check", "--help").stdout
    assert "examples:" in help_text and "--thorough" in help_text


# ----------------------------------------------------------------------------- the package
def test_the_kit_imports_no_torch_and_refuses_another_name():
    code = ("import sys, rankalloc.testing as t; t.check_solver('uniform', examples=2); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import testing"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "import this package as rankalloc.testing, not testing" in proc.stderr


def test_without_hypothesis_the_kit_says_what_to_install():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import rankalloc.testing\nexcept ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install rankalloc[testing]" in proc.stdout, proc.stdout + proc.stderr


def test_pyproject_has_a_testing_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("hypothesis>=6.100") for d in extras["testing"]) and "pandas" in " ".join(extras["testing"])
    assert any(d.startswith("hypothesis") for d in extras["test"])


# ----------------------------------------------------------------------------- the strategies
@settings(DETERMINISTIC, max_examples=40)
@given(problem=problems(n_budgets=(1, 3), sparse=True, weights=None, layered=None, break_even=True))
def test_problems_are_valid_and_as_asked(problem):
    """1 to 3 budgets on the first resources; ranks on the grid; layer scores for every layer; above break-even
    (r(m + n) > mn) candidates where the shape has one."""
    assert 1 <= len(problem.budgets) <= 3 and problem.resources == RESOURCES[:len(problem.budgets)]
    assert set(problem.layer_scores) == {c.layer for c in problem.components}
    for cv in problem.curves:
        c, low = cv.component, cv.ranks[cv.ranks != DENSE]
        assert (low % problem.grid == 0).all() and (low <= c.max_rank).all()
        grid_ranks = range(0, c.max_rank + 1, problem.grid)
        if any(r * (c.m + c.n) > c.m * c.n for r in grid_ranks):
            assert (low * (c.m + c.n) > c.m * c.n).any()


@settings(DETERMINISTIC, max_examples=40)
@given(problem=problems(n_budgets=(1, 3), sparse=True, layered=True, removable=True))
def test_layered_removable_problems_are_evidently_feasible(problem):
    assert evident_feasible(problem)
    assert problem.infeasibility_message() is None


def test_strategies_are_deterministic():
    """The DETERMINISTIC settings draw the same problems on every run."""
    def draws() -> list[str]:
        out: list[str] = []

        @settings(DETERMINISTIC, max_examples=10)
        @given(problem=problems(n_budgets=(1, 2), sparse=True))
        def record(problem):
            out.append(problem.describe() + str([cv.errors.tolist() for cv in problem.curves]))

        record()
        return out

    first, second = draws(), draws()
    assert first == second and len(set(first)) > 1


@settings(DETERMINISTIC, max_examples=30)
@given(case=cost_cases())
def test_cost_cases_cover_both_ends(case):
    component, ranks, kept = case
    assert ranks[0] == 0 and ranks[-1] == component.max_rank and (np.diff(ranks) > 0).all()
    assert kept[0] == 0.0 and (np.diff(kept) > 0).all()
