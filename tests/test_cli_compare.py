"""``rankalloc compare`` end to end on a tiny random-weight model saved as a local HF folder.

The command runs through the real entry point in a subprocess: it profiles, solves with two
solvers at one budget, compresses with SVD-LLM and evaluates. The printed table and the CSV are
checked against the allocations' own JSON, re-priced here from the model's shapes alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_SIZES, save_tiny_model_dir, write_text_file

H, I = TINY_SIZES["hidden_size"], TINY_SIZES["intermediate_size"]
KV = TINY_SIZES["num_key_value_heads"] * (H // TINY_SIZES["num_attention_heads"])
SHAPES = {"q_proj": (H, H), "k_proj": (KV, H), "v_proj": (KV, H), "o_proj": (H, H),
          "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
"""(out, in) of each linear matrix of the tiny llama, from its config."""
DENSE_LINEAR = TINY_SIZES["num_hidden_layers"] * sum(m * n for m, n in SHAPES.values())


def rankalloc(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankalloc.studies.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def repriced_params(choices: dict) -> int:
    """Parameters of an allocation's choices: r(m+n) per low-rank matrix, m*n dense (shapes from the config)."""
    total = 0
    for name, choice in choices.items():
        m, n = SHAPES[name.rsplit(".", 1)[1]]
        total += m * n if choice == "dense" else int(choice) * (m + n)
    return total


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model_dir = save_tiny_model_dir(root / "model")
    text = write_text_file(root / "text.txt")
    out = root / "out"
    proc = rankalloc("compare", "--model", str(model_dir), "--text", str(text), "--ratios", "0.3",
                     "--solvers", "uniform,exact", "--methods", "svd", "--kinds", "whitened", "--samples", "8",
                     "--seqlen", "64", "--windows", "4", "--device", "cpu", "--out", str(out),
                     env={"RANKALLOC_CACHE": str(root / "cache")})
    return proc, out, model_dir


def test_compare_runs_and_writes_its_files(compared):
    """Exit 0; compare.csv has one row per solver at the one budget; every row names its allocation JSON."""
    proc, out, _ = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out / "compare.csv")
    assert sorted(frame["solver"]) == ["exact", "uniform"]
    assert set(frame["method"]) == {"svd"} and set(frame["kind"]) == {"whitened"}
    assert frame["budget_removed"].tolist() == [0.3, 0.3]
    for name in frame["allocation"]:
        assert (out / "allocations" / name).is_file()
    settings = json.loads((out / "compare.json").read_text())
    assert settings["ratios"] == [0.3] and settings["solvers"] == ["uniform", "exact"]


def test_compare_realized_params_match_the_allocations(compared):
    """Realized params removed (counted on the built model) = 1 - (allocation cost re-priced from the shapes)
    / dense linear params, and = the JSON's own cost; every budget is met; exact's predicted objective is no
    larger than uniform's on the same problem; dense perplexity is one number on every row; perplexity finite."""
    proc, out, _ = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out / "compare.csv")
    for row in frame.itertuples():
        data = json.loads((out / "allocations" / row.allocation).read_text())
        params = repriced_params(data["choices"])
        assert params == pytest.approx(data["cost"]["params"], abs=0)
        assert row.removed_linear_params == pytest.approx(1 - params / DENSE_LINEAR, abs=1e-9)
        assert row.removed_budgeted == pytest.approx(data["removed"]["params"], abs=1e-9)
        assert row.predicted_objective == pytest.approx(data["objective"], rel=1e-9)
        assert params <= 0.7 * DENSE_LINEAR
        assert 0 < row.removed_model_params < row.removed_linear_params
        assert math.isfinite(row.ppl) and row.ppl > 1
        assert row.status in ("optimal", "feasible")
    by = frame.set_index("solver")
    assert by.loc["exact", "predicted_objective"] <= by.loc["uniform", "predicted_objective"] * (1 + 1e-12)
    assert by.loc["exact", "status"] == "optimal"
    assert frame["dense_ppl"].nunique() == 1 and math.isfinite(frame["dense_ppl"].iloc[0])


def test_compare_whole_model_fraction_is_consistent(compared):
    """Removed (whole model) x whole-model params = removed (linear) x linear params: the same parameters."""
    proc, out, model_dir = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.numpy import load_file

    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    total = sum(v.size for v in weights.values())  # tied lm_head is stored once
    frame = pd.read_csv(out / "compare.csv")
    for row in frame.itertuples():
        assert row.removed_model_params * total == pytest.approx(row.removed_linear_params * DENSE_LINEAR, rel=1e-9)


