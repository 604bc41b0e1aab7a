# A run: one model, one text split and the calibration settings, and the cached profile they key.
"""``prepare`` loads a model and a text; ``profile`` profiles them once into a cached directory.

::

    import rankalloc
    run = rankalloc.prepare()              # default SmolLM2-135M + gensim Wikipedia text
    prof = rankalloc.profile(run)          # cached profile store

The cache key of a profile is the model fingerprint (config, tokenizer, weight checksum), the text fingerprint,
the sample count, the sequence length and the seed; a profile is never reused for another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PROFILE_KINDS = ("whitened", "energy", "relative", "epsilon", "fisher", "probe")
"""Curve kinds ``profile_model`` computes (``fisher`` also yields ``fisher_svd``)."""

DEFAULT_KINDS = ("whitened", "energy", "relative", "epsilon", "fisher")


@dataclass(frozen=True)
class Run:
    """A loaded model plus its text split and the calibration/evaluation settings."""

    loaded: object          # profiling.data.LoadedModel
    text: object            # profiling.text.TextSplit
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval_seqlen: int = 512
    eval_windows: int = 60
    device: str = "auto"

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def _positive(what: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what}: expected an integer >= {least}, received {value!r}")


def prepare(model: str | None = None, text=None, *, samples: int = 128, seqlen: int = 512, seed: int = 0,
            eval_seqlen: int | None = None, eval_windows: int = 60, device: str = "auto",
            progress: bool = True, out_of_core: bool = False) -> Run:
    """Load the model (default SmolLM2-135M-Instruct) and the text (default gensim Wikipedia).

    ``eval_seqlen`` defaults to ``seqlen``. Nothing is tokenized yet. ``out_of_core``: read one part of the model at
    a time from its safetensors files (:func:`rankalloc.profiling.data.load_model`).
    """
    from rankalloc.profiling.data import load_model
    from rankalloc.profiling.text import load_text

    eval_seqlen = seqlen if eval_seqlen is None else eval_seqlen
    for what, value, least in (("samples", samples, 1), ("seqlen", seqlen, 2), ("eval_seqlen", eval_seqlen, 2),
                               ("eval_windows", eval_windows, 1)):
        _positive(what, value, least)
    return Run(load_model(model, progress=progress, out_of_core=out_of_core), load_text(text, progress=progress),
               samples, seqlen, seed, eval_seqlen, eval_windows, device)


def profile_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds to ask ``profile_model`` for so that ``kinds`` are in the profile (``fisher_svd`` comes with
    ``fisher``; ``whitened`` is always there)."""
    need = {"whitened"}
    for k in kinds:
        k = "fisher" if k == "fisher_svd" else k
        if k not in PROFILE_KINDS:
            raise ValueError(f"curve kind {k!r}: expected some of {list(PROFILE_KINDS) + ['fisher_svd']}")
        need.add(k)
    return tuple(k for k in PROFILE_KINDS if k in need)


def profile_dir(run: Run, root: str | Path | None = None) -> Path:
    """The cached profile directory of ``run``: keyed by model fingerprint, text, samples, seqlen and seed.

    Every curve kind of the run lives there: the spectral kinds are always stored, and loss-aware kinds
    (``fisher``, ``probe``) are added to the same directory when first asked for.
    """
    from rankalloc.profiling.data import cache_dir
    from rankalloc.profiling.store import FORMAT
    from rankalloc.profiling.text import text_fingerprint

    key = json.dumps({"format": FORMAT, "model": run.loaded.fingerprint, "text": text_fingerprint(run.text), "samples": run.samples,
                      "seqlen": run.seqlen, "seed": run.seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = Path(root) if root is not None else cache_dir() / "profiles"
    return base / f"{Path(str(run.loaded.model_id)).name}-{run.samples}x{run.seqlen}-{digest}"


def profile(run: Run, kinds: Sequence[str] = DEFAULT_KINDS, out: str | Path | None = None, *,
            batch_size: int | None = None, resume: bool = True, progress: bool = True,
            fisher_samples: int | None = None, store: str = "compact"):
    """Profile ``run`` into ``out`` (default :func:`profile_dir`), or open the finished profile there.

    An interrupted run resumes from its first unfinished layer when called again with the same arguments;
    loss-aware kinds missing from a finished profile are added to it. ``batch_size`` (sequences per forward
    pass) defaults to the existing profile's, else 8. ``fisher_samples``: Fisher output-gradient Grams on the
    first N calibration sequences only (default all).
    """
    from rankalloc.profiling.profile import profile_model
    from rankalloc.profiling.store import Profile

    want = profile_kinds(kinds)
    path = Path(out) if out is not None else profile_dir(run)
    if resume and (path / "meta.json").exists():
        prof = Profile.load(path)
        if prof.meta.get("fingerprint") != run.loaded.fingerprint:
            raise ValueError(f"{path} holds a profile of another model (fingerprint {prof.meta.get('fingerprint')}, "
                             f"this model {run.loaded.fingerprint}); use another --out directory")
        if prof.complete and all(k in prof.kinds for k in want):
            return prof
        if batch_size is None:
            batch_size = prof.meta.get("settings", {}).get("batch_size")
    return profile_model(run.model, run.text, out=path, tokenizer=run.tokenizer, n_samples=run.samples,
                         seqlen=run.seqlen, seed=run.seed, device=run.device, kinds=want,
                         model_id=str(run.loaded.model_id), fingerprint=run.loaded.fingerprint,
                         batch_size=batch_size or 8, resume=resume, progress=progress,
                         fisher_samples=fisher_samples, store=store, weights=run.loaded.weights)


def linear_params(prof) -> int:
    """Dense parameter count of every profiled linear matrix (the base of "removed")."""
    return int(sum(c.m * c.n for c in prof.components))


def evaluation_ids(run: Run):
    """The evaluation windows of ``run`` (``(W, eval_seqlen)`` LongTensor)."""
    from rankalloc.profiling.text import evaluation_ids as windows

    return windows(run.tokenizer, run.text, run.eval_seqlen, run.eval_windows)


def profiled_model(prof, model: str | None = None) -> str | None:
    """The ``--model`` that loads the model ``prof`` was made from: ``model`` when given, else the folder or hub id
    recorded in the profile (None for the default SmolLM2)."""
    if model is not None:
        return model
    from rankalloc.profiling.data import SMOLLM2_ID

    recorded = prof.meta.get("model_id")
    if not recorded or recorded == SMOLLM2_ID:
        return None
    return recorded


def check_same_model(loaded, prof) -> None:
    """``ValueError`` unless ``loaded`` (a LoadedModel) is the model ``prof`` was profiled from."""
    want = prof.meta.get("fingerprint")
    if want is not None and loaded.fingerprint != want:
        raise ValueError(f"the model {loaded.model_id!r} (fingerprint {loaded.fingerprint}) is not the model the "
                         f"profile at {prof.path} was made from ({prof.meta.get('model_id')!r}, fingerprint {want}); "
                         f"pass that model with --model")
