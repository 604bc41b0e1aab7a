# Profiling entry point: SVD-LLM whitening (Wang et al., 2024, Sec. 3.1) statistics and curves, layer by layer.
"""``profile_model``: a model plus calibration token ids in, a profile directory out.

One streaming pass (:mod:`~rankalloc.profiling.calibration`) gathers each layer's float64 input
Grams, value-output covariance and layer score; right after each layer, every component's
whitened spectrum and curves (:mod:`~rankalloc.profiling.spectra`) are computed and the layer is
written to the store (:mod:`~rankalloc.profiling.store`). Loss-aware kinds (``fisher``,
``probe``) are added afterwards by their own modules through ``Profile.write_kind``.

Resume: the store marks a layer finished only after its files are in place. A rerun with the
same cache key recomputes the inputs of the first unfinished layer by re-running the finished
layers' forward passes (no statistics, no disk cache of activations; the same batches and
kernels on the same device give bit-identical inputs), then carries on. Timings in the meta
cover only the work each run actually did.
"""

from __future__ import annotations

import hashlib
import importlib
import time

import numpy as np
import torch

from rankalloc.profiling.architectures import ModulePatterns, find_structure, weight_of
from rankalloc.profiling.calibration import StreamConfig, capture_inputs, run_layer
from rankalloc.profiling.numerics import Damping, check_finite, damped_cholesky
from rankalloc.profiling.spectra import BASE_KINDS, SpectrumConfig, component_spectrum
from rankalloc.profiling.store import Profile

LOSS_KINDS = {
    "fisher": ("rankalloc.profiling.fisher", "add_fisher_curves"),
    "fisher_svd": ("rankalloc.profiling.fisher", "add_fisher_curves"),  # written together with "fisher"
    "probe": ("rankalloc.profiling.probe", "add_probe_curves"),
}
"""Curve kinds computed after the streaming pass: kind -> (module, function(profile, model, ids, device=,
batch_size=)). Imported lazily."""

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
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


def _fingerprint(model, tokenizer) -> str:
    """``data.model_fingerprint`` (config + tokenizer + weights, as ``load_model`` records) when a tokenizer
    is given, else :func:`model_fingerprint` (config + weights)."""
    if tokenizer is not None:
        from rankalloc.profiling.data import model_fingerprint as with_tokenizer

        return with_tokenizer(model, tokenizer)
    return model_fingerprint(model)


def resolve_calibration(calibration, tokenizer, n_samples, seqlen, seed) -> tuple[torch.Tensor, str]:
    """Token ids ``(n_samples, seqlen)`` and a text source id from ids, a ``TextSplit``, a path or strings."""
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
        return ids.long().cpu(), "token-ids"
    if tokenizer is None:
        raise ValueError(f"calibration: a {type(calibration).__name__} is text; pass tokenizer= to tokenize it, "
                         f"or pass a LongTensor of token ids (n_samples, seqlen)")
    text = importlib.import_module("rankalloc.profiling.text")
    split = calibration if isinstance(calibration, text.TextSplit) else text.load_text(calibration)
    ids = text.calibration_ids(tokenizer, split, n_samples=n_samples or DEFAULT_SAMPLES,
                               seqlen=seqlen or DEFAULT_SEQLEN, seed=seed)
    return ids, f"{split.source_id}@{text.text_fingerprint(split)}"


def _settings(stream: StreamConfig, spec: SpectrumConfig, patterns, save_grams: bool) -> dict:
    d = spec.damping
    return {"batch_size": stream.batch_size, "gram_dtype": stream.gram_dtype, "spectrum": spec.method,
            "damping": {"damp": d.damp, "retries": d.retries, "growth": d.growth},
            "patterns": (patterns or ModulePatterns()).to_dict(), "save_grams": save_grams}