def test_compare_prints_one_table_matching_the_csv(compared):
    """stdout holds the protocol, the dense perplexity, and one table whose rows show the CSV's figures."""
    proc, out, _ = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out / "compare.csv")
    lines = proc.stdout.splitlines()
    assert any(line.startswith("perplexity protocol: 4 non-overlapping windows of 64 tokens") for line in lines)
    assert f"dense perplexity {frame['dense_ppl'].iloc[0]:.4f}" in proc.stdout
    header = [i for i, line in enumerate(lines) if line.startswith("method")]
    assert len(header) == 1
    for c in ("predicted objective", "params removed (linear)", "params removed (model)", "perplexity", "dense ppl",
              "solve s", "compress s"):
        assert c in lines[header[0]]
    for row in frame.itertuples():
        printed = next(line for line in lines if line.split()[:3] == ["svd", row.solver, "whitened"])
        for figure in (f"{row.removed_linear_params:.2%}", f"{row.removed_model_params:.2%}", f"{row.ppl:.4f}",
                       f"{row.dense_ppl:.4f}", f"{row.predicted_objective:.6g}", "30.00%"):
            assert figure in printed, (figure, printed)


def test_compare_bad_input_is_one_line_naming_what_is_known(tmp_path, capsys):
    """An unknown solver, method or cost, and a budget outside [0, 1), exit 1 before any model is loaded,
    with one line listing what is accepted; a missing --profile names `rankalloc profile`."""
    from rankalloc.studies.cli import main

    cases = [(["--solvers", "uniform,simplex"], ["simplex", "uniform", "greedy", "exact", "iprs"]),
             (["--methods", "svd,qr"], ["qr", "fisher_svd", "sola", "flat"]),
             (["--cost", "watts"], ["watts", "params", "flops", "kv"]),
             (["--ratios", "0.2,1.2"], ["[0, 1)"]),
             (["--profile", str(tmp_path / "missing")], ["rankalloc profile"])]
    for extra, expected in cases:
        assert main(["compare", "--out", str(tmp_path / "o"), *extra]) == 1, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        for word in expected:
            assert word in err, (word, err)


def test_compare_sequential_changes_the_fit_not_the_allocation(compared, tmp_path):
    """--sequential N builds each allocation with sequential calibration: the same allocations and parameter
    counts as the plain run, another perplexity, and the setting recorded in compare.json."""
    proc, out, model_dir = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = out.parent
    common = ["--model", str(model_dir), "--text", str(root / "text.txt"), "--ratios", "0.3", "--samples", "8",
              "--seqlen", "64", "--windows", "4", "--device", "cpu"]
    env = {"RANKALLOC_CACHE": str(root / "cache")}
    seq = rankalloc("compare", *common, "--solvers", "uniform,exact", "--methods", "svd", "--kinds", "whitened",
                    "--sequential", "4", "--out", str(tmp_path / "seq"), env=env)
    assert seq.returncode == 0, seq.stderr[-3000:]
    plain, ours = pd.read_csv(out / "compare.csv"), pd.read_csv(tmp_path / "seq" / "compare.csv")
    assert list(ours.removed_linear_params) == pytest.approx(list(plain.removed_linear_params), abs=0)
    assert (ours.ppl != plain.ppl).all()
    assert json.loads((tmp_path / "seq" / "compare.json").read_text())["sequential"] == 4


