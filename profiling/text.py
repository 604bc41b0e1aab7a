"""Calibration and evaluation text: the default corpora, users' own text, one split rule, token windows.

Sources (all go through the same path, ``load_text``):
- ``"wiki"`` (the default): 106 real English Wikipedia articles from a dump excerpt shipped as test data
  in the PyPI wheel ``gensim==4.4.0`` (CC BY-SA), with the wiki markup stripped by ``strip_wiki_markup``.
- ``"news"``: 299 news articles, one per line, from ``lee_background.cor`` in the same wheel.
- a path to a plain UTF-8 text file: articles are blocks separated by blank lines. A file with no
  blank line at all is read as one article per non-empty line (the ``lee_background.cor`` format).
- a list of strings: each string is one article.

The wheel is fetched with ``pip download --no-deps`` (gensim is never installed or imported) and the
cleaned corpus is cached as JSON lines under ``cache_dir()/text``.

Split rule (the same for every source, reproducible from the code alone):
1. Articles are stripped of surrounding whitespace; empty ones are an error.
2. An article goes to evaluation iff ``int(sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100 < 15``
   (about 15% held out), otherwise to calibration. Identical articles land on the same side by
   construction, so no evaluation text is ever in calibration. Order within each side is source order.
3. Guards, when there are at least two distinct articles: if evaluation came out empty, the text with
   the smallest sha256 moves there (with all its copies); if calibration came out empty, the text with
   the largest sha256 moves there.
4. A source with a single distinct text is split by character position: calibration is the text before
   the last whitespace at or before 85% of its length, evaluation the text after it (each once per copy).

Token windows (``calibration_ids``, ``evaluation_ids``): the articles of one side are joined with
``"\\n\\n"`` and tokenized once without special tokens. Each window is the tokenizer's BOS id (when it
has one) followed by ``seqlen - 1`` consecutive text tokens (``seqlen`` text tokens when there is no
BOS); windows are non-overlapping chunks of the token stream and a trailing partial chunk is dropped.
Calibration takes the first ``n_samples`` chunks of a ``torch.randperm`` permutation seeded with
``seed`` (default 0); evaluation takes the first ``max_windows`` chunks in text order.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from rankalloc.profiling.data import cache_dir, fetch_wheel, read_archive_member
from rankalloc.profiling.wikitext import strip_wiki_markup, wiki_articles

GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
CORPORA = {"wiki": WIKI_MEMBER, "news": NEWS_MEMBER}
CLEANER_VERSION = 1  # bump whenever strip_wiki_markup changes, so cached corpora are rebuilt

EVAL_PERCENT = 15
CHAR_SPLIT = 0.85
SPLIT_RULE = (
    f"article -> evaluation iff int(sha256(utf8 text)[:8], 16) % 100 < {EVAL_PERCENT}, else calibration; "
    "if one side is empty (>= 2 distinct texts) the smallest-sha256 text moves to evaluation / the largest "
    f"to calibration; a single distinct text is split at the last whitespace before {CHAR_SPLIT:.0%} of its characters"
)


@dataclass(frozen=True)
class TextSplit:
    """Disjoint calibration and evaluation articles of one text source, and the rule that split them."""

    name: str
    source_id: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    rule: str
    path: str = field(default="", compare=False)  # the file it was read from (resolved); "" for a corpus or a list

    def __post_init__(self):
        for side in ("calibration", "evaluation"):
            arts = getattr(self, side)
            if not isinstance(arts, tuple) or not all(isinstance(a, str) for a in arts):
                raise ValueError(f"TextSplit {self.name!r}: {side} must be a tuple of str, got {type(arts).__name__}")
            if not arts:
                raise ValueError(f"TextSplit {self.name!r}: {side} has no articles")
        shared = set(self.calibration) & set(self.evaluation)
        if shared:
            raise ValueError(f"TextSplit {self.name!r}: {len(shared)} article(s) are in both calibration and "
                             f"evaluation, e.g. {next(iter(shared))[:60]!r}")


# ----------------------------------------------------------------------------------------------------
# Wiki markup stripping

def _corpus_path(corpus: str) -> Path:
    key = hashlib.sha256(f"{GENSIM_REQUIREMENT}|{CORPORA[corpus]}|{CLEANER_VERSION}".encode()).hexdigest()[:12]
    return cache_dir() / "text" / f"{corpus}-{key}.jsonl"


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prepare_corpus(corpus: str, progress: bool) -> list[str]:
    wheel = fetch_wheel(GENSIM_REQUIREMENT, cache_dir() / "wheels", progress=progress)
    raw = read_archive_member(wheel, CORPORA[corpus])
    if corpus == "wiki":
        from tqdm.auto import tqdm

        pages = wiki_articles(io.BytesIO(bz2.decompress(raw)))
        articles = [strip_wiki_markup(text, title) for title, text in
                    tqdm(pages, desc="cleaning Wikipedia articles", unit=" article", disable=not progress)]
    else:
        articles = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    articles = [a for a in articles if a.strip()]
    _write_jsonl(_corpus_path(corpus), ({"text": a} for a in articles))
    return articles


def corpus_articles(corpus: str = "wiki", progress: bool = True) -> list[str]:
    """The cleaned articles of a default corpus (``wiki`` or ``news``), prepared once into the cache."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}: expected one of {sorted(CORPORA)}")
    path = _corpus_path(corpus)
    if path.exists():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]
    return _prepare_corpus(corpus, progress)


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Articles of a UTF-8 text file: blocks separated by blank lines; without any blank line, one per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}: "
                         f"{exc.object[exc.start:exc.start + 4]!r}); convert it to UTF-8 (e.g. iconv -t UTF-8)") from None
    if not text:
        raise ValueError(f"text file {str(path)!r} is empty")
    blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text)]
    if len(blocks) == 1:
        blocks = [line.strip() for line in text.split("\n")]
    return [b for b in blocks if b]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _char_split(text: str) -> tuple[str, str]:
    cut = int(len(text) * CHAR_SPLIT)
    left = max(text.rfind(" ", 0, cut + 1), text.rfind("\n", 0, cut + 1))
    if left <= 0:
        m = re.search(r"\s", text[cut:])
        left = cut + m.start() if m else cut
    head, tail = text[:left].strip(), text[left:].strip()
    if not head or not tail:
        raise ValueError(f"a single article of {len(text)} characters is too short to split into calibration "
                         "and evaluation text; give at least two articles or a longer one")
    return head, tail


