"""The fault suite: what a new user can do wrong, and what rankalloc does about it, through the real command line.

One test per class of fault (README, "What it guarantees"): outputs, stale results, baselines, integrity, inputs,
one-line errors, leftovers and locks. Each runs ``rankalloc`` (``studies.cli.main``, the console script's entry
point) on tiny random-weight models, and holds the rule that every failure is one line on stderr, naming the file,
matrix, layer or setting at fault, with exit code 1 -- never a traceback, never a silent wrong result.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_model_dir, write_text_file

CALIBRATION = ("--samples", "8", "--seqlen", "64", "--device", "cpu")


def cli(capsys, *args) -> tuple[int, str, str]:
    """``rankalloc ARGS`` in this process: (exit code, stdout, stderr)."""
    from rankalloc.studies.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(result, command: str, *needles: str) -> str:
    """The run failed with exit 1 and one error line (the last line of stderr, after any progress bars) naming
    every needle; no traceback."""
    rc, _, err = result
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"rankalloc {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def ok(result) -> str:
    rc, out, err = result
    assert rc == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama folder, a text file, a finished profile (whitened kinds) and two allocations (30%, 50%)."""
    root = tmp_path_factory.mktemp("faults")
    os.environ.setdefault("RANKALLOC_CACHE", str(root / "cache"))
    model = save_tiny_model_dir(root / "model")
    text = write_text_file(root / "text.txt")
    from rankalloc.studies.cli import main

    prof = root / "profile"
    assert main(["profile", "--model", str(model), "--text", str(text), *CALIBRATION, "--kinds", "whitened",
                 "--out", str(prof)]) == 0
    allocs = {}
    for budget in ("0.3", "0.5"):
        allocs[budget] = root / f"alloc{budget}.json"
        assert main(["allocate", "--curves", str(prof), "--kind", "whitened", "--solver", "exact", "--budget",
                     budget, "--out", str(allocs[budget]), "--quiet"]) == 0
    return {"root": root, "model": model, "text": text, "profile": prof, "alloc": allocs}


def compress(capsys, world, out, budget="0.3", *extra):
    return cli(capsys, "compress", "--profile", world["profile"], "--allocation", world["alloc"][budget],
               "--method", "svd", "--out", out, *extra)


def evaluate(capsys, world, compressed, *extra):
    return cli(capsys, "evaluate", "--compressed", compressed, "--text", world["text"], "--seqlen", "64",
               "--windows", "2", "--device", "cpu", *extra)


