# Saving and loading compressed models: safetensors weights + a JSON of the module structure (no recomputation).
"""A compressed model on disk is a folder with its weights and a manifest:

- the weights, in one of two forms (the manifest's ``weights`` says which):

  - ``model.safetensors``: the full state dict in one file (:func:`save_compressed`, in memory);
  - sharded: ``model-00001-of-000NN.safetensors`` ... with ``model.safetensors.index.json`` (the Hugging Face
    index, ``weight_map``: tensor name -> shard), one shard per decoder layer plus the non-layer parts
    (:func:`rankalloc.decomposers.streamed.compress_to_folder`, out of core);

  tensors that share storage, such as tied embeddings, are stored once; the aliases are listed in the JSON;
- ``compressed.json``: ``format``, ``format_version``, ``library_version``, ``method``, ``config``, ``choices``
  (one per component), ``profile`` (the profile's identity), ``base_config`` (the transformers config of the
  dense model), ``attn_implementation``, ``dtype``, ``modules`` (qualified name -> structure spec of
  every compressed module, see ``base.MODULE_TYPES``), ``aliases``, ``weights`` (``model.safetensors`` or
  ``model.safetensors.index.json``), ``weight_map`` (sharded form: the index's map) and the full ``report``.
  It is written last, atomically: a folder without it is incomplete. Since format version 3 it also holds
  ``checksums`` (sha256 and size of every weights file and of the index), verified when the folder is read (each
  file hashed once per process); versions 1 (single file, no ``weights`` key) and 2 are still read, with a warning
  that they cannot be verified.

Writing (:func:`output_folder`) never touches a folder rankalloc did not write (a non-empty folder without
``compressed.json``; never a model folder, one holding ``config.json``) unless ``overwrite``; it holds the folder's
lock (:func:`~rankalloc.profiling.files.folder_lock`), builds the new output in a private ``.building-<pid>``
subfolder, and only when it is complete moves its files into place (``compressed.json`` removed first, moved in
last, with the checksums). An interrupted or failed run leaves the earlier output as it was.

``load_compressed`` rebuilds the dense architecture from ``base_config`` (without random init), swaps
in empty compressed modules of the recorded shapes (parents before children), and loads the weights
strictly. Outputs are bit-identical to the saved model's. :func:`open_compressed` builds the same model as a
skeleton on ``meta`` with a :class:`~rankalloc.profiling.weights.Weights` over the folder, for out-of-core
evaluation (one decoder layer resident at a time).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from rankalloc.decomposers.base import allocation_items, replace_module
from rankalloc.decomposers.registry import MODULE_TYPES, load_builtins
from rankalloc.decomposers.report import CompressionReport
from rankalloc.profiling import files as filerules
from rankalloc.profiling.weights import Weights

FORMAT = "rankalloc.compressed"
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
"""Manifest versions :func:`read_manifest` accepts (1: single weights file, before the sharded form; 2: no
checksums)."""
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MANIFEST = "compressed.json"


def module_specs(model: nn.Module) -> dict[str, dict]:
    """``{qualified name: {"type": ..., **spec}}`` for every module of a registered compressed type."""
    load_builtins()
    by_class = {cls: (name, spec) for name, (cls, spec, _) in MODULE_TYPES.items()}
    out = {}
    for name, mod in model.named_modules():
        hit = by_class.get(type(mod))
        if hit is not None:
            out[name] = {"type": hit[0], **hit[1](mod)}
    return out


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory once; return ``(tensors, {alias: stored name})``."""
    seen, tensors, aliases = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) \
            if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    return tensors, aliases


def manifest_of(model: nn.Module, report: CompressionReport, aliases: dict, dtype: torch.dtype,
                weights: str = WEIGHTS, weight_map: dict | None = None) -> dict:
    """The ``compressed.json`` of ``model`` (compressed; on any device, ``meta`` included) and its ``report``."""
    import rankalloc

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": rankalloc.__version__,
        "method": report.method,
        "config": report.config,
        "choices": {c.name: c.choice.to_json() for c in report.components},
        "profile": report.profile_id,
        "base_config": model.config.to_dict(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(dtype).removeprefix("torch."),
        "modules": module_specs(model),
        "aliases": dict(aliases),
        "weights": weights,
    }
    if weight_map is not None:
        manifest["weight_map"] = dict(weight_map)
    manifest["report"] = report.to_dict()
    return manifest


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    filerules.atomic_write_json(Path(path), data)


