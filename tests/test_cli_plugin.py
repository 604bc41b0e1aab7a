"""The example cost-model plugin (studies/examples/bandwidth_cost.py) and the model-free commands on the
shipped curves fixture: allocate with --cost bandwidth, pareto on a curves CSV, and the command list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "studies" / "fixtures" / "curves_small.csv"
PLUGIN = ROOT / "studies" / "examples" / "bandwidth_cost.py"
PNG = b"\x89PNG\r\n\x1a\n"


def rankalloc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankalloc.studies.cli", *args], capture_output=True, text=True,
                          timeout=300)


def bandwidth(kind: str, m: int, n: int, choice, context: int = 2048, b: int = 2) -> float:
    """Bytes read per decoded token, written out from the plugin's docstring (bfloat16, context 2048)."""
    if choice == "dense":
        return b * (m * n + (context * m if kind in ("k", "v") else 0))
    r = int(choice)
    return b * (r * (m + n) + (context * min(r, m) if kind in ("k", "v") else 0))


@pytest.fixture
def registry_guard():
    """Undo what loading the plugin in this process registers."""
    from rankalloc.allocators.costs import COST_MODELS

    yield
    COST_MODELS.pop("bandwidth", None)
    for name in [n for n in sys.modules if n.startswith("rankalloc_plugin_bandwidth_cost_")]:
        del sys.modules[name]


