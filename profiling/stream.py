# The streamed profile (GPTQ's layer-by-layer calibration, Frantar et al., 2023, Sec. 4; K-FAC Grams by a
# layer-streamed backward): forward for the input statistics, the chunked head, backward for the Fisher Grams.
"""The passes of one profiling run, each with one decoder layer resident.

1. **Forward** (:func:`forward_pass`): the embedding runs once with every decoder layer replaced by a recorder
   (:func:`~rankalloc.profiling.calibration.capture_inputs`). Then each layer in turn is made resident, run on the
   current boundary batch by batch with hooks accumulating its input Grams, released; its spectra, curves and
   Cholesky roots are computed and written (:func:`layer_results`). With Fisher kinds wanted, each layer's input
   boundary is written to the scratch folder for the backward.
2. **Head** (:func:`head_gradients`): the final norm, the LM head and the cross-entropy run in chunks of tokens on
   the last boundary, giving ``dL/dh_L`` per batch (:mod:`~rankalloc.profiling.head`).
3. **Backward** (:func:`backward_pass`): layers in reverse, one resident at a time; see
   :mod:`~rankalloc.profiling.backward`. Each component's ``fisher`` and ``fisher_svd`` curves and Fisher basis
   are computed as soon as its output-gradient Gram is complete, and the Gram is freed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rankalloc.profiling.architectures import DecoderStructure
from rankalloc.profiling.backward import Boundaries, gram_groups, layer_backward
from rankalloc.profiling.calibration import StreamConfig, batches, capture_inputs, run_layer
from rankalloc.profiling.fisher import fisher_component, loss_token_count
from rankalloc.profiling.numerics import lean_cholesky, pack_lower
from rankalloc.profiling.spectra import SpectrumConfig, component_spectrum, resolve_method
from rankalloc.profiling.weights import Weights


PHASE = ["idle"]
"""What the current run is doing (``forward layer 3``, ``backward layer 1: curves`` ...), for memory reports."""


@dataclass
class Pass:
    """What the passes of one run share."""

    weights: Weights
    structure: DecoderStructure
    ids: torch.Tensor
    profile: object
    stream: StreamConfig
    spec: SpectrumConfig
    device: torch.device
    store: str
    progress: bool
    timings: dict = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def layer_prefix(self, layer: int) -> str:
        return f"{self.structure.layers_path}.{layer}."

    def resident(self, layer: int):
        return self.weights.resident(self.structure.layers[layer], self.layer_prefix(layer), self.device)

    @staticmethod
    def phase(label: str) -> None:
        PHASE[0] = label


def _capture(p: Pass, ids: torch.Tensor):
    t0 = time.perf_counter()
    model = p.weights.model
    embed = model.get_input_embeddings()
    with p.weights.resident(embed, p.weights.prefix_of(embed), p.device):
        captured = capture_inputs(model, p.structure, ids, p.stream.batch_size, p.device)
    p.add("capture", time.perf_counter() - t0)
    return captured


def layer_results(p: Pass, stats) -> tuple[dict, dict, dict | None]:
    """Spectra, curves, neuron norms and value covariance of one layer (arrays to store), its packed Cholesky roots,
    and (full store) its float64 Grams. Roots are float32 in the compact store, and the spectra are computed from
    the stored root, so the curves price exactly the whitening every decomposer will read back."""
    arrays: dict[str, np.ndarray] = {"t": np.float64(stats.score), "cos_sum": np.float64(stats.cos_sum),
                                     "tokens": np.int64(stats.tokens)}
    roots, grams = {}, ({} if p.store == "full" else None)
    kind_of = {c.name: c.kind for c in p.structure.layer_components(stats.layer)}
    root_dtype = torch.float64 if p.store == "full" else torch.float32
    for g in p.structure.layer_groups(stats.layer):
        G = stats.grams.pop(g.key)
        if any(kind_of[n] == "down" for n in g.members):  # a_i^2 = sum_t h_i^2 is the Gram diagonal
            arrays["neuron_norms"] = torch.diagonal(G).clamp_min(0).sqrt().cpu().numpy()
        if grams is not None:
            grams[g.key] = G.cpu().numpy()
        what = g.key if len(g.members) == 1 else f"{g.key} (input shared by {', '.join(g.members)})"
        t0 = time.perf_counter()
        S, delta = lean_cholesky(G, what, p.spec.damping)  # a large Gram becomes its own factor
        G = None
        roots[g.key] = pack_lower(S, root_dtype).cpu().numpy()
        if root_dtype != torch.float64:  # the stored root, exactly (row by row: no second n x n copy)
            for i in range(S.shape[0]):
                S[i, :i + 1] = S[i, :i + 1].to(root_dtype)
        p.add("cholesky", time.perf_counter() - t0)
        for name in g.members:
            W = p.weights.matrix(p.structure.modules[name], name)
            cs = component_spectrum(W, S, delta, name, p.spec, p.timings)
            arrays[f"sigma:{name}"] = cs.sigma
            if cs.sigma_w is not None:
                arrays[f"sigma_w:{name}"] = cs.sigma_w
            arrays[f"delta:{name}"] = np.float64(cs.delta)
            for kind, e in cs.curves.items():
                arrays[f"{kind}:{name}"] = e
        del S
    if stats.value_cov is not None:
        arrays["value_cov"] = stats.value_cov.cpu().numpy()
    return arrays, roots, grams


def forward_pass(p: Pass, boundaries: Boundaries | None, rows: int, todo: set[int]):
    """Stream every layer (statistics for those in ``todo``), writing each layer's input for the first ``rows``
    sequences to ``boundaries``; returns ``(last boundary per batch, captured call arguments, layers return tuples)``."""
    from tqdm.auto import tqdm

    captured = _capture(p, p.ids)
    hidden, captured.hidden = captured.hidden, None  # one copy of the activations alive, not two
    as_tuple = False
    bar = tqdm(total=p.structure.num_layers, unit="layer", disable=not p.progress,
               desc=f"profiling {p.profile.meta.get('model_id') or 'model'}")
    try:
        for layer in range(p.structure.num_layers):
            if boundaries is not None:
                for b, h in enumerate(_fisher_rows(hidden, rows)):
                    boundaries.write(layer, b, h)
            p.phase(f"forward layer {layer}")
            with p.resident(layer) as module:
                outputs, stats, as_tuple = run_layer(p.structure, layer, module, hidden, captured.calls[layer],
                                                     p.device, p.stream, collect=layer in todo)
            if stats is not None:
                timings = dict(stats.timings)
                p.phase(f"forward layer {layer}: spectra")
                arrays, roots, grams = layer_results(p, stats)
                t1 = time.perf_counter()
                p.profile._write_layer(layer, arrays, roots, grams, stats.score)
                timings["write"] = time.perf_counter() - t1
                for k, v in timings.items():
                    p.add(k, v)
                _flush(p)
            hidden = outputs
            bar.update(1)
    finally:
        bar.close()
    return hidden, captured.calls, as_tuple


def _fisher_rows(hidden: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """The batches of the first ``rows`` sequences (the last one cut), in the forward's batch partition."""
    out, seen = [], 0
    for h in hidden:
        if seen >= rows:
            break
        out.append(h[:rows - seen])
        seen += h.shape[0]
    return out


