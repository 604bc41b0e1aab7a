"""Every method's compressed model follows the host model's call contract: cached decoding, generation, save/load.

For each method (svd, fisher_svd, pgsvd, sola, sslc, flat) on a tiny Llama-family, Gemma-family and Qwen3 model
(Gemma3: query/key norms, one sliding-window and one full layer, ``query_pre_attn_scalar`` != head_dim; Qwen3:
query/key norms and a head_dim that is not hidden / heads, so q_proj is not square), the
compressed model is saved and reloaded, then decoded incrementally with its KV cache. Every step's logits must equal
the full forward's, and greedy generation with and without the cache must agree. A replaced module that dropped an
argument (the cache, a position, a mask) fails here.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_model
from decomposer_cases import ALL_METHODS, allocation_of, flat_choices, linear_choices, method_case, varied
from rankalloc.decomposers import FlatConfig, SVDConfig, compress_, load_compressed, save_compressed
from rankalloc.decomposers.host import (AttentionContract, attention_contract, cache_argument, output_cache,
                                        transformers_version, with_cache)

FAMILIES = {
    "llama": dict(),
    "gemma3": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4, query_pre_attn_scalar=24),
    "qwen3": dict(head_dim=24),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, model, calibration ids, profile) of a tiny model of one family."""
    from rankalloc.profiling.profile import profile_model

    model = tiny_model(request.param, **FAMILIES[request.param])
    ids = torch.randint(3, model.config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(1))
    profile = profile_model(model, ids, out=tmp_path_factory.mktemp(f"profile-{request.param}"), device="cpu",
                            kinds=("whitened", "fisher"), progress=False, store="full")
    return request.param, model, ids, profile


