"""Decoder structure by module-name patterns: every supported family, user patterns, clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ARCHES, tiny_model
from rankalloc.profiling.architectures import ModulePatterns, find_structure, weight_of

EXPECTED_KINDS = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "mistral": ["q", "k", "v", "o", "gate", "up", "down"],
    "qwen2": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma2": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma3": ["q", "k", "v", "o", "gate", "up", "down"],
    "phi3": ["qkv", "o", "gate_up", "down"],
    "opt": ["q", "k", "v", "o", "up", "down"],
    "gpt2": ["qkv", "o", "up", "down"],
}
LAYERS_PATH = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("arch", ARCHES)
def test_family_structure(arch):
    """Each family yields its kinds per layer with qualified names, (m, n) = (out, in) of weight_of, the
    layer index, input groups (q/k/v and gate/up share one input) and value heads from the config."""
    model = tiny_model(arch)
    st = find_structure(model)
    assert st.layers_path == LAYERS_PATH.get(arch, "model.layers") and st.num_layers == 2
    for layer in range(2):
        comps = st.layer_components(layer)
        assert [c.kind for c in comps] == EXPECTED_KINDS[arch]
        for c in comps:
            assert c.name.startswith(f"{st.layers_path}.{layer}.") and c.layer == layer
            mod = model.get_submodule(c.name)
            assert st.modules[c.name] is mod and tuple(weight_of(mod).shape) == (c.m, c.n)
            x = torch.randn(3, c.n)
            bias = 0 if getattr(mod, "bias", None) is None else mod.bias
            torch.testing.assert_close(mod(x), x @ weight_of(mod).T + bias)  # (out, in) even for Conv1D
        groups = st.layer_groups(layer)
        kinds_by_group = sorted(tuple(next(c.kind for c in comps if c.name == n) for n in g.members) for g in groups)
        expect = {"llama": [("down",), ("gate", "up"), ("o",), ("q", "k", "v")],
                  "phi3": [("down",), ("gate_up",), ("o",), ("qkv",)],
                  "opt": [("down",), ("o",), ("q", "k", "v"), ("up",)],
                  "gpt2": [("down",), ("o",), ("qkv",), ("up",)]}
        assert kinds_by_group == expect.get(arch, expect["llama"])
    d = st.dims
    assert (d.hidden, d.intermediate, d.heads, d.num_layers) == (64, 160, 4, 2)
    assert d.kv_heads == (4 if arch in ("opt", "gpt2") else 2) and d.head_dim == 16
    vname, width = st.value_slice(0)
    assert width == d.kv_heads * d.head_dim
    assert vname.endswith({"phi3": "qkv_proj", "gpt2": "c_attn"}.get(arch, "v_proj"))


def test_gpt2_conv1d_transposed():
    """GPT-2 Conv1D stores (in, out); weight_of returns the (out, in) view, not a copy."""
    model = tiny_model("gpt2")
    mod = model.transformer.h[0].attn.c_attn
    assert tuple(mod.weight.shape) == (64, 192) and tuple(weight_of(mod).shape) == (192, 64)
    assert weight_of(mod).data_ptr() == mod.weight.data_ptr()
    with pytest.raises(ValueError, match="Conv2d"):
        weight_of(nn.Conv2d(2, 2, 1))


class _Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.attn = nn.Module()
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self.attn, name, nn.Linear(d, d, bias=False))
        self.ffn = nn.Module()
        self.ffn.w1, self.ffn.w2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, hidden_states, scale=1.0):
        x = hidden_states
        q, k, v = self.attn.wq(x), self.attn.wk(x), self.attn.wv(x)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        x = x + self.attn.wo(att)
        return x + self.ffn.w2(torch.relu(self.ffn.w1(x)))


class _Custom(nn.Module):
    """A decoder that no default pattern knows: ``blocks.{i}.attn.wq`` ... ``blocks.{i}.ffn.w2``."""

    def __init__(self, d=16, f=40, layers=2, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, f) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x, scale=0.25)
        return self.head(x)


CUSTOM = ModulePatterns(layers=r"blocks", q=r"attn\.wq", k=r"attn\.wk", v=r"attn\.wv", o=r"attn\.wo",
                        up=r"ffn\.w1", down=r"ffn\.w2", qkv="", gate="", gate_up="")


def test_unknown_architecture_lists_modules_and_explains_patterns():
    """Without patterns an unknown model is refused with the module lists found and how to pass patterns."""
    with pytest.raises(ValueError, match=r"(?s)unknown architecture _Custom.*blocks \(len 2\).*ModulePatterns"):
        find_structure(_Custom())


def test_no_supported_linear_layers_lists_what_was_found():
    """A layer list whose modules match no kind is refused listing the modules (and types) of layer 0."""
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = _Custom().blocks

    with pytest.raises(ValueError, match=r"(?s)no supported linear layers in model\.layers.*attn\.wq \(Linear\)"
                                         r".*ModulePatterns"):
        find_structure(Wrapped())


def test_user_patterns_profile_end_to_end(tmp_path):
    """User patterns make an unknown model profilable: components, Grams equal to a plain forward, curves."""
    from rankalloc.profiling.profile import profile_model

    model = _Custom().eval()
    st = find_structure(model, CUSTOM)
    assert [c.kind for c in st.layer_components(1)] == ["q", "k", "v", "o", "up", "down"]
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    prof = profile_model(model, ids, out=tmp_path, patterns=CUSTOM, batch_size=2, progress=False, store="full")
    xs = []
    h = model.blocks[1].ffn.w2.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, 40).double()))
    with torch.no_grad():
        for i in (0, 2):
            model(ids[i:i + 2])
    h.remove()
    X = torch.cat(xs)
    G = prof.input_gram("blocks.1.ffn.w2")
    assert float((G - X.T @ X).abs().max()) <= 1e-10 * float(G.abs().max())
    assert len(prof.curve_set().components) == 12 and prof.meta["settings"]["patterns"]["layers"] == "blocks"
    with pytest.raises(ValueError, match="value-output covariance"):
        prof.value_covariance(0)  # no head count in a config-less model: refused on access, not guessed


def test_pattern_validation():
    """Bad regexes, non-strings, an empty layer pattern and patterns matching two kinds are refused."""
    with pytest.raises(ValueError, match="invalid regex"):
        ModulePatterns(q="(")
    with pytest.raises(ValueError, match="expected a regex string"):
        ModulePatterns(q=3)
    with pytest.raises(ValueError, match="layers"):
        ModulePatterns(layers="")
    with pytest.raises(ValueError, match="several kinds"):
        find_structure(tiny_model("llama"), ModulePatterns(k=r"self_attn\.[qk]_proj"))
    with pytest.raises(ValueError, match="matched kind .q. but is a LlamaMLP"):
        find_structure(tiny_model("llama"), ModulePatterns(q=r"self_attn\.q_proj|mlp"))
    with pytest.raises(ValueError, match="expected a ModulePatterns"):
        find_structure(tiny_model("llama"), {"q": "x"})


@pytest.mark.real_model
def test_smollm2_has_210_components():
    """SmolLM2-135M: 30 layers x (q, k, v, o, gate, up, down) = 210 components, GQA 9/3 heads of 64."""
    data = pytest.importorskip("rankalloc.profiling.data")
    loaded = data.load_model()
    st = find_structure(loaded.model)
    assert len(st.components) == 210 and len(st.groups) == 120
    d = st.dims
    assert (d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim, d.num_layers) == (576, 1536, 9, 3, 64, 30)
    assert sum(c.m * c.n for c in st.components) == 106_168_320
