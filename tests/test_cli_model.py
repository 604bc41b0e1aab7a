"""``rankalloc profile``, ``compress``, ``evaluate`` and ``pareto`` on a tiny random-weight model folder.

The profile, compress and evaluate commands run through the real entry point in subprocesses;
the interrupt/resume check and the measured Pareto run call ``main`` in-process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import save_tiny_model_dir, write_text_file

PNG = b"\x89PNG\r\n\x1a\n"
COMMON = ("--samples", "8", "--seqlen", "64", "--device", "cpu")


def rankalloc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankalloc.studies.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A model folder, a text file and a whitened profile made by `rankalloc profile` (subprocess)."""
    root = tmp_path_factory.mktemp("cli_model")
    model_dir = save_tiny_model_dir(root / "model")
    text = write_text_file(root / "text.txt")
    env = {"RANKALLOC_CACHE": str(root / "cache")}
    proc = rankalloc("profile", "--model", str(model_dir), "--text", str(text), *COMMON, "--kinds", "whitened",
                     "--out", str(root / "profile"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "model": model_dir, "text": text, "profile": root / "profile", "env": env,
            "profile_stdout": proc.stdout}


def test_profile_writes_a_store_that_allocate_reads(workdir, tmp_path, capsys):
    """The profile directory has curves for every linear matrix of the model, records the model's
    fingerprint and text, and `rankalloc allocate --curves DIR` solves on it within the budget."""
    from rankalloc.profiling.store import Profile
    from rankalloc.studies.cli import main

    prof = Profile.load(workdir["profile"])
    assert prof.complete and len(prof.components) == 14 and "whitened" in prof.kinds
    assert prof.meta["model_id"] == str(Path(workdir["model"]).resolve())
    assert prof.meta["source_id"].startswith("file:text.txt:")
    assert f"profile: {workdir['profile']}" in workdir["profile_stdout"]
    assert "rankalloc allocate --curves" in workdir["profile_stdout"]
    out = tmp_path / "alloc.json"
    assert main(["allocate", "--curves", str(workdir["profile"]), "--kind", "whitened", "--solver", "exact",
                 "--budget", "0.3", "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    dense = sum(c.m * c.n for c in prof.components)
    assert data["cost"]["params"] <= 0.7 * dense and data["grid"] == 16
    assert set(data["choices"]) == {c.name for c in prof.components}


@pytest.fixture(scope="module")
def compressed(workdir):
    """An exact allocation at 30% removed, compressed by `rankalloc compress`, then `rankalloc evaluate`."""
    from rankalloc.studies.cli import main

    root = workdir["root"]
    alloc = root / "alloc.json"
    assert main(["allocate", "--curves", str(workdir["profile"]), "--kind", "whitened", "--solver", "exact",
                 "--budget", "0.3", "--out", str(alloc), "--quiet"]) == 0
    comp = rankalloc("compress", "--profile", str(workdir["profile"]), "--allocation", str(alloc), "--method", "svd",
                     "--out", str(root / "compressed"), env=workdir["env"])
    assert comp.returncode == 0, comp.stderr[-3000:]
    ev = rankalloc("evaluate", "--compressed", str(root / "compressed"), "--text", str(workdir["text"]),
                   "--seqlen", "64", "--windows", "4", "--device", "cpu", env=workdir["env"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    return {"alloc": alloc, "dir": root / "compressed", "compress": comp.stdout, "evaluate": ev.stdout}


def test_compress_reports_the_allocation_cost(workdir, compressed):
    """compress prints the realized fraction of linear parameters removed, equal to 1 - cost / dense of
    the allocation JSON, and writes the two files of a compressed model."""
    from rankalloc.profiling.store import Profile

    data = json.loads(compressed["alloc"].read_text())
    dense = sum(c.m * c.n for c in Profile.load(workdir["profile"]).components)
    removed = 1 - data["cost"]["params"] / dense
    line = next(l for l in compressed["compress"].splitlines() if l.startswith("realized parameters removed"))
    assert f"{removed:.2%} of the linear matrices ({dense - int(data['cost']['params']):,} of {dense:,})" in line
    assert (compressed["dir"] / "model.safetensors").is_file() and (compressed["dir"] / "compressed.json").is_file()


def _ppl(stdout: str, label: str) -> float:
    line = next(l for l in stdout.splitlines() if l.startswith(label))
    return float(re.search(r"perplexity ([0-9.]+|nan|inf)", line).group(1))


def test_evaluate_round_trip_matches_the_in_memory_model(workdir, compressed):
    """evaluate --compressed prints the protocol, the dense baseline and the compressed perplexity; the
    latter equals the perplexity of the same allocation compressed in memory (so save/load and the
    command lose nothing), and the dense figure equals the dense model's on the same windows."""
    from rankalloc.profiling.store import Profile
    from rankalloc.profiling import run as runs
    from rankalloc.decomposers import problems
    from rankalloc.decomposers import evaluate as evaluation

    out = compressed["evaluate"]
    assert out.startswith("protocol: 4 non-overlapping windows of 64 tokens")
    dense_ppl, comp_ppl = _ppl(out, "dense"), _ppl(out, "compressed")
    assert math.isfinite(dense_ppl) and math.isfinite(comp_ppl)
    run = runs.prepare(str(workdir["model"]), str(workdir["text"]), samples=8, seqlen=64, eval_windows=4,
                     device="cpu", progress=False)
    prof = Profile.load(workdir["profile"])
    allocation = problems.load_allocation(prof, compressed["alloc"], "svd")
    model, report = problems.compress(run.model, prof, allocation, "svd", progress=False)
    assert report.params_after == json.loads(compressed["alloc"].read_text())["cost"]["params"]
    assert evaluation.evaluate(model, run, progress=False).ppl == pytest.approx(comp_ppl, rel=1e-6)
    assert evaluation.evaluate(run.model, run, progress=False).ppl == pytest.approx(dense_ppl, rel=1e-6)


def test_evaluate_counts_the_parameters_compress_kept(compressed):
    """The compressed parameter count printed by evaluate equals the count compress reported as kept."""
    kept = int(re.search(r"\(([\d,]+) of [\d,]+ kept\)", compressed["compress"]).group(1).replace(",", ""))
    line = next(l for l in compressed["evaluate"].splitlines() if l.startswith("compressed"))
    printed = int(re.search(r"([\d,]+) parameters", line).group(1).replace(",", ""))
    assert printed == kept


def test_compress_refuses_another_models_profile(workdir, compressed, tmp_path, capsys):
    """--model pointing at a different model than the profiled one exits 1 naming both; a missing
    profile exits 1 naming `rankalloc profile`; an allocation for another method is refused."""
    from rankalloc.studies.cli import main

    other = save_tiny_model_dir(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert main(["compress", "--profile", str(workdir["profile"]), "--allocation", str(compressed["alloc"]),
                 "--model", str(other), "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err  # loading progress bars, then the one-line error
    assert "is not the model the profile" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert main(["compress", "--profile", str(tmp_path / "nope"), "--allocation", str(compressed["alloc"]),
                 "--out", str(tmp_path / "c")]) == 1
    assert "rankalloc profile" in capsys.readouterr().err
    bad = tmp_path / "flat.json"
    edited = {k: v for k, v in json.loads(compressed["alloc"].read_text()).items() if k != "sha256"}  # unsealed
    bad.write_text(json.dumps({**edited, "method": "flat"}))
    assert main(["compress", "--profile", str(workdir["profile"]), "--allocation", str(bad),
                 "--out", str(tmp_path / "c")]) == 1
    assert "--method flat" in capsys.readouterr().err


def test_compress_refuses_an_allocation_solved_on_another_models_curves(workdir, compressed, tmp_path, capsys):
    """An allocation JSON records the profile it was solved on. Applied to the profile of another model with the
    same matrix names and shapes (a second seed), compress exits 1 naming both models and builds nothing; the same
    model calibrated on more sequences is accepted, the choices re-priced on its curves."""
    from rankalloc.studies.cli import main

    recorded = json.loads(compressed["alloc"].read_text())["profile"]
    assert recorded["fingerprint"] == json.loads((workdir["profile"] / "meta.json").read_text())["fingerprint"]
    other = save_tiny_model_dir(tmp_path / "other", seed=1)
    prof_other, prof_more = tmp_path / "p_other", tmp_path / "p_more"
    assert main(["profile", "--model", str(other), "--text", str(workdir["text"]), *COMMON, "--kinds", "whitened",
                 "--out", str(prof_other)]) == 0
    capsys.readouterr()
    assert main(["compress", "--profile", str(prof_other), "--allocation", str(compressed["alloc"]),
                 "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "solved on the curves of model" in err and str(other.resolve()) in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()
    samples = COMMON[COMMON.index("--samples") + 1]
    more = list(COMMON)
    more[COMMON.index("--samples") + 1] = str(int(samples) + 2)
    assert main(["profile", "--model", str(workdir["model"]), "--text", str(workdir["text"]), *more, "--kinds",
                 "whitened", "--out", str(prof_more)]) == 0
    assert main(["compress", "--profile", str(prof_more), "--allocation", str(compressed["alloc"]),
                 "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "compressed.json").is_file()


def test_evaluate_scores_the_text_the_model_was_calibrated_on(workdir, compressed, tmp_path, capsys):
    """Without --text, evaluate --compressed scores the held-out split of the text file its profile recorded (the
    same figures as passing that file); a file changed since, or moved, exits 1 naming the folder and the file; a
    corpus other than wiki comes back by name."""
    from rankalloc.studies.cli import main
    from rankalloc.studies.cmd_evaluate import calibration_text_of

    window = ["--seqlen", "64", "--windows", "4", "--device", "cpu"]
    capsys.readouterr()
    assert main(["evaluate", "--compressed", str(compressed["dir"]), *window]) == 0
    out = capsys.readouterr().out
    assert "held-out evaluation split of text 'text'" in out
    assert _ppl(out, "compressed") == _ppl(compressed["evaluate"], "compressed")
    assert _ppl(out, "dense") == _ppl(compressed["evaluate"], "dense")

    text = tmp_path / "mine.txt"
    text.write_text(workdir["text"].read_text())
    prof, alloc, comp = tmp_path / "p", tmp_path / "a.json", tmp_path / "c"
    assert main(["profile", "--model", str(workdir["model"]), "--text", str(text), *COMMON, "--kinds", "whitened",
                 "--out", str(prof)]) == 0
    assert main(["allocate", "--curves", str(prof), "--kind", "whitened", "--budget", "0.3", "--out", str(alloc),
                 "--quiet"]) == 0
    assert main(["compress", "--profile", str(prof), "--allocation", str(alloc), "--out", str(comp)]) == 0
    assert calibration_text_of(comp) == str(text.resolve())
    text.write_text(text.read_text() + "\n\nOne more article, added after the profile was made.\n")
    capsys.readouterr()
    assert main(["evaluate", "--compressed", str(comp), *window]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has changed since it was profiled" in err and str(text.resolve()) in err
    text.rename(tmp_path / "moved.txt")
    assert main(["evaluate", "--compressed", str(comp), *window]) == 1
    assert "which is no longer there" in capsys.readouterr().err
    manifest = json.loads((comp / "compressed.json").read_text())
    manifest["profile"]["source_id"] = "gensim==4.4.0:lee_background.cor:cleaner1@0123"
    (comp / "compressed.json").write_text(json.dumps(manifest))
    assert calibration_text_of(comp) == "news"


def test_profile_interrupt_leaves_a_resumable_store(workdir, tmp_path, monkeypatch, capsys):
    """Ctrl-C after layer 0 is stored: exit 130 saying to rerun to resume from layer 1; the rerun
    finishes and its curves equal those of the uninterrupted profile."""
    import rankalloc.profiling.stream as profile_mod
    from rankalloc.studies.cli import main

    real = profile_mod.layer_results

    def interrupt_at_layer_1(p, stats):
        if stats.layer == 1:
            raise KeyboardInterrupt
        return real(p, stats)

    argv = ["profile", "--model", str(workdir["model"]), "--text", str(workdir["text"]), *COMMON,
            "--kinds", "whitened", "--out", str(tmp_path / "p")]
    monkeypatch.setattr(profile_mod, "layer_results", interrupt_at_layer_1)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume from layer 1" in err
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["finished_layers"] == [0]
    monkeypatch.setattr(profile_mod, "layer_results", real)
    assert main(argv) == 0
    resumed = pd.read_csv(tmp_path / "p" / "curves.csv")
    full = pd.read_csv(workdir["profile"] / "curves.csv")
    assert list(resumed["component"]) == list(full["component"])
    np.testing.assert_allclose(resumed["whitened"], full["whitened"], rtol=1e-9, atol=1e-12)


def test_pareto_with_measured_points(workdir, tmp_path, capsys):
    """pareto --measure 1 on the profile: two PNG figures and a CSV whose fronts cover the params, flops
    and kv cost models; one measured point per solver with finite perplexity, whose realized fraction of
    linear parameters removed equals the point's own (SVD builds exactly the allocation)."""
    from rankalloc.studies.cli import main

    out = tmp_path / "pareto"
    assert main(["pareto", "--profile", str(workdir["profile"]), "--text", str(workdir["text"]), "--seqlen", "64",
                 "--windows", "4", "--device", "cpu", "--solvers", "uniform,exact", "--kind", "whitened",
                 "--ratios", "0.2,0.4", "--measure", "1", "--out", str(out)]) == 0
    for name in ("pareto_whitened_params.png", "pareto_cost_models_whitened.png"):
        assert (out / name).read_bytes()[:8] == PNG
    frame = pd.read_csv(out / "pareto.csv")
    assert set(frame["cost_model"]) == {"params", "flops", "kv"}
    assert set(frame["solver"]) == {"uniform", "exact"}
    measured = frame[frame["ppl"].notna()]
    assert sorted(measured["solver"]) == ["exact", "uniform"] and (measured["cost_model"] == "params").all()
    assert np.isfinite(measured["ppl"]).all()
    np.testing.assert_allclose(measured["removed_linear_params"], measured["removed"], atol=1e-12)
    params = frame[frame["cost_model"] == "params"]
    assert (params["cost"] <= (1 - 0.2) * params["dense_cost"] * (1 + 1e-12)).all()
    assert "dense perplexity" in capsys.readouterr().out


def test_profile_fisher_samples_option(workdir, tmp_path):
    """`rankalloc profile --kinds whitened,fisher --fisher-samples 2` (in-process) writes fisher curves whose
    output Grams sum over the first 2 calibration sequences only, and records the setting."""
    from rankalloc.profiling.store import Profile
    from rankalloc.studies.cli import main

    out = tmp_path / "fisher2"
    assert main(["profile", "--model", str(workdir["model"]), "--text", str(workdir["text"]), *COMMON,
                 "--kinds", "whitened,fisher", "--fisher-samples", "2", "--out", str(out)]) == 0
    prof = Profile.load(out)
    assert {"fisher", "fisher_svd"} <= set(prof.kinds)
    assert prof.meta["settings"]["fisher_samples"] == 2
    assert prof.fisher_loss_tokens == 2 * (prof.meta["seqlen"] - 1) < prof.meta["n_samples"] * (prof.meta["seqlen"] - 1)


def test_compress_writes_the_dtype_the_checkpoint_stores(tmp_path):
    """A bfloat16 checkpoint gives a bfloat16 compressed model (in memory and out of core), smaller than its
    source: its weights are the float32 factors (--dtype float32) rounded once, and it reloads in bfloat16. A
    tensor that float16 cannot hold is refused naming it, and low-rank factors are balanced before any cast, so
    whitened factors beyond float16's range (U Sigma scales with the calibration) still fit."""
    import torch
    from safetensors import safe_open

    from conftest import tiny_model, tiny_tokenizer
    from rankalloc.decomposers import load_compressed
    from rankalloc.studies.cli import main

    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    text = write_text_file(tmp_path / "text.txt")
    assert main(["profile", "--model", str(src), "--text", str(text), *COMMON, "--kinds", "whitened",
                 "--out", str(tmp_path / "p")]) == 0
    alloc = tmp_path / "alloc.json"
    assert main(["allocate", "--curves", str(tmp_path / "p"), "--kind", "whitened", "--solver", "exact",
                 "--budget", "0.3", "--out", str(alloc), "--quiet"]) == 0

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})
        return out

    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    common = ["compress", "--profile", str(tmp_path / "p"), "--allocation", str(alloc), "--method", "svd"]
    assert main([*common, "--dtype", "float32", "--out", str(tmp_path / "f32")]) == 0
    wide = tensors(tmp_path / "f32")
    assert {t.dtype for t in wide.values()} == {torch.float32}
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / f"bf16-out{len(extra)}"
        assert main([*common, *extra, "--out", str(out)]) == 0
        narrow = tensors(out)
        assert {t.dtype for t in narrow.values()} == {torch.bfloat16}, extra
        assert narrow.keys() == wide.keys() and all(torch.equal(narrow[k], wide[k].to(torch.bfloat16)) for k in wide)
        assert size(out) < size(src) < size(tmp_path / "f32")
        assert json.loads((out / "compressed.json").read_text())["dtype"] == "bfloat16"
        assert next(load_compressed(out).parameters()).dtype == torch.bfloat16
    from rankalloc.decomposers.io import stored_tensors

    big = {"model.layers.0.mlp.down_proj.second.weight": torch.tensor([7e4, 1.0]), "index": torch.tensor([3])}
    assert stored_tensors(big, torch.bfloat16)["index"].dtype == torch.int64  # indices keep their type
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj.second.weight': values up to 7e\\+04 "
                                         "overflow float16"):
        stored_tensors(big, torch.float16)  # never an inf written silently
    from rankalloc.decomposers.modules import LowRankLinear

    g = torch.Generator().manual_seed(0)  # whitened factors: U Sigma grows with the calibration, V^T S^-1 shrinks
    A = torch.randn(64, 8, dtype=torch.float64, generator=g) * 3e4
    B = torch.randn(8, 96, dtype=torch.float64, generator=g) * 1e-4
    assert float(A.abs().max()) > torch.finfo(torch.float16).max
    half = LowRankLinear.from_factors(A, B, None, torch.float16, "cpu")  # balanced before the cast: it fits
    W = half.second.weight.detach().double() @ half.first.weight.detach().double()
    assert torch.isfinite(W).all() and float((W - A @ B).norm() / (A @ B).norm()) < 1e-3
