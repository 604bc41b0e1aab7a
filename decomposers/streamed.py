# Out-of-core compression (the layer-streaming lifecycle of GPTQ / llm-compressor): one decoder layer resident,
# compressed and written as its own shard, then released.
"""Compress a model larger than memory: a skeleton on ``meta``, one decoder layer at a time from the checkpoint.

:func:`compress_to_folder` takes an out-of-core :class:`~rankalloc.profiling.data.LoadedModel` (``load_model(...,
out_of_core=True)``) and, for each decoder layer in turn:

1. makes it resident on the compute device (``loaded.weights.resident``: its tensors read from the safetensors);
2. runs the method's handler through :func:`~rankalloc.decomposers.base.compress_` on that layer's components only
   (a sub-allocation over the layer's curves with the same choices, whose budget, the full one, holds), which also
   checks the layer's realized parameter count;
3. writes the layer's state dict (compressed modules included, with the layer prefix) to its own shard
   ``model-000NN-of-000MM.safetensors``;
4. releases it: every parameter goes back to ``meta``, the new compressed modules' too (their structure stays,
   for the manifest's ``modules``), and their buffers.

The non-layer parts (embedding, position embeddings, norms, head) are then copied from the checkpoint one part
per shard, so no more than one part is held. ``model.safetensors.index.json`` and ``compressed.json`` (the
:func:`~rankalloc.decomposers.io.save_compressed` manifest with ``weights`` naming the index and its
``weight_map``) are written last, each atomically: an interrupted run leaves no manifest, and
:func:`~rankalloc.decomposers.io.read_manifest` refuses the folder. The report equals what
:func:`~rankalloc.decomposers.base.compress_` gives in memory (components, ``params_after``, ``expected_params``;
times differ), and the total realized count is checked against ``allocation.cost["params"]`` as there.

Peak memory: one decoder layer (dense while it is compressed, then its compressed modules) plus the method's
working set (the profile's Grams of one component, its factors), plus the small non-layer parameters the
skeleton holds, and one non-layer part while it is copied.

Several processes (``torchrun``; :mod:`~rankalloc.profiling.distributed`): the decoder layers are split across
ranks by parameter count (:func:`layer_owners`). Out of core, in each round every rank compresses its next layer
and sends its tensors to rank 0, which writes every shard, the index and the manifest. In memory,
:func:`compress_in_parts` (what :func:`~rankalloc.decomposers.problems.compress` runs under several processes)
compresses each rank's layers and then sends every compressed layer to every rank, so all of them end with the same
model. Each matrix is computed by the same code on the same tensors as in one process: the weights are identical.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rankalloc.decomposers.report import CompressionReport, config_dict, profile_id
from rankalloc.profiling import distributed

SHARD = "model-{:05d}-of-{:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ----------------------------------------------------------------------------- the skeleton's parts
def decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder layers: ``path`` when given (a profile's ``layers_path``),
    else the one list the default module patterns match (compressed layers are fine: only the list is looked up)."""
    from rankalloc.profiling.architectures import DEFAULT_PATTERNS

    if path is not None:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(model).__name__}: no decoder layer list {path!r} (recorded in the profile)")
        return path, layers
    hits = [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and re.fullmatch(DEFAULT_PATTERNS.layers, n)]
    if len(hits) != 1:
        found = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(f"{type(model).__name__}: expected one decoder layer list matching "
                         f"{DEFAULT_PATTERNS.layers!r}, found {[n for n, _ in hits] or 'none'} (module lists: "
                         f"{found or 'none'})")
    return hits[0]


class _Layers:
    """What :func:`~rankalloc.profiling.calibration.capture_inputs` reads of a decoder structure."""

    def __init__(self, layers_path: str, layers: nn.ModuleList):
        self.layers_path, self.layers = layers_path, layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def layer_structure(model: nn.Module, path: str | None = None) -> _Layers:
    return _Layers(*decoder_layers(model, path))


def big_parts(model: nn.Module, layers: tuple[str, nn.ModuleList]) -> list[nn.Module]:
    """The parts made resident one at a time: every decoder layer, the input embedding, the LM head."""
    parts = list(layers[1])
    for get in ("get_input_embeddings", "get_output_embeddings"):
        m = getattr(model, get)() if hasattr(model, get) else None
        if m is not None:
            parts.append(m)
    return parts