def decode_steps(model, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of positions ``prefill - 1 ..`` computed by a prefill, then one token at a time with the cache."""
    out = model(input_ids=x[:, :prefill], use_cache=True)
    steps = [out.logits[:, -1]]
    cache = output_cache(out)
    for t in range(prefill, x.shape[1]):
        out = model(input_ids=x[:, t:t + 1], **with_cache(model, cache))
        cache = output_cache(out)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_cached_decoding_and_generation_match_the_full_forward(family, method, tmp_path):
    """Save, reload, then: incremental decoding with the cache gives the full forward's logits at every step, and
    greedy generation with and without the cache agrees. The project's own calls raise no deprecation warning."""
    name, model, ids, profile = family
    m = copy.deepcopy(model)
    config, alloc = method_case(method, m, profile)
    report = compress_(m, alloc, config, profile, progress=False)
    save_compressed(m, tmp_path / "c", report)
    loaded = load_compressed(tmp_path / "c")
    x = ids[:2, :12]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            full = loaded(input_ids=x, use_cache=False).logits
            assert torch.equal(full, m(input_ids=x, use_cache=False).logits)
            steps = decode_steps(loaded, x, prefill=6)
    torch.testing.assert_close(steps, full[:, 5:], rtol=1e-5, atol=1e-5)
    a = loaded.generate(x[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    b = loaded.generate(x[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape == (1, 11) and torch.equal(a, b)


def test_flat_with_value_rank_zero_decodes_with_the_cache(family):
    """A layer whose value heads keep rank 0 outputs zeros from attention, with or without the cache."""
    name, model, ids, profile = family
    m = copy.deepcopy(model)
    from decomposer_cases import FLAT_COSTS

    compress_(m, allocation_of(flat_choices(profile, ranks=(0, 9)), FLAT_COSTS), FlatConfig(), profile, progress=False)
    x = ids[:2, :10]
    with torch.no_grad():
        torch.testing.assert_close(decode_steps(m, x, 4), m(input_ids=x).logits[:, 3:], rtol=1e-5, atol=1e-5)


def test_flat_at_full_value_rank_reproduces_the_dense_model(family):
    """At value rank = head_dim the absorbed basis is orthonormal, so FLAT's attention must equal the host's: same
    scaling (Gemma's query_pre_attn_scalar), query/key norms, sliding-window and full layers."""
    from decomposer_cases import HEADS, KV_HEADS, vo_component
    from rankalloc.allocators.costs import FlatParams
    from rankalloc.allocators.problem import DENSE, Choice

    name, model, ids, profile = family
    m = copy.deepcopy(model)
    head_dim = model.config.head_dim
    choices = {vo_component(l): Choice(head_dim) for l in range(2)}
    choices.update({c: Choice(DENSE) for c in profile.components if c.kind not in ("v", "o")})
    compress_(m, allocation_of(choices, {"params": FlatParams(head_dim, HEADS, KV_HEADS)}), FlatConfig(), profile,
              progress=False)
    assert sum(type(x).__name__ == "FlatAttention" for x in m.modules()) == 2
    x = ids[:2, :12]
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- refused contracts
class ExtraArgAttention(nn.Module):
    """An attention whose forward takes an argument FLAT does not know."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, alibi=None,
                **kwargs):
        raise AssertionError("never called")


class ScaledLinear(nn.Linear):
    """A Linear called with a second input: a low-rank replacement would drop it."""

    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


class RoutedMLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x, routing_weights):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * routing_weights


def test_unknown_forward_signatures_are_refused_by_name():
    """A host module whose forward is not the contract a replacement follows is refused at build time, with the
    module, its class and the installed transformers version in one line."""
    attn = ExtraArgAttention()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*ExtraArgAttention.*transformers "
                                         + transformers_version().replace(".", r"\.") + r".*alibi"):
        attention_contract(attn, "model.layers.0.self_attn")


def test_linear_and_mlp_with_extra_inputs_are_refused(family):
    """svd on a Linear subclass called with two inputs, and SoLA on an MLP called with routing weights, both refuse
    before any module is changed."""
    name, model, ids, profile = family
    m = copy.deepcopy(model)
    q = m.model.layers[0].self_attn.q_proj
    scaled = ScaledLinear(q.in_features, q.out_features, bias=q.bias is not None)
    scaled.load_state_dict(q.state_dict())
    m.model.layers[0].self_attn.q_proj = scaled
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*ScaledLinear.*forward\(x, scale\)"):
        compress_(m, allocation_of(linear_choices(profile, varied)), SVDConfig(), profile, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m = copy.deepcopy(model)
    m.model.layers[0].mlp = RoutedMLP(m.model.layers[0].mlp)
    config, alloc = method_case("sola", m, profile)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp.*RoutedMLP.*routing_weights"):
        compress_(m, alloc, config, profile, progress=False)
    assert isinstance(m.model.layers[1].mlp, type(model.model.layers[1].mlp))  # nothing was split


@pytest.mark.parametrize("arch, why", [("phi3", "fused qkv_proj"), ("gpt2", "fused Conv1D")])
def test_flat_names_the_family_it_refuses_and_why(arch, why):
    from rankalloc.decomposers.flat import check_family
    from rankalloc.profiling.architectures import find_structure

    model = tiny_model(arch)
    attn_name = find_structure(model).layers_path + ".0." + ("self_attn" if arch == "phi3" else "attn")
    with pytest.raises(ValueError, match=why):
        check_family(model.get_submodule(attn_name), attn_name + ".vo")


# ----------------------------------------------------------------------------- the three 5.x contracts
class RecordingCache:
    def __init__(self):
        self.calls = []

    def update(self, *args, **kwargs):
        self.calls.append((args[3:], kwargs))
        return args[0], args[1]


def _signature_module(params: str):
    ns = {}
    exec(f"def forward(self, {params}):\n    pass\n", ns)
    return type("Host", (nn.Module,), {"forward": ns["forward"]})()


@pytest.mark.parametrize("params, contract, call", [
    ("hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs",
     AttentionContract("cache"), ((), {"kwargs": {"position_ids": 3}})),
    ("hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs",
     AttentionContract("past_key_values"), ((), {})),
    ("hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache_position=None, "
     "**kwargs", AttentionContract("past_key_values", True), (({"sin": "s", "cos": "c", "cache_position": 7},), {})),
])
def test_each_transformers_5_attention_contract_updates_the_cache_as_its_host(params, contract, call):
    """5.24+ passes ``kwargs=``; 5.1-5.23 pass nothing more; early 5.x pass {sin, cos, cache_position}."""
    assert attention_contract(_signature_module(params), "attn") == contract
    cache = RecordingCache()
    k = v = torch.zeros(1)
    contract.update(cache, k, v, 0, "s", "c", 7, {"position_ids": 3})
    assert cache.calls == [call]


def test_the_installed_model_takes_its_cache_under_the_name_the_helpers_use():
    model = tiny_model("llama")
    name = cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 3
