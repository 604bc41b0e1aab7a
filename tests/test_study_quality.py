"""The quality study (studies/study_quality.py) on a tiny saved model: combos with a rank grid, per-row
peak memory and throughput columns, and the uniform baseline used for the x-uniform ratio."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import save_tiny_model_dir, write_text_file
from rankalloc.studies.study_quality import parse_combo, run_quality


def test_parse_combo_grid_and_errors():
    """method:kind:solver defaults to grid 16; a 4th field sets the grid; anything else names the combo."""
    assert parse_combo("svd:fisher_svd:exact") == ("svd", "fisher_svd", "exact", 16)
    assert parse_combo("svd:whitened:uniform:1") == ("svd", "whitened", "uniform", 1)
    with pytest.raises(ValueError, match="'svd:whitened'"):
        parse_combo("svd:whitened")
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        parse_combo("svd:whitened:uniform:0")


def test_run_quality_grid_memory_and_throughput(tmp_path):
    """On a tiny model at 30% removed: uniform on grid 1 removes at least the nominal 30% and no more than
    uniform snapped to grid 16 does; greedy on grid 4 lands within 5 points of 30%; every row has a finite
    perplexity, a non-negative compression peak RSS and positive prefill/decode speeds; ppl_vs_uniform is
    relative to the grid-16 uniform row (1 there, ppl/uniform elsewhere)."""
    from rankalloc.studies.pipeline import prepare, profile

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
    assert df.ppl.map(math.isfinite).all() and (df.compress_peak_mib >= 0).all()
    assert (df.prefill_tok_s > 0).all() and (df.decode_tok_s > 0).all() and (df.dense_prefill_tok_s > 0).all()
    assert df.ppl_vs_uniform.iloc[0] == 1.0
    assert math.isclose(df.ppl_vs_uniform.iloc[1], df.ppl.iloc[1] / df.ppl.iloc[0])
    assert math.isfinite(dense.ppl)