def split_articles(articles: Sequence[str], name: str, source_id: str) -> TextSplit:
    """Apply the module's split rule (see the module docstring) to ``articles``."""
    if isinstance(articles, str):
        raise ValueError("articles must be a list of strings, got one str (wrap it in a list)")
    arts = []
    for i, a in enumerate(articles):
        if not isinstance(a, str):
            raise ValueError(f"article {i} of {name!r} must be a str, got {type(a).__name__}")
        if not a.strip():
            raise ValueError(f"article {i} of {name!r} is empty or whitespace only")
        arts.append(a.strip())
    if not arts:
        raise ValueError(f"text source {name!r} has no articles")
    digests = {a: _digest(a) for a in arts}
    if len(digests) == 1:
        head, tail = _char_split(arts[0])
        return TextSplit(name, source_id, (head,) * len(arts), (tail,) * len(arts), SPLIT_RULE)
    held = {a for a, d in digests.items() if int(d[:8], 16) % 100 < EVAL_PERCENT}
    if not held:
        held = {min(digests, key=digests.get)}
    elif len(held) == len(digests):
        held.discard(max(digests, key=digests.get))
    calibration = tuple(a for a in arts if a not in held)
    evaluation = tuple(a for a in arts if a in held)
    return TextSplit(name, source_id, calibration, evaluation, SPLIT_RULE)


def default_text(corpus: str = "wiki", progress: bool = True) -> TextSplit:
    """The split of a default corpus: ``wiki`` (gensim's Wikipedia excerpt) or ``news`` (Lee corpus)."""
    articles = corpus_articles(corpus, progress)
    source_id = f"{GENSIM_REQUIREMENT}:{CORPORA[corpus].rsplit('/', 1)[-1]}:cleaner{CLEANER_VERSION}"
    return split_articles(articles, corpus, source_id)


