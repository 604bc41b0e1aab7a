# Out-of-core weights (the streaming lifecycle of GPTQ / llm-compressor: one decoder layer resident at a time).
"""Where a model's parameters live, and how one part of it is made resident on a device and released again.

- In memory: the model holds real tensors; :meth:`Weights.resident` moves a part to the compute device for the
  block and back afterwards.
- Out of core: the model is a skeleton whose parameters are on the ``meta`` device (built from its config with
  :func:`skeleton`; buffers such as rotary tables are real). :meth:`Weights.resident` reads the part's tensors
  from the checkpoint's safetensors files (one shard or an indexed set) straight onto the device, in the working
  dtype, and puts them back on ``meta`` afterwards, so peak memory is one part (a decoder layer, the embedding or
  the head) plus the activations.

A missing, truncated or mis-shaped tensor is an error naming the file and the tensor; nothing is ever left at a
random initialisation.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The safetensors tensors of a Hugging Face model folder: ``name -> file`` from its index (or one file)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {str(k): self.folder / str(v) for k, v in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{index}: not a safetensors index (expected a JSON with weight_map): {exc}") from None
        elif single.is_file():
            header, _ = safetensors_header(single)
            self.files = {k: single for k in header if k != "__metadata__"}
        else:
            raise ValueError(f"{self.folder}: no {SINGLE} or {INDEX}; out-of-core loading needs safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def validate(self) -> dict[str, tuple]:
        """Every file of the checkpoint read as far as its header: present, a well-formed header whose tensors fit
        the file exactly (a truncated or padded file, a garbage one, is a ``ValueError`` naming it), and every tensor
        the index names is in its file. Returns ``{tensor name: shape}``."""
        shapes = {}
        for path in sorted(set(self.files.values())):
            if not path.is_file():
                raise ValueError(f"checkpoint {path}: missing (the index names it); the download is incomplete")
            header, start = safetensors_header(path)
            end = start
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                try:
                    lo, hi = (int(x) for x in info["data_offsets"])
                    shape = tuple(int(d) for d in info["shape"])
                    item = torch.empty(0, dtype=_DTYPES[info["dtype"]]).element_size()
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"checkpoint {path}: damaged safetensors header (entry {k!r})") from None
                count = 1
                for d in shape:
                    count *= d
                if hi - lo != count * item or lo < 0:
                    raise ValueError(f"checkpoint {path}: tensor {k!r} is damaged ({hi - lo} bytes for {count} values "
                                     f"of {info['dtype']})")
                end = max(end, start + hi)
                if self.files.get(k) == path:
                    shapes[k] = shape
            size = os.path.getsize(path)
            if end != size:
                raise ValueError(f"checkpoint {path}: {size:,} bytes, but its header describes {end:,}: the file is "
                                 f"{'truncated' if size < end else 'damaged'} (download it again)")
        missing = sorted(k for k in self.files if k not in shapes)
        if missing:
            raise ValueError(f"checkpoint {self.files[missing[0]]}: lacks tensor {missing[0]!r}, which the index names "
                             f"({len(missing)} missing)")
        return shapes

    def float_dtype(self) -> torch.dtype | None:
        """The floating-point dtype that holds most of the checkpoint's values, from the file headers (None: no
        floating-point tensor): the precision the model was published in."""
        counts: dict[torch.dtype, int] = {}
        for path in sorted(set(self.files.values())):
            header, _ = safetensors_header(path)
            for k, info in header.items():
                dt = _DTYPES.get(info.get("dtype")) if k != "__metadata__" and self.files.get(k) == path else None
                if dt is not None and dt.is_floating_point:
                    n = 1
                    for d in info["shape"]:
                        n *= int(d)
                    counts[dt] = counts.get(dt, 0) + n
        return max(counts, key=counts.get) if counts else None

    def check_model(self, model: torch.nn.Module, weights: "Weights") -> None:
        """The checkpoint holds exactly the parameters of ``model`` (a skeleton of its config) in their shapes: a
        missing tensor (which would stay at random initialisation), a mis-shaped one or one the model does not have
        (a config that does not match the weights) is a ``ValueError`` naming it."""
        shapes = self.validate()
        expected = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            key = name if name in shapes else (weights._tied_source(name) or name)
            expected[key] = tuple(p.shape)
        missing = sorted(k for k in expected if k not in shapes)
        if missing:
            raise ValueError(f"checkpoint {self.folder}: no tensor {missing[0]!r} ({len(missing)} of the model's "
                             f"{len(expected)} missing); the weights do not match config.json (a truncated download or "
                             f"another model?) and would be left at random initialisation")
        wrong = sorted(k for k in expected if shapes[k] != expected[k])
        if wrong:
            k = wrong[0]
            raise ValueError(f"checkpoint {self.files[k]}: tensor {k!r} has shape {shapes[k]}, config.json gives "
                             f"{expected[k]} ({len(wrong)} mis-shaped); the config does not match the weights")
        buffers = {n for n, _ in model.named_buffers()}
        unexpected = sorted(k for k in shapes if k not in expected and k not in buffers)
        if unexpected:
            raise ValueError(f"checkpoint {self.files[unexpected[0]]}: tensor {unexpected[0]!r} is not a parameter of "
                             f"the model config.json describes ({len(unexpected)} such); the config does not match "
                             f"the weights")

    def read(self, names, device, dtype, shapes: dict | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` on ``device`` in ``dtype`` (each shard opened once, closed after reading)."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ValueError(f"checkpoint {self.folder}: no tensor {missing[0]!r} ({len(missing)} missing); the "
                             f"weights do not match the config (truncated download or another model?)")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            header, start = safetensors_header(path)
            for k in keys:
                if k not in header:
                    raise ValueError(f"checkpoint {path}: the index names tensor {k!r}, which the file lacks")
                out[k] = _read_one(path, header, start, k, None if shapes is None else shapes.get(k), device, dtype)
        return out


SLICE_BYTES = 2 ** 26
"""Tensors are read and converted to the working dtype 64 MB at a time (no whole second copy)."""

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_header(path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins (ValueError naming the file)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"checkpoint {path}: truncated safetensors file (no header)")
        size = int.from_bytes(raw, "little")
        if size > 100 * 2 ** 20 or size > os.path.getsize(path) - 8:
            raise ValueError(f"checkpoint {path}: damaged safetensors header (length {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ValueError(f"checkpoint {path}: damaged safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint {path}: damaged safetensors header (not a JSON object)")
    return header, 8 + size


def _read_one(path, header: dict, start: int, key: str, want, device, dtype) -> torch.Tensor:
    """One tensor read with plain file reads, a slice at a time (a memory map would count whole in the RSS)."""
    info = header[key]
    src = _DTYPES.get(info["dtype"])
    shape = tuple(info["shape"])
    if src is None:
        raise ValueError(f"checkpoint {path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    if want is not None and shape != tuple(want):
        raise ValueError(f"checkpoint {path}: tensor {key!r} has shape {shape}, the model expects {tuple(want)}")
    lo, hi = info["data_offsets"]
    item = torch.empty(0, dtype=src).element_size()
    count = 1
    for d in shape:
        count *= d
    if hi - lo != count * item or start + hi > os.path.getsize(path):
        raise ValueError(f"checkpoint {path}: tensor {key!r} is truncated or damaged ({hi - lo} bytes for "
                         f"{count} values of {info['dtype']})")
    target = dtype if src.is_floating_point else src
    out = torch.empty(count, dtype=target, device=device)
    per = max(1, SLICE_BYTES // item)
    with open(path, "rb") as f:
        for s in range(0, count, per):
            n = min(per, count - s)
            buf = bytearray(n * item)
            f.seek(start + lo + s * item)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"checkpoint {path}: tensor {key!r} is truncated")
            out[s:s + n] = torch.frombuffer(buf, dtype=src).to(device=device, dtype=target)
    return out.view(shape)


def skeleton(config, dtype: torch.dtype = torch.float32):
    """The causal LM of ``config`` with every parameter on ``meta`` (no memory, no random init); buffers are real."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _release(module: torch.nn.Module) -> None:
    """Put every parameter of ``module`` back on ``meta`` (frees its memory; shapes and dtypes stay)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                           requires_grad=p.requires_grad)


_SOURCES: "weakref.WeakKeyDictionary[torch.nn.Module, Weights]" = weakref.WeakKeyDictionary()
"""The checkpoint-backed :class:`Weights` of each out-of-core skeleton, for :func:`source_of`."""


def source_of(model: torch.nn.Module) -> "Weights | None":
    """The out-of-core :class:`Weights` whose checkpoint holds ``model``'s meta parameters (None: none)."""
    return _SOURCES.get(model)