def _is_output(path: Path) -> bool:
    """Whether ``path`` holds a compressed model rankalloc wrote (a manifest of this format)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _output_file(name: str) -> bool:
    from rankalloc.decomposers.streamed import SHARD_PATTERN

    return name in (WEIGHTS, INDEX, MANIFEST) or bool(SHARD_PATTERN.fullmatch(name))


def check_output(path, *, overwrite: bool = False, protect=()) -> None:
    """The refusals of :func:`output_folder`, on their own (to fail before any work is done)."""
    path = Path(path)
    if (path / "config.json").exists():
        raise ValueError(f"--out {path}: is a model folder (it holds config.json); write the compressed model to a "
                         f"folder of its own")
    for p in protect:
        if p is not None and path.exists() and Path(p).exists() and path.resolve() == Path(p).resolve():
            raise ValueError(f"--out {path}: is the folder of the profile or the dense model it is made from; write "
                             f"the compressed model to a folder of its own")
    filerules.check_output_folder(path, "--out", ours=_is_output(path), overwrite=overwrite)


@contextlib.contextmanager
def output_folder(path, *, overwrite: bool = False, protect=()):
    """Yield a private folder to build a compressed model in; on success its files become ``path``'s output.

    Refused (``ValueError``): a model folder (``config.json``), one of ``protect`` (the dense model's folder, the
    profile), or a non-empty folder that holds no compressed model (unless ``overwrite``). The folder's lock is held
    throughout. On success the new files replace the earlier output (``compressed.json`` first removed, and written
    last with the checksums of the other files); on failure the earlier output stays untouched.
    """
    path = Path(path)
    check_output(path, overwrite=overwrite, protect=protect)
    with filerules.folder_lock(path):
        build = path / f".building-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        try:
            yield build
            _publish(build, path)
        finally:
            shutil.rmtree(build, ignore_errors=True)


def _publish(build: Path, path: Path) -> None:
    """Move a complete build into ``path``: the manifest gains the checksums of every other file, the old manifest
    goes first, the new files replace the old ones, outputs of the earlier run that the new one lacks are removed,
    and the manifest comes last."""
    manifest = json.loads((build / MANIFEST).read_text())
    names = sorted(f.name for f in build.iterdir() if f.name != MANIFEST)
    manifest["format_version"] = FORMAT_VERSION
    manifest["checksums"] = {n: filerules.file_record(build / n) for n in names}
    write_json_atomic(build / MANIFEST, manifest)
    with contextlib.suppress(FileNotFoundError):
        (path / MANIFEST).unlink()
    for n in names:
        os.replace(build / n, path / n)
    for f in path.iterdir():
        if f.is_file() and _output_file(f.name) and f.name not in names and f.name != MANIFEST:
            f.unlink()
    os.replace(build / MANIFEST, path / MANIFEST)


def stored_tensors(tensors: dict, dtype: torch.dtype | None) -> dict:
    """``tensors`` as written: the floating-point ones cast to ``dtype`` (None: as they are; integer index buffers
    always as they are). A finite tensor that the cast would overflow (float16 tops out at 65504) is a
    ``ValueError`` naming it, never an ``inf`` written silently."""
    if dtype is None:
        return tensors
    out = {}
    for k, v in tensors.items():
        out[k] = v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
        if out[k] is not v and not bool(torch.isfinite(out[k]).all()) and bool(torch.isfinite(v).all()):
            big = float(v.abs().max())
            raise ValueError(f"tensor {k!r}: values up to {big:.3g} overflow {str(dtype).removeprefix('torch.')} "
                             f"(largest {torch.finfo(dtype).max:.3g}); write it as bfloat16 or float32 (--dtype)")
    return out


def save_compressed(model: nn.Module, path, report: CompressionReport, *, overwrite: bool = False,
                    protect=(), dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (compressed in place by ``compress_``) and ``report`` to the folder ``path``, through
    :func:`output_folder` (``overwrite`` and ``protect`` as there). ``dtype``: the dtype of the floating-point
    weights written, such as the checkpoint's (``LoadedModel.source_dtype``); None keeps the model's own."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, aliases = _dedupe(model.state_dict())
    dtype = dtype or next(model.parameters()).dtype
    manifest = manifest_of(model, report, aliases, dtype)
    with output_folder(path, overwrite=overwrite, protect=protect) as build:
        save_file(stored_tensors(tensors, dtype), str(build / WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(build / MANIFEST, manifest)
    return path


def read_manifest(path) -> dict:
    """The ``compressed.json`` of a saved compressed model, validated."""
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; expected a folder written by save_compressed or "
                                f"compress_to_folder (an interrupted run leaves none)")
    manifest = filerules.read_json(f, "compress the model again")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"{f}: expected format {FORMAT!r} version {' or '.join(map(str, READ_VERSIONS))}, received "
                         f"{manifest.get('format')!r} version {manifest.get('format_version')!r}")
    manifest.setdefault("weights", WEIGHTS)
    if manifest["weights"] not in (WEIGHTS, INDEX):
        raise ValueError(f"{f}: expected weights {WEIGHTS!r} or {INDEX!r}, received {manifest['weights']!r}")
    if manifest["format_version"] >= 3 and not isinstance(manifest.get("checksums"), dict):
        raise ValueError(f"{f}: format version {manifest['format_version']} without its checksums (damaged or "
                         f"edited); compress the model again")
    return manifest


def _verify_folder(path: Path, manifest: dict, names) -> None:
    """Every file of ``names`` against the checksum ``compressed.json`` records for it (once per process)."""
    sums = manifest.get("checksums")
    if sums is None:
        warnings.warn(f"{path}: written by rankalloc before checksums (format version {manifest['format_version']}); "
                      f"its weights are not verified. Compress it again to add them", stacklevel=3)
        return
    unlisted = sorted(set(sums) - set(names))
    remedy = "the folder mixes two runs or a file is damaged; compress the model again"
    for n in sorted(set(names)):
        filerules.verify_file(path / n, sums.get(n), path / MANIFEST, remedy)
    for n in unlisted:  # recorded but not named by the weights form: still part of the output
        filerules.verify_file(path / n, sums[n], path / MANIFEST, remedy)


def weight_files(path, manifest: dict) -> dict[str, Path]:
    """``stored tensor name -> file`` of a compressed folder, in the form its manifest names."""
    from safetensors import safe_open

    path = Path(path)
    if manifest["weights"] == INDEX:
        weight_map = manifest.get("weight_map")
        if weight_map is None:
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"{path / INDEX}: unreadable safetensors index ({exc})") from None
        files = {k: path / v for k, v in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{path}: weight shard(s) {missing[:3]} missing ({len(missing)} of "
                                    f"{len(set(files.values()))}); the folder is incomplete")
        _verify_folder(path, manifest, [p.name for p in files.values()] + [INDEX])
    else:
        single = path / WEIGHTS
        if not single.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS} (the manifest names it)")
        _verify_folder(path, manifest, [WEIGHTS])
        try:
            with safe_open(str(single), framework="pt") as fh:
                files = {k: single for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{single}: unreadable safetensors file ({exc})") from None
    missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"{path}: weight shard(s) {missing[:3]} missing ({len(missing)} of "
                                f"{len(set(files.values()))}); the folder is incomplete")
    return files


def _base_config(path: Path, manifest: dict):
    """``(transformers config, dtype)`` of the dense model a compressed folder was built from."""
    import transformers

    base = dict(manifest["base_config"])
    model_type = base.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{path}: unknown base model type {model_type!r}")
    config = transformers.CONFIG_MAPPING[model_type].from_dict(base)
    return config, getattr(torch, manifest["dtype"])


def _swap_in(model: nn.Module, specs: dict, path: Path) -> None:
    """Replace the modules named in ``specs`` by empty compressed modules of the recorded shapes (on the device of
    the modules they replace: ``meta`` for a skeleton); parents before children."""
    for name in sorted(specs, key=lambda n: (n.count("."), n)):
        spec = dict(specs[name])
        kind = spec.pop("type")
        if kind not in MODULE_TYPES:
            raise ValueError(f"{path}: module {name!r} has type {kind!r}, expected one of {sorted(MODULE_TYPES)} "
                             f"(is the method's module importable?)")
        _, _, build = MODULE_TYPES[kind]
        replace_module(model, name, build(spec, model.get_submodule(name)))


def load_compressed(path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` or ``compress_to_folder`` (structure from the JSON, weights
    from the single safetensors file or the shards of the index).

    Returns the model in eval mode; ``model.compression_report`` holds the saved :class:`CompressionReport`.
    """
    import transformers
    from safetensors.torch import load_file

    load_builtins()
    path = Path(path)
    manifest = read_manifest(path)
    config, dtype = _base_config(path, manifest)
    kwargs = {"dtype": dtype}
    if manifest.get("attn_implementation"):
        kwargs["attn_implementation"] = manifest["attn_implementation"]
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: a random init is only slower
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    _swap_in(model, manifest["modules"], path)
    files = weight_files(path, manifest)
    state = {}
    for f in dict.fromkeys(files.values()):
        part = load_file(str(f), device="cpu")
        state.update({k: v for k, v in part.items() if files.get(k) == f})
    for alias, stored in manifest["aliases"].items():
        state[alias] = state[stored]
    model.load_state_dict(state, strict=True)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()  # no_init_weights() skips tying in transformers 5; the saved copies are equal
    model.to(device)
    model.eval()
    model.compression_report = CompressionReport.from_dict(manifest["report"])
    return model


