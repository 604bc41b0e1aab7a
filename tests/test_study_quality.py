"""The quality study (studies/study_quality.py) on a tiny saved model: combos with a rank grid, per-row
peak memory and throughput columns, and the uniform baseline used for the x-uniform ratio."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model_dir, write_text_file
from rankalloc.studies.study_quality import parse_combo, run_quality


def test_parse_combo_grid_and_errors():
    """method:kind:solver defaults to grid 16; a 4th field sets the grid; anything else names the combo: a
    malformed one, an unknown method, solver or kind, and a kind the method's curves cannot offer (SSLC's table
    is in loss units only), all before anything is profiled."""
    assert parse_combo("svd:fisher_svd:exact") == ("svd", "fisher_svd", "exact", 16)
    assert parse_combo("svd:whitened:uniform:1") == ("svd", "whitened", "uniform", 1)
    with pytest.raises(ValueError, match="'svd:whitened'"):
        parse_combo("svd:whitened")
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        parse_combo("svd:whitened:uniform:0")
    assert parse_combo("sslc:fisher:exact") == ("sslc", "fisher", "exact", 16)
    for combo, words in (("svdd:whitened:exact", "unknown method 'svdd'"), ("svd:whitend:exact", "'whitend'"),
                         ("svd:whitened:exakt", "'exakt'"),
                         ("sslc:fisher_svd:exact", "method 'sslc' offers the curve kinds ['fisher'] only"),
                         ("flat:epsilon:iprs", "method 'flat' offers the curve kinds")):
        with pytest.raises(ValueError, match=re.escape(f"combo {combo!r}: ") + ".*" + re.escape(words)):
            parse_combo(combo)


def test_run_quality_grid_memory_and_throughput(tmp_path):
    """On a tiny model at 30% removed: uniform on grid 1 removes at least the nominal 30% and no more than
    uniform snapped to grid 16 does; greedy on grid 4 lands within 5 points of 30%; every row has a finite
    perplexity, a positive process peak RSS while compressing and positive prefill/decode speeds; ppl_vs_uniform is
    relative to the grid-16 uniform row (1 there, ppl/uniform elsewhere)."""
    from rankalloc.profiling.run import prepare, profile

    torch.manual_seed(0)
    run = prepare(str(save_tiny_model_dir(tmp_path / "model")), str(write_text_file(tmp_path / "text.txt")),
                  samples=4, seqlen=32, eval_windows=2, progress=False)
    prof = profile(run, kinds=("whitened",), out=tmp_path / "profile", progress=False)
    combos = [("svd", "whitened", "uniform"), ("svd", "whitened", "uniform", 1), ("svd", "whitened", "greedy", 4)]
    df, dense = run_quality(run, prof, [0.3], combos, progress=False, throughput=True)
    assert list(zip(df.solver, df.grid)) == [("uniform", 16), ("uniform", 1), ("greedy", 4)]
    fine, coarse = df.removed_linear.iloc[1], df.removed_linear.iloc[0]
    assert 0.3 <= fine <= coarse + 1e-12
    assert math.isclose(df.removed_linear.iloc[2], 0.3, abs_tol=0.05)
    assert df.ppl.map(math.isfinite).all() and (df.compress_rss_mib > 0).all()
    assert (df.prefill_tok_s > 0).all() and (df.decode_tok_s > 0).all() and (df.dense_prefill_tok_s > 0).all()
    assert df.ppl_vs_uniform.iloc[0] == 1.0
    assert math.isclose(df.ppl_vs_uniform.iloc[1], df.ppl.iloc[1] / df.ppl.iloc[0])
    assert math.isfinite(dense.ppl)


def test_readme_table_cells():
    """The README table: one line per (method, kind, solver, grid), known lines in LABELS order, ppl x the
    grid-1 uniform row at the same ratio, the removed fraction, and "not run" for a missing ratio."""
    import pandas as pd

    from rankalloc.studies.study_quality import readme_table

    rows = [dict(method="svd", kind="fisher_svd", solver="exact", grid=16, ratio=0.2, ppl=30.0, removed_linear=0.2,
                 compress_s=10.0),
            dict(method="svd", kind="whitened", solver="uniform", grid=1, ratio=0.2, ppl=60.0, removed_linear=0.201,
                 compress_s=20.0),
            dict(method="svd", kind="whitened", solver="uniform", grid=1, ratio=0.4, ppl=200.0, removed_linear=0.401,
                 compress_s=30.0)]
    lines = readme_table(pd.DataFrame(rows)).splitlines()
    assert len(lines) == 4 and "grid 1" in lines[2] and "recommended for plain SVD factors" in lines[3]
    assert "| 60.0 (20.1%) | 200.0 (40.1%) | 25 |" in lines[2]
    assert "| 30.0 ×0.50 (20.0%) | not run | 10 |" in lines[3]


def test_within_ratio_spearman_groups_by_budget():
    """within_ratio_spearman ranks predictions against measurements inside each ratio and averages: a kind
    that orders each budget's allocations perfectly scores 1 even when its values are far apart across
    budgets, and one that inverts them scores -1; pooled Spearman of the latter would not say so."""
    import pandas as pd

    from rankalloc.studies.study_agreement import within_ratio_spearman

    per = pd.DataFrame({"allocation": [f"{r}:s{i}:k" for r in ("0.20", "0.40") for i in range(3)],
                        "measured_increase": [1.0, 2.0, 3.0, 10.0, 20.0, 30.0],
                        "pred_good": [5.0, 6.0, 7.0, 0.1, 0.2, 0.3],
                        "pred_bad": [3.0, 2.0, 1.0, 30.0, 20.0, 10.0]})
    got = within_ratio_spearman(per, ["good", "bad"])
    assert got["good"] == pytest.approx(1.0) and got["bad"] == pytest.approx(-1.0)


def test_sequential_rows_and_per_method_agreement(tmp_path):
    """run_quality with a SequentialConfig marks its rows (seq = the sequences used) and keeps the plain rows' exact
    budget; method_agreement scores each method's own allocations on the evaluation text: measured is
    ln(ppl / dense ppl), and a kind's prediction of its own exact optimum is that optimum's objective."""
    from rankalloc.decomposers.sequential import SequentialConfig
    from rankalloc.profiling.run import prepare, profile
    from rankalloc.studies.study_agreement import method_agreement, method_summary

    torch.manual_seed(0)
    run = prepare(str(save_tiny_model_dir(tmp_path / "model")), str(write_text_file(tmp_path / "text.txt")),
                  samples=4, seqlen=32, eval_windows=2, progress=False)
    prof = profile(run, kinds=("whitened", "fisher"), out=tmp_path / "profile", progress=False, store="full")
    combos = [("svd", "fisher_svd", "exact"), ("fisher_svd", "fisher", "exact")]
    plain, _ = run_quality(run, prof, [0.3], combos, progress=False)
    seq, _ = run_quality(run, prof, [0.3], combos, progress=False, sequential=SequentialConfig(samples=2))
    assert list(plain.seq) == [0, 0] and list(seq.seq) == [2, 2]
    assert list(seq.removed_linear) == list(plain.removed_linear)
    assert (seq.ppl != plain.ppl).all() and seq.ppl.map(math.isfinite).all()

    per = method_agreement(run, prof, ["svd", "fisher_svd"], [0.3], progress=False)
    assert set(per.method) == {"svd", "fisher_svd"} and len(per) >= 8
    assert ((per.measured - (per.ppl / per.dense_ppl).map(math.log)).abs() < 1e-12).all()
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.problems import problem_for

    best = per[(per.method == "svd") & (per.solver == "exact") & (per.kind == "fisher_svd")]
    a = get_solver("exact").solve(problem_for(prof, "svd", "fisher_svd", 0.3))
    assert math.isclose(best.pred_fisher_svd.iloc[0], a.objective, rel_tol=1e-9)
    summary = method_summary(per)
    assert set(summary.method) == {"svd", "fisher_svd"} and summary.within_budget_spearman.between(-1, 1).all()
    assert "pred/measured 30%" in summary.columns
    sslc = method_agreement(run, prof, ["sslc"], [0.3], progress=False)  # one kind: every solver runs on it
    assert set(sslc.kind) == {"fisher"} and {"uniform", "epsilon", "greedy", "exact"} <= set(sslc.solver)
    assert len(sslc) == len(set(sslc.solver)) and sslc.ppl.map(math.isfinite).all()


def test_a_combo_that_needs_the_full_store_refuses_compact_before_any_work(tmp_path):
    """``--store compact`` with an SSLC combo, or with fisher_svd under --sequential, stops in one line naming the
    method, before the output folder is made or any model is loaded; so does the per-method agreement study with
    SSLC among its methods."""
    from rankalloc.studies.study_quality import main

    from rankalloc.studies.study_agreement import main as agreement

    for extra, method in ((["--combo", "sslc:fisher:exact"], "'sslc'"),
                          (["--combo", "fisher_svd:fisher:exact", "--sequential", "4"], "'fisher_svd' with --sequential")):
        with pytest.raises(ValueError, match=f"--store compact: method {method} needs the full store"):
            main([*extra, "--store", "compact", "--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--store compact: method 'sslc' needs the full store"):
        agreement(["--per-method", "--methods", "svd,sslc", "--store", "compact", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_study_run_as_a_script_ends_bad_input_in_one_line(tmp_path):
    """``python -m rankalloc.studies.study_quality`` with a malformed combo, or with SoLA under --sequential, exits
    1 with one line naming the fault, and no traceback (studies.options.script)."""
    import subprocess
    import sys

    for extra, words in ((["--combo", "bad"], ["combo 'bad'"]),
                         (["--combo", "sola:fisher_svd:exact", "--sequential", "4"], ["method 'sola'"])):
        proc = subprocess.run([sys.executable, "-m", "rankalloc.studies.study_quality", *extra,
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert err[0].startswith("study_quality: error:") and all(w in err[0] for w in words), err
        assert not (tmp_path / "out").exists()


def test_a_study_writes_only_into_its_own_output_folder(tmp_path, monkeypatch):
    """Each study refuses an --out folder that holds files it did not write, in one line naming the folder, before
    any model is loaded; a folder with its own earlier output, or --overwrite, is written into. A table is replaced
    through a temporary sibling, so a write that fails leaves the old table as it was."""
    import pandas as pd

    from rankalloc.profiling import files
    from rankalloc.profiling import run as runs
    from rankalloc.studies import study_agreement, study_quality, study_reprofile

    class Prepared(Exception):
        pass

    def never(*args, **kwargs):
        raise Prepared

    monkeypatch.setattr(runs, "prepare", never)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    studies = ((study_quality.main, [], "quality.csv"), (study_agreement.main, [], "agreement.csv"),
               (study_agreement.main, ["--per-method", "--methods", "svd"], "method_agreement.csv"),
               (study_reprofile.main, [], "reprofile.csv"))
    for main, extra, output in studies:
        with pytest.raises(ValueError, match=f"--out {foreign}: a non-empty folder that rankalloc did not write"):
            main([*extra, "--out", str(foreign)])
        with pytest.raises(Prepared):  # --overwrite: past the folder check, to loading the model
            main([*extra, "--out", str(foreign), "--overwrite"])
        own = tmp_path / output
        own.mkdir()
        (own / output).write_text("an earlier run\n")
        (own / "other.txt").write_text("x")
        with pytest.raises(Prepared):  # its own earlier output: written into
            main([*extra, "--out", str(own)])
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    table = tmp_path / "t.csv"
    files.atomic_write_csv(table, pd.DataFrame({"a": [1, 2]}), index=False)
    before = table.read_text()

    class Broken(pd.DataFrame):
        def to_csv(self, path, **kwargs):
            Path(path).write_text("a\n1\n")  # a part written, then the write fails
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_csv(table, Broken({"a": [3]}), index=False)
    assert table.read_text() == before and [p.name for p in tmp_path.glob(".t.csv*")] == []
