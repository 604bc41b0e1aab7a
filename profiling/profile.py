# Profiling entry point: SVD-LLM whitening (Wang et al., 2024, Sec. 3.1) statistics and curves, layer by layer.
"""``profile_model``: a model plus calibration token ids in, a profile directory out.

The passes (:mod:`~rankalloc.profiling.stream`) keep one decoder layer resident at a time, in memory or read from
the checkpoint (:mod:`~rankalloc.profiling.weights`): the forward gathers each layer's float64 input Grams, value
covariance and layer score, and right after each layer its spectra, curves and Cholesky roots are written
(:mod:`~rankalloc.profiling.store`). ``fisher`` adds the chunked head and the layer-streamed backward.

Resume: the store marks a layer finished only after its files are in place. A rerun with the same cache key
recomputes the inputs of the first unfinished layer by re-running the finished layers (no statistics; the same
batches and kernels on the same device give bit-identical inputs), then carries on. An interrupted backward
restarts from the top (its layer inputs are recomputed). Timings in the meta cover the work each run did.

Several processes (``torchrun``; :mod:`~rankalloc.profiling.distributed`): every rank receives the whole calibration
set (the meta describes all of it) and streams its own slice; rank 0 alone creates, resumes, writes and clears the
profile directory, and decides the finished layers, which every rank then reruns without statistics to rebuild its
boundaries, as one process does. The stored layer inputs are per rank (``scratch/rank_<r>``). A resumed run may use
another number of processes.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rankalloc.profiling import distributed
from rankalloc.profiling.architectures import ModulePatterns, find_structure, weight_of
from rankalloc.profiling.backward import Boundaries
from rankalloc.profiling.calibration import StreamConfig
from rankalloc.profiling.fisher import loss_token_count
from rankalloc.profiling.numerics import Damping, check_finite
from rankalloc.profiling.spectra import BASE_KINDS, SpectrumConfig
from rankalloc.profiling.store import KEY_FIELDS, STORES, Profile
from rankalloc.profiling.stream import (Pass, _capture, _fisher_rows, _flush, backward_pass, fisher_rows, forward_pass,
                                        head_gradients, scratch_folder)
from rankalloc.profiling.weights import Weights

LOSS_KINDS = {
    "fisher": ("rankalloc.profiling.stream", "backward_pass"),  # the layer-streamed backward (gives fisher_svd too)
    "fisher_svd": ("rankalloc.profiling.stream", "backward_pass"),
    "probe": ("rankalloc.profiling.probe", "add_probe_curves"),
}
"""Curve kinds computed after the forward streaming: kind -> (module, function). ``probe`` is imported lazily."""

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given to ``torch.device``. A string that names
    no device, or a CUDA device this machine does not have, is a one-line ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return dev


def calibration_hash(ids: torch.Tensor) -> str:
    """Short sha256 of the token ids (shape and values)."""
    a = np.ascontiguousarray(ids.detach().cpu().numpy().astype(np.int64))
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Short hash of the config and a checksum of every parameter (sum plus an evenly strided sample)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{float(flat.double().sum())!r}".encode())
        h.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(model, tokenizer, weights=None) -> str:
    """``data.model_fingerprint`` (config + tokenizer + weights, as ``load_model`` records) when a tokenizer
    is given, else :func:`model_fingerprint` (config + weights)."""
    if tokenizer is not None:
        from rankalloc.profiling.data import model_fingerprint as with_tokenizer

        return with_tokenizer(model, tokenizer, weights)
    if weights is not None and weights.out_of_core:
        raise ValueError("profile_model: an out-of-core model needs tokenizer= or fingerprint= (its weights are not in "
                         "memory to be checksummed); load it with rankalloc.profiling.data.load_model(out_of_core=True)")
    return model_fingerprint(model)


def resolve_calibration(calibration, tokenizer, n_samples, seqlen, seed) -> tuple[torch.Tensor, str, str]:
    """Token ids ``(n_samples, seqlen)``, a text source id and the text file read ("" for ids, a corpus or strings)
    from ids, a ``TextSplit``, a path or strings."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise ValueError(f"calibration ids: expected a 2-D LongTensor (n_samples, seqlen >= 2), received shape "
                             f"{tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration ids: expected an integer (long) tensor, received dtype {ids.dtype}")
        for what, want, got in (("n_samples", n_samples, ids.shape[0]), ("seqlen", seqlen, ids.shape[1])):
            if want is not None and want != got:
                raise ValueError(f"calibration ids: {what}={want} requested but the ids tensor has {got}")
        return ids.long().cpu(), "token-ids", ""
    if tokenizer is None:
        raise ValueError(f"calibration: a {type(calibration).__name__} is text; pass tokenizer= to tokenize it, "
                         f"or pass a LongTensor of token ids (n_samples, seqlen)")
    text = importlib.import_module("rankalloc.profiling.text")
    split = calibration if isinstance(calibration, text.TextSplit) else text.load_text(calibration)
    ids = text.calibration_ids(tokenizer, split, n_samples=n_samples or DEFAULT_SAMPLES,
                               seqlen=seqlen or DEFAULT_SEQLEN, seed=seed)
    return ids, f"{split.source_id}@{text.text_fingerprint(split)}", split.path


