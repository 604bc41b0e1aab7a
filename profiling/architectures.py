# Decoder structure by module-name patterns (one table for all HF families; no per-family pipelines).
"""Find the decoder layers and their compressible linear maps in a Hugging Face causal LM.

Every family is described by one set of regular expressions (:class:`ModulePatterns`), matched
against a module's name *inside* its decoder layer (``self_attn.q_proj``, ``mlp.c_fc``, ``fc2``).
The defaults cover Llama, Mistral, Qwen2, Gemma/Gemma2/Gemma3, Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``), OPT and GPT-2 (``Conv1D`` layers whose weight is stored ``(in, out)``;
:func:`weight_of` returns every weight as ``(out, in)``). Pass your own patterns for anything else.

Projections that read the same tensor (q/k/v; gate/up) form one :class:`InputGroup`, so their
input Gram is accumulated and stored once.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch

from rankalloc.allocators.problem import Component

KINDS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
"""Component kinds in the order they are listed within a layer."""

SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))
"""Kinds whose modules read the same input tensor inside one layer (one Gram per group)."""


@dataclass(frozen=True)
class ModulePatterns:
    """Regular expressions locating the decoder layers and each kind of linear map.

    ``layers`` must fully match the qualified name of the ``torch.nn.ModuleList`` holding the
    decoder layers. Every other field must fully match a module's name relative to its layer
    (e.g. ``self_attn.q_proj``); an empty string disables that kind. A module may match at most
    one kind. Example for a model with ``blocks.{i}.attn.wq`` etc.::

        ModulePatterns(layers=r"blocks", q=r"attn\\.wq", k=r"attn\\.wk", v=r"attn\\.wv",
                       o=r"attn\\.wo", up=r"ffn\\.w1", down=r"ffn\\.w2", gate=r"ffn\\.w3")
    """

    layers: str = r"(model\.)?(language_model\.)?(decoder\.)?layers|transformer\.h"
    q: str = r"(self_attn|attn|attention)\.q_proj"
    k: str = r"(self_attn|attn|attention)\.k_proj"
    v: str = r"(self_attn|attn|attention)\.v_proj"
    qkv: str = r"(self_attn|attn)\.(qkv_proj|c_attn)"
    o: str = r"(self_attn|attention)\.(o_proj|out_proj)|attn\.(o_proj|out_proj|c_proj)"
    gate: str = r"mlp\.gate_proj"
    up: str = r"mlp\.(up_proj|c_fc)|fc1"
    gate_up: str = r"mlp\.gate_up_proj"
    down: str = r"mlp\.(down_proj|c_proj)|fc2"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise ValueError(f"ModulePatterns.{f.name}: expected a regex string, received {value!r}")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"ModulePatterns.{f.name}: invalid regex {value!r}: {exc}") from None
        if not self.layers:
            raise ValueError("ModulePatterns.layers: expected a regex for the decoder layer list, received ''")

    def kind_of(self, local_name: str) -> str | None:
        """The kind whose pattern fully matches ``local_name``; ``None`` if none does."""
        hits = [k for k in KINDS if getattr(self, k) and re.fullmatch(getattr(self, k), local_name)]
        if len(hits) > 1:
            raise ValueError(f"module {local_name!r} matches several kinds {hits}; expected one. "
                             f"Make the ModulePatterns regexes disjoint.")
        return hits[0] if hits else None

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_PATTERNS = ModulePatterns()


@dataclass(frozen=True)
class InputGroup:
    """Linear maps of one layer that read the same input; ``key`` names their shared Gram."""

    key: str
    members: tuple[str, ...]
    layer: int
    n: int


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from the model config (``None`` where the config does not say)."""

    arch: str
    num_layers: int
    hidden: int | None
    intermediate: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class DecoderStructure:
    """The decoder layers of a model and the components found in them."""

    layers_path: str
    layers: torch.nn.ModuleList
    components: tuple[Component, ...]
    groups: tuple[InputGroup, ...]
    modules: dict
    dims: ModelDims

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_components(self, layer: int) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.layer == layer)

    def layer_groups(self, layer: int) -> tuple[InputGroup, ...]:
        return tuple(g for g in self.groups if g.layer == layer)

    def gram_key(self, name: str) -> str:
        for g in self.groups:
            if name in g.members:
                return g.key
        raise KeyError(name)

    def value_slice(self, layer: int) -> tuple[str, int] | None:
        """``(module name, width)`` of the value projection output of ``layer``: its last ``width``
        output features are the values (a plain ``v`` projection, or the tail of a fused ``qkv``)."""
        d = self.dims
        for c in self.layer_components(layer):
            if c.kind in ("v", "qkv") and d.kv_heads and d.head_dim:
                width = d.kv_heads * d.head_dim
                if c.kind == "v" and c.m != width:
                    raise ValueError(f"{c.name}: expected {d.kv_heads} KV heads x {d.head_dim} = {width} value "
                                     f"outputs from the config, received {c.m}")
                return c.name, width
        return None


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """The weight of a linear map as ``(out, in)``: ``nn.Linear`` as is, GPT-2 ``Conv1D`` transposed."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.T
    raise ValueError(f"unsupported linear module type {type(module).__name__}: expected torch.nn.Linear "
                     f"or transformers Conv1D")


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _supported(module) -> bool:
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def _first(config, *names):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    return None


def model_dims(model, num_layers: int, components) -> ModelDims:
    """Hidden/MLP sizes and attention heads from ``model.config`` (text config for multimodal models)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    arch = str(getattr(config, "model_type", "") or type(model).__name__)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    inter = _first(config, "intermediate_size", "ffn_dim", "n_inner")
    downs = [c.n for c in components if c.kind == "down"]
    if inter is None and downs:
        inter = downs[0]
    heads = _first(config, "num_attention_heads", "n_head")
    kv = _first(config, "num_key_value_heads", "n_head_kv") or heads
    head_dim = _first(config, "head_dim")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    return ModelDims(arch, num_layers, hidden, inter, heads, kv, head_dim)