def test_bandwidth_plugin_through_the_command_line(tmp_path):
    """`allocate --plugin bandwidth_cost.py --cost bandwidth`: exit 0; the JSON's bandwidth cost equals the
    choices re-priced by the formula in the plugin's docstring; the budget is 60% of the dense bandwidth
    and is met; the k/v matrices, whose cache read dominates, are not all left dense."""
    out = tmp_path / "bw.json"
    proc = rankalloc("allocate", "--plugin", str(PLUGIN), "--cost", "bandwidth", "--curves", str(FIXTURE),
                     "--solver", "exact", "--budget", "0.4", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    frame = pd.read_csv(FIXTURE)
    shapes = frame.groupby("component")[["kind", "m", "n"]].first()
    cost = sum(bandwidth(s.kind, s.m, s.n, data["choices"][name]) for name, s in shapes.iterrows())
    dense = sum(bandwidth(s.kind, s.m, s.n, "dense") for _, s in shapes.iterrows())
    assert set(data["cost"]) == {"bandwidth"} and data["cost_model"] == "bandwidth"
    assert data["cost"]["bandwidth"] == pytest.approx(cost, rel=1e-12)
    assert data["budget"]["bandwidth"] == pytest.approx(0.6 * dense, rel=1e-12)
    assert cost <= 0.6 * dense * (1 + 1e-9)
    kv = [data["choices"][name] for name, s in shapes.iterrows() if s.kind in ("k", "v")]
    assert any(c != "dense" for c in kv)
    assert "bandwidth" in proc.stdout and "40.00%" in proc.stdout


def test_bandwidth_needs_its_plugin(capsys):
    """Without --plugin, --cost bandwidth is an unknown cost model: exit 1, one line listing the known ones."""
    from rankalloc.studies.cli import main

    assert main(["allocate", "--curves", str(FIXTURE), "--cost", "bandwidth", "--budget", "0.4"]) == 1
    err = capsys.readouterr().err
    assert "unknown cost 'bandwidth'" in err and "params" in err and len(err.strip().splitlines()) == 1


def test_a_plugin_that_fails_to_load_is_named_with_its_line(tmp_path, capsys):
    """A plugin solver that raises while it solves, a plugin that raises while it loads, one with a syntax error, and
    a folder given as a plugin: exit 1, one line naming the plugin file and the line at fault, and never "a bug in
    rankalloc" (the fault is the plugin's)."""
    from rankalloc.studies.cli import main

    raises = tmp_path / "raises.py"
    raises.write_text("from rankalloc.allocators.registry import register_solver\n\n\ndef setup():\n"
                      "    raise RuntimeError('no licence for the solver')\n\n\nsetup()\n")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("x = 1\ny = = 2\n")
    folder = tmp_path / "folder.py"
    folder.mkdir()
    crashes = tmp_path / "crashes.py"
    crashes.write_text("from dataclasses import dataclass\nfrom rankalloc.allocators.registry import register_solver\n"
                       "\n\n@register_solver('crashes')\n@dataclass(frozen=True)\nclass Crashes:\n"
                       "    name: str = 'crashes'\n\n    def solve(self, problem):\n        return 1 / 0\n")
    ran = rankalloc("allocate", "--plugin", str(crashes), "--solver", "crashes", "--curves", str(FIXTURE),
                    "--budget", "0.4")  # in a subprocess: the solver stays out of this process's registry
    err = ran.stderr.strip().splitlines()
    assert ran.returncode == 1 and len(err) == 1 and f"ZeroDivisionError: division by zero (raised in plugin file {crashes}, line 11)" in err[0]
    for plugin, says in ((raises, f"plugin file {raises}, line 5: RuntimeError: no licence for the solver"),
                         (syntax, f"plugin file {syntax}, line 2: SyntaxError"),
                         (folder, "is not a file")):
        assert main(["allocate", "--plugin", str(plugin), "--curves", str(FIXTURE), "--budget", "0.4"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "bug in rankalloc" not in err[0], err


def test_a_plugin_solver_that_breaks_the_contract_is_named(tmp_path):
    """A plugin solver whose solve returns None, or an Allocation claiming half the cost its choices have: exit 1,
    one line naming the solver and what is wrong, never "a bug in rankalloc" nor an allocation that trusted it."""
    plugin = tmp_path / "breaks.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from rankalloc.allocators.allocation import Allocation, Status\n"
        "from rankalloc.allocators.registry import register_solver\n\n\n"
        "@register_solver('nothing')\n@dataclass(frozen=True)\nclass Nothing:\n    name: str = 'nothing'\n\n"
        "    def solve(self, problem):\n        return None\n\n\n"
        "@register_solver('halves')\n@dataclass(frozen=True)\nclass Halves:\n    name: str = 'halves'\n\n"
        "    def solve(self, problem):\n        idx = tuple(len(cv) - 1 for cv in problem.curves)\n"
        "        obj, cost = problem.evaluate(idx)\n"
        "        return Allocation(problem, self.name, Status.FEASIBLE, idx, obj, {r: c / 2 for r, c in cost.items()})\n")
    out = tmp_path / "a.json"
    for solver, says in (("nothing", "solver 'nothing' returned NoneType, not an Allocation"),
                         ("halves", "solver 'halves' reports a cost its choices do not have")):
        ran = rankalloc("allocate", "--plugin", str(plugin), "--solver", solver, "--curves", str(FIXTURE),
                        "--budget", "0.4", "--out", str(out))
        err = ran.stderr.strip().splitlines()
        assert ran.returncode == 1 and len(err) == 1 and says in err[0] and "bug in rankalloc" not in err[0], err
        assert not out.exists()


def test_bandwidth_cost_model_contract(registry_guard):
    """The plugin's model obeys the cost-model contract: cost(dense) == dense(), costs >= 0 and
    non-decreasing in rank, k/v pay the cache read for min(r, m) values, bad settings are refused."""
    from rankalloc.allocators.problem import Component
    from rankalloc.allocators.registry import COST_MODELS, load_plugin

    load_plugin(PLUGIN)
    model = COST_MODELS["bandwidth"]()
    ranks = np.array([0, 8, 64, 200, -1])
    for kind, (m, n) in (("k", (128, 256)), ("up", (704, 256))):
        c = Component(f"x.{kind}", m, n, kind, 0)
        cost = model.cost(c, ranks, np.zeros(len(ranks)))
        assert cost[-1] == model.dense(c) and (cost >= 0).all() and (np.diff(cost[:-1]) >= 0).all()
        cache = 2048 * 2 * np.minimum(ranks[:-1], m) if kind == "k" else 0
        np.testing.assert_array_equal(cost[:-1], 2 * ranks[:-1] * (m + n) + cache)
    cls = type(model)
    with pytest.raises(ValueError, match="dtype"):
        cls(dtype="float12")
    with pytest.raises(ValueError, match="context"):
        cls(context=-1)


def test_pareto_on_curves_csv_with_the_plugin(tmp_path):
    """pareto on the fixture CSV with --cost bandwidth: both PNG figures; the fronts cover params, flops, kv
    and bandwidth; every point meets its budget; exact's front is never above greedy's at the same budget."""
    out = tmp_path / "pareto"
    proc = rankalloc("pareto", "--profile", str(FIXTURE), "--plugin", str(PLUGIN), "--cost", "bandwidth",
                     "--solvers", "greedy,exact", "--ratios", "0.2,0.4,0.6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("pareto_error_bandwidth.png", "pareto_cost_models_error.png"):
        assert (out / name).read_bytes()[:8] == PNG
    frame = pd.read_csv(out / "pareto.csv")
    assert set(frame["cost_model"]) == {"params", "flops", "kv", "bandwidth"}
    budget = frame["budget"].str.extract(r"(\d+)% removed")[0].astype(float) / 100
    assert (frame["cost"] <= (1 - budget) * frame["dense_cost"] * (1 + 1e-9)).all()
    assert (frame["removed"] >= budget - 1e-9).all()
    both = frame.pivot_table(index=["cost_model", "budget"], columns="solver", values="objective").dropna()
    assert len(both) > 0 and (both["exact"] <= both["greedy"] * (1 + 1e-9)).all()


def test_pareto_budget_beyond_the_grid_says_what_is_reachable(tmp_path, capsys):
    """Without rank-0 rows only so much can be removed: a larger budget exits 1 naming the reachable range."""
    from rankalloc.studies.cli import main

    frame = pd.read_csv(FIXTURE)
    path = tmp_path / "no_rank0.csv"
    frame[frame["rank"] > 0].to_csv(path, index=False)
    assert main(["pareto", "--profile", str(path), "--ratios", "0.3,0.95", "--solvers", "exact",
                 "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and "reachable" in err and len(err.strip().splitlines()) == 1
    assert main(["pareto", "--profile", str(tmp_path / "missing"), "--out", str(tmp_path / "p")]) == 1
    assert "rankalloc profile" in capsys.readouterr().err
    assert main(["pareto", "--profile", str(FIXTURE), "--solvers", "exact,simplex"]) == 1
    err = capsys.readouterr().err
    assert "simplex" in err and "uniform" in err and "greedy" in err


def test_every_subcommand_is_listed_with_help():
    """`rankalloc --help` lists every subcommand; each subcommand's --help exits 0 with examples."""
    from rankalloc.studies.cli import COMMANDS

    top = rankalloc("--help")
    assert top.returncode == 0
    for name in ("profile", "allocate", "compress", "evaluate", "compare", "pareto"):
        assert name in COMMANDS and name in top.stdout
    for name in ("profile", "compress", "evaluate", "compare", "pareto"):
        proc = rankalloc(name, "--help")
        assert proc.returncode == 0 and "examples:" in proc.stdout, name
