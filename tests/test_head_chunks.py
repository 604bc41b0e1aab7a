"""The final norm, head and loss in chunks of tokens: equal to the full computation, never a tokens x vocab tensor.

Checked on families whose heads differ: Llama (tied head), Gemma-2 (final logit soft-capping), GPT-2 (``ln_f``,
Conv1D blocks) and OPT (final layer norm in the decoder).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from rankalloc.profiling.architectures import find_structure
from rankalloc.profiling.head import chunked_nll, final_hidden, loss_and_hidden_grad

FAMILIES = ("llama", "gemma2", "gpt2", "opt")


def last_boundary_and_full_loss(model, ids):
    """``h_L`` (a leaf) from a hook on the last decoder layer, the full-model summed loss and ``dL/dh_L``."""
    st = find_structure(model)
    box = {}

    def hook(mod, args, out):
        t = (out[0] if isinstance(out, tuple) else out).detach().requires_grad_(True)
        box["h"] = t
        return (t, *out[1:]) if isinstance(out, tuple) else t

    handle = st.layers[-1].register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    return box["h"].detach(), float(loss.detach()), box["h"].grad


class WidestLogits:
    """Records the most rows the LM head produced in one call, and refuses a call of the full model."""

    def __init__(self, model):
        self.rows = 0
        head = model.get_output_embeddings()
        self.handles = [head.register_forward_hook(self._head),
                        model.register_forward_pre_hook(self._full)]

    def _head(self, mod, args, out):
        self.rows = max(self.rows, out.reshape(-1, out.shape[-1]).shape[0])

    @staticmethod
    def _full(mod, args, kwargs=None):
        raise AssertionError("the full model (all positions' logits) was called")

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("arch", FAMILIES)
def test_chunked_loss_and_gradient_equal_the_full_ones(arch):
    model = tiny_model(arch).double()
    st = find_structure(model)
    ids = torch.randint(3, 300, (3, 25), generator=torch.Generator().manual_seed(0))
    h, want_loss, want_grad = last_boundary_and_full_loss(model, ids)
    watch = WidestLogits(model)
    try:
        loss, grad = loss_and_hidden_grad(model, st.layers, h, ids, chunk=7)
        normed = final_hidden(model, st.layers, h)
        total, count, bad = chunked_nll(model, normed, ids, chunk=5)
    finally:
        watch.remove()
    assert math.isclose(loss, want_loss, rel_tol=1e-12) and math.isclose(total, want_loss, rel_tol=1e-12)
    assert count == 3 * 24 and bad == 0
    assert float((grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())
    assert 0 < watch.rows <= 7  # no logits tensor larger than one chunk


def test_perplexity_scores_in_chunks_and_matches_the_full_logits():
    """decomposers.evaluate.perplexity equals the full-logits float64 NLL and calls the head on chunks only."""
    from rankalloc.decomposers import evaluate as ev

    model = tiny_model("gemma2")
    ids = torch.randint(3, 300, (4, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.double()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="mean")
    watch = WidestLogits(model)
    try:
        res = ev.perplexity(model, ids, batch_size=2, progress=False)
    finally:
        watch.remove()
    assert res.nll == pytest.approx(float(want), rel=1e-6)
    assert 0 < watch.rows <= ev.LOGIT_CHUNK < ids[:2].numel()


def test_sampled_labels_differentiate_the_models_own_draws():
    """labels="sampled": the gradient is that of the loss of tokens drawn from the model's softmax at each position
    (seeded, chunk after chunk), the returned loss is still the data loss, and over many draws the gradient averages
    towards 0 (E_y grad log p(y) = 0: the true Fisher's score), which the data-label gradient does not."""
    from rankalloc.profiling.head import sampled_targets

    model = tiny_model("llama").double()
    st = find_structure(model)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    h, data_loss, data_grad = last_boundary_and_full_loss(model, ids)
    loss, grad = loss_and_hidden_grad(model, st.layers, h, ids, chunk=7, labels="sampled", seed=5)
    assert math.isclose(loss, data_loss, rel_tol=1e-12)
    # reference: the full model's logits, the same draws chunk by chunk
    hx = h.clone().requires_grad_(True)
    logits = model.get_output_embeddings()(final_hidden(model, st.layers, hx)).reshape(-1, model.config.vocab_size)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets = targets.reshape(-1)
    gen, total = torch.Generator().manual_seed(5), 0.0
    for s in range(0, logits.shape[0], 7):
        keep = targets[s:s + 7] >= 0
        if keep.any():
            lg = logits[s:s + 7][keep]
            total = total + F.cross_entropy(lg, sampled_targets(lg, gen), reduction="sum")
    total.backward()
    assert float((grad - hx.grad).abs().max()) <= 1e-10 * float(hx.grad.abs().max())
    assert float((grad - data_grad).abs().max()) > 1e-3 * float(data_grad.abs().max())  # not the data gradient
    mean = sum(loss_and_hidden_grad(model, st.layers, h, ids, labels="sampled", seed=s)[1] for s in range(200)) / 200
    assert float(mean.norm()) < 0.25 * float(data_grad.norm())
    with pytest.raises(ValueError, match="labels: expected 'data' or 'sampled'"):
        loss_and_hidden_grad(model, st.layers, h, ids, labels="model")
