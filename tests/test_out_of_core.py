"""Out-of-core compression and evaluation: one decoder layer at a time from the checkpoint, equal to in memory.

A tiny Llama saved as a model folder is profiled once (``store="full"``, whitened + fisher). Every method compresses
it in memory (``compress_``) and out of core (``compress_to_folder`` on ``load_model(..., out_of_core=True)``): the
sharded folder loads to a model whose logits equal the in-memory model's bit for bit, no more than one decoder layer
is ever materialized, and the streamed perplexity equals the in-memory one. The CLI runs the whole chain with and
without ``--out-of-core`` and prints the same perplexities.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from conftest import save_tiny_model_dir, tiny_model, tiny_tokenizer, write_text_file
from decomposer_cases import ALL_METHODS, method_case
from rankalloc.decomposers import compress_, load_compressed, save_compressed
from rankalloc.decomposers import streamed
from rankalloc.decomposers.evaluate import perplexity, streamed_perplexity
from rankalloc.decomposers.io import INDEX, MANIFEST, WEIGHTS, open_compressed, read_manifest
from rankalloc.profiling.data import load_model
from rankalloc.profiling.weights import Checkpoint

REL = 1e-12


def _eval_ids(vocab: int, windows: int = 5, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1  # BOS
    return ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, in-memory LoadedModel, full-store profile, evaluation windows) of a tiny Llama."""
    from rankalloc.profiling.profile import profile_model

    root = tmp_path_factory.mktemp("ooc")
    folder = save_tiny_model_dir(root / "model", "llama")
    loaded = load_model(folder, progress=False)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(3, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    prof = profile_model(loaded.model, ids, out=root / "profile", device="cpu", kinds=("whitened", "fisher"),
                         progress=False, store="full")
    return folder, loaded, prof, _eval_ids(vocab)


class _Watch:
    """Counts materialized parameters per part whenever the checkpoint is read or a shard is written."""

    def __init__(self, loaded):
        model = loaded.model
        self.layers = list(streamed.decoder_layers(model)[1])
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.at_write, self.at_read = [], []

    def counts(self):
        return [streamed.materialized(layer) for layer in self.layers], \
            streamed.materialized(self.embed) + streamed.materialized(self.head)

    def install(self, monkeypatch):
        write, read = streamed._write_shard, Checkpoint.read

        def watched_write(folder, name, tensors, weight_map, dtype):
            self.at_write.append((name, *self.counts()))
            return write(folder, name, tensors, weight_map, dtype)

        def watched_read(ck, names, device, dtype, shapes=None):
            self.at_read.append((list(names), *self.counts()))
            return read(ck, names, device, dtype, shapes)

        monkeypatch.setattr(streamed, "_write_shard", watched_write)
        monkeypatch.setattr(Checkpoint, "read", watched_read)


def _same_reports(a, b) -> None:
    assert a.method == b.method and a.config == b.config and a.expected_params == b.expected_params
    assert a.params_after == b.params_after == a.expected_params and a.allocation == b.allocation
    key = lambda r: (r.name, r.choice, r.module, r.params_before, r.params_after, r.fixed_params,  # noqa: E731
                     r.predicted_error)
    assert [key(r) for r in a.components] == [key(r) for r in b.components]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_compress_to_folder_equals_compress_in_memory(setup, tmp_path, monkeypatch, name):
    """For every method: the sharded folder loads (load_compressed) to logits equal to the in-memory compress_
    model's, the reports agree, at most one decoder layer is materialized at any checkpoint read or shard write
    (the embedding and head never while a layer is), and the streamed perplexity of open_compressed equals the
    in-memory perplexity."""
    folder, loaded, prof, ids = setup
    config, allocation = method_case(name, loaded.model, prof)
    dense = copy.deepcopy(loaded.model)
    report = compress_(dense, allocation, config, prof, progress=False)

    ooc = load_model(folder, progress=False, out_of_core=True)
    watch = _Watch(ooc)
    watch.install(monkeypatch)
    out = tmp_path / name
    got = streamed.compress_to_folder(ooc, prof, allocation, name, out, config=config, progress=False)
    monkeypatch.undo()
    _same_reports(report, got)

    n = len(watch.layers)
    # the layers, then the non-layer parts: the embedding and the rest (the tied head is an alias)
    assert [w[0] for w in watch.at_write] == [streamed.SHARD.format(i + 1, n + 2) for i in range(n + 2)]
    for i, (_, layers, big) in enumerate(watch.at_write):
        assert big == 0 and all(c == 0 for j, c in enumerate(layers) if j != i), (i, layers)
        assert i >= n or layers[i] > 0  # layer i's shard is written while it (alone) is resident
    for names, layers, big in watch.at_read:  # every part is read with nothing else resident
        assert sum(layers) == 0 and big == 0, names
    assert all(streamed.materialized(layer) == 0 for layer in watch.layers)

    manifest = read_manifest(out)
    assert manifest["weights"] == INDEX and manifest["format_version"] == 3
    assert set(manifest["checksums"]) == set(manifest["weight_map"].values()) | {INDEX}
    assert json.loads((out / INDEX).read_text())["weight_map"] == manifest["weight_map"]
    assert not (out / WEIGHTS).exists()
    restored = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, dense(ids).logits)

    model, weights = open_compressed(out)
    assert weights.out_of_core and streamed.materialized(streamed.decoder_layers(model)[1]) == 0
    a = perplexity(dense, ids, batch_size=2, progress=False)
    b = streamed_perplexity(model, weights, ids, batch_size=2, progress=False)
    assert b.nll == pytest.approx(a.nll, rel=REL) and b.protocol == a.protocol and b.tokens == a.tokens
    assert all(streamed.materialized(layer) == 0 for layer in streamed.decoder_layers(model)[1])


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_streamed_perplexity_equals_perplexity(tmp_path, arch):
    """Dense models out of core (Llama, Gemma3 with its sliding windows, GPT-2 with learned positions): the
    streamed perplexity equals the in-memory one to 1e-12, with the same protocol string."""
    folder = save_tiny_model_dir(tmp_path / arch, arch)
    mem = load_model(folder, progress=False)
    ooc = load_model(folder, progress=False, out_of_core=True)
    ids = _eval_ids(mem.model.config.vocab_size, windows=5, seqlen=40)
    for bs in (2, 5):
        a = perplexity(mem.model, ids, batch_size=bs, progress=False, source="s")
        b = streamed_perplexity(ooc.model, ooc.weights, ids, batch_size=bs, progress=False, source="s")
        assert b.nll == pytest.approx(a.nll, rel=REL) and b.ppl == pytest.approx(a.ppl, rel=REL)
        assert (b.protocol, b.tokens, b.windows, b.bos, b.nonfinite_tokens) == \
            (a.protocol, a.tokens, a.windows, a.bos, a.nonfinite_tokens)