class CompressedWeights(Weights):
    """:class:`~rankalloc.profiling.weights.Weights` over a compressed folder: aliases resolve to their stored
    tensor, and the buffers of compressed modules (SSLC's ``sparse_col`` and ``sparse_crow``, SoLA's
    ``prime_index``), which a skeleton holds on ``meta``, are read with the part's parameters and put back on
    ``meta`` after it."""

    def __init__(self, model, checkpoint, aliases: dict):
        super().__init__(model, checkpoint)
        self.aliases = dict(aliases)

    def _tied_source(self, name: str) -> str | None:
        return self.aliases.get(name) or super()._tied_source(name)

    def load(self, module, prefix, device) -> None:
        super().load(module, prefix, device)
        meta = [(local, b) for local, b in module.named_buffers() if b.device.type == "meta"]
        if not meta:
            return
        keys = {local: self.aliases.get(prefix + local, prefix + local) for local, _ in meta}
        tensors = self.checkpoint.read(sorted(set(keys.values())), device, self.dtype,
                                       {keys[local]: b.shape for local, b in meta})
        for local, b in meta:
            owner, _, leaf = local.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._buffers[leaf] = tensors[keys[local]].to(b.dtype)

    @contextlib.contextmanager
    def resident(self, module, prefix, device):
        if not self.out_of_core:
            with super().resident(module, prefix, device) as m:
                yield m
            return
        loaded = [(sub, leaf) for sub in module.modules() for leaf, b in sub._buffers.items()
                  if b is not None and b.device.type == "meta"]
        try:
            with super().resident(module, prefix, device) as m:
                yield m
        finally:
            for sub, leaf in loaded:
                b = sub._buffers[leaf]
                sub._buffers[leaf] = torch.empty_like(b, device="meta")
            for sub in module.modules():  # SparseLowRankLinear's CSR cache holds the released tensors
                sub.__dict__.pop("_csr", None)
                sub.__dict__.pop("_csr_key", None)