def test_compare_sequential_fits_on_the_profiles_own_calibration(compared, tmp_path):
    """With --profile, the sequential fit runs on the sequences the profile was calibrated on, whatever --samples or
    --seed say (the figures do not move with --seed), and without --text the profile's own text file is read and
    scored; another --text, or more --sequential sequences than the
    profile has, stop in one line before anything is evaluated or written. A folder holding only the allocations of
    a compare that stopped is compare's own, so the rerun writes there."""
    proc, out, model_dir = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = out.parent
    prof = json.loads((out / "compare.json").read_text())["profile"]
    common = ["--model", str(model_dir), "--profile", prof, "--ratios", "0.3", "--solvers", "uniform", "--methods",
              "svd", "--kinds", "whitened", "--seqlen", "64", "--windows", "4", "--device", "cpu"]
    env = {"RANKALLOC_CACHE": str(root / "cache")}
    text = ["--text", str(root / "text.txt")]
    ppl = []
    for extra in ([*text, "--samples", "8", "--seed", "0"], ["--samples", "12", "--seed", "1"]):  # no --text: P's
        ran = rankalloc("compare", *common, *extra, "--sequential", "4",
                        "--out", str(tmp_path / f"s{len(ppl)}"), env=env)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert "held-out evaluation split of text 'text'" in ran.stdout
        ppl.append(float(pd.read_csv(tmp_path / f"s{len(ppl)}" / "compare.csv").ppl.iloc[0]))
    assert ppl[0] == ppl[1]
    other = write_text_file(tmp_path / "other.txt", n_articles=41)
    for extra, says in ((["--text", str(other), "--sequential", "4"], "not the text the profile"),
                        ([*text, "--samples", "16", "--sequential", "9"], "--sequential: 9 calibration sequences")):
        bad = rankalloc("compare", *common, *extra, "--out", str(tmp_path / "bad"), env=env)
        errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]
        assert bad.returncode == 1 and len(errors) == 1 and says in errors[0] and "Traceback" not in bad.stderr
        assert not (tmp_path / "bad").exists()
    stopped = tmp_path / "stopped"
    (stopped / "allocations").mkdir(parents=True)
    first = next((tmp_path / "s0" / "allocations").glob("*.json"))
    (stopped / "allocations" / first.name).write_bytes(first.read_bytes())
    again = rankalloc("compare", *common, *text, "--sequential", "4", "--out", str(stopped), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    (stopped / "compare.csv").unlink(), (stopped / "compare.json").unlink()
    (stopped / "allocations" / "notes.txt").write_text("mine")
    foreign = rankalloc("compare", *common, *text, "--sequential", "4", "--out", str(stopped), env=env)
    assert foreign.returncode == 1 and "did not write" in foreign.stderr


def test_compare_profiles_the_store_its_methods_need(compared, tmp_path):
    """SSLC, and fisher_svd under --sequential, read the float64 Grams of a full store. Without --profile, compare
    profiles one (cached beside the compact profile, which stays as it was) and runs; a compact profile given with
    --profile is refused in one line naming the profile, the method and --store full, before any allocation."""
    from rankalloc.profiling.store import Profile

    proc, out, model_dir = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = out.parent
    compact = json.loads((out / "compare.json").read_text())["profile"]
    common = ["--model", str(model_dir), "--text", str(root / "text.txt"), "--ratios", "0.3", "--samples", "8",
              "--seqlen", "64", "--windows", "4", "--device", "cpu", "--solvers", "exact", "--kinds", "fisher"]
    env = {"RANKALLOC_CACHE": str(root / "cache")}
    for methods, extra in (("sslc", []), ("fisher_svd", ["--sequential", "4"])):
        ran = rankalloc("compare", *common, "--methods", methods, *extra, "--out", str(tmp_path / methods), env=env)
        assert ran.returncode == 0, ran.stderr[-3000:]
        used = json.loads((tmp_path / methods / "compare.json").read_text())["profile"]
        assert used != compact and Profile.load(used).store_mode == "full", methods
        bad = rankalloc("compare", *common, "--methods", methods, *extra, "--profile", compact,
                        "--out", str(tmp_path / f"bad-{methods}"), env=env)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and compact in errors[0] and repr(methods) in errors[0] and "--store full" in errors[0]
        assert not (tmp_path / f"bad-{methods}" / "allocations").exists()
    assert Profile.load(compact).store_mode == "compact"


def test_compress_sequential_rebuilds_the_calibration_from_the_text(compared, tmp_path):
    """``rankalloc compress --sequential N --text FILE`` rebuilds the profile's calibration sequences, checks them
    by hash, and writes other weights than the plain build with the same parameter count; without --text it reads
    the file the profile recorded, to the same weights. Another text is refused in one line naming --text, and so
    is --text without --sequential."""
    from safetensors.torch import load_file

    proc, out, model_dir = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = out.parent
    prof = json.loads((out / "compare.json").read_text())["profile"]
    alloc = next((out / "allocations").glob("*exact*.json"))
    common = ["compress", "--profile", prof, "--allocation", str(alloc), "--model", str(model_dir), "--method", "svd"]
    plain = rankalloc(*common, "--out", str(tmp_path / "plain"))
    seq = rankalloc(*common, "--sequential", "4", "--text", str(root / "text.txt"), "--out", str(tmp_path / "seq"))
    assert plain.returncode == 0 and seq.returncode == 0, (plain.stderr[-2000:], seq.stderr[-2000:])
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "seq" / "model.safetensors")
    assert a.keys() == b.keys() and sum(v.numel() for v in a.values()) == sum(v.numel() for v in b.values())
    assert any(not (a[k] == b[k]).all() for k in a)
    recorded = rankalloc(*common, "--sequential", "4", "--out", str(tmp_path / "recorded"))  # the profile's own text
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    c = load_file(tmp_path / "recorded" / "model.safetensors")
    assert all((b[k] == c[k]).all() for k in b)
    other = write_text_file(tmp_path / "other.txt", n_articles=41)
    bad = rankalloc(*common, "--sequential", "4", "--text", str(other), "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--text" in bad.stderr and "not the text the profile" in bad.stderr
    lone = rankalloc(*common, "--text", str(other), "--out", str(tmp_path / "lone"))
    assert lone.returncode != 0 and "--text is read only with --sequential" in lone.stderr


def test_settings_read_after_profiling_are_refused_before_it(tmp_path, capsys, monkeypatch):
    """Settings compare reads only after the profile (--grid, --batch-size, --time-limit, --sequential, and
    --sequential with SoLA, which is neither per-matrix nor joined, a --cost a method cannot be priced in and a
    --kinds its curves cannot offer) stop in one line naming the setting before any model is prepared or profiled;
    so do pareto's --grid, --batch-size, --cost and --kind, and SoLA under --sequential in the quality study."""
    from rankalloc.profiling import run as runs
    from rankalloc.studies import study_quality
    from rankalloc.studies.cli import main

    def never(*args, **kwargs):
        raise AssertionError("prepared a model")

    monkeypatch.setattr(runs, "prepare", never)
    cases = [(["--methods", "sola", "--sequential", "4"], ["method 'sola'", "Method.joins"]),
             (["--grid", "0"], ["--grid", ">= 1"]), (["--batch-size", "0"], ["--batch-size", ">= 1"]),
             (["--sequential", "-1"], ["--sequential", ">= 0"]), (["--time-limit", "-1"], ["--time-limit"]),
             (["--sequential", "100", "--samples", "8"], ["--sequential: 100", "--samples is 8"]),
             (["--methods", "svd,sola", "--cost", "kv"], ["method 'sola'", "['params'] only", "'kv'"]),
             (["--methods", "flat", "--cost", "flops"], ["method 'flat'", "['params'] only", "'flops'"]),
             (["--methods", "svd,sslc", "--kinds", "fisher_svd"], ["method 'sslc'", "['fisher'] only", "'fisher_svd'"])]
    for extra, words in cases:
        assert main(["compare", *extra, "--out", str(tmp_path / "o")]) == 1, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), (extra, err)
    for extra, words in ((["--grid", "0"], ["--grid", ">= 1"]), (["--batch-size", "0"], ["--batch-size", ">= 1"]),
                         (["--method", "sola", "--cost", "kv"], ["method 'sola'", "['params'] only", "'kv'"]),
                         (["--method", "sslc", "--kind", "whitened"], ["method 'sslc'", "['fisher'] only"])):
        assert main(["pareto", *extra, "--out", str(tmp_path / "p")]) == 1, extra  # 0 was taken as the default grid
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), (extra, err)
    with pytest.raises(ValueError, match="method 'sola' does not factor one matrix at a time"):
        study_quality.main(["--combo", "sola:fisher_svd:exact", "--sequential", "4", "--out", str(tmp_path / "q")])
    assert not (tmp_path / "o" / "compare.csv").exists() and not (tmp_path / "q").exists()
    assert not (tmp_path / "p" / "pareto.csv").exists()