def _settings(stream: StreamConfig, spec: SpectrumConfig, patterns, store: str) -> dict:
    d = spec.damping
    return {"batch_size": stream.batch_size, "gram_dtype": stream.gram_dtype, "spectrum": spec.method,
            "damping": {"damp": d.damp, "retries": d.retries, "growth": d.growth},
            "patterns": (patterns or ModulePatterns()).to_dict(), "store": store}


def _loss_kind(kind: str):
    module, fn = LOSS_KINDS[kind]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise ValueError(f"curve kind {kind!r} needs {module}.{fn}, and {module} is not available in this "
                             f"installation; profile without {kind!r}") from None
        raise
    if not hasattr(mod, fn):
        raise ValueError(f"curve kind {kind!r} needs {module}.{fn}, which {module} does not define")
    return getattr(mod, fn)


def default_gram_budget(weights: Weights, structure) -> float:
    """Bytes of output-gradient Grams accumulated in one backward pass: half the largest resident part (a decoder
    layer, the embedding or the head, in the working dtype), at least 256 MB."""
    return max(largest_block_bytes(weights.model, structure) / 2, 2.0 ** 28)


def largest_block_bytes(model, structure) -> int:
    """The largest of one decoder layer, the embedding and the head, in bytes of the working dtype."""
    def size(m):
        return sum(p.numel() * p.element_size() for p in m.parameters()) if m is not None else 0
    parts = [structure.layers[0]] + [getattr(model, f, lambda: None)() for f in ("get_input_embeddings",
                                                                                 "get_output_embeddings")]
    return max(size(m) for m in parts)


def _fisher(p: Pass, calls, last, as_tuple, boundaries, fisher_samples, gram_budget, extras) -> None:
    """The chunked head, the layer-streamed backward, and the fisher kinds written (see ``profiling.stream``)."""
    rows, sequences = fisher_rows(p, fisher_samples)
    fids, n_loss = p.ids[:rows], loss_token_count(p.ids[:1]) * sequences
    if 0 < rows < p.ids.shape[0] and rows % p.stream.batch_size:
        calls = _capture(p, fids).calls  # the last Fisher batch is shorter: its own masks
    if distributed.world() > 1:  # the backward reads the roots and layer files rank 0 wrote in the forward
        distributed.barrier("the forward pass finished")
        distributed.require_shared([p.profile._layer_file(sub, l, ext) for l in range(p.structure.num_layers)
                                    for sub, ext in (("layers", "npz"), ("roots", "safetensors"))],
                                   "the forward pass's layer files")
    grads, _ = head_gradients(p, last, fids, as_tuple) if rows else ([], 0.0)
    curves = backward_pass(p, boundaries, calls, grads, n_loss, gram_budget, extras)
    if distributed.is_main():
        p.profile.meta["fisher_loss_tokens"] = n_loss
        p.profile.meta["fisher_samples"] = sequences
        p.profile._write_meta()
        for kind in ("fisher", "fisher_svd"):
            p.profile.write_kind(kind, curves[kind])
    boundaries.remove()
    if distributed.world() > 1:
        distributed.barrier("removing the stored layer inputs")
        if distributed.is_main():  # every rank's folder, and any a run with another process count left
            shutil.rmtree(boundaries.folder.parent, ignore_errors=True)