def small_parts(model: nn.Module, layers: tuple[str, nn.ModuleList]):
    """``(prefix, holder)`` for each module with parameters of its own outside the big parts (final norm, learned
    position embeddings, projections): ``holder`` is a bare module sharing that module's parameter dict, so a
    ``Weights.load(holder, prefix, device)`` fills the module itself."""
    big = {id(m) for m in big_parts(model, layers)}
    for name, sub in _outside(model, big):
        if any(p is not None for p in sub._parameters.values()):
            holder = nn.Module()
            holder._parameters = sub._parameters
            yield (name + "." if name else ""), holder


def _outside(model: nn.Module, big: set[int]):
    """``(name, module)`` of the modules not inside any module of ``big`` (nor one of them)."""
    stack = [("", model)]
    while stack:
        name, mod = stack.pop()
        if id(mod) in big:
            continue
        yield name, mod
        for child_name, child in reversed(list(mod._modules.items())):
            if child is not None:
                stack.append((f"{name}.{child_name}" if name else child_name, child))


def materialized(module: nn.Module) -> int:
    """Parameters of ``module`` not on ``meta`` (shared ones once)."""
    return sum(p.numel() for p in module.parameters() if p.device.type != "meta")


# ----------------------------------------------------------------------------- sub-allocations
def layer_of(name: str, layers_path: str) -> int | None:
    """The decoder layer a component name lies in (``<layers_path>.<i>.``), or None."""
    m = re.match(re.escape(layers_path) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def sub_allocation(allocation, names, label: str | None = None):
    """The allocation restricted to the components ``names`` (in problem order), with the same choices. The
    sub-problem keeps the costs, grid, objective, weights and layer scores, and the full budgets, which hold: costs
    are >= 0, so a part costs at most the whole."""
    from rankalloc.allocators.allocation import finish
    from rankalloc.allocators.problem import AllocationProblem, Budget

    p = allocation.problem
    want = set(names)
    idx = [l for l, cv in enumerate(p.curves) if cv.component.name in want]
    if len(idx) != len(want):
        missing = sorted(want - {p.curves[l].component.name for l in idx})
        raise ValueError(f"components {missing[:3]} are not in the allocation")
    budgets = tuple(Budget(res, limit=float(p.limits[res])) for res in p.resources)
    curves = [p.curves[l] for l in idx]
    label = label or f"{len(idx)} components"
    sub = AllocationProblem(curves, budgets, p.costs, weights={k: w for k, w in p.weights.items() if k in want},
                            grid=p.grid, objective=p.objective, layer_scores=p.layer_scores,
                            name=f"{p.name} ({label})" if p.name else label)
    return finish(sub, allocation.solver, [allocation.choice_index[l] for l in idx], allocation.status,
                  message=allocation.message)


def layer_allocations(allocation, layers_path: str, num_layers: int) -> dict[int, object]:
    """``{layer: Allocation}`` over each layer's curves with the allocation's choices (a layer without components
    has none); see :func:`sub_allocation`."""
    by_layer: dict[int, list[str]] = {}
    for cv in allocation.problem.curves:
        c = cv.component
        i = layer_of(c.name, layers_path)
        if i is None or not 0 <= i < num_layers:
            raise ValueError(f"component {c.name!r}: not inside a decoder layer {layers_path}.<0..{num_layers - 1}>; "
                             f"out-of-core compression handles the decoder layers' components only")
        if c.layer >= 0 and c.layer != i:
            raise ValueError(f"component {c.name!r}: its layer index is {c.layer}, but its name lies in layer {i}")
        by_layer.setdefault(i, []).append(c.name)
    return {i: sub_allocation(allocation, names, f"layer {i}") for i, names in sorted(by_layer.items())}


def layer_owners(layers) -> list[int]:
    """The rank that compresses each decoder layer: bin-packed by parameter count (all 0 in one process)."""
    return distributed.assign([sum(p.numel() for p in layer.parameters()) for layer in layers])


# ----------------------------------------------------------------------------- writing
def _write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict, dtype) -> None:
    from safetensors.torch import save_file

    from rankalloc.decomposers.io import stored_tensors

    save_file(stored_tensors(tensors, dtype), str(folder / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})