def layer_results(structure, stats, spec: SpectrumConfig, timings: dict) -> tuple[dict, dict]:
    """Spectra and curves of every component of one layer, plus its Grams, as numpy arrays to store."""
    arrays: dict[str, np.ndarray] = {"t": np.float64(stats.score), "cos_sum": np.float64(stats.cos_sum),
                                     "tokens": np.int64(stats.tokens)}
    grams = {}
    kind_of = {c.name: c.kind for c in structure.layer_components(stats.layer)}
    for g in structure.layer_groups(stats.layer):
        G = stats.grams[g.key]
        what = g.key if len(g.members) == 1 else f"{g.key} (input shared by {', '.join(g.members)})"
        t0 = time.perf_counter()
        S, delta = damped_cholesky(G, what, spec.damping)
        timings["cholesky"] = timings.get("cholesky", 0.0) + time.perf_counter() - t0
        for name in g.members:
            cs = component_spectrum(weight_of(structure.modules[name]), S, delta, name, spec, timings)
            arrays[f"sigma:{name}"] = cs.sigma
            if cs.sigma_w is not None:
                arrays[f"sigma_w:{name}"] = cs.sigma_w
            arrays[f"delta:{name}"] = np.float64(cs.delta)
            for kind, e in cs.curves.items():
                arrays[f"{kind}:{name}"] = e
        grams[g.key] = G.cpu().numpy()
        if any(kind_of[n] == "down" for n in g.members):  # a_i^2 = sum_t h_i^2 is the Gram diagonal
            arrays["neuron_norms"] = np.sqrt(np.diagonal(grams[g.key]).copy())
    if stats.value_cov is not None:
        arrays["value_cov"] = stats.value_cov.cpu().numpy()
    return arrays, grams


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


@torch.no_grad()
def _stream(model, structure, ids, profile: Profile, stream: StreamConfig, spec: SpectrumConfig,
            device: torch.device, save_grams: bool, progress: bool) -> None:
    from tqdm.auto import tqdm

    finished = set(profile.finished_layers)
    todo = [l for l in range(structure.num_layers) if l not in finished]
    if not todo:
        return
    t0 = time.perf_counter()
    captured = capture_inputs(model, structure, ids, stream.batch_size, device)
    capture_s = time.perf_counter() - t0
    hidden, captured.hidden = captured.hidden, None  # keep one copy of the activations alive, not two
    bar = tqdm(total=structure.num_layers, initial=len(finished), unit="layer", disable=not progress,
               desc=f"profiling {profile.meta.get('model_id') or 'model'}")
    try:
        for layer in range(max(todo) + 1):
            if layer in finished:  # resume: recompute this layer's outputs only
                hidden, _ = run_layer(structure, layer, hidden, captured.calls[layer], device, stream, collect=False)
                continue
            outputs, stats = run_layer(structure, layer, hidden, captured.calls[layer], device, stream)
            timings = dict(stats.timings)
            if capture_s:
                timings["capture"], capture_s = capture_s, 0.0
            arrays, grams = layer_results(structure, stats, spec, timings)
            t1 = time.perf_counter()
            profile._write_layer(layer, arrays, grams if save_grams else None, stats.score)
            timings["write"] = time.perf_counter() - t1
            _add_timings(profile, timings)
            hidden = outputs
            bar.update(1)
            bar.set_postfix(layer=layer, t=f"{stats.score:.3f}")
    finally:
        bar.close()


def _add_timings(profile: Profile, timings: dict) -> None:
    for k, v in timings.items():
        profile.meta["timings"][k] = profile.meta["timings"].get(k, 0.0) + float(v)
    profile._write_meta()