def _passes(p: Pass, wanted, fisher_samples, gram_budget, extras) -> None:
    todo = {l for l in range(p.structure.num_layers) if l not in set(p.profile.finished_layers)}
    fisher = "fisher" in wanted and "fisher" not in p.profile.kinds
    if todo or fisher:
        rows, _ = fisher_rows(p, fisher_samples)
        boundaries = Boundaries(scratch_folder(p.profile.path)) if fisher else None
        t0 = time.perf_counter()
        last, calls, as_tuple = forward_pass(p, boundaries, rows, todo)
        p.add("forward_pass", time.perf_counter() - t0)
        if distributed.is_main() and not (p.profile.path / "curves.csv").exists():
            p.profile._write_curves()
        if fisher:
            t0 = time.perf_counter()
            _fisher(p, calls, _fisher_rows(last, rows), as_tuple, boundaries, fisher_samples, gram_budget, extras)
            p.add("fisher", time.perf_counter() - t0)
        _flush(p)


def profile_model(model, calibration, *, out, tokenizer=None, n_samples: int | None = None,
                  seqlen: int | None = None, seed: int = 0, device="auto", kinds=BASE_KINDS,
                  gamma: float = 0.15, patterns: ModulePatterns | None = None, batch_size: int = 8,
                  resume: bool = True, progress: bool = True, model_id: str | None = None,
                  fingerprint: str | None = None, gram_dtype: str = "float64", spectrum: str = "auto",
                  damping: Damping = Damping(), store: str = "compact", fisher_samples: int | None = None,
                  weights: Weights | None = None, gram_budget: float | None = None,
                  extras: tuple[str, ...] = ("sola", "flat"), fisher_labels: str = "data") -> Profile:
    """Profile ``model`` on calibration tokens and write the profile directory ``out``.

    Args:
        model: a Hugging Face causal LM (any family :func:`~rankalloc.profiling.architectures.find_structure`
            recognises, or one described by ``patterns``), in memory or as an out-of-core skeleton whose
            ``weights`` (:class:`~rankalloc.profiling.weights.Weights`) read it from its checkpoint. Each decoder
            layer visits ``device`` in turn; one is resident at a time.
        calibration: a LongTensor ``(n_samples, seqlen)`` of token ids, or text (a ``TextSplit``, a path to a
            text file, a list of strings) tokenized with ``tokenizer`` (default 128 x 512).
        out: the profile directory. An unfinished run with the same cache key resumes there; another key raises
            ``ValueError`` (``resume=False`` overwrites instead).
        kinds: curve kinds wanted. The four spectral kinds are always stored; ``fisher`` (which also gives
            ``fisher_svd``) runs the chunked head and the layer-streamed backward; ``probe`` is measured after.
        store: ``"compact"`` (float32 input roots and Fisher bases, no larger than the model) or ``"full"`` (every
            float64 Gram too); see :mod:`~rankalloc.profiling.store`.
        fisher_samples: the Fisher Grams on the first N calibration sequences only (default all).
        gram_budget: bytes of output-gradient Grams per backward pass (default :func:`default_gram_budget`).
        extras: method curves computed in the backward while the output Grams exist: ``sola`` (marginal FFN
            parts at ``gamma``) and ``flat`` (value heads).
        fisher_labels: the labels the Fisher backward differentiates, ``"data"`` (the empirical Fisher) or
            ``"sampled"`` (drawn from the model; :data:`~rankalloc.profiling.calibration.FISHER_LABELS`).
        gamma, patterns, batch_size, gram_dtype, spectrum, damping, model_id, fingerprint: as before.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in BASE_KINDS and k not in LOSS_KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown curve kinds {unknown}; expected some of {BASE_KINDS + tuple(LOSS_KINDS)}")
    if store not in STORES:
        raise ValueError(f"store: expected one of {STORES}, received {store!r}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma: expected a fraction in [0, 1], received {gamma!r}")
    if "probe" in kinds and distributed.world() > 1:
        raise ValueError("probe curves are measured in one process; profile them without torchrun (the other kinds "
                         "can be profiled first under torchrun, then probe added to the same directory)")
    stream = StreamConfig(batch_size=batch_size, gram_dtype=gram_dtype, fisher_labels=fisher_labels)
    spec = SpectrumConfig(kinds=BASE_KINDS, method=spectrum, damping=damping)
    dev = distributed.device_of(resolve_device(device))
    ids, source_id, text_path = resolve_calibration(calibration, tokenizer, n_samples, seqlen, seed)
    weights = weights or Weights(model)
    if "probe" in kinds and weights.out_of_core:
        raise ValueError("kinds: probe curves rerun the whole model in memory; profile probe without --out-of-core")
    structure = find_structure(model, patterns)
    _check_inputs(model, weights, structure, ids, fisher_samples)
    extra_fns = _extras(extras)
    meta = _meta(model, weights, structure, ids, source_id, seed, stream, spec, patterns, store, fisher_samples,
                 gamma, dev, model_id, fingerprint, tokenizer)
    if text_path:
        meta["text_path"] = text_path  # where `rankalloc evaluate --compressed` finds the held-out text again
    budget = gram_budget if gram_budget is not None else default_gram_budget(weights, structure)
    distributed.agree("profile", dict({k: meta.get(k) for k in KEY_FIELDS}, kinds=sorted(kinds), out=str(out),
                                      resume=resume, gram_budget=budget, extras=list(extras), gamma=gamma,
                                      device=dev.type))
    part = distributed.batch_slice(ids.shape[0], batch_size)
    profile = distributed.on_main(lambda: Profile.start(out, meta, resume=resume), "opening the profile directory")
    was_training = model.training
    model.eval()
    try:
        p = Pass(weights, structure, ids[part], profile, stream, spec, dev, store, progress and distributed.is_main(),
                 first=part.start, sequences=ids.shape[0])
        _passes(p, kinds, fisher_samples, budget, extra_fns)
        for kind in kinds:
            if kind == "probe" and kind not in profile.kinds:
                t0 = time.perf_counter()
                _loss_kind(kind)(profile, model, ids, device=dev, batch_size=batch_size, progress=progress)
                profile = Profile.load(profile.path)
                profile.meta["timings"][kind] = profile.meta["timings"].get(kind, 0.0) + time.perf_counter() - t0
                profile._write_meta()
    finally:
        model.train(was_training)
    return distributed.on_main(lambda: Profile.load(profile.path), "reading the finished profile")


@dataclass(frozen=True)
class Extra:
    """A method's loss curves computed in the layer-streamed backward: ``curves(profile, component, W, G_g, n_loss,
    tap)`` once the component's output-gradient Gram is summed; ``tap(profile, component, device)`` (optional) gives
    a per-token accumulator ``tap(y, g)`` fed every batch's outputs and output gradients (or None)."""

    curves: Callable
    tap: Callable | None = None