def _release_new_buffers(layer: nn.Module, before: set[int]) -> None:
    """Put the buffers the compression added to ``layer`` (index buffers of compressed modules) on ``meta``."""
    for sub in layer.modules():
        for leaf, b in list(sub._buffers.items()):
            if b is not None and id(b) not in before and b.device.type != "meta":
                sub._buffers[leaf] = torch.empty_like(b, device="meta")


def _non_layer_parts(model: nn.Module, weights, layers_path: str) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """The state-dict entries outside the decoder layers, grouped by part (embedding, head, the rest): ``([(label,
    {name: ("checkpoint", stored name) | ("buffer", tensor)})], {alias: stored name})``."""
    state = model.state_dict(keep_vars=True)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    prefixes = []
    for label, get in (("embedding", "get_input_embeddings"), ("head", "get_output_embeddings")):
        m = getattr(model, get)()
        if m is not None:
            prefixes.append((label, weights.prefix_of(m)))
    groups: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    ck = weights.checkpoint
    for name, t in state.items():
        if name.startswith(layers_path + "."):
            continue
        if name in ck:
            source = ("checkpoint", name)
        elif name in params:
            stored = weights._tied_source(name)
            if stored is None or stored not in ck:
                raise ValueError(f"checkpoint {ck.folder}: no tensor {name!r} (and it is not tied to one)")
            aliases[name] = stored
            continue
        elif t.device.type != "meta":  # a persistent buffer the skeleton builds (Gemma's embed_scale is not one)
            source = ("buffer", t)
        else:
            raise ValueError(f"checkpoint {ck.folder}: no tensor {name!r}")
        label = next((lb for lb, pre in prefixes if name.startswith(pre)), "rest")
        groups.setdefault(label, {})[name] = source
    order = [lb for lb in ("embedding", "head", "rest") if lb in groups]
    return [(lb, groups[lb]) for lb in order], aliases


def _read_part(weights, entries: dict) -> dict[str, torch.Tensor]:
    """The tensors of one non-layer part, read from the checkpoint in the model's dtype (CPU)."""
    names = [src for kind, src in entries.values() if kind == "checkpoint"]
    read = weights.checkpoint.read(names, "cpu", weights.dtype) if names else {}
    out = {}
    for name, (kind, src) in entries.items():
        out[name] = (read[src] if kind == "checkpoint" else src.detach().cpu()).contiguous()
    return out


def _clear_outputs(out: Path) -> None:
    """Remove a previous manifest and index first, so the folder never looks complete while it is rewritten."""
    from rankalloc.decomposers.io import INDEX, MANIFEST

    for name in (MANIFEST, INDEX):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


# ----------------------------------------------------------------------------- entry point
def compress_to_folder(loaded, prof, allocation, method: str, out, *, overwrite: bool = False, protect=(),
                       **kwargs) -> CompressionReport:
    """:func:`write_folder` into a private folder inside ``out``, whose files replace ``out``'s output only once it
    is complete (:func:`~rankalloc.decomposers.io.output_folder`: ``out`` must be new, empty or an earlier
    compressed output unless ``overwrite``, never a model folder nor one of ``protect``; its lock is held)."""
    from rankalloc.decomposers.io import output_folder
    from rankalloc.profiling import distributed

    if not distributed.is_main():  # the other ranks only compress and send their layers
        return write_folder(loaded, prof, allocation, method, Path(out), **kwargs)
    with output_folder(out, overwrite=overwrite, protect=protect) as build:
        return write_folder(loaded, prof, allocation, method, build, **kwargs)


