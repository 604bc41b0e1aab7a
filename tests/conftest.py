"""Shared test support: tiny random-weight decoder models and a real tokenizer trained locally.

Model tests use these instead of downloaded weights. Only tests marked ``real_model`` touch
SmolLM2. Use the helpers through the fixtures, or import them as
``from conftest import tiny_model`` (pytest's default import mode puts this folder on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


SAMPLE_TEXT = (
    "The river flows past the old mill and into the valley below. Farmers grow wheat, barley and oats "
    "on the terraces. In 1843 the town council built a stone bridge; it still carries traffic today. "
    "Scholars argue about the origin of the name, which may come from an older word for ford. "
) * 8

TINY_SIZES = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)


def tiny_config(arch: str = "llama", **overrides):
    """A transformers config of a tiny decoder for ``arch`` (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3,
    phi3, opt, gpt2). Overrides of :data:`TINY_SIZES` resize it; any other override is a field of that family's
    config (``sliding_window``, ``layer_types``, ``head_dim``...) and must come out as given, so a family that does
    not know it fails here instead of silently building another model."""
    import transformers as tf

    s = {**TINY_SIZES, **{k: v for k, v in overrides.items() if k in TINY_SIZES}}
    extra = {k: v for k, v in overrides.items() if k not in TINY_SIZES}
    common = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                  num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=s["max_position_embeddings"], bos_token_id=1, eos_token_id=2)
    ids = dict(bos_token_id=1, eos_token_id=2)
    head_dim = dict(head_dim=s["hidden_size"] // s["num_attention_heads"])
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**common, "tie_word_embeddings": True, **extra})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**common, "sliding_window": None, **extra})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, **extra})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**{**common, **head_dim, **extra})
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**{**common, **head_dim, **extra})
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**{**common, **head_dim, **extra})
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**{**common, **head_dim, **extra})
    elif arch == "phi3":
        cfg = tf.Phi3Config(**{**common, "pad_token_id": 0, **extra})
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], ffn_dim=s["intermediate_size"],
                           num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                           max_position_embeddings=s["max_position_embeddings"], word_embed_proj_dim=s["hidden_size"],
                           **{**ids, **extra})
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=s["vocab_size"], n_embd=s["hidden_size"], n_inner=s["intermediate_size"],
                            n_layer=s["num_hidden_layers"], n_head=s["num_attention_heads"],
                            n_positions=s["max_position_embeddings"], **{**ids, **extra})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    lost = {k: (v, getattr(cfg, k, None)) for k, v in extra.items() if getattr(cfg, k, None) != v}
    if lost:
        raise ValueError(f"tiny {arch} config did not take {lost} (given, got)")
    return cfg


ARCHES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2")


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random-weight causal LM in float32, eval mode, on CPU."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def tiny_full_profile(tmp_path_factory):
    """``(model, ids, profile)``: the tiny llama, 8 x 64 random calibration ids and their full-store profile
    (whitened + fisher, every output-gradient Gram), for the sequential-calibration tests."""
    import torch

    from rankalloc.profiling.profile import profile_model

    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    full = profile_model(model, ids, out=tmp_path_factory.mktemp("full"), device="cpu", kinds=("whitened", "fisher"),
                         progress=False, store="full")
    return model, ids, full


def tiny_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]):
    """A real byte-level BPE tokenizer trained on a few sentences, with BOS/EOS, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model_dir(path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny model plus tokenizer as a plain HF folder (what a user's local model looks like)."""
    path = Path(path)
    model = tiny_model(arch, seed, **overrides)
    tok = tiny_tokenizer(model.config.vocab_size)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_text_file(path, n_articles: int = 40) -> Path:
    """A plain-text corpus of ``n_articles`` blank-line-separated articles."""
    path = Path(path)
    arts = [f"Article {i}. " + SAMPLE_TEXT[(i * 37) % 200:] for i in range(n_articles)]
    path.write_text("\n\n".join(arts))
    return path


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _threads():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    yield
