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

import contextlib
import hashlib
import json
import sys
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


def at_least(what: str, value, least: int) -> None:
    """``ValueError`` naming ``what`` (a setting or option) unless ``value`` is an integer >= ``least``; None (not
    given) is accepted. Commands call it for the counts they read only after profiling, so those are refused
    before it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
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
    for what, value, least in (("samples (--samples)", samples, 1), ("seqlen (--seqlen)", seqlen, 2),
                               ("eval_seqlen (--eval-seqlen)", eval_seqlen, 2),
                               ("eval_windows (--windows)", eval_windows, 1)):
        at_least(what, value, least)  # named as the library and the commands both call them
    from rankalloc.profiling.profile import resolve_device

    resolve_device(device)  # a device this machine lacks stops here, before the model is loaded
    loaded = load_model(model, progress=progress, out_of_core=out_of_core)
    for option, value in (("--seqlen", seqlen), ("--eval-seqlen", eval_seqlen)):
        check_context(loaded, value, option)
    return Run(loaded, load_text(text, progress=progress), samples, seqlen, seed, eval_seqlen, eval_windows, device)


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(config) -> tuple[int, str] | None:
    """``(positions, config key)``: how many positions a model was trained on (``max_position_embeddings``, GPT-2's
    ``n_positions`` ...), or None when its config does not say."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_context(loaded, seqlen: int, option: str = "--seqlen") -> None:
    """``ValueError`` naming ``option`` when ``seqlen`` tokens exceed the model's context: positions past the
    trained range give meaningless statistics (rotary models) or no embedding at all (GPT-2, OPT)."""
    ctx = model_context(getattr(loaded.model, "config", None))
    if ctx is not None and seqlen > ctx[0]:
        raise ValueError(f"{option} {seqlen}: longer than the context of the model {loaded.model_id!r}, {ctx[0]} "
                         f"positions (its config's {ctx[1]}); use {option} {ctx[0]} or less")


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


def profile_dir(run: Run, root: str | Path | None = None, store: str = "compact") -> Path:
    """The cached profile directory of ``run``: keyed by model fingerprint, text, samples, seqlen and seed, and by
    the store when it is not the default ``compact`` (so a ``full`` profile, which SSLC and sequential calibration
    need, is cached beside the compact one instead of clashing with it).

    Every curve kind of the run lives there: the spectral kinds are always stored, and loss-aware kinds
    (``fisher``, ``probe``) are added to the same directory when first asked for.
    """
    from rankalloc.profiling.data import cache_dir
    from rankalloc.profiling.store import FORMAT
    from rankalloc.profiling.text import text_fingerprint

    fields = {"format": FORMAT, "model": run.loaded.fingerprint, "text": text_fingerprint(run.text),
              "samples": run.samples, "seqlen": run.seqlen, "seed": run.seed}
    if store != "compact":
        fields["store"] = store
    key = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = Path(root) if root is not None else cache_dir() / "profiles"
    return base / f"{Path(str(run.loaded.model_id)).name}-{run.samples}x{run.seqlen}-{digest}"