class Weights:
    """A model and the source of its parameters (``checkpoint=None``: they are in memory already)."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint | None = None):
        self.model, self.checkpoint = model, checkpoint
        self.dtype = next(model.parameters()).dtype
        self._meta: dict = {}
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        if checkpoint is not None:
            _SOURCES[model] = self

    @property
    def out_of_core(self) -> bool:
        return self.checkpoint is not None

    def _tied_source(self, name: str) -> str | None:
        """The stored name of a tied parameter that the checkpoint lacks (the LM head tied to the embedding)."""
        cfg = getattr(self.model, "config", None)
        if getattr(cfg, "tie_word_embeddings", False) and self.model.get_output_embeddings() is not None:
            head = self.model.get_output_embeddings().weight
            if self._names.get(id(head)) == name or name.endswith("lm_head.weight"):
                emb = self.model.get_input_embeddings().weight
                for n, p in self.model.named_parameters(remove_duplicate=False):
                    if p is emb:
                        return n
        return None

    def load(self, module: torch.nn.Module, prefix: str, device) -> None:
        """Read ``module``'s parameters (named ``prefix + local name`` in the checkpoint) onto ``device``."""
        params = [(local, p) for local, p in module.named_parameters(remove_duplicate=False)]
        keys = {}
        for local, p in params:
            key = prefix + local
            if key not in self.checkpoint:
                key = self._tied_source(key) or key
            keys[local] = key
        tensors = self.checkpoint.read(sorted(set(keys.values())), device, self.dtype,
                                       {keys[local]: p.shape for local, p in params})
        for local, p in params:
            owner, _, leaf = local.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            if p.device.type == "meta":  # kept, so a release restores the very object (ties between parts survive)
                self._meta[(id(sub), leaf)] = p
            sub._parameters[leaf] = torch.nn.Parameter(tensors[keys[local]], requires_grad=p.requires_grad)

    def release(self, module: torch.nn.Module) -> None:
        """Put ``module``'s parameters back on ``meta``: the skeleton's own meta parameters where it had them (so a
        head tied to the embedding is tied again), new ones for parameters that appeared since."""
        for sub in module.modules():
            for leaf, p in list(sub._parameters.items()):
                if p is None or p.device.type == "meta":
                    continue
                old = self._meta.pop((id(sub), leaf), None)
                sub._parameters[leaf] = old if old is not None else torch.nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)

    @contextlib.contextmanager
    def resident(self, module: torch.nn.Module, prefix: str, device):
        """``module`` with real parameters on ``device`` inside the block (see the module docstring)."""
        device = torch.device(device)
        if not self.out_of_core:
            home = next(module.parameters(), torch.empty(0)).device
            module.to(device)
            try:
                yield module
            finally:
                module.to(home)
            return
        self.load(module, prefix, device)
        try:
            yield module
        finally:
            self.release(module)

    def matrix(self, module: torch.nn.Module, name: str) -> torch.Tensor:
        """The ``(out, in)`` weight of the linear map ``name`` (a view in memory; read from the checkpoint out of
        core, without loading anything else)."""
        from rankalloc.profiling.architectures import weight_of

        w = module.weight
        if w.device.type != "meta":
            return weight_of(module).detach()
        t = self.checkpoint.read([name + ".weight"], "cpu", self.dtype, {name + ".weight": w.shape})[name + ".weight"]
        return t if isinstance(module, torch.nn.Linear) else t.T

    def prefix_of(self, module: torch.nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name + "." if name else ""
        raise ValueError(f"{type(module).__name__}: not a module of this model")


def load_out_of_core(folder, dtype: torch.dtype = torch.float32):
    """``(skeleton model, Weights)`` for a local model folder: nothing but the non-layer small parts is read.

    The decoder layers, the embedding and the LM head stay on ``meta`` until made resident; the other parameters
    (final norm, learned position embeddings, projections) are small and loaded now.
    """
    import transformers

    from rankalloc.profiling.architectures import find_structure

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = skeleton(config, dtype)
    weights = Weights(model, Checkpoint(folder))
    weights.checkpoint.check_model(model, weights)
    structure = find_structure(model)
    big = {id(m) for m in structure.layers} | {id(model.get_input_embeddings())}
    head = model.get_output_embeddings()
    if head is not None:
        big.add(id(head))
    for name, sub in model.named_modules():
        params = {k: v for k, v in sub._parameters.items() if v is not None}  # a LayerNorm may have no bias
        if id(sub) in big or not params or _inside(model, name, big):
            continue
        own = torch.nn.Module()
        own._parameters = params
        weights.load(own, name + "." if name else "", "cpu")
        sub._parameters.update(own._parameters)
    return model, weights


def _inside(model, name: str, big: set) -> bool:
    """Whether module ``name`` lies inside one of the ``big`` parts (those are loaded on demand)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        if id(model.get_submodule(".".join(parts[:i]))) in big:
            return True
    return False


def write_random_checkpoint(config, folder, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A model folder (config.json + indexed safetensors shards) of ``config`` with random weights of its real shapes.

    Written one part at a time (the embedding, each decoder layer, the rest), each initialised by the model's own
    ``_init_weights`` and released before the next, so a model larger than memory can be written. Random weights
    time the same as real ones; they are for benchmarks and tests.
    """
    from safetensors.torch import save_file

    from rankalloc.profiling.architectures import find_structure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = skeleton(config, dtype)
    structure = find_structure(model)
    weights = Weights(model)
    parts = [("embed", model.get_input_embeddings())] + [(f"layer{i}", m) for i, m in enumerate(structure.layers)]
    head = model.get_output_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    if head is not None and not tied:
        parts.append(("head", head))
    # by name: to_empty and _release give the parts' parameters new objects, so ids would not match afterwards
    covered = {weights.prefix_of(m) + n for _, m in parts for n, _ in m.named_parameters()}
    if head is not None and tied:  # stored as the embedding
        covered |= {weights.prefix_of(head) + n for n, _ in head.named_parameters()}
    rest = torch.nn.Module()
    rest._parameters = {}
    weight_map, files = {}, []
    for i, (label, module) in enumerate(parts + [("rest", None)]):
        if module is None:  # every parameter no part above holds: norms, position embeddings, projections
            tensors = {}
            for name, p in model.named_parameters():
                if name not in covered:
                    sub_name, _, leaf = name.rpartition(".")
                    sub = model.get_submodule(sub_name)
                    sub.to_empty(device="cpu", recurse=False)
                    model._init_weights(sub)
                    tensors[name] = sub._parameters[leaf].detach().to(dtype).contiguous()
        else:
            module.to_empty(device="cpu")
            for sub in module.modules():
                model._init_weights(sub)
            prefix = weights.prefix_of(module)
            tensors = {prefix + n: p.detach().to(dtype).contiguous() for n, p in module.named_parameters()}
        shard = f"model-{i + 1:05d}-of-{len(parts) + 1:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
        files.append(shard)
        if module is not None:
            _release(module)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return folder
