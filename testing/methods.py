# A conformance suite for a decomposition method, run on a tiny random-weight model of a real family
"""``check_method``: the contracts every registered decomposition method must keep, checked on anyone's method.

The method is run end to end on a tiny random-weight causal LM built from a transformers config (Llama by
default; ``family`` picks another), profiled on random token ids (the full store, so that every rank can be built). Each row of the
returned table (columns :data:`~rankalloc.testing.checks.COLUMNS`) is one check of :data:`METHOD_CHECKS`:

* ``fits``: the method accepts the model's structure (:meth:`~rankalloc.decomposers.registry.Method.check_model`);
  when it does not, the other rows are not run and say so.
* ``curves_valid``: its curves build, every error of every kind is finite and >= 0, and its problem at ``ratio``
  removed builds (which checks that errors do not rise with rank or kept sparsity).
* ``budget_held``: its recommended solver's allocation at ``ratio`` is compressed; the weights the model really
  stores fell by exactly what the allocation says it removed, counted on the model, not from the method's own
  report (:func:`weight_units`).
* ``full_rank_is_dense``: every component at its largest rank (no sparse part) reproduces the dense logits.
* ``save_load_identical``: the compressed model saved and reloaded gives bit-identical logits.
* ``cached_decoding``: the reloaded model decoded one token at a time with its KV cache gives the full forward's
  logits.
* ``deterministic``: compressing again from the dense model gives the same tensors.

A failed check is a verdict in its row (with the exception's message), never an exception to the caller.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rankalloc.testing.checks import COLUMNS, CheckRow

METHOD_CHECKS = ("fits", "curves_valid", "budget_held", "full_rank_is_dense", "save_load_identical",
                 "cached_decoding", "deterministic")
"""The rows of :func:`check_method`, in order."""

FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2")
"""Model families :func:`check_method` can build (``family``)."""

LOGIT_RTOL = 1e-3
"""``full_rank_is_dense`` and ``cached_decoding``: the largest logit difference allowed, relative to the largest
dense logit (float32 factors of a float64 fit)."""


def tiny_config(family: str = "llama"):
    """A transformers config of a two-layer decoder of ``family`` (hidden 64, 4 heads of dim 16, 2 KV heads, MLP
    160, vocabulary 256): small enough to profile and compress in seconds, with every projection a real family
    has (fused ``qkv_proj`` and ``gate_up_proj`` in Phi-3, ``Conv1D`` layers in GPT-2)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {list(FAMILIES)}")
    size = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_inner=160, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2)
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig,
              "gemma2": tf.Gemma2Config, "phi3": tf.Phi3Config}[family]
    extra = {"gemma2": dict(head_dim=16, sliding_window=8), "mistral": dict(sliding_window=8),
             "phi3": dict(pad_token_id=0)}.get(family, {})
    return config(**size, **extra)


def _model(family: str, seed: int):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()


def weight_units(model) -> int:
    """What ``model`` stores in the units of the ``Params`` cost model: its weight entries (biases excluded: no
    cost model prices them) plus every sparse part's CSR indices in 16-bit parameters (a module's
    ``index_params()``). Bookkeeping a forward never reads (SoLA's ``prime_index``) is not counted."""
    index = sum(int(m.index_params()) for m in model.modules() if callable(getattr(m, "index_params", None)))
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("bias")) + index


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _close(a, b, what: str) -> str | None:
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    if not math.isfinite(diff) or diff > LOGIT_RTOL * max(scale, 1.0):
        return f"{what}: largest logit difference {diff:.3g} (allowed {LOGIT_RTOL:g} x {max(scale, 1.0):.3g})"
    return None


def _full_rank(problem):
    """The allocation of ``problem`` that takes every component's largest rank without a sparse part."""
    from rankalloc.allocators.allocation import Status, finish
    from rankalloc.allocators.problem import DENSE, Budget

    index = []
    for cv in problem.curves:
        ok = np.flatnonzero((cv.ranks != DENSE) & np.isclose(cv.sparsity, 0.0))
        index.append(int(ok[np.argmax(cv.ranks[ok])]))
    roomy = problem.with_budgets(*(Budget(b.resource, limit=1e18) for b in problem.budgets))
    return finish(roomy, "full_rank", index, Status.FEASIBLE)


def _decode_steps(model, ids, prefill: int):
    import torch

    from rankalloc.decomposers.host import output_cache, with_cache

    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        steps, cache = [out.logits[:, -1]], output_cache(out)
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], **with_cache(model, cache))
            cache = output_cache(out)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1).double()