def profile(run: Run, kinds: Sequence[str] = DEFAULT_KINDS, out: str | Path | None = None, *,
            batch_size: int | None = None, resume: bool = True, progress: bool = True,
            fisher_samples: int | None = None, store: str | None = None, overwrite: bool = False,
            fisher_labels: str | None = None):
    """Profile ``run`` into ``out`` (default :func:`profile_dir`), or open the finished profile there.

    An interrupted run resumes from its first unfinished layer when called again with the same arguments;
    loss-aware kinds missing from a finished profile are added to it. Reusing a profile, finished or not, needs the
    same model, text, samples, seqlen, seed, batch size, store and Fisher samples: a difference is a ``ValueError``
    naming the option (``--restart``, i.e. ``resume=False``, discards the profile instead). ``batch_size``
    (sequences per forward pass) and ``store`` default to the existing profile's, else 8 and ``"compact"``.
    ``fisher_samples``: Fisher output-gradient Grams on the first N calibration sequences only (default all).
    ``fisher_labels``: ``"data"`` or ``"sampled"`` (:data:`~rankalloc.profiling.calibration.FISHER_LABELS`; default
    the existing profile's, else ``"data"``).
    ``out`` must be new, empty or a profile (``overwrite``: any folder; its other files are left alone). The run
    holds the folder's lock (:func:`~rankalloc.profiling.files.folder_lock`): a second run into it is refused,
    naming the first.
    """
    from rankalloc.profiling import distributed, files
    from rankalloc.profiling.profile import profile_model
    from rankalloc.profiling.store import STORES, Profile

    want = profile_kinds(kinds)
    for option, value in (("--batch-size", batch_size), ("--fisher-samples", fisher_samples)):
        at_least(option, value, 1)
    if store is not None and store not in STORES:
        raise ValueError(f"--store: expected one of {list(STORES)}, received {store!r}")
    path = Path(out) if out is not None else profile_dir(run, store=store or "compact")
    distributed.on_main(lambda: files.check_output_folder(path, "--out", ours=(path / "meta.json").exists(),
                                                          overwrite=overwrite), "checking the output folder")
    with files.folder_lock(path) if distributed.is_main() else contextlib.nullcontext():
        if resume and (path / "meta.json").exists():
            prof = Profile.load(path)
            settings = prof.meta.get("settings", {})
            batch_size = settings.get("batch_size") if batch_size is None else batch_size
            store = settings.get("store") if store is None else store
            fisher_labels = settings.get("fisher_labels", "data") if fisher_labels is None else fisher_labels
            check_reuse(prof, run, batch_size, fisher_samples, store, fisher_labels)
            if prof.complete and all(k in prof.kinds for k in want):
                return prof
        elif out is None and progress and distributed.is_main():
            for other in cached_elsewhere(run, store or "compact"):
                print(f"rankalloc: note: profiling {run.samples} x {run.seqlen} calibration tokens (seed {run.seed}); "
                      f"a finished profile of this model and text with other calibration settings is cached at "
                      f"{other}: pass --profile {other} to use it instead", file=sys.stderr, flush=True)
        return profile_model(run.model, run.text, out=path, tokenizer=run.tokenizer, n_samples=run.samples,
                             seqlen=run.seqlen, seed=run.seed, device=run.device, kinds=want,
                             model_id=str(run.loaded.model_id), fingerprint=run.loaded.fingerprint,
                             batch_size=batch_size or 8, resume=resume, progress=progress,
                             fisher_samples=fisher_samples, store=store or "compact", weights=run.loaded.weights,
                             fisher_labels=fisher_labels or "data")


def source_key(run: Run) -> str:
    """The text identity a profile records as ``source_id``: the text's name and its fingerprint."""
    from rankalloc.profiling.text import text_fingerprint

    return f"{run.text.source_id}@{text_fingerprint(run.text)}"


def cached_elsewhere(run: Run, store: str = "compact") -> list[Path]:
    """Finished profiles in the cache of ``run``'s model and text, in a store that serves ``store``, but with
    other calibration settings (samples, seqlen or seed): what a command about to profile ``run`` could reuse
    with ``--profile`` (``rankalloc profile`` takes 128 sequences by default, ``compare`` 64)."""
    from rankalloc.profiling.data import cache_dir
    from rankalloc.profiling.store import Profile

    root = cache_dir() / "profiles"
    source = source_key(run)
    found = []
    for meta in sorted(root.glob("*/meta.json")) if root.is_dir() else ():
        try:
            prof = Profile.load(meta.parent)
        except (OSError, ValueError):
            continue  # a damaged or foreign folder is not a suggestion
        m = prof.meta
        serves = store == "compact" or m.get("settings", {}).get("store") == "full"
        if (prof.complete and serves and m.get("fingerprint") == run.loaded.fingerprint
                and m.get("source_id") == source
                and (m.get("n_samples"), m.get("seqlen"), m.get("seed")) != (run.samples, run.seqlen, run.seed)):
            found.append(meta.parent)
    return found


