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

Several processes (:mod:`~rankalloc.profiling.distributed`): each rank streams its own slice of the calibration
sequences (``Pass.ids``; whole batches, so every batch is the one a single process forms). After each layer's
forward the input Grams, value covariance, cosine sum and token count are all-reduced; the groups' Cholesky roots
and spectra are split across ranks by cost and gathered to rank 0, which writes the layer. In the backward each
group's output-gradient Grams are all-reduced, the components' Fisher curves, bases and extras split by cost and
gathered to rank 0, which writes. One process is the same code with every reduction the identity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rankalloc.profiling import distributed
from rankalloc.profiling.architectures import DecoderStructure
from rankalloc.profiling.backward import Boundaries, gram_groups, layer_backward
from rankalloc.profiling.calibration import StreamConfig, batches, capture_inputs, run_layer
from rankalloc.profiling.fisher import fisher_component
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
    first: int = 0
    """Index of ``ids[0]`` in the whole calibration set (``ids`` is this rank's slice of it)."""
    sequences: int | None = None
    """Sequences in the whole calibration set (None: ``ids`` is all of it)."""

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
    the stored root, so the curves price exactly the whitening every decomposer will read back.

    Under several processes each rank computes the groups :func:`~rankalloc.profiling.distributed.assign` gives it
    (by cost, ``n^3 + sum m n^2``) from the all-reduced Grams; rank 0 receives them all and gets the results, the
    other ranks ``(None, None, None)``."""
    arrays: dict[str, np.ndarray] = {"t": np.float64(stats.score), "cos_sum": np.float64(stats.cos_sum),
                                     "tokens": np.int64(stats.tokens)}
    comps = {c.name: c for c in p.structure.layer_components(stats.layer)}
    groups = p.structure.layer_groups(stats.layer)
    owners = distributed.assign([g.n ** 3 + sum(comps[n].m * g.n ** 2 for n in g.members) for g in groups])
    mine = {}
    for g, owner in zip(groups, owners):
        G = stats.grams.pop(g.key)
        if owner == distributed.rank():
            mine[g.key] = _group_results(p, g, G, comps)
        del G
    parts = distributed.gather_to_main(mine, f"forward layer {stats.layer}: gathering the spectra")
    if parts is None:
        return None, None, None
    done = {k: v for part in parts for k, v in part.items()}
    roots, grams = {}, ({} if p.store == "full" else None)
    for g in groups:
        part, roots[g.key], gram = done[g.key]
        arrays.update(part)
        if grams is not None:
            grams[g.key] = gram
    if stats.value_cov is not None:
        arrays["value_cov"] = stats.value_cov.cpu().numpy()
    return arrays, roots, grams


def _group_results(p: Pass, g, G: torch.Tensor, comps: dict) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """``(arrays, packed root, float64 Gram or None)`` of one input group from its Gram (consumed)."""
    arrays = {}
    if any(comps[n].kind == "down" for n in g.members):  # a_i^2 = sum_t h_i^2 is the Gram diagonal
        arrays["neuron_norms"] = torch.diagonal(G).clamp_min(0).sqrt().cpu().numpy()
    gram = G.cpu().numpy() if p.store == "full" else None
    root_dtype = torch.float64 if p.store == "full" else torch.float32
    what = g.key if len(g.members) == 1 else f"{g.key} (input shared by {', '.join(g.members)})"
    t0 = time.perf_counter()
    S, delta = lean_cholesky(G, what, p.spec.damping)  # a large Gram becomes its own factor
    G = None
    root = pack_lower(S, root_dtype).cpu().numpy()
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
    return arrays, root, gram


def _reduce_stats(stats) -> None:
    """The statistics of every rank's slice summed, in place (one process: nothing to do)."""
    if distributed.world() == 1:
        return
    t0 = time.perf_counter()
    step = f"forward layer {stats.layer}: summing the input statistics"
    tensors = list(stats.grams.values()) + ([stats.value_cov] if stats.value_cov is not None else [])
    distributed.all_reduce_sum_(*tensors, step=step)
    stats.cos_sum, tokens = distributed.all_reduce_scalars([stats.cos_sum, stats.tokens], step)
    stats.tokens = int(round(tokens))
    stats.timings["reduce"] = stats.timings.get("reduce", 0.0) + time.perf_counter() - t0


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
            distributed.fail_hook(layer)
            if boundaries is not None:
                for b, h in enumerate(_fisher_rows(hidden, rows)):
                    boundaries.write(layer, b, h)
            p.phase(f"forward layer {layer}")
            with p.resident(layer) as module:
                outputs, stats, as_tuple = run_layer(p.structure, layer, module, hidden, captured.calls[layer],
                                                     p.device, p.stream, collect=layer in todo)
            if stats is not None:
                _reduce_stats(stats)
                timings = dict(stats.timings)
                p.phase(f"forward layer {layer}: spectra")
                arrays, roots, grams = layer_results(p, stats)
                t1 = time.perf_counter()
                if arrays is not None:  # rank 0
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
    """Add the timings to the meta and write it (rank 0; the other ranks drop theirs)."""
    if not distributed.is_main():
        p.timings.clear()
        return
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
        for i, (h, b) in enumerate(zip(last, batches(ids, p.stream.batch_size))):
            first = p.first + i * p.stream.batch_size  # the batch's first sequence in the whole calibration set
            loss, g = loss_and_hidden_grad(model, p.structure.layers, h.to(p.device), b.to(p.device),
                                           as_tuple=as_tuple, labels=p.stream.fisher_labels,
                                           seed=int(p.profile.meta["seed"]) * 1_000_003 + first)
            grads.append(g.detach())
            total += loss
    p.add("head", time.perf_counter() - t0)
    return grads, total