def profile_model(model, calibration, *, out, tokenizer=None, n_samples: int | None = None,
                  seqlen: int | None = None, seed: int = 0, device="auto", kinds=BASE_KINDS,
                  gamma: float = 0.15, patterns: ModulePatterns | None = None, batch_size: int = 8,
                  resume: bool = True, progress: bool = True, model_id: str | None = None,
                  fingerprint: str | None = None, gram_dtype: str = "float64", spectrum: str = "svd",
                  damping: Damping = Damping(), save_grams: bool = True,
                  fisher_samples: int | None = None) -> Profile:
    """Profile ``model`` on calibration tokens and write the profile directory ``out``.

    Args:
        model: a Hugging Face causal LM (any family :func:`~rankalloc.profiling.architectures.find_structure`
            recognises, or one described by ``patterns``). It stays where it is; each decoder layer
            visits ``device`` in turn.
        calibration: a LongTensor ``(n_samples, seqlen)`` of token ids, or text (a ``TextSplit``, a
            path to a text file, a list of strings) tokenized with ``tokenizer`` by
            ``rankalloc.profiling.text.calibration_ids`` (default 128 x 512).
        out: the profile directory. An unfinished run with the same cache key resumes there;
            another key raises ``ValueError`` (``resume=False`` overwrites instead).
        kinds: curve kinds wanted. The four spectral kinds ``whitened, energy, relative, epsilon`` are
            always stored (one pass of SVDs; they are not part of the cache key, so runs asking for
            different kinds share a profile); the loss-aware ``fisher``, ``probe`` are computed
            afterwards when asked for and missing.
        gamma: SoLA's prime-neuron fraction, recorded for ``Profile.prime_neurons``.
        batch_size: sequences per forward batch. gram_dtype: ``"float64"`` or ``"float32"`` (see
            :mod:`~rankalloc.profiling.calibration`). spectrum: ``"svd"`` or ``"gram-eigh"`` (see
            :mod:`~rankalloc.profiling.spectra`). damping: relative Cholesky damping.
        save_grams: store the float64 input Grams (decomposers need them; 8 n^2 bytes each).
        model_id, fingerprint: recorded in the meta; the fingerprint (computed from the config and
            weights when not given) is part of the cache key.
        fisher_samples: accumulate the Fisher output-gradient Grams on the first ``fisher_samples``
            calibration sequences only (default all; the backward passes dominate CPU time). Recorded
            in the settings when given.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in BASE_KINDS and k not in LOSS_KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown curve kinds {unknown}; expected some of {BASE_KINDS + tuple(LOSS_KINDS)}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma: expected a fraction in [0, 1], received {gamma!r}")
    stream = StreamConfig(batch_size=batch_size, gram_dtype=gram_dtype)
    spec = SpectrumConfig(kinds=BASE_KINDS, method=spectrum, damping=damping)
    dev = resolve_device(device)
    ids, source_id = resolve_calibration(calibration, tokenizer, n_samples, seqlen, seed)

    structure = find_structure(model, patterns)
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"calibration ids: expected token ids in [0, {vocab}) for this model, received "
                         f"[{int(ids.min())}, {int(ids.max())}] (tokenizer of another model?)")
    for c in structure.components:
        check_finite(weight_of(structure.modules[c.name]).detach(), f"weight of {c.name}")

    config = getattr(model, "config", None)
    meta = {
        "model_id": model_id or getattr(config, "_name_or_path", "") or type(model).__name__,
        "fingerprint": fingerprint or _fingerprint(model, tokenizer),
        "source_id": source_id,
        "calibration_hash": calibration_hash(ids),
        "n_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": int(seed),
        "tokens": int(ids.numel()),
        "settings": dict(_settings(stream, spec, patterns, save_grams),
                         **({"fisher_samples": int(fisher_samples)} if fisher_samples is not None else {})),
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
    profile = Profile.start(out, meta, resume=resume)
    was_training = model.training
    model.eval()
    try:
        _stream(model, structure, ids, profile, stream, spec, dev, save_grams, progress)
        if not (profile.path / "curves.csv").exists():
            profile._write_curves()
        for kind in kinds:
            if kind in LOSS_KINDS and kind not in profile.kinds:
                t0 = time.perf_counter()
                extra = {"samples": fisher_samples} if kind in ("fisher", "fisher_svd") and fisher_samples else {}
                _loss_kind(kind)(profile, model, ids, device=dev, batch_size=batch_size, progress=progress, **extra)
                profile = Profile.load(profile.path)
                _add_timings(profile, {kind: time.perf_counter() - t0})  # e.g. "fisher": backward Grams + curves
                profile._write_meta()
    finally:
        model.train(was_training)
    return profile


def _version() -> str:
    try:
        import rankalloc

        return rankalloc.__version__
    except (ImportError, AttributeError):
        return "unknown"
