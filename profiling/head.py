# The final norm, the LM head and the next-token loss in chunks of tokens: no tokens x vocabulary tensor is ever whole.
"""Next-token loss and its gradient at the last decoder boundary, computed a chunk of tokens at a time.

A model's logits are ``head(norm(h_L))``: the base model's final norm (and OPT's ``project_out``, GPT-2's
``ln_f``) applied to the last decoder layer's output ``h_L``, then ``lm_head`` and, for Gemma-2/3, the final
logit soft-capping ``c tanh(z / c)``. :func:`final_hidden` runs the base model's own forward with its decoder
layers replaced (the first returns ``h_L``, the others pass it on), so the final norm is the model's own code for
every family, and no embedding weight is read. The logits then exist only ``chunk`` tokens at a time
(``chunk x vocab`` floats): at a 128k vocabulary and 128 tokens that is 66 MB instead of gigabytes.

Targets: position ``t`` of a sequence predicts token ``t + 1``; the last position of each sequence predicts
nothing (its gradient is 0). The loss is the SUM over predicted tokens (the Fisher Grams are normalised by the
count separately).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rankalloc.profiling.calibration import FISHER_LABELS, replaced_forwards

LOGIT_CHUNK = 128
"""Tokens per chunk of logits (the largest logits tensor is ``LOGIT_CHUNK x vocab``)."""


def softcap_of(model) -> float | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    cap = getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def head_logits(model, normed: torch.Tensor) -> torch.Tensor:
    """``lm_head`` (and soft-capping) of final-normed hidden states, as the model's own forward applies them."""
    logits = model.get_output_embeddings()(normed)
    cap = softcap_of(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model, layers, h: torch.Tensor, as_tuple: bool = False) -> torch.Tensor:
    """``norm(h)``: the base model's own forward from the last decoder boundary ``h`` (batch, tokens, hidden) on.

    ``layers``: the model's decoder layer list; ``as_tuple``: whether its layers return tuples (older families).
    Differentiable in ``h`` when ``h`` requires grad.
    """
    out = (h,) if as_tuple else h

    def make(i):
        def forward(hidden_states, *args, **kwargs):
            return out if i == 0 else ((hidden_states,) if as_tuple else hidden_states)
        return forward

    base = model.base_model
    with replaced_forwards(layers, make):
        res = base(inputs_embeds=torch.zeros_like(h, requires_grad=False), use_cache=False)
    return res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets per position, ``-100`` (ignored) at each sequence's last position."""
    t = torch.full_like(ids, -100)
    t[:, :-1] = ids[:, 1:]
    return t


def chunked_nll(model, normed: torch.Tensor, ids: torch.Tensor, chunk: int = LOGIT_CHUNK,
                dtype: torch.dtype = torch.float64) -> tuple[float, int, int]:
    """``(sum of next-token NLL, predicted tokens, positions with non-finite logits)`` without grad.

    The log-softmax runs in ``dtype`` (float64 for perplexity); non-finite logits are counted, never dropped: they
    enter the sum with the value the arithmetic gives them.
    """
    flat = normed.reshape(-1, normed.shape[-1])
    targets = _targets(ids).reshape(-1).to(flat.device)
    total, count, nonfinite = 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, flat.shape[0], chunk):
            tg = targets[s:s + chunk]
            keep = tg >= 0
            if not keep.any():
                continue
            lg = head_logits(model, flat[s:s + chunk][keep]).to(dtype)
            nonfinite += int((~torch.isfinite(lg).all(dim=-1)).sum())
            t = tg[keep]
            total += float((torch.logsumexp(lg, dim=-1) - lg.gather(-1, t[:, None]).squeeze(-1)).sum())
            count += int(keep.sum())
    return total, count, nonfinite


def sampled_targets(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One next token per row of ``logits`` drawn from its softmax (float64), with ``generator``."""
    return torch.multinomial(torch.softmax(logits.detach().double(), dim=-1), 1, generator=generator).squeeze(1)


def loss_and_hidden_grad(model, layers, h: torch.Tensor, ids: torch.Tensor, chunk: int = LOGIT_CHUNK,
                         as_tuple: bool = False, labels: str = "data",
                         seed: int = 0) -> tuple[float, torch.Tensor]:
    """``(sum of next-token losses, d(sum)/dh)`` at the last decoder boundary ``h`` of the sequences ``ids``.

    ``labels`` (:data:`~rankalloc.profiling.calibration.FISHER_LABELS`): the gradient is of the loss of the data's
    next tokens (``"data"``) or of tokens drawn from the model's own softmax at each position (``"sampled"``, with
    a generator seeded by ``seed``, chunk after chunk); the returned loss is the data loss either way.

    The final norm runs once with grad; the head and the cross-entropy run ``chunk`` tokens at a time, each
    chunk's graph freed by its own backward, so no tokens x vocab tensor larger than one chunk is allocated. The
    loss is float32 (float64 for a float64 model), as the model's own loss.
    """
    hx = h.detach().requires_grad_(True)
    frozen = {p: p.requires_grad for p in model.parameters()}  # only dL/dh: no weight gradient (the head's is 2 GB)
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _loss_and_grad(model, layers, hx, ids, chunk, as_tuple, labels, seed)
    finally:
        for p, f in frozen.items():
            p.requires_grad_(f)


def _loss_and_grad(model, layers, hx: torch.Tensor, ids: torch.Tensor, chunk: int, as_tuple: bool,
                   labels: str = "data", seed: int = 0):
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels: expected {' or '.join(map(repr, FISHER_LABELS))}, received {labels!r}")
    generator = torch.Generator(device=hx.device).manual_seed(seed) if labels == "sampled" else None
    with torch.enable_grad():
        normed = final_hidden(model, layers, hx, as_tuple)
        n = normed.detach().requires_grad_(True)
        flat = n.reshape(-1, n.shape[-1])
        targets = _targets(ids).reshape(-1).to(flat.device)
        total = 0.0
        for s in range(0, flat.shape[0], chunk):
            tg = targets[s:s + chunk]
            keep = tg >= 0
            if not keep.any():
                continue
            lg = head_logits(model, flat[s:s + chunk][keep])
            lg = lg if lg.dtype == torch.float64 else lg.float()
            loss = F.cross_entropy(lg, tg[keep], reduction="sum")
            total += float(loss.detach())
            if generator is not None:
                loss = F.cross_entropy(lg, sampled_targets(lg, generator), reduction="sum")
            loss.backward()
        if not math.isfinite(total):
            raise ValueError(f"calibration loss is not finite ({total}) on these sequences: the model produces "
                             f"NaN/Inf logits")
        grad_n = n.grad if n.grad is not None else torch.zeros_like(n)
        normed.backward(grad_n)
    return total, hx.grad