def variant(world, name: str, edit) -> Path:
    """A copy of the tiny model folder whose state dict ``edit(state)`` changed (tensors by name)."""
    from safetensors.torch import load_file, save_file

    folder = world["root"] / name
    shutil.copytree(world["model"], folder)
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def replace_bytes(path: Path, data: bytes) -> None:
    """Give ``path`` new contents as a new file (a new inode, as a damaged copy would be)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def flip_byte(path: Path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    replace_bytes(path, bytes(data))


# ----------------------------------------------------------------------------- 1. outputs
def test_outputs_never_overwrite_what_rankalloc_did_not_write(world, capsys, monkeypatch):
    """compress --out at the dense model's folder, at a folder of someone else's files, allocate --out at a file
    that is no allocation, profile --out at a non-empty folder: each refused, nothing touched. --overwrite writes into
    a foreign folder (its files stay). Rewriting an earlier output is atomic: a run killed while it writes leaves the
    earlier output whole and readable, and a folder whose weights and manifest come from two runs is refused."""
    root = world["root"]
    weights = (world["model"] / "model.safetensors").read_bytes()
    error_line(compress(capsys, world, world["model"]), "compress", str(world["model"]), "model folder")
    assert (world["model"] / "model.safetensors").read_bytes() == weights
    error_line(compress(capsys, world, world["profile"]), "compress", str(world["profile"]))

    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    error_line(compress(capsys, world, foreign), "compress", str(foreign), "--overwrite")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    ok(compress(capsys, world, foreign, "0.3", "--overwrite"))
    assert (foreign / "notes.txt").read_text() == "keep me" and (foreign / "compressed.json").is_file()

    error_line(cli(capsys, "allocate", "--curves", world["profile"], "--kind", "whitened", "--budget", "0.3",
                   "--out", foreign / "notes.txt"), "allocate", "notes.txt", "not an allocation JSON")
    assert (foreign / "notes.txt").read_text() == "keep me"
    error_line(cli(capsys, "profile", "--model", world["model"], "--text", world["text"], *CALIBRATION, "--kinds",
                   "whitened", "--out", foreign), "profile", str(foreign), "--overwrite")

    out = root / "c"
    ok(compress(capsys, world, out, "0.3"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import safetensors.torch

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    assert compress(capsys, world, out, "0.5")[0] == 130
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier output, whole
    assert "perplexity" in ok(evaluate(capsys, world, out))

    other = root / "c50"
    ok(compress(capsys, world, other, "0.5"))
    mixed = root / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(other / "model.safetensors", mixed / "model.safetensors")  # one run's weights, another's manifest
    error_line(evaluate(capsys, world, mixed), "evaluate", str(mixed / "model.safetensors"), "compressed.json")


# ----------------------------------------------------------------------------- 2. stale results
def test_a_profile_is_reused_only_with_its_own_settings(world, capsys, monkeypatch):
    """Rerunning profile on a finished profile with another --text, --samples, --seqlen, --seed, --batch-size,
    --fisher-samples or --fisher-labels is an error naming that option and --restart (an unfinished one too); asking for a curve kind it
    lacks adds it; --restart profiles again with the new settings."""
    root = world["root"]
    prof = root / "stale"
    shutil.copytree(world["profile"], prof)
    base = ["profile", "--model", world["model"], "--text", world["text"], "--device", "cpu", "--kinds", "whitened",
            "--out", prof]
    other_text = write_text_file(root / "other.txt", n_articles=30)
    for change, option in ((["--samples", "4", "--seqlen", "64"], "--samples"),
                           (["--samples", "8", "--seqlen", "32"], "--seqlen"),
                           (["--samples", "8", "--seqlen", "64", "--seed", "1"], "--seed"),
                           (["--samples", "8", "--seqlen", "64", "--batch-size", "2"], "--batch-size"),
                           (["--samples", "8", "--seqlen", "64", "--fisher-samples", "2"], "--fisher-samples"),
                           (["--samples", "8", "--seqlen", "64", "--fisher-labels", "sampled"], "--fisher-labels")):
        error_line(cli(capsys, *base, *change), "profile", option, "--restart", str(prof))
    args = [a if a != world["text"] else other_text for a in base]
    error_line(cli(capsys, *args, "--samples", "8", "--seqlen", "64"), "profile", "--text", "--restart")
    ok(cli(capsys, *base, "--samples", "8", "--seqlen", "64"))  # the same settings: reused
    more = [a if a != "whitened" else "whitened,fisher" for a in base]
    out = ok(cli(capsys, *more, "--samples", "8", "--seqlen", "64"))
    assert "fisher" in out.split("curve kinds:")[1]

    import rankalloc.profiling.stream as stream

    real = stream.layer_results

    def interrupted(p, stats):
        if stats.layer == 1:
            raise KeyboardInterrupt
        return real(p, stats)

    cut = root / "cut"
    monkeypatch.setattr(stream, "layer_results", interrupted)
    assert cli(capsys, *base[:-1], cut, "--samples", "8", "--seqlen", "64")[0] == 130
    monkeypatch.undo()
    error_line(cli(capsys, *base[:-1], cut, "--samples", "8", "--seqlen", "64", "--seed", "3"), "profile", "--seed",
               "--restart")
    ok(cli(capsys, *base[:-1], cut, "--samples", "8", "--seqlen", "64", "--seed", "3", "--restart"))
    assert json.loads((cut / "meta.json").read_text())["seed"] == 3


# ----------------------------------------------------------------------------- 3. baselines
def test_evaluate_scores_the_baseline_of_the_model_it_was_built_from(world, capsys):
    """evaluate --compressed C --model OTHER is refused naming both fingerprints (no ratio against another model's
    baseline); without --model the recorded dense model is scored beside it."""
    out = world["root"] / "base"
    ok(compress(capsys, world, out))
    other = save_tiny_model_dir(world["root"] / "other-model", seed=3)
    line = error_line(evaluate(capsys, world, out, "--model", other), "evaluate", str(other), "fingerprint",
                      "was built from")
    fingerprint = json.loads((out / "compressed.json").read_text())["profile"]["fingerprint"]
    assert fingerprint in line
    assert "x the dense perplexity" in ok(evaluate(capsys, world, out))


# ----------------------------------------------------------------------------- 4. integrity
def test_everything_read_back_is_verified(world, capsys):
    """A curves.csv cut at a row boundary, flipped bytes in a stored Gram, a Gram that matches a fresh checksum but
    is not symmetric, flipped bytes in a compressed model's weights, and an allocation JSON changed after it was
    written: each refused, naming the file."""
    from rankalloc.profiling import files

    root = world["root"]
    cut = root / "cut-curves"
    shutil.copytree(world["profile"], cut)
    lines = (cut / "curves.csv").read_text().splitlines(keepends=True)
    replace_bytes(cut / "curves.csv", "".join(lines[: len(lines) // 2]).encode())  # whole matrices missing
    error_line(cli(capsys, "allocate", "--curves", cut, "--kind", "whitened", "--budget", "0.3"), "allocate",
               str(cut / "curves.csv"))

    full = root / "full"
    ok(cli(capsys, "profile", "--model", world["model"], "--text", world["text"], *CALIBRATION, "--kinds",
           "whitened", "--store", "full", "--out", full))
    gram = full / "grams" / "layer_000.safetensors"
    pristine = gram.read_bytes()
    flip_byte(gram)
    error_line(compress(capsys, world | {"profile": full}, root / "cf"), "compress", str(gram), "sha256")

    from safetensors.numpy import load_file, save_file

    replace_bytes(gram, pristine)
    choices = json.loads(world["alloc"]["0.3"].read_text())["choices"]
    grams = load_file(str(gram))
    key = next(k for k in grams if choices.get(k, "dense") != "dense")  # a matrix the allocation factorizes
    grams[key][0, 1] += 1.0  # a valid file, recorded as such, holding no Gram
    save_file(grams, str(gram))
    files.record(full, gram, files.contents_of(grams))
    error_line(compress(capsys, world | {"profile": full}, root / "cf"), "compress", str(gram), "not symmetric")

    out = root / "verified"
    ok(compress(capsys, world, out))
    flip_byte(out / "model.safetensors")
    error_line(evaluate(capsys, world, out), "evaluate", str(out / "model.safetensors"), "damaged")

    edited = root / "edited.json"
    data = json.loads(world["alloc"]["0.3"].read_text())
    name, rank = next((n, v) for n, v in data["choices"].items() if v != "dense")
    data["choices"][name] = 1 if rank == 0 else rank - 1  # a valid rank, but not the one written
    edited.write_text(json.dumps(data))
    error_line(compress(capsys, world | {"alloc": {"0.3": edited}}, root / "ce"), "compress", str(edited),
               "sha256")


# ----------------------------------------------------------------------------- 5. inputs
def test_bad_inputs_are_refused_naming_what_is_wrong(world, capsys, tmp_path):
    """A checkpoint missing a tensor (in memory and out of core), truncated or garbage weights, a config that does
    not match the weights, a folder without tokenizer files (in memory and out of core) or without weights, --seqlen past the model's context (Llama and GPT-2), a rank of 2.5 or -1 in a curves CSV,
    --batch-size 0 and --fisher-samples 0, a --device torch does not know, and a cost model whose cost falls as the
    rank grows: each refused."""
    root = world["root"]
    job = ["--text", world["text"], *CALIBRATION, "--kinds", "whitened"]
    tensor = "model.layers.0.self_attn.o_proj.weight"
    missing = variant(world, "missing-tensor", lambda s: s.pop(tensor))
    for flag in ([], ["--out-of-core"]):
        error_line(cli(capsys, "profile", "--model", missing, *job, "--out", tmp_path / "p", *flag), "profile",
                   tensor, "random")
    truncated = variant(world, "truncated", lambda s: None)
    weights = truncated / "model.safetensors"
    replace_bytes(weights, weights.read_bytes()[:-1000])
    error_line(cli(capsys, "profile", "--model", truncated, *job, "--out", tmp_path / "p"), "profile", str(weights),
               "truncated")
    garbage = variant(world, "garbage", lambda s: None)
    replace_bytes(garbage / "model.safetensors", b"not a safetensors file at all" * 20)
    error_line(cli(capsys, "profile", "--model", garbage, *job, "--out", tmp_path / "p"), "profile",
               str(garbage / "model.safetensors"))
    mismatch = variant(world, "mismatch", lambda s: None)
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    error_line(cli(capsys, "profile", "--model", mismatch, *job, "--out", tmp_path / "p"), "profile", "mlp",
               "config")

    no_tokenizer = variant(world, "no-tokenizer", lambda s: None)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    for flag in ([], ["--out-of-core"]):
        error_line(cli(capsys, "profile", "--model", no_tokenizer, *job, "--out", tmp_path / "p", *flag), "profile",
                   str(no_tokenizer), "tokenizer could not be loaded", "config.json")
    no_weights = variant(world, "no-weights", lambda s: None)
    (no_weights / "model.safetensors").unlink()
    error_line(cli(capsys, "profile", "--model", no_weights, *job, "--out", tmp_path / "p"), "profile",
               str(no_weights), "has no weights")

    error_line(cli(capsys, "profile", "--model", world["model"], "--text", world["text"], "--samples", "4",
                   "--seqlen", "300", "--kinds", "whitened", "--out", tmp_path / "p"), "profile", "--seqlen 300",
               "256")
    gpt2 = save_tiny_model_dir(root / "gpt2", arch="gpt2")
    error_line(cli(capsys, "evaluate", "--model", gpt2, "--text", world["text"], "--seqlen", "300", "--windows", "2"),
               "evaluate", "--seqlen 300", "256")

    for bad in ("2.5", "-1"):
        csv = tmp_path / f"rank{bad}.csv"
        csv.write_text("component,m,n,rank,error\na,8,8,0,4.0\na,8,8,2,1.0\n"
                       f"b,8,8,0,3.0\nb,8,8,{bad},1.0\n")
        error_line(cli(capsys, "allocate", "--curves", csv, "--budget", "0.3"), "allocate", str(csv), "row 5",
                   repr(bad))
    for option in ("--batch-size", "--fisher-samples"):
        error_line(cli(capsys, "profile", "--model", world["model"], *job, "--out", world["profile"], option, "0"),
                   "profile", option)
    error_line(cli(capsys, "compare", "--model", world["model"], "--text", world["text"], "--windows", "0",
                   "--out", tmp_path / "c"), "compare", "eval_windows (--windows)", ">= 1")
    for command in ("profile", "evaluate"):  # a device string torch does not know: one line, not "a bug"
        error_line(cli(capsys, command, "--model", world["model"], "--text", world["text"], "--device", "gpu",
                       *(["--out", tmp_path / "p"] if command == "profile" else [])),
                   command, "device: 'gpu' is not a device")

    plugin = tmp_path / "falling.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "import numpy as np\n"
        "from rankalloc.allocators.registry import register_cost_model\n"
        "@register_cost_model('falling')\n@dataclass(frozen=True)\nclass Falling:\n"
        "    name: str = 'falling'\n    unit: str = 'units'\n"
        "    def cost(self, component, ranks, sparsity):\n"
        "        r = np.asarray(ranks, dtype=float)\n"
        "        return np.where(r < 0, 2.0 * component.m * component.n, component.m * component.n / (1.0 + abs(r)))\n"
        "    def dense(self, component):\n        return 2.0 * component.m * component.n\n")
    error_line(cli(capsys, "allocate", "--plugin", plugin, "--curves", world["profile"], "--kind", "whitened",
                   "--budget", "0.3", "--cost", "falling"), "allocate", "falling")


# ----------------------------------------------------------------------------- 6. one-line errors
def test_every_failure_is_one_line_naming_its_cause(world, capsys, tmp_path, monkeypatch):
    """A hand-edited over-budget allocation is blamed on the file, not the solver; text that is not UTF-8, an
    allocation that is not JSON and a curves file that is not a CSV are named; a zero input Gram (v_proj all zero), a
    zero output-gradient Gram (o_proj all zero) and an activation overflow are each diagnosed as what they are; an
    unexpected exception is still one line, with its type."""
    root = world["root"]
    data = {k: v for k, v in json.loads(world["alloc"]["0.3"].read_text()).items() if k != "sha256"}
    data["choices"] = {n: "dense" for n in data["choices"]}  # edited by hand, unsealed: over the budget
    over = tmp_path / "over.json"
    over.write_text(json.dumps(data))
    line = error_line(compress(capsys, world | {"alloc": {"0.3": over}}, tmp_path / "c"), "compress", str(over),
                      "budget")
    assert "solver" not in line and "optimal" not in line

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\xe9 society.\n\nAnother article.".encode("latin-1"))
    error_line(cli(capsys, "profile", "--model", world["model"], "--text", latin, *CALIBRATION, "--out",
                   tmp_path / "p"), "profile", str(latin), "UTF-8")
    broken = tmp_path / "broken.json"
    broken.write_text(world["alloc"]["0.3"].read_text()[:-40])
    error_line(compress(capsys, world | {"alloc": {"0.3": broken}}, tmp_path / "c"), "compress", str(broken),
               "JSON")
    binary = tmp_path / "curves.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\x00\x81")
    error_line(cli(capsys, "allocate", "--curves", binary, "--budget", "0.3"), "allocate", str(binary))

    job = ["--text", world["text"], *CALIBRATION]
    zero_v = variant(world, "zero-v", lambda s: s["model.layers.0.self_attn.v_proj.weight"].zero_())
    line = error_line(cli(capsys, "profile", "--model", zero_v, *job, "--kinds", "whitened", "--out", tmp_path / "a"),
                      "profile", "model.layers.0.self_attn.o_proj", "exactly zero", "v_proj before o_proj")
    assert "more text" not in line and "calibration text" not in line
    zero_o = variant(world, "zero-o", lambda s: s["model.layers.1.self_attn.o_proj.weight"].zero_())
    error_line(cli(capsys, "profile", "--model", zero_o, *job, "--kinds", "whitened,fisher", "--out", tmp_path / "b"),
               "profile", "output-gradient Gram of model.layers.1.self_attn", "loss gradient", "o_proj")
    big = variant(world, "overflow", lambda s: s["model.embed_tokens.weight"].mul_(1e25))
    error_line(cli(capsys, "profile", "--model", big, *job, "--kinds", "whitened", "--out", tmp_path / "d"),
               "profile", "decoder layer 0", "overflow")

    import rankalloc.allocators.exact as exact

    def bug(self, problem):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(exact.Exact, "solve", bug)
    error_line(cli(capsys, "allocate", "--curves", world["profile"], "--kind", "whitened", "--budget", "0.3"),
               "allocate", "TypeError", "bug")


# ----------------------------------------------------------------------------- 7. leftovers and locks
def test_no_leftovers_and_one_run_per_output(world, capsys):
    """allocate --out at a folder leaves no DIR.tmp; a killed writer's temporaries are removed by the next run; a
    second run into a folder another live run holds is refused naming its pid and host; a dead run's lock is taken
    over with a note."""
    from rankalloc.profiling.files import LOCK

    root = world["root"]
    folder = root / "a-folder"
    folder.mkdir()
    error_line(cli(capsys, "allocate", "--curves", world["profile"], "--kind", "whitened", "--budget", "0.3",
                   "--out", folder), "allocate", str(folder), "is a folder")
    assert not (root / "a-folder.tmp").exists() and not list(folder.iterdir())

    prof = root / "leftovers"
    shutil.copytree(world["profile"], prof)
    litter = [prof / "roots" / ".layer_000.safetensors.tmp99999999", prof / ".meta.json.tmp99999999"]
    for f in litter:
        f.write_bytes(b"\0" * 4096)
    (prof / ".building-99999999").mkdir()
    job = ["profile", "--model", world["model"], "--text", world["text"], *CALIBRATION, "--kinds", "whitened"]
    ok(cli(capsys, *job, "--out", prof))
    assert not any(f.exists() for f in litter) and not (prof / ".building-99999999").exists()
    assert not (prof / LOCK).exists()

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2025-01-01 00:00:00",
                "command": "rankalloc profile --out x"}
        (prof / LOCK).write_text(json.dumps(lock))
        error_line(cli(capsys, *job, "--out", prof), "profile", f"pid {holder.pid}", socket.gethostname(),
                   "in use")
        out = root / "locked-c"
        out.mkdir()
        (out / LOCK).write_text(json.dumps(lock))
        error_line(compress(capsys, world, out), "compress", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = cli(capsys, *job, "--out", prof)  # the holder is gone: its lock is stale
    assert rc == 0 and "took over the lock" in err and f"pid {holder.pid}" in err, err[-2000:]
    assert not (prof / LOCK).exists()
