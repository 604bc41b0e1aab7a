# The host library's call contracts (transformers' module forward signatures and cache interface), in one place.
"""What a replaced module must accept, and how the project itself calls a model with a KV cache.

transformers renamed the cache argument of every model, decoder layer and attention forward from
``past_key_values`` to ``cache`` in 5.24 (the old name is accepted with a deprecation warning until
5.40), and the model outputs carry it as ``out.cache``. Earlier 5.x attention forwards also took an
explicit ``cache_position`` and passed ``{sin, cos, cache_position}`` to ``Cache.update``. Every
module this project puts into a model reads the host's contract here, at build time, and refuses a
signature it does not know with an error naming the module, its class and the installed version.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

CACHE_NAMES = ("cache", "past_key_values")
"""The cache argument, newest name first."""


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - torch-only use
        return "not installed"
    return transformers.__version__


def _parameters(module: torch.nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``type(module).forward`` after ``self`` (decorators such as ``deprecate_kwarg`` unwrapped)."""
    return list(inspect.signature(type(module).forward).parameters.values())[1:]


def describe_forward(module: torch.nn.Module) -> str:
    return f"forward({', '.join(str(p).split(':')[0].split('=')[0].strip() for p in _parameters(module))})"


def _refuse(module: torch.nn.Module, name: str, what: str, expected: str) -> ValueError:
    return ValueError(f"{name}: cannot replace {type(module).__name__} ({type(module).__module__}, transformers "
                      f"{transformers_version()}) with {what}: its {describe_forward(module)} is not a supported call "
                      f"contract; expected {expected}")


def check_single_input(module: torch.nn.Module, name: str, what: str) -> None:
    """``ValueError`` unless ``module.forward`` takes exactly one tensor (how ``nn.Linear`` and gated MLPs are called).

    A replacement of ``what`` takes one input, so a host module called with more would lose arguments.
    """
    params = _parameters(module)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 1 or params[0].kind not in positional:
        raise _refuse(module, name, what, "forward(x) with exactly one input")


@dataclass(frozen=True)
class AttentionContract:
    """How a host attention module is called: the name of its cache argument, and whether it takes an explicit
    ``cache_position`` (early 5.x releases; ``Cache.update`` then receives ``{sin, cos, cache_position}``)."""

    cache_name: str
    cache_position: bool = False

    def update(self, cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, sin, cos, cache_position,
               kwargs: dict):
        """``cache.update`` called the way the host attention calls it."""
        if self.cache_name == "cache":
            return cache.update(key, value, layer_idx, kwargs=kwargs)
        if self.cache_position:
            return cache.update(key, value, layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        return cache.update(key, value, layer_idx)


ATTENTION_FORWARD = ("hidden_states", "position_embeddings", "attention_mask")


def attention_contract(attn: torch.nn.Module, name: str, what: str = "FLAT attention") -> AttentionContract:
    """The :class:`AttentionContract` of ``attn``, or ``ValueError`` naming it when its forward is of another shape.

    Supported: ``forward(hidden_states, position_embeddings, attention_mask, cache | past_key_values
    [, cache_position], **kwargs)``, the Llama-family signature of transformers 5.x.
    """
    params = _parameters(attn)
    names = [p.name for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    has_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    cache = [n for n in CACHE_NAMES if n in names]
    expected = ("forward(hidden_states, position_embeddings, attention_mask, cache (or past_key_values)"
                "[, cache_position], **kwargs)")
    if names[:3] != list(ATTENTION_FORWARD) or len(cache) != 1 or not has_kwargs:
        raise _refuse(attn, name, what, expected)
    rest = [n for n in names[3:] if n != cache[0]]
    if rest not in ([], ["cache_position"]):
        raise _refuse(attn, name, what, expected)
    return AttentionContract(cache[0], bool(rest))


def attention_function(config, eager):
    """The attention kernel the host selects for ``config._attn_implementation`` (``eager`` when it is "eager").

    ``ALL_ATTENTION_FUNCTIONS.get_interface`` appeared during 5.x; earlier releases index the registry directly.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache (``cache`` from transformers 5.24)."""
    names = {p.name for p in _parameters(model)}
    for n in CACHE_NAMES:
        if n in names:
            return n
    raise ValueError(f"{type(model).__name__} (transformers {transformers_version()}): its {describe_forward(model)} "
                     f"takes no KV cache; expected one of {list(CACHE_NAMES)}")


def output_cache(out):
    """The KV cache a model returned (``out.cache``, or ``out.past_key_values`` before transformers 5.24)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for n in CACHE_NAMES:
        if n in keys:
            return out[n]
    raise ValueError(f"the model output ({type(out).__name__}) holds no KV cache; received fields {list(keys)}")


def with_cache(model: torch.nn.Module, cache) -> dict:
    """Keyword arguments that pass ``cache`` to ``model`` under the name its forward uses."""
    return {cache_argument(model): cache, "use_cache": True}