def backward_pass(p: Pass, boundaries: Boundaries, calls: list, grads: list, n_loss: int, gram_budget: float,
                  extras) -> dict[str, dict]:
    """Layers in reverse (see the module docstring); returns ``{"fisher": {name: curve}, "fisher_svd": {...}}`` (on
    rank 0; the other ranks return empty dicts). A rank without Fisher sequences (``grads`` empty) adds zero Grams."""
    from tqdm.auto import tqdm

    curves: dict[str, dict] = {"fisher": {}, "fisher_svd": {}}
    scale = 1.0 / (2.0 * p.profile.tokens * n_loss)
    for layer in tqdm(range(p.structure.num_layers - 1, -1, -1), desc="fisher backward", unit="layer",
                      disable=not p.progress):
        comps = p.structure.layer_components(layer)
        groups = gram_groups(comps, gram_budget)
        new_grads, mine = None, {}
        for group in groups:
            held: dict = {}
            taps = {c.name: [extra.tap(p.profile, c, p.device) if extra.tap else None for extra in extras]
                    for c in group}
            p.phase(f"backward layer {layer}: {', '.join(c.kind for c in group)}")
            if grads:
                with p.resident(layer) as module:
                    got = layer_backward(module, p.structure, layer, boundaries, calls[layer], grads, p.device,
                                         p.weights.dtype, [group], held.update, p.timings,
                                         {n: [t for t in ts if t is not None] for n, ts in taps.items()},
                                         p.stream.product_dtype)
            else:
                got = []
                held.update({c.name: torch.zeros(c.m, c.m, dtype=torch.float64, device=p.device) for c in group})
            new_grads = got if new_grads is None else new_grads
            t0 = time.perf_counter()
            distributed.all_reduce_sum_(*(held[c.name] for c in group),
                                        *(t.sums for ts in taps.values() for t in ts if t is not None),
                                        step=f"backward layer {layer}: summing the output-gradient Grams")
            p.add("reduce", time.perf_counter() - t0)
            owners = distributed.assign([c.m ** 3 + c.n ** 3 + c.m * c.n * (c.m + c.n) for c in group])
            for c, owner in zip(group, owners):
                Gg = held.pop(c.name)
                if owner == distributed.rank():
                    p.phase(f"backward layer {layer}: curves of {c.kind}")
                    mine[c.name] = _component_curves(p, c, Gg, (scale, n_loss), extras, taps[c.name])
                del Gg
        grads = new_grads
        parts = distributed.gather_to_main(mine, f"backward layer {layer}: gathering the Fisher curves")
        if parts is not None:
            done = {k: v for part in parts for k, v in part.items()}
            bases, extra, keep = {}, {}, ({} if p.store == "full" else None)
            for c in (c for group in groups for c in group):
                fisher, fisher_svd, bases[c.name], more, gram = done[c.name]
                curves["fisher"][c.name], curves["fisher_svd"][c.name] = fisher, fisher_svd
                extra.update(more)
                if keep is not None:
                    keep[c.name] = gram
            t0 = time.perf_counter()
            p.profile.write_fisher_layer(layer, bases, extra, keep)
            p.add("write", time.perf_counter() - t0)
        _flush(p)
    return curves


def _component_curves(p: Pass, c, Gg, counts, extras, taps) -> tuple:
    """``(fisher, fisher_svd, basis, extras, float64 Gram or None)`` of one component from its output-gradient Gram
    (consumed) and its extras' filled taps (one per extra, None where an extra has none); the basis as float32
    arrays, as stored."""
    t0 = time.perf_counter()
    scale, n_loss = counts
    gram = Gg.cpu().numpy() if p.store == "full" else None
    W = p.weights.matrix(p.structure.modules[c.name], c.name)
    extra: dict = {}
    for fn, tap in zip(extras, taps):
        extra.update(fn.curves(p.profile, c, W, Gg, n_loss, tap))
    S, _ = p.profile.input_root(c.name)
    out = fisher_component(W, S.to(p.device), Gg, scale, c.name, p.spec.damping,
                           method=resolve_method(p.spec.method, W.shape))
    basis = {k: v.to(torch.float32).cpu().numpy() for k, v in out["basis"].items()}
    p.add("fisher_curves", time.perf_counter() - t0)
    return out["fisher"], out["fisher_svd"], basis, extra, gram


def fisher_rows(p: Pass, samples: int | None) -> tuple[int, int]:
    """``(rows, sequences)``: how many of this rank's sequences are Fisher sequences (the first ``samples`` of the
    whole calibration set, default all), and how many Fisher sequences there are in all."""
    total = p.ids.shape[0] if p.sequences is None else p.sequences
    chosen = total if samples is None else samples
    return max(0, min(p.ids.shape[0], chosen - p.first)), chosen


def scratch_folder(path) -> Path:
    """The folder of this rank's stored layer inputs: ``scratch`` (one process) or ``scratch/rank_<r>``."""
    base = Path(path) / "scratch"
    return base if distributed.world() == 1 else base / f"rank_{distributed.rank()}"