def test_a_method_refuses_a_model_it_cannot_compress_before_profiling(tmp_path, capsys, monkeypatch):
    """FLAT on a fused q/k/v projection (Phi-3) and SoLA on an ungated FFN (GPT-2) or a fused gate_up (Phi-3) stop
    in one line naming the matrix, once the model is loaded and before it is profiled (compare, pareto); so does
    --cost kv on a model without separate k/v projections. A method that can compress the model runs past that
    point; the library's curve builders refuse the same models. pareto's default kv panel is skipped with a note
    on such a model, and its figures and table are written."""
    import torch

    from conftest import tiny_model
    from rankalloc.decomposers.problems import method_curves
    from rankalloc.profiling import run as runs
    from rankalloc.profiling.flat import flat_curve_set
    from rankalloc.profiling.profile import profile_model
    from rankalloc.profiling.sola import sola_curve_set
    from rankalloc.studies.cli import main

    class Profiled(Exception):
        pass

    def never(*args, **kwargs):
        raise Profiled

    real_profile = runs.profile
    monkeypatch.setattr(runs, "profile", never)
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))  # the pareto run below profiles into it
    text = write_text_file(tmp_path / "text.txt")
    models = {arch: save_tiny_model_dir(tmp_path / arch, arch) for arch in ("phi3", "gpt2")}
    cases = [("phi3", "flat", "'model.layers.0.self_attn.qkv_proj'", "fused 'qkv'"),
             ("phi3", "sola", "'model.layers.0.mlp.gate_up_proj'", "gated FFN"),
             ("gpt2", "sola", "'transformer.h.0.mlp.c_fc'", "gated FFN")]
    common = ["--text", str(text), "--samples", "4", "--seqlen", "32", "--device", "cpu"]
    cases.append(("gpt2", "svd", "--cost kv", "dense kv cost of this model's matrices (kinds ['down', 'o', 'qkv', "
                                              "'up']) is 0"))
    for arch, method, matrix, words in cases:
        cost = ["--cost", "kv"] if matrix == "--cost kv" else []
        for argv in (["compare", "--methods", f"svd,{method}", "--kinds", "fisher_svd", *cost],
                     ["pareto", "--method", method, *cost]):
            assert main([*argv, "--model", str(models[arch]), *common, "--out", str(tmp_path / "o")]) == 1
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if "error" in line.lower()]
            assert len(errors) == 1 and matrix in errors[0] and words in errors[0], (arch, method, argv, err)
            assert "Traceback" not in err
    # svd compresses Phi-3: compare goes on to profile it (and meets the stand-in above)
    assert main(["compare", "--methods", "svd", "--model", str(models["phi3"]), *common, "--out", str(tmp_path / "o")])
    assert "error: Profiled" in capsys.readouterr().err
    monkeypatch.setattr(runs, "profile", real_profile)
    model = tiny_model("gpt2")
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    prof = profile_model(model, ids, out=tmp_path / "p", device="cpu", kinds=("whitened",), progress=False)
    for method, matrix in (("sola", "c_fc"), ("flat", "c_attn")):
        with pytest.raises(ValueError, match=matrix):
            method_curves(prof, method, model, progress=False)
    with pytest.raises(ValueError, match="'transformer.h.0.mlp.c_fc': SoLA splits a gated FFN"):
        sola_curve_set(prof, model)  # the curve builders' own checks, reached without the model's
    with pytest.raises(ValueError, match="'transformer.h.0.attn.c_attn': FLAT-LLM needs separate"):
        flat_curve_set(prof)
    capsys.readouterr()
    assert main(["pareto", "--method", "svd", "--kind", "whitened", "--model", str(models["gpt2"]), *common,
                 "--out", str(tmp_path / "fronts")]) == 0
    err = capsys.readouterr().err
    assert "note: panel kv: the dense kv cost of these matrices is 0" in err
    assert (tmp_path / "fronts" / "pareto.csv").is_file() and len(list((tmp_path / "fronts").glob("*.png"))) == 2