def test_streamed_perplexity_counts_non_finite_positions(tmp_path):
    """A layer producing Inf/NaN is no error: the positions are counted, as perplexity counts them."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    ooc = load_model(tmp_path / "m", progress=False, out_of_core=True)
    ids = _eval_ids(model.config.vocab_size, windows=3, seqlen=16)
    a = perplexity(model, ids, batch_size=2, progress=False)
    b = streamed_perplexity(ooc.model, ooc.weights, ids, batch_size=2, progress=False)
    assert a.nonfinite_tokens > 0 and b.nonfinite_tokens == a.nonfinite_tokens and b.protocol == a.protocol


def test_open_compressed_reads_the_single_file_form(setup, tmp_path):
    """save_compressed's single file opens out of core too (SSLC: its index buffers are read with their layer and
    put back on meta), and a stale index in the folder is not read."""
    folder, loaded, prof, ids = setup
    config, allocation = method_case("sslc", loaded.model, prof)
    model = copy.deepcopy(loaded.model)
    report = compress_(model, allocation, config, prof, progress=False)
    save_compressed(model, tmp_path / "c", report)
    (tmp_path / "c" / INDEX).write_text(json.dumps({"weight_map": {"nope": "missing.safetensors"}}))
    skeleton, weights = open_compressed(tmp_path / "c")
    buffers = [b for n, b in skeleton.named_buffers() if n.endswith(("sparse_col", "sparse_crow"))]
    assert buffers and all(b.device.type == "meta" for b in buffers)
    a = perplexity(model, ids, batch_size=3, progress=False)
    b = streamed_perplexity(skeleton, weights, ids, batch_size=3, progress=False)
    assert b.nll == pytest.approx(a.nll, rel=REL)
    assert all(b.device.type == "meta" for n, b in skeleton.named_buffers()
               if n.endswith(("sparse_col", "sparse_crow")))
    in_memory, w = open_compressed(tmp_path / "c", out_of_core=False)
    assert not w.out_of_core and perplexity(in_memory, ids, batch_size=3, progress=False).nll == a.nll
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())  # a version-1 manifest (no "weights") reads
    manifest["format_version"] = 1
    del manifest["weights"]
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(manifest))
    assert perplexity(load_compressed(tmp_path / "c"), ids, batch_size=3, progress=False).nll == a.nll


def test_interrupted_compress_to_folder_leaves_the_earlier_output(setup, tmp_path, monkeypatch):
    """A run that dies after layer 0 over a finished earlier run leaves that earlier output as it was (the new one is
    built in a private folder and moved into place only when complete), its checksums verified; into a new folder it
    leaves no compressed.json (nor index): a folder never looks complete when it is not."""
    folder, loaded, prof, _ = setup
    config, allocation = method_case("svd", loaded.model, prof)
    out = tmp_path / "c"
    streamed.compress_to_folder(load_model(folder, progress=False, out_of_core=True), prof, allocation, "svd", out,
                                config=config, progress=False)
    assert (out / MANIFEST).is_file()
    write, calls = streamed._write_shard, []

    def dies_after_layer_0(folder_, name, tensors, weight_map, dtype):
        if calls:
            raise RuntimeError("interrupted")
        calls.append(name)
        return write(folder_, name, tensors, weight_map, dtype)

    before = {f.name: f.read_bytes() for f in out.iterdir()}
    monkeypatch.setattr(streamed, "_write_shard", dies_after_layer_0)
    with pytest.raises(RuntimeError, match="interrupted"):
        streamed.compress_to_folder(load_model(folder, progress=False, out_of_core=True), prof, allocation, "svd",
                                    out, config=config, progress=False)
    assert calls and {f.name: f.read_bytes() for f in out.iterdir()} == before
    load_compressed(out)
    calls.clear()
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="interrupted"):
        streamed.compress_to_folder(load_model(folder, progress=False, out_of_core=True), prof, allocation, "svd",
                                    fresh, config=config, progress=False)
    assert calls and not (fresh / MANIFEST).exists() and not (fresh / INDEX).exists()
    with pytest.raises(FileNotFoundError, match="no compressed.json"):
        load_compressed(fresh)


def test_out_of_core_refusals(setup, tmp_path):
    """compress_to_folder wants an out-of-core model and a folder of its own; a skeleton cannot be evaluated
    without its weights."""
    from types import SimpleNamespace

    from rankalloc.decomposers.evaluate import evaluate

    folder, loaded, prof, ids = setup
    config, allocation = method_case("svd", loaded.model, prof)
    with pytest.raises(ValueError, match="expected an out-of-core model"):
        streamed.compress_to_folder(loaded, prof, allocation, "svd", tmp_path / "c", config=config, progress=False)
    ooc = load_model(folder, progress=False, out_of_core=True)
    with pytest.raises(ValueError, match="is a model folder"):
        streamed.compress_to_folder(ooc, prof, allocation, "svd", folder, config=config, progress=False)
    run = SimpleNamespace(model=None, loaded=SimpleNamespace(out_of_core=False), device="cpu",
                          text=SimpleNamespace(name="t", source_id="s"))
    with pytest.raises(ValueError, match="meta device"):
        evaluate(ooc.model, run, ids=ids, progress=False)


def _numbers(stdout: str) -> dict[str, str]:
    """The printed perplexity per row (dense, compressed) of `rankalloc evaluate`."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^(dense|compressed)\s.*?perplexity ([\d.]+)", stdout, re.M)}