def _extras(names) -> tuple:
    import rankalloc.profiling.flat as flat_mod
    import rankalloc.profiling.sola as sola_mod

    known = {"sola": Extra(sola_mod.fisher_extras), "flat": Extra(flat_mod.fisher_extras, flat_mod.fisher_tap)}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"extras: expected some of {sorted(known)}, received {list(names)}")
    return tuple(known[n] for n in names)


def _check_inputs(model, weights, structure, ids, fisher_samples) -> None:
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"calibration ids: expected token ids in [0, {vocab}) for this model, received "
                         f"[{int(ids.min())}, {int(ids.max())}] (tokenizer of another model?)")
    if fisher_samples is not None and (isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int)
                                       or not 1 <= fisher_samples <= ids.shape[0]):
        raise ValueError(f"fisher_samples: expected an integer in 1..{ids.shape[0]} (the calibration sequences), "
                         f"received {fisher_samples!r}")
    if not weights.out_of_core:
        for c in structure.components:
            check_finite(weight_of(structure.modules[c.name]).detach(), f"weight of {c.name}")


def _meta(model, weights, structure, ids, source_id, seed, stream, spec, patterns, store, fisher_samples, gamma,
          dev, model_id, fingerprint, tokenizer) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_id": model_id or getattr(config, "_name_or_path", "") or type(model).__name__,
        "fingerprint": fingerprint or _fingerprint(model, tokenizer, weights),
        "source_id": source_id,
        "calibration_hash": calibration_hash(ids),
        "n_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": int(seed),
        "tokens": int(ids.numel()),
        "settings": dict(_settings(stream, spec, patterns, store),
                         **({"fisher_samples": int(fisher_samples)} if fisher_samples is not None else {}),
                         **({"fisher_labels": stream.fisher_labels} if stream.fisher_labels != "data" else {})),
        "gamma": float(gamma),
        "version": _version(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "torch": torch.__version__,
        "config": structure.dims.to_dict(),
        "layers_path": structure.layers_path,
        "components": [[c.name, c.m, c.n, c.kind, c.layer] for c in structure.components],
        "gram_keys": {n: g.key for g in structure.groups for n in g.members},
        "kinds": [],
    }


def _version() -> str:
    try:
        import rankalloc

        return rankalloc.__version__
    except (ImportError, AttributeError):
        return "unknown"
