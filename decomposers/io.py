# Saving and loading compressed models: safetensors weights + a JSON of the module structure (no recomputation).
"""A compressed model on disk is a folder with two files:

- ``model.safetensors``: the full state dict (tensors that share storage, such as tied embeddings,
  are stored once; the aliases are listed in the JSON);
- ``compressed.json``: ``format``, ``library_version``, ``method``, ``config``, ``choices`` (one per
  component), ``profile`` (the profile's identity), ``base_config`` (the transformers config of the
  dense model), ``attn_implementation``, ``dtype``, ``modules`` (qualified name -> structure spec of
  every compressed module, see ``base.MODULE_TYPES``), ``aliases`` and the full ``report``.

``load_compressed`` rebuilds the dense architecture from ``base_config`` (without random init), swaps
in empty compressed modules of the recorded shapes (parents before children), and loads the weights
strictly. Outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rankalloc.decomposers.base import allocation_items, replace_module
from rankalloc.decomposers.registry import MODULE_TYPES, load_builtins
from rankalloc.decomposers.report import CompressionReport

FORMAT = "rankalloc.compressed"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
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


def save_compressed(model: nn.Module, path, report: CompressionReport) -> Path:
    """Write ``model`` (compressed in place by ``compress_``) and ``report`` to the folder ``path``."""
    from safetensors.torch import save_file

    import rankalloc

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(model.state_dict())
    dtype = next(model.parameters()).dtype
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
        "aliases": aliases,
        "report": report.to_dict(),
    }
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path / MANIFEST)
    return path


def read_manifest(path) -> dict:
    """The ``compressed.json`` of a saved compressed model, validated."""
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; expected a folder written by save_compressed")
    manifest = json.loads(f.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{f}: expected format {FORMAT!r} version {FORMAT_VERSION}, received "
                         f"{manifest.get('format')!r} version {manifest.get('format_version')!r}")
    return manifest


def load_compressed(path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (structure from the JSON, weights from safetensors).

    Returns the model in eval mode; ``model.compression_report`` holds the saved :class:`CompressionReport`.
    """
    import transformers
    from safetensors.torch import load_file

    load_builtins()
    path = Path(path)
    manifest = read_manifest(path)
    base = dict(manifest["base_config"])
    model_type = base.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{path}: unknown base model type {model_type!r}")
    config = transformers.CONFIG_MAPPING[model_type].from_dict(base)
    dtype = getattr(torch, manifest["dtype"])
    kwargs = {"dtype": dtype}
    if manifest.get("attn_implementation"):
        kwargs["attn_implementation"] = manifest["attn_implementation"]
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: a random init is only slower
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    specs = manifest["modules"]
    for name in sorted(specs, key=lambda n: (n.count("."), n)):  # parents before children
        spec = dict(specs[name])
        kind = spec.pop("type")
        if kind not in MODULE_TYPES:
            raise ValueError(f"{path}: module {name!r} has type {kind!r}, expected one of {sorted(MODULE_TYPES)} "
                             f"(is the method's module importable?)")
        _, _, build = MODULE_TYPES[kind]
        replace_module(model, name, build(spec, model.get_submodule(name)))
    state = load_file(str(path / WEIGHTS), device="cpu")
    for alias, stored in manifest["aliases"].items():
        state[alias] = state[stored]
    model.load_state_dict(state, strict=True)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()  # no_init_weights() skips tying in transformers 5; the saved copies are equal
    model.to(device)
    model.eval()
    model.compression_report = CompressionReport.from_dict(manifest["report"])
    return model


def rank_pattern(allocation) -> dict[str, int]:
    """PEFT-style ``{module_name: rank}`` of the allocation's low-rank choices.

    Dense components are omitted (they are not factorised). Names are the allocation's component names
    (SoLA's ``#marginal`` and FLAT's ``vo`` names as they are; for ``vo`` the rank is the value-head rank).
    A sparse + low-rank choice maps to its rank; its kept sparse fraction is not represented.
    """
    return {c.name: int(ch.rank) for c, ch in allocation_items(allocation) if not ch.is_dense}