def load_text(source: str | os.PathLike | Sequence[str] | None = None, progress: bool = True) -> TextSplit:
    """A ``TextSplit`` from None (default wiki), a corpus name, a text file path, or a list of articles."""
    if source is None:
        return default_text("wiki", progress)
    if isinstance(source, str) and source in CORPORA:
        return default_text(source, progress)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"text source {str(source)!r} is neither a corpus name {sorted(CORPORA)} "
                             "nor an existing text file")
        arts = read_text_file(path)
        digest = _digest("\n\n".join(arts))[:12]
        split = split_articles(arts, path.stem, f"file:{path.name}:{digest}")
        return dataclasses.replace(split, path=str(path.resolve()))
    if isinstance(source, (list, tuple)):
        return split_articles(source, "list", f"list:{len(source)} articles")
    raise ValueError(f"text source must be None, a corpus name, a file path or a list of str; "
                     f"got {type(source).__name__}")


def corpus_of(source_id: str) -> str | None:
    """The default corpus name (``wiki``, ``news``) a recorded ``source_id`` is of, or None for other text."""
    for corpus, member in CORPORA.items():
        if source_id.startswith(f"{GENSIM_REQUIREMENT}:{member.rsplit('/', 1)[-1]}:"):
            return corpus
    return None


def text_fingerprint(split: TextSplit) -> str:
    """Short sha256 of the split rule and both sides' text (identifies the calibration/evaluation data)."""
    h = hashlib.sha256()
    h.update(split.rule.encode("utf-8"))
    for side in (split.calibration, split.evaluation):
        h.update(b"\x00side")
        for art in side:
            h.update(b"\x00" + art.encode("utf-8"))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Token windows

def _windows(tokenizer, articles: tuple[str, ...], seqlen: int) -> tuple[torch.Tensor, int, int]:
    """Non-overlapping windows (n_chunks, seqlen) of BOS + text tokens, and the text token count."""
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an int >= 2, got {seqlen!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    step = seqlen - 1 if bos is not None else seqlen
    ids = tokenizer("\n\n".join(articles), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    n_chunks = ids.numel() // step
    chunks = ids[: n_chunks * step].view(n_chunks, step)
    if bos is not None:
        chunks = torch.cat([torch.full((n_chunks, 1), bos, dtype=torch.long), chunks], dim=1)
    return chunks, ids.numel(), step


def calibration_ids(tokenizer, split: TextSplit, n_samples: int = 128, seqlen: int = 512,
                    seed: int = 0) -> torch.LongTensor:
    """``(n_samples, seqlen)`` calibration windows: BOS + ``seqlen-1`` text tokens, chosen by a seeded
    permutation of the non-overlapping chunks of the calibration text."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    chunks, n_tokens, step = _windows(tokenizer, split.calibration, seqlen)
    if chunks.shape[0] < n_samples:
        bos = " (BOS + text)" if step < seqlen else ""
        raise ValueError(f"need {n_samples * step} text tokens for n_samples (--samples) {n_samples} sequences of "
                         f"seqlen (--seqlen) {seqlen} tokens{bos}, the calibration text has {n_tokens} (text "
                         f"{split.name!r}); lower --samples or --seqlen, or give more text")
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(seed))
    return chunks[order[:n_samples]].contiguous()


def evaluation_ids(tokenizer, split: TextSplit, seqlen: int = 512, max_windows: int | None = 60) -> torch.LongTensor:
    """``(W, seqlen)`` evaluation windows in text order, W = min(max_windows, available chunks); each is
    BOS + ``seqlen-1`` text tokens (no overlap, no context carried between windows)."""
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")
    chunks, n_tokens, step = _windows(tokenizer, split.evaluation, seqlen)
    if chunks.shape[0] == 0:
        raise ValueError(f"need {step} text tokens for one evaluation window of {seqlen} tokens, "
                         f"the evaluation text has {n_tokens} (text {split.name!r})")
    return chunks[:max_windows].contiguous()