def check_method(method, *, family: str = "llama", ratio: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """The method contract (:data:`METHOD_CHECKS`) checked on a tiny ``family`` model at ``ratio`` removed.

    ``method``: a registered method's name or its :class:`~rankalloc.decomposers.registry.Method` (registered, so
    that ``compress_`` finds it by its config). Returns one row per check; a method that raises fails that row.
    """
    import torch

    from rankalloc.decomposers.registry import Method, get_method

    m = method if isinstance(method, Method) else get_method(method)
    if not 0 < ratio < 1:
        raise ValueError(f"check_method: expected a ratio in (0, 1), received {ratio!r}")
    rows: list[CheckRow] = []
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="rankalloc-check-") as tmp:
        tmp = Path(tmp)
        dense = _model(family, seed)
        ids = torch.randint(3, dense.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(seed))
        steps = _steps(m, dense, ids, ratio, tmp, state)
        for name in METHOD_CHECKS:
            t0 = time.perf_counter()
            if state.get("stop"):
                rows.append(CheckRow(name, False, 0, 0.0, f"not run: {state['stop']}"))
                continue
            try:
                failure, detail = steps[name]()
            except Exception as exc:  # a method that raises fails the check; the caller gets the verdict
                failure, detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}", ""
                if name in ("fits", "curves_valid", "budget_held"):
                    state["stop"] = f"{name} failed"
            rows.append(CheckRow(name, failure is None, 1, time.perf_counter() - t0, failure or detail))
    return pd.DataFrame([{c: getattr(r, c) for c in COLUMNS} for r in rows], columns=list(COLUMNS))


def _steps(m, dense, ids, ratio: float, tmp: Path, state: dict) -> dict:
    """One callable per check, each returning ``(failure or None, detail)``; they share ``state`` in order."""
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers import compress_, load_compressed, save_compressed
    from rankalloc.decomposers.problems import method_curves, problem_for
    from rankalloc.profiling.profile import profile_model

    def compressed(allocation):
        model = copy.deepcopy(dense)
        report = compress_(model, allocation, m.config(), state["profile"], progress=False)
        return model, report

    def fits():
        m.check_model(dense)
        state["profile"] = profile_model(dense, ids, out=tmp / "profile", device="cpu", kinds=("whitened", "fisher"),
                                         progress=False, store="full")
        return None, f"{type(dense).__name__}, profiled on {ids.shape[0]} x {ids.shape[1]} random tokens"

    def curves_valid():
        mc = method_curves(state["profile"], m.name, dense, progress=False)
        bad = [(k, n) for k, per in mc.curve_set.errors.items() for n, e in per.items()
               if not (np.all(np.isfinite(e)) and np.all(np.asarray(e) >= 0))]
        if bad:
            return f"kind {bad[0][0]!r} of {bad[0][1]!r}: an error that is not finite and >= 0", ""
        state["curves"] = mc
        state["problem"] = problem_for(state["profile"], m.name, m.kind, ratio, curves=mc, grid=4)
        return None, f"{len(mc.curve_set.components)} components, kinds {list(mc.curve_set.kinds)}"

    def budget_held():
        problem = state["problem"]
        allocation = get_solver(m.solver).solve(problem)
        if not allocation.feasible:
            return f"{m.solver} found no allocation at {ratio:.0%} removed: {allocation.message}", ""
        model, report = compressed(allocation)
        claimed = problem.dense_costs["params"] - allocation.cost["params"]
        fell = weight_units(dense) - weight_units(model)
        state.update(allocation=allocation, model=model, report=report)
        if fell != claimed:
            return (f"the stored weights fell by {fell:,}, the allocation says it removed {claimed:,.0f} "
                    f"({allocation.removed():.2%} of its components)"), ""
        return None, f"{fell:,} weights removed ({allocation.removed():.2%}), as the allocation says"

    def full_rank_is_dense():
        every_rank = problem_for(state["profile"], m.name, m.kind, ratio, curves=state["curves"], grid=1)
        model, _ = compressed(_full_rank(every_rank))
        return _close(_logits(model, ids[:2]), _logits(dense, ids[:2]), "every component at full rank"), \
            "every component at its largest rank reproduces the dense logits"

    def save_load_identical():
        save_compressed(state["model"], tmp / "saved", state["report"])
        state["loaded"] = load_compressed(tmp / "saved").eval()
        a, b = _logits(state["loaded"], ids[:2]), _logits(state["model"], ids[:2])
        if not bool((a == b).all()):
            return f"reloaded logits differ by up to {float((a - b).abs().max()):.3g}", ""
        return None, "bit-identical logits after save and load"

    def cached_decoding():
        x = ids[:2, :16]
        return _close(_decode_steps(state["loaded"], x, 8), _logits(state["loaded"], x)[:, 7:], "cached decoding"), \
            "incremental decoding with the KV cache matches the full forward"

    def deterministic():
        again, _ = compressed(state["allocation"])
        first = state["model"].state_dict()
        for k, v in again.state_dict().items():
            if k not in first or first[k].shape != v.shape or not bool((first[k] == v).all()):
                return f"compressing twice gave another {k!r}", ""
        return None, "the same tensors from a second compression"

    return dict(fits=fits, curves_valid=curves_valid, budget_held=budget_held, full_rank_is_dense=full_rank_is_dense,
                save_load_identical=save_load_identical, cached_decoding=cached_decoding, deterministic=deterministic)