def check_reuse(prof, run: Run, batch_size: int | None, fisher_samples: int | None, store: str | None,
                fisher_labels: str | None = None) -> None:
    """``ValueError`` naming each option in which ``run`` (and the given settings) differ from the existing profile
    ``prof``: ``--model``, ``--text``, ``--samples``, ``--seqlen``, ``--seed``, ``--batch-size``, ``--store``,
    ``--fisher-samples``, ``--fisher-labels``; the curve kinds may differ (missing ones are added)."""
    from rankalloc.profiling.store import mismatch_error, setting_differences

    if prof.meta.get("fingerprint") != run.loaded.fingerprint:
        raise ValueError(f"{prof.path} holds a profile of another model ({prof.meta.get('model_id')!r}, fingerprint "
                         f"{prof.meta.get('fingerprint')}; this --model {run.loaded.model_id!r} has fingerprint "
                         f"{run.loaded.fingerprint}); use another --out directory, or --restart to discard it")
    now = {"source_id": source_key(run), "n_samples": run.samples,
           "seqlen": run.seqlen, "seed": run.seed}
    old_settings = prof.meta.get("settings", {})
    new_settings = {"batch_size": batch_size or 8, "store": store or "compact", "fisher_samples": fisher_samples,
                    "fisher_labels": None if fisher_labels in (None, "data") else fisher_labels}
    diff = setting_differences(prof.meta, now, fields=tuple(now))
    diff += setting_differences({"settings": {k: old_settings.get(k) for k in new_settings}},
                                {"settings": new_settings}, fields=("settings",))
    if diff:
        raise mismatch_error(prof.path, diff)


def linear_params(prof) -> int:
    """Dense parameter count of every profiled linear matrix (the base of "removed")."""
    return int(sum(c.m * c.n for c in prof.components))


def calibration_ids(run: Run):
    """The calibration sequences of ``run`` (``(samples, seqlen)`` LongTensor), the ones its profile is measured on."""
    from rankalloc.profiling.text import calibration_ids as sequences

    return sequences(run.tokenizer, run.text, n_samples=run.samples, seqlen=run.seqlen, seed=run.seed)


def recorded_text(identity: dict, where: str, use: str) -> str | None:
    """The ``--text`` a profile was calibrated on, from what it or its outputs record (``source_id``, ``text_path``):
    a corpus name (None for the default ``wiki``) or the text file. ``ValueError`` starting with ``where`` and ending
    with ``pass --text FILE {use}`` when it cannot be found again (text given as ids or strings, a file that moved,
    a record written before the path was kept). Whether the file still holds that text is checked by the caller."""
    from rankalloc.profiling.text import corpus_of

    source = str(identity.get("source_id", ""))
    corpus = corpus_of(source)
    if corpus is not None:
        return None if corpus == "wiki" else corpus
    path = identity.get("text_path")
    said = f"{where}: calibrated on text {source.split('@')[0] or 'not recorded'}"
    if not path:
        raise ValueError(f"{said}, whose file is not recorded; pass --text FILE {use}")
    if not Path(path).is_file():
        raise ValueError(f"{said}, read from {path}, which is no longer there; pass --text FILE {use}")
    return path


def check_recorded_text(run: Run, identity: dict, where: str) -> None:
    """``ValueError`` starting with ``where`` when ``run``'s text, read from what ``identity`` recorded
    (:func:`recorded_text`), has changed since the profile was calibrated on it: its held-out split is no longer the
    one kept out of calibration."""
    want = identity.get("source_id")
    now = source_key(run)
    if want is not None and now != want:
        raise ValueError(f"{where}: its calibration text {run.text.path or run.text.name} has changed since it was "
                         f"profiled ({want.split('@')[0]}, now {now.split('@')[0]}); pass --text to score another text")