def test_cli_round_trip_out_of_core(tmp_path, monkeypatch, capsys):
    """profile --out-of-core, allocate, compress --out-of-core, evaluate --out-of-core --compressed exit 0 and
    print the same dense and compressed perplexities as the in-memory chain; an in-memory-only step refuses
    --out-of-core with one line."""
    from rankalloc.studies.cli import main

    model = save_tiny_model_dir(tmp_path / "model")
    text = write_text_file(tmp_path / "text.txt")
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))
    common = ["--text", str(text), "--samples", "8", "--seqlen", "64", "--device", "cpu"]
    printed = {}
    for label, flag in (("memory", []), ("ooc", ["--out-of-core"])):
        d = tmp_path / label
        assert main(["profile", "--model", str(model), *common, "--kinds", "whitened", "--out", str(d / "profile"),
                     *flag]) == 0
        assert main(["allocate", "--curves", str(d / "profile"), "--kind", "whitened", "--solver", "exact",
                     "--budget", "0.3", "--out", str(d / "alloc.json"), "--quiet"]) == 0
        assert main(["compress", "--profile", str(d / "profile"), "--allocation", str(d / "alloc.json"),
                     "--method", "svd", "--out", str(d / "compressed"), *flag]) == 0
        capsys.readouterr()
        assert main(["evaluate", "--compressed", str(d / "compressed"), "--text", str(text), "--seqlen", "64",
                     "--windows", "4", "--device", "cpu", *flag]) == 0
        printed[label] = _numbers(capsys.readouterr().out)
    assert set(printed["ooc"]) == {"dense", "compressed"} and printed["ooc"] == printed["memory"]
    assert read_manifest(tmp_path / "ooc" / "compressed")["weights"] == INDEX

    bad = tmp_path / "sola.json"
    bad.write_text(json.dumps({"method": "sola", "kind": "whitened", "choices": {}, "budget": {"params": 1.0}}))
    capsys.readouterr()
    assert main(["compress", "--profile", str(tmp_path / "ooc" / "profile"), "--allocation", str(bad),
                 "--method", "sola", "--out", str(tmp_path / "sola"), "--out-of-core"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out-of-core" in err and "in memory" in err


def test_compare_out_of_core_equals_in_memory(tmp_path, monkeypatch):
    """`rankalloc compare --out-of-core` compresses each allocation one layer at a time into a temporary folder and
    scores it one layer at a time: the same table (perplexities, removed fractions) as in memory."""
    import pandas as pd

    from rankalloc.studies.cli import main

    model = save_tiny_model_dir(tmp_path / "model")
    text = write_text_file(tmp_path / "text.txt")
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(model), "--text", str(text), "--samples", "8", "--seqlen", "64", "--device", "cpu",
              "--methods", "svd,fisher_svd", "--kinds", "fisher_svd", "--solvers", "uniform,exact", "--ratios", "0.3",
              "--windows", "3"]
    frames = {}
    for label, flag in (("memory", []), ("ooc", ["--out-of-core"])):
        assert main(["compare", *common, "--out", str(tmp_path / label), *flag]) == 0
        frames[label] = pd.read_csv(tmp_path / label / "compare.csv")
    cols = ["method", "solver", "ppl", "removed_linear_params", "removed_model_params", "predicted_objective"]
    pd.testing.assert_frame_equal(frames["ooc"][cols], frames["memory"][cols], rtol=1e-9)


def test_curves_that_read_weights_build_out_of_core(setup):
    """SoLA's marginal curves and SSLC's (rank, sparsity) table read each weight from the checkpoint when the model
    is an out-of-core skeleton: the same tables as in memory, with the skeleton's layers still on meta. A meta
    model with no checkpoint behind it is refused naming the weight."""
    import pandas as pd
    import transformers

    from rankalloc.profiling.probe import model_weight
    from rankalloc.profiling.sola import sola_curve_set
    from rankalloc.profiling.sslc_table import sslc_curve_set
    from rankalloc.profiling.weights import skeleton

    folder, loaded, prof, _ = setup
    ooc = load_model(folder, progress=False, out_of_core=True)
    for build in (lambda m: sola_curve_set(prof, m, 0.15).curve_set,
                  lambda m: sslc_curve_set(prof, m, ranks=(0, 4, 8), progress=False)):
        want, got = build(loaded.model), build(ooc.model)
        pd.testing.assert_frame_equal(got.to_frame(), want.to_frame(), rtol=1e-12)
    assert all(p.device.type == "meta" for p in ooc.model.model.layers.parameters())
    bare = skeleton(transformers.AutoConfig.from_pretrained(folder), torch.float32)
    with pytest.raises(ValueError, match=r"weight of model\.layers\.0\.mlp\.up_proj: on the meta device"):
        model_weight(bare, "model.layers.0.mlp.up_proj")