def _find_layer_list(model, patterns: ModulePatterns) -> tuple[str, torch.nn.ModuleList]:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    hits = [(n, m) for n, m in lists if re.fullmatch(patterns.layers, n)]
    if len(hits) == 1:
        return hits[0]
    top = [f"{n} ({type(m).__name__})" for n, m in model.named_children()]
    found = [f"{n} (len {len(m)})" for n, m in lists]
    if not hits:
        raise ValueError(
            f"unknown architecture {type(model).__name__}: no torch.nn.ModuleList of decoder layers matches "
            f"ModulePatterns.layers={patterns.layers!r}. Module lists found: {found or 'none'}; top-level "
            f"modules: {top}. Pass patterns=ModulePatterns(layers=r'<name of the layer list>', q=..., k=..., "
            f"v=..., o=..., gate=..., up=..., down=...) with regexes for your module names.")
    raise ValueError(f"{type(model).__name__}: several module lists match ModulePatterns.layers="
                     f"{patterns.layers!r}: {[n for n, _ in hits]}; expected exactly one. Pass a narrower "
                     f"patterns=ModulePatterns(layers=...).")


def find_structure(model: torch.nn.Module, patterns: ModulePatterns | None = None) -> DecoderStructure:
    """Decoder layers, components (kind/m/n/layer, qualified names) and shared-input groups of ``model``.

    Raises ``ValueError`` listing the modules found when the layer list or no supported linear
    map can be located, with instructions for passing :class:`ModulePatterns`.
    """
    patterns = patterns or DEFAULT_PATTERNS
    if not isinstance(patterns, ModulePatterns):
        raise ValueError(f"patterns: expected a ModulePatterns, received {type(patterns).__name__}")
    path, layers = _find_layer_list(model, patterns)
    components, groups, modules = [], [], {}
    for li, layer in enumerate(layers):
        found: dict[str, list[tuple[str, torch.nn.Module]]] = {}
        for local, mod in layer.named_modules():
            if not local:
                continue
            kind = patterns.kind_of(local)
            if kind is None:
                continue
            if not _supported(mod):
                raise ValueError(f"{path}.{li}.{local}: matched kind {kind!r} but is a {type(mod).__name__}; "
                                 f"expected torch.nn.Linear or transformers Conv1D")
            found.setdefault(kind, []).append((f"{path}.{li}.{local}", mod))
        layer_comps = []
        for kind in KINDS:
            for name, mod in found.get(kind, []):
                m, n = weight_of(mod).shape
                layer_comps.append(Component(name, int(m), int(n), kind, li))
                modules[name] = mod
        components += layer_comps
        grouped = set()
        for shared in SHARED_INPUT:
            members = [c for c in layer_comps if c.kind in shared]
            if members:
                ns = {c.n for c in members}
                if len(ns) != 1:
                    raise ValueError(f"layer {li}: {[c.name for c in members]} should share one input but have "
                                     f"input sizes {sorted(ns)}")
                groups.append(InputGroup(members[0].name, tuple(c.name for c in members), li, members[0].n))
                grouped |= {c.name for c in members}
        groups += [InputGroup(c.name, (c.name,), li, c.n) for c in layer_comps if c.name not in grouped]
    if not components:
        first = layers[0] if len(layers) else None
        seen = [f"{n} ({type(m).__name__})" for n, m in first.named_modules() if n] if first is not None else []
        raise ValueError(
            f"{type(model).__name__}: no supported linear layers in {path} (found {len(layers)} layers). "
            f"Modules of layer 0: {seen[:40] or 'none'}. Expected names like self_attn.q_proj, mlp.down_proj "
            f"(nn.Linear or Conv1D). Pass patterns=ModulePatterns(q=r'...', k=r'...', ...) whose regexes "
            f"fully match these names.")
    dims = model_dims(model, len(layers), components)
    return DecoderStructure(path, layers, tuple(components), tuple(groups), modules, dims)


def prime_count(d: int, gamma: float) -> int:
    """``ceil(gamma * d)``: the number of neurons SoLA keeps dense."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma: expected a fraction in [0, 1], received {gamma!r}")
    return int(math.ceil(gamma * d - 1e-12))