def _flush(p: Pass) -> None:
    for k, v in p.timings.items():
        p.profile.meta["timings"][k] = p.profile.meta["timings"].get(k, 0.0) + float(v)
    p.timings.clear()
    p.profile._write_meta()


def head_gradients(p: Pass, last: list[torch.Tensor], ids: torch.Tensor, as_tuple: bool) -> tuple[list, float]:
    """``dL/dh_L`` per batch of the Fisher sequences ``ids`` (the summed next-token loss), head resident."""
    from rankalloc.profiling.head import loss_and_hidden_grad

    t0 = time.perf_counter()
    model = p.weights.model
    head = model.get_output_embeddings()
    grads, total = [], 0.0
    p.phase("head")
    with p.weights.resident(head, p.weights.prefix_of(head), p.device):
        for h, b in zip(last, batches(ids, p.stream.batch_size)):
            loss, g = loss_and_hidden_grad(model, p.structure.layers, h.to(p.device), b.to(p.device),
                                           as_tuple=as_tuple)
            grads.append(g.detach())
            total += loss
    p.add("head", time.perf_counter() - t0)
    return grads, total


def backward_pass(p: Pass, boundaries: Boundaries, calls: list, grads: list, n_loss: int, gram_budget: float,
                  extras) -> dict[str, dict]:
    """Layers in reverse (see the module docstring); returns ``{"fisher": {name: curve}, "fisher_svd": {...}}``."""
    from tqdm.auto import tqdm

    curves: dict[str, dict] = {"fisher": {}, "fisher_svd": {}}
    scale = 1.0 / (2.0 * p.profile.tokens * n_loss)
    for layer in tqdm(range(p.structure.num_layers - 1, -1, -1), desc="fisher backward", unit="layer",
                      disable=not p.progress):
        bases, extra, keep = {}, {}, ({} if p.store == "full" else None)
        comps = p.structure.layer_components(layer)
        groups = gram_groups(comps, gram_budget)
        new_grads = None
        for group in groups:
            held: dict = {}
            p.phase(f"backward layer {layer}: {', '.join(c.kind for c in group)}")
            with p.resident(layer) as module:
                got = layer_backward(module, p.structure, layer, boundaries, calls[layer], grads, p.device,
                                     p.weights.dtype, [group], held.update, p.timings)
            new_grads = got if new_grads is None else new_grads
            for c in group:
                p.phase(f"backward layer {layer}: curves of {c.kind}")
                _component_curves(p, c, held.pop(c.name), (scale, n_loss), curves, bases, extra, keep, extras)
        grads = new_grads
        t0 = time.perf_counter()
        p.profile.write_fisher_layer(layer, {n: {k: v.to(torch.float32).cpu().numpy() for k, v in parts.items()}
                                             for n, parts in bases.items()}, extra, keep)
        p.add("write", time.perf_counter() - t0)
        _flush(p)
    return curves


def _component_curves(p: Pass, c, Gg, counts, curves, bases, extra, keep, extras) -> None:
    """Fisher curves, basis and method extras of one component from its output-gradient Gram (then freed)."""
    t0 = time.perf_counter()
    scale, n_loss = counts
    if keep is not None:
        keep[c.name] = Gg.cpu().numpy()
    W = p.weights.matrix(p.structure.modules[c.name], c.name)
    for fn in extras:
        extra.update(fn(p.profile, c, W, Gg, n_loss))
    S, _ = p.profile.input_root(c.name)
    out = fisher_component(W, S.to(p.device), Gg, scale, c.name, p.spec.damping,
                           method=resolve_method(p.spec.method, W.shape))
    curves["fisher"][c.name], curves["fisher_svd"][c.name] = out["fisher"], out["fisher_svd"]
    bases[c.name] = out["basis"]
    p.add("fisher_curves", time.perf_counter() - t0)


def fisher_sequences(ids: torch.Tensor, samples: int | None) -> tuple[torch.Tensor, int]:
    """The calibration sequences the Fisher Grams are accumulated on, and their predicted-token count."""
    fids = ids if samples is None else ids[:samples]
    return fids, loss_token_count(fids)