def test_compare_names_a_cached_profile_of_other_calibration_settings(tmp_path, capsys, monkeypatch):
    """`rankalloc profile` caches 128 sequences by default and compare profiles 64: before profiling again,
    compare names the finished profile of the same model and text, and ``--profile`` with it runs without one."""
    from rankalloc.profiling.store import Profile
    from rankalloc.studies.cli import main

    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))
    model, text = save_tiny_model_dir(tmp_path / "model"), write_text_file(tmp_path / "text.txt")
    common = ["--model", str(model), "--text", str(text), "--seqlen", "32", "--device", "cpu"]
    assert main(["profile", *common, "--samples", "8", "--kinds", "whitened"]) == 0
    cached = [p.parent for p in (tmp_path / "cache" / "profiles").glob("*/meta.json")]
    assert len(cached) == 1 and Profile.load(cached[0]).complete
    capsys.readouterr()
    run = ["compare", *common, "--windows", "2", "--ratios", "0.3", "--solvers", "greedy", "--methods", "svd",
           "--kinds", "whitened"]
    assert main([*run, "--samples", "4", "--out", str(tmp_path / "a")]) == 0
    assert f"pass --profile {cached[0]} to use it instead" in capsys.readouterr().err
    assert main([*run, "--profile", str(cached[0]), "--out", str(tmp_path / "b")]) == 0
    assert "to use it instead" not in capsys.readouterr().err