def write_folder(loaded, prof, allocation, method: str, out, *, config=None, device="cpu",
                 progress: bool = True, dtype: torch.dtype | None = None) -> CompressionReport:
    """Compress the out-of-core model ``loaded`` as ``allocation`` says, one decoder layer at a time, into ``out``.

    Args:
        loaded: a :class:`~rankalloc.profiling.data.LoadedModel` from ``load_model(..., out_of_core=True)``. Its
            skeleton keeps the compressed structure afterwards (every parameter on ``meta``); open the result
            with :func:`~rankalloc.decomposers.io.open_compressed` or ``load_compressed``.
        prof: the profile of the dense model.
        allocation: an allocation over the decoder layers' components (the method's own names included: SoLA
            ``...#marginal``, FLAT ``...self_attn.vo``).
        method: a registered method name; ``config`` its config (default: its defaults).
        out: the output folder (shards, index, ``compressed.json``); it must not be the model's own folder.
        device: where each layer is made resident and its factors computed.
        dtype: the dtype of the floating-point weights written, such as the checkpoint's
            (``loaded.source_dtype``); None keeps the model's own (the dtype it was computed in).

    Returns the combined :class:`CompressionReport` (as ``compress_`` in memory; on every rank under several
    processes, where rank 0 alone writes). Raises ``ValueError`` on bad input before any layer is read,
    ``RuntimeError`` if a realized parameter count differs from the allocation's.
    """
    from rankalloc.decomposers.base import combined_report, compress_, expected_params
    from rankalloc.decomposers.io import _swap_in, module_specs
    from rankalloc.decomposers.registry import get_method

    m = get_method(method)
    if config is None:
        config = m.config()
    elif type(config) is not m.config:
        raise ValueError(f"method {method!r} takes a {m.config.__name__}, received {type(config).__name__}")
    weights = getattr(loaded, "weights", None)
    if weights is None or not weights.out_of_core:
        raise ValueError("compress_to_folder: expected an out-of-core model (load_model(..., out_of_core=True)); "
                         "compress an in-memory model with compress_ and save_compressed")
    if not allocation.feasible:
        raise ValueError(f"allocation by {allocation.solver!r} has status {allocation.status}: expected a "
                         f"feasible allocation ({allocation.message})")
    model = loaded.model
    dtype = dtype or weights.dtype
    out = Path(out)
    source = weights.checkpoint.folder
    if out.exists() and (out.resolve() == Path(source).resolve() or (out / "config.json").exists()):
        raise ValueError(f"compress_to_folder: output folder {out} is a model folder (it holds config.json); "
                         f"write the compressed model to a folder of its own")
    path = (getattr(prof, "meta", None) or {}).get("layers_path")
    layers_path, layers = decoder_layers(model, path)
    device = distributed.device_of(torch.device(device))
    subs = layer_allocations(allocation, layers_path, len(layers))
    expected = expected_params(model, allocation)
    parts, aliases = _non_layer_parts(model, weights, layers_path)
    total = len(layers) + len(parts)
    _agree(m.name, config, allocation, prof)

    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _clear_outputs(out)
    weight_map: dict[str, str] = {}
    reports = []
    t0 = time.perf_counter()
    owners = layer_owners(layers)
    mine = [i for i, r in enumerate(owners) if r == distributed.rank()]
    rounds = max(owners.count(r) for r in range(distributed.world()))
    bar = tqdm(total=len(layers), unit="layer", desc=f"compress ({method})", disable=not progress or not main)
    try:
        for k in range(rounds):  # every rank compresses its k-th layer; rank 0 writes them all
            done = None
            if k < len(mine):
                i = mine[k]
                layer, prefix = layers[i], f"{layers_path}.{i}."
                before = {id(b) for b in layer.buffers()}
                with weights.resident(layer, prefix, device):
                    got = compress_(model, subs[i], config, prof, progress=False).components if i in subs else []
                    tensors, layer_aliases = _layer_tensors(layer, prefix)
                    if main:  # written while it is resident, as in one process
                        _write_shard(out, SHARD.format(i + 1, total), tensors, weight_map, dtype)
                        done = (i, None, None, layer_aliases, got)
                    else:
                        specs = {prefix + n: spec for n, spec in module_specs(layer).items()}
                        done = (i, tensors, specs, layer_aliases, got)
                    del tensors
                _release_new_buffers(layer, before)
            for item in distributed.gather_to_main(done, f"compressing decoder layers (round {k + 1} of {rounds})") \
                    or []:
                if item is None:
                    continue
                i, tensors, specs, layer_aliases, got = item
                if tensors is not None:  # another rank's layer: its shard, and its structure in the skeleton
                    _write_shard(out, SHARD.format(i + 1, total), tensors, weight_map, dtype)
                    _swap_in(model, specs, out)
                aliases.update(layer_aliases)
                reports += got
                bar.update(1)
    finally:
        bar.close()
    def finish():
        report = combined_report(m.name, config, allocation, reports, expected, prof, time.perf_counter() - t0)
        return _finish_folder(out, model, weights, parts, len(layers), total, weight_map, aliases, report, dtype)

    return distributed.on_main(finish, "writing the compressed model")