def open_compressed(path, out_of_core: bool = True):
    """``(model, Weights)`` of a compressed folder.

    Out of core: the base architecture as a skeleton (:func:`rankalloc.profiling.weights.skeleton`) with the
    compressed modules swapped in from their specs on ``meta``; the returned ``Weights`` reads a part's tensors
    from the folder's shards when it is made resident (``weights.resident(layer, prefix, device)``). The small
    non-layer parameters (final norm, learned position embeddings) are loaded now, as
    :func:`~rankalloc.profiling.weights.load_out_of_core` does; the decoder layers, the embedding and the head stay
    on ``meta``. ``out_of_core=False``: :func:`load_compressed` and an in-memory ``Weights``.
    """
    from rankalloc.profiling.weights import Checkpoint, skeleton

    load_builtins()
    path = Path(path)
    if not out_of_core:
        model = load_compressed(path)
        return model, Weights(model)
    manifest = read_manifest(path)
    config, dtype = _base_config(path, manifest)
    if manifest.get("attn_implementation"):
        config._attn_implementation = manifest["attn_implementation"]
    model = skeleton(config, dtype)
    _swap_in(model, manifest["modules"], path)
    checkpoint = Checkpoint.__new__(Checkpoint)  # the files the manifest names (a stale index is not read)
    checkpoint.folder, checkpoint.files = path, weight_files(path, manifest)
    weights = CompressedWeights(model, checkpoint, manifest["aliases"])
    from rankalloc.decomposers.streamed import decoder_layers, small_parts

    layers = decoder_layers(model)
    for prefix, holder in small_parts(model, layers):
        weights.load(holder, prefix, "cpu")
    model.compression_report = CompressionReport.from_dict(manifest["report"])
    return model, weights


def rank_pattern(allocation) -> dict[str, int]:
    """PEFT-style ``{module_name: rank}`` of the allocation's low-rank choices.

    Dense components are omitted (they are not factorised). Names are the allocation's component names
    (SoLA's ``#marginal`` and FLAT's ``vo`` names as they are; for ``vo`` the rank is the value-head rank).
    A sparse + low-rank choice maps to its rank; its kept sparse fraction is not represented.
    """
    return {c.name: int(ch.rank) for c, ch in allocation_items(allocation) if not ch.is_dense}
