"""The ``rankalloc allocate`` command, run as a subprocess on the shipped curves fixture."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "studies" / "fixtures" / "curves_small.csv"
REQUIRED = {"solver", "status", "objective", "lower_bound", "cost", "budget", "choices", "solve_seconds"}


def rankalloc(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankalloc.studies.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def reprice(choices: dict, frame: pd.DataFrame) -> tuple[float, float, float]:
    """Objective, parameter count and dense parameter count of ``choices``, computed from the CSV rows alone."""
    obj = params = dense = 0.0
    for name, sub in frame.groupby("component"):
        m, n = int(sub["m"].iloc[0]), int(sub["n"].iloc[0])
        dense += m * n
        ch = choices[name]
        if ch == "dense":
            params += m * n
        else:
            params += ch * (m + n)
            obj += float(sub.loc[sub["rank"] == ch, "error"].iloc[0])
    return obj, params, dense


def test_fixture_is_what_make_fixture_writes(tmp_path):
    """The committed fixture is reproducible from studies/make_fixture.py (and its curves are non-increasing)."""
    from rankalloc.studies.make_fixture import main

    fresh = main(tmp_path / "curves.csv")
    assert fresh.read_text() == FIXTURE.read_text()
    frame = pd.read_csv(FIXTURE)
    assert frame["component"].nunique() == 14
    for _, sub in frame.groupby("component"):
        assert (np.diff(sub["error"].to_numpy()) <= 0).all()


def test_allocate_exact_writes_consistent_json(tmp_path):
    """exact at 40% removed: exit 0, a table row per matrix plus a summary; the JSON has the agreed keys and its
    objective and cost agree with the choices re-priced from the CSV rows; the budget is met."""
    out = tmp_path / "alloc.json"
    proc = rankalloc("allocate", "--curves", str(FIXTURE), "--solver", "exact", "--budget", "0.4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert REQUIRED <= set(data)
    assert data["solver"] == "exact" and data["status"] == "optimal"
    frame = pd.read_csv(FIXTURE)
    assert set(data["choices"]) == set(frame["component"])
    obj, params, dense = reprice(data["choices"], frame)
    assert data["objective"] == pytest.approx(obj, rel=1e-9)
    assert data["cost"]["params"] == pytest.approx(params, rel=1e-12)
    assert data["budget"]["params"] == pytest.approx(0.6 * dense, rel=1e-12)
    assert params <= 0.6 * dense * (1 + 1e-9)
    assert data["lower_bound"] is not None and data["lower_bound"] <= data["objective"] * (1 + 1e-9)
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("model.layers.") for line in lines) == 14
    summary = next(line for line in lines if line.startswith("exact: optimal"))
    assert f"{1 - params / dense:.2%} removed" in summary and "budget 40.00%" in summary


def profile_dir(tmp_path) -> Path:
    """A profile-shaped directory: the fixture as curves.csv plus meta.json with FLAT-LLM layer scores."""
    path = tmp_path / "profile"
    path.mkdir()
    (path / "curves.csv").write_text(FIXTURE.read_text())
    (path / "meta.json").write_text(json.dumps({"layer_scores": {"0": 0.3, "1": 0.1}}))
    return path


@pytest.mark.parametrize("solver", ["uniform", "greedy", "lagrangian", "epsilon", "iprs"])
def test_allocate_every_solver_meets_the_budget(solver, tmp_path):
    """Every user-facing solver runs from the command line on a profile directory (which carries the layer
    scores IPRS needs) and its JSON allocation meets the budget."""
    from rankalloc.studies.cli import main

    out = tmp_path / f"{solver}.json"
    assert main(["allocate", "--curves", str(profile_dir(tmp_path)), "--solver", solver, "--budget", "0.3",
                 "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["solver"] == solver and data["grid"] == 16
    _, params, dense = reprice(data["choices"], pd.read_csv(FIXTURE))
    assert data["cost"]["params"] == pytest.approx(params, rel=1e-12)
    assert params <= 0.7 * dense * (1 + 1e-9)


def test_iprs_without_layer_scores_says_so(capsys):
    """A plain CSV has no layer scores: IPRS exits 1 saying it needs them."""
    from rankalloc.studies.cli import main

    assert main(["allocate", "--curves", str(FIXTURE), "--solver", "iprs", "--budget", "0.3"]) == 1
    assert "layer" in capsys.readouterr().err


def test_allocate_kv_cost(tmp_path, capsys):
    """--cost kv budgets the KV cache of the k/v projections only."""
    from rankalloc.studies.cli import main

    out = tmp_path / "kv.json"
    assert main(["allocate", "--curves", str(FIXTURE), "--solver", "exact", "--budget", "0.5", "--cost", "kv",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["cost"]) == {"kv"}
    assert data["cost"]["kv"] <= data["budget"]["kv"] * (1 + 1e-9)
    frame = pd.read_csv(FIXTURE)
    free = frame[~frame["kind"].isin(["k", "v"])]
    obj_free, _, _ = reprice({k: data["choices"][k] for k in free["component"].unique()}, free)
    assert obj_free == 0.0  # matrices outside the KV cache cost nothing, so they keep zero error


def test_unknown_solver_lists_known_ones():
    """An unknown solver exits 1 with one line naming the known solvers, and no traceback."""
    proc = rankalloc("allocate", "--curves", str(FIXTURE), "--solver", "simplex", "--budget", "0.4")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for name in ("uniform", "greedy", "lagrangian", "exact", "iprs", "epsilon"):
        assert name in proc.stderr


@pytest.mark.parametrize("budget", ["1.2", "-0.1", "1"])
def test_budget_outside_unit_interval_says_what_is_reachable(budget, capsys):
    from rankalloc.studies.cli import main

    assert main(["allocate", "--curves", str(FIXTURE), "--budget", budget]) == 1
    err = capsys.readouterr().err
    assert "[0, 1)" in err and "reachable" in err and len(err.strip().splitlines()) == 1


def test_unreachable_budget_says_what_is_reachable(tmp_path):
    """Without rank-0 rows, at most a fixed fraction can be removed: a larger budget exits 1 naming it."""
    frame = pd.read_csv(FIXTURE)
    frame = frame[frame["rank"] > 0]
    path = tmp_path / "no_rank0.csv"
    frame.to_csv(path, index=False)
    dense = sum(m * n for (_, m, n) in frame[["component", "m", "n"]].drop_duplicates().itertuples(index=False))
    least = sum(16 * (m + n) for (_, m, n) in frame[["component", "m", "n"]].drop_duplicates().itertuples(index=False))
    proc = rankalloc("allocate", "--curves", str(path), "--budget", "0.99")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unreachable" in proc.stderr and f"{1 - least / dense:.2%}" in proc.stderr


def test_missing_file_and_usage_errors(tmp_path, capsys):
    """A missing curves file exits 1 with one line; a missing required option is a usage error (2)."""
    from rankalloc.studies.cli import main

    assert main(["allocate", "--curves", str(tmp_path / "nope.csv"), "--budget", "0.4"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["allocate", "--curves", str(FIXTURE)]) == 2
    assert main([]) == 2


def test_bad_options_are_reported(capsys):
    """--time-limit on a solver without one, an unknown --kind, an unknown --cost, and a --grid the rows
    are not on all exit 1 with a one-line message naming the option."""
    from rankalloc.studies.cli import main

    cases = [(["--solver", "greedy", "--time-limit", "5"], "--time-limit"),
             (["--kind", "fisher"], "curve kind 'fisher'"),
             (["--cost", "watts"], "unknown cost 'watts'"),
             (["--grid", "32"], "multiples of 32")]
    for extra, expected in cases:
        assert main(["allocate", "--curves", str(FIXTURE), "--budget", "0.4", *extra]) == 1, extra
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_help_has_examples():
    proc = rankalloc("allocate", "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "REMOVED" in proc.stdout
    top = rankalloc("--help")
    assert top.returncode == 0 and "allocate" in top.stdout


def test_console_script_declared():
    """pyproject declares the `rankalloc` command at rankalloc.studies.cli:main."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["rankalloc"] == "rankalloc.studies.cli:main"


def test_plugin_solver_from_one_file(tmp_path, capsys):
    """--plugin FILE registers a user solver that --solver can then name."""
    from rankalloc.allocators.registry import ALL_SOLVERS, SOLVERS
    from rankalloc.studies.cli import main

    plugin = tmp_path / "rank_zero.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from rankalloc.allocators.allocation import Status, finish\n"
        "from rankalloc.allocators.registry import register_solver\n"
        "@dataclass(frozen=True)\n"
        "class RankZero:\n"
        "    name: str = 'rank-zero'\n"
        "    def solve(self, problem):\n"
        "        return finish(problem, self.name, [0] * len(problem.curves), Status.FEASIBLE)\n"
        "register_solver('rank-zero', RankZero)\n")
    try:
        out = tmp_path / "a.json"
        assert main(["allocate", "--plugin", str(plugin), "--curves", str(FIXTURE), "--solver", "rank-zero",
                     "--budget", "0.9", "--out", str(out), "--quiet"]) == 0
        assert set(json.loads(out.read_text())["choices"].values()) == {0}
    finally:
        SOLVERS.pop("rank-zero", None)
        ALL_SOLVERS.pop("rank-zero", None)