def _finish_folder(out: Path, model, weights, parts, n_layers: int, total: int, weight_map: dict, aliases: dict,
                   report: CompressionReport, dtype) -> CompressionReport:
    """The non-layer shards, then the index and the manifest (last, atomically); stale shards removed."""
    from rankalloc.decomposers.io import INDEX, MANIFEST, manifest_of, write_json_atomic

    for k, (label, entries) in enumerate(parts):
        tensors = _read_part(weights, entries)
        _write_shard(out, SHARD.format(n_layers + k + 1, total), tensors, weight_map, dtype)
        del tensors
    manifest = manifest_of(model, report, aliases, dtype, weights=INDEX, weight_map=weight_map)
    written = set(weight_map.values())
    for f in out.iterdir():  # shards of an earlier run with another shard count (nothing complete names them)
        if SHARD_PATTERN.fullmatch(f.name) and f.name not in written:
            f.unlink()
    write_json_atomic(out / INDEX, {"metadata": {"format": "pt"}, "weight_map": weight_map})
    write_json_atomic(out / MANIFEST, manifest)
    return report


def compress_in_parts(model: nn.Module, allocation, config, prof, progress: bool = True) -> CompressionReport:
    """:func:`~rankalloc.decomposers.base.compress_` split across the ranks of several processes, in memory.

    Each rank compresses the decoder layers :func:`layer_owners` gives it (a sub-allocation per layer through
    ``compress_``, as :func:`compress_to_folder` does); then each compressed layer's module specs and state dict
    go from its rank to every other, which swaps in the compressed modules and loads them. Every rank ends with the
    same compressed ``model``, equal to one process's; the realized parameter count is checked against the
    allocation. In one process this is ``compress_`` layer by layer.
    """
    from rankalloc.decomposers.base import combined_report, compress_, expected_params
    from rankalloc.decomposers.io import _swap_in, module_specs
    from rankalloc.decomposers.registry import method_of_config

    method = method_of_config(config).name
    if not allocation.feasible:
        raise ValueError(f"allocation by {allocation.solver!r} has status {allocation.status}: expected a "
                         f"feasible allocation ({allocation.message})")
    layers_path, layers = decoder_layers(model, (getattr(prof, "meta", None) or {}).get("layers_path"))
    subs = layer_allocations(allocation, layers_path, len(layers))
    expected = expected_params(model, allocation)
    _agree(method, config, allocation, prof)
    owners = layer_owners(layers)
    t0 = time.perf_counter()
    done = {}
    for i in tqdm([i for i in subs if owners[i] == distributed.rank()], desc=f"compress ({method})", unit="layer",
                  disable=not progress or not distributed.is_main()):
        done[i] = compress_(model, subs[i], config, prof, progress=False).components
    reports = []
    for i in sorted(subs):
        layer, ours = layers[i], owners[i] == distributed.rank()
        sent = (done[i], module_specs(layer), {k: v.cpu() for k, v in layer.state_dict().items()}) if ours else None
        got, specs, state = distributed.broadcast(sent, f"sending compressed decoder layer {i}", src=owners[i])
        if not ours:
            _swap_in(layer, specs, f"decoder layer {i} from rank {owners[i]}")
            layer.load_state_dict(state, strict=True)
        reports += got
    return combined_report(method, config, allocation, reports, expected, prof, time.perf_counter() - t0)


def _agree(method: str, config, allocation, prof) -> None:
    """Every rank compresses the same allocation of the same profile with the same method and settings."""
    distributed.agree("compress", {"method": method, "config": config_dict(config), "profile": profile_id(prof),
                                   "choices": [cv.component.name + ":" + str(j) for cv, j in
                                               zip(allocation.problem.curves, allocation.choice_index)]})


def _layer_tensors(layer: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The resident layer's state dict with its prefix, on CPU (tensors sharing storage stored once)."""
    from rankalloc.decomposers.io import _dedupe

    return _dedupe(layer.state_dict(prefix=prefix))