def profile_calibration_ids(prof, tokenizer, text):
    """The calibration sequences ``prof`` was measured on, rebuilt from ``text`` (a ``TextSplit``) with the profile's
    own sample count, length and seed, and checked against its calibration hash: ``ValueError`` naming the text
    when it is not the one the profile was calibrated on (a fit on other sequences would not match its Grams)."""
    from rankalloc.profiling.probe import check_calibration_ids
    from rankalloc.profiling.text import calibration_ids as sequences

    meta = prof.meta
    ids = sequences(tokenizer, text, n_samples=int(meta["n_samples"]), seqlen=int(meta["seqlen"]),
                    seed=int(meta.get("seed", 0)))
    try:
        check_calibration_ids(prof, ids)
    except ValueError:
        raise ValueError(f"--text {text.path or text.name}: not the text the profile at {prof.path} was calibrated "
                         f"on ({str(meta.get('source_id')).split('@')[0]}); pass that text") from None
    return ids


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


def profiled_text(prof, text=None):
    """The ``--text`` of a command given ``prof``: ``text`` when given, else the text the profile was calibrated on
    (:func:`recorded_text`), so its held-out split is what gets scored, as when the command profiles itself."""
    if text is not None:
        return text
    return recorded_text(prof.meta, f"--profile {prof.path}", "(its held-out split is scored), or --text wiki")


def store_for(methods, sequential: bool = False) -> tuple[str, list[str]]:
    """``(store, why)``: the profile store that serves every method in ``methods`` (registered names), ``"full"``
    when one of them needs it (:meth:`~rankalloc.decomposers.registry.Method.profile_store`), with the names that
    do."""
    from rankalloc.decomposers.registry import get_method

    why = [m for m in methods if get_method(m).profile_store(sequential) == "full"]
    return ("full" if why else "compact"), why


def check_fit(methods, model) -> None:
    """One-line ``ValueError`` when a method in ``methods`` (registered names) cannot compress ``model``'s
    structure (:meth:`~rankalloc.decomposers.registry.Method.check_model`): called on the prepared model before it
    is profiled, so FLAT on a fused q/k/v or SoLA on an ungated FFN stops at once, not after the profile."""
    from rankalloc.decomposers.registry import get_method

    for m in methods:
        get_method(m).check_model(model)


def check_priced(model, cost: str) -> None:
    """One-line ``ValueError`` when the cost model ``cost`` gives ``model``'s linear matrices a dense cost of 0 (kv
    on a model with fused q/k/v projections), so no fraction of it could be removed: on the prepared model, before
    it is profiled."""
    from rankalloc.allocators.registry import get_cost_model
    from rankalloc.profiling.architectures import find_structure

    components = find_structure(model).components
    if sum(get_cost_model(cost)().dense(c) for c in components) <= 0:
        kinds = sorted({c.kind for c in components})
        raise ValueError(f"--cost {cost}: the dense {cost} cost of this model's matrices (kinds {kinds}) is 0, so no "
                         f"fraction of it can be removed (kv prices separate k and v projections)")


def check_store(prof, store: str, why: Sequence[str]) -> None:
    """One-line ``ValueError`` when ``store`` is ``"full"`` and the given profile ``prof`` is compact, naming the
    profile and the methods that need the full store (``why``, from :func:`store_for`), before anything is
    allocated or compressed."""
    if store == "full" and prof.store_mode != "full":
        raise ValueError(f"--profile {prof.path} is a compact profile, and method {store_reasons(why)} needs the full "
                         f"store (the float64 Grams); profile with `rankalloc profile --store full --out DIR` and pass "
                         f"that DIR")


def store_reasons(why: Sequence[str]) -> str:
    """The methods of :func:`store_for`'s ``why`` as an error names them: ``'sslc'``, or ``'fisher_svd' with
    --sequential`` for one that needs the full store only under sequential calibration."""
    from rankalloc.decomposers.registry import get_method

    return ", ".join(f"{m!r}{' with --sequential' if get_method(m).profile_store() != 'full' else ''}" for m in why)


def check_same_model(loaded, prof) -> None:
    """``ValueError`` unless ``loaded`` (a LoadedModel) is the model ``prof`` was profiled from."""
    want = prof.meta.get("fingerprint")
    if want is not None and loaded.fingerprint != want:
        raise ValueError(f"the model {loaded.model_id!r} (fingerprint {loaded.fingerprint}) is not the model the "
                         f"profile at {prof.path} was made from ({prof.meta.get('model_id')!r}, fingerprint {want}); "
                         f"pass that model with --model")
