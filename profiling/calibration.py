# Layer-by-layer calibration statistics (streaming as in GPTQ, Frantar et al., 2023, Sec. 4), with the
# inputs SVD-LLM (Sec. 3.1), SoLA (Sec. 3.2) and FLAT-LLM (Sec. 3.1-3.2) need.
"""Stream calibration tokens through the decoder one layer at a time and accumulate statistics.

1. :func:`capture_inputs` runs the model once with every decoder layer's ``forward`` replaced
   by a recorder that returns its input unchanged. That gives the input hidden states of layer 0
   (the model's own embedding) and each layer's call arguments (attention mask, rotary
   ``position_embeddings``, ``position_ids``...) as the model itself builds them. Recording every
   layer, not only layer 0, matters for Gemma-2/3, whose sliding-window layers get other masks.
   The last recorder raises to stop the pass before the final norm and LM head.
2. :func:`run_layer` runs one resident layer (:mod:`~rankalloc.profiling.weights`) on the cached inputs batch by
   batch, and returns the outputs (the next layer's inputs). With ``collect=True`` forward hooks
   on its linear maps accumulate, in float64:

   - ``G = sum_t x_t x_t^T`` per input group (q/k/v share one Gram; gate/up another), on the lower
     block triangle only (mirrored at the end: exactly symmetric, 30-45% fewer multiply-adds),
   - ``C_h = sum_t y_{t,h} y_{t,h}^T`` per KV head of the value projection output ``y``,
   - ``t_l = arccos(mean_t cos(x_l, x_{l+1})) / pi`` from the layer's input and output.

   FFN neuron norms ``a_i^2 = sum_t h_{t,i}^2`` (``h`` = input of down_proj) are the diagonal of
   the down_proj Gram, so they are read from it rather than accumulated twice.

Gram precision (``gram_dtype``, for the input Grams here and the output-gradient Grams of the layer-streamed
backward): ``"float64"`` casts each batch to float64 before ``X^T X``.
``"float32"`` forms each batch's ``X^T X`` in float32 and adds it into the float64 accumulator:
about 1.8x faster for the Gram products on CPU, and accurate to about 1e-6 of the largest entry
(not to float64 round-off), which the exactness checks of the float64 path would not pass.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from rankalloc.profiling.architectures import DecoderStructure
from rankalloc.profiling.numerics import PRECISION, NonFiniteError, check_finite

GRAM_DTYPES = ("float64", "float32")


FISHER_LABELS = ("data", "sampled")
"""Labels of the next-token loss whose gradients make the Fisher Grams: ``data``, the calibration text's own next
tokens (the empirical Fisher), or ``sampled``, one token per position drawn from the model's own predictive
distribution (a one-sample Monte-Carlo estimate of the true Fisher, whose expectation is the Gauss-Newton matrix
of the cross-entropy; Kunstner et al., 2019, "Limitations of the empirical Fisher approximation", Sec. 3)."""


@dataclass(frozen=True)
class StreamConfig:
    """How calibration batches are streamed: sequences per batch, Gram precision, and the labels the Fisher backward
    differentiates (``fisher_labels``, see :data:`FISHER_LABELS`)."""

    batch_size: int = 8
    gram_dtype: str = "float64"
    fisher_labels: str = "data"

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, received {self.batch_size!r}")
        if self.gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"gram_dtype: expected one of {GRAM_DTYPES}, received {self.gram_dtype!r}")
        if self.fisher_labels not in FISHER_LABELS:
            raise ValueError(f"fisher_labels: expected one of {FISHER_LABELS}, received {self.fisher_labels!r}")

    @property
    def product_dtype(self) -> torch.dtype:
        """The dtype each batch's Gram product is formed in (the sums are float64 either way)."""
        return torch.float32 if self.gram_dtype == "float32" else PRECISION


@dataclass
class Captured:
    """Inputs of decoder layer 0 per batch, and each layer's extra call arguments per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]  # calls[layer][batch] = (args after hidden_states, kwargs)


@dataclass
class LayerStats:
    """Statistics of one decoder layer over all calibration tokens (float64, on the compute device)."""

    layer: int
    grams: dict[str, torch.Tensor]
    value_cov: torch.Tensor | None
    cos_sum: float
    tokens: int
    timings: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        """``t_l = arccos(mean cos(x_l, x_{l+1})) / pi``."""
        c = min(1.0, max(-1.0, self.cos_sum / self.tokens))
        return math.acos(c) / math.pi


class _Stop(Exception):
    pass


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _Deduper:
    """Move tensors to ``device``, sharing equal ones: masks and rotary tables repeat across batches and
    layers. ``seen`` maps ``id()`` of the tensors of the current batch only; they are alive while it is used,
    so an id is never one of a freed tensor."""

    def __init__(self, device):
        self.device = device
        self.pool: dict[tuple, list[torch.Tensor]] = {}
        self.seen: dict[int, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) in self.seen:
            return self.seen[id(t)]
        for u in self.pool.setdefault((tuple(t.shape), t.dtype), []):
            if torch.equal(u, t.to(u.device)):
                break
        else:
            u = t.detach().to(self.device)
            self.pool[(tuple(t.shape), t.dtype)].append(u)
        self.seen[id(t)] = u
        return u


@contextlib.contextmanager
def replaced_forwards(layers, make_forward):
    """Give each of ``layers`` the instance ``forward`` ``make_forward(i)`` inside the block; afterwards every
    layer gets back exactly what it had (its own instance attribute, or none: the class forward)."""
    layers = list(layers)
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = make_forward(i)
        yield
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd


def batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


@torch.no_grad()
def capture_inputs(model, structure: DecoderStructure, ids: torch.Tensor, batch_size: int,
                   device: torch.device) -> Captured:
    """Layer-0 inputs and every layer's call arguments, from the model's own forward (see module doc)."""
    layers = structure.layers
    last = len(layers) - 1
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    in_device = embed.weight.device if embed is not None else next(model.parameters()).device
    hidden, calls = [], [[] for _ in layers]
    current: dict = {}

    def recorder(i):
        def forward(*args, **kwargs):
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            current[i] = (rest, kwargs)
            if i == 0:
                current["hidden"] = h
            if i == last:
                raise _Stop
            return h
        return forward

    move = _Deduper(device)
    with replaced_forwards(layers, recorder):
        for b in batches(ids, batch_size):
            current.clear()
            try:
                model(input_ids=b.to(in_device), use_cache=False)
            except _Stop:
                pass
            else:
                raise RuntimeError(f"{type(model).__name__}: the forward pass never called decoder layer {last} "
                                   f"of {structure.layers_path}; cannot capture the layer inputs")
            missing = [i for i in range(len(layers)) if i not in current]
            if missing:
                raise RuntimeError(f"{type(model).__name__}: decoder layers {missing} were not called in order")
            hidden.append(current["hidden"].detach().to(device))
            for i in range(len(layers)):
                calls[i].append(_map_tensors(current[i], move))
            move.seen.clear()
    check_finite(torch.stack([h.abs().amax() for h in hidden]),
                 f"input of decoder layer 0 ({structure.layers_path}.0, the embedding output)")
    return Captured(hidden, calls)


def check_range(hidden: list[torch.Tensor], what: str) -> None:
    """``NonFiniteError`` naming ``what`` when the hidden states are zero on every token, or so large that their mean
    square overflows float32: the norm at the next layer's entry then returns zeros (not an error there), and every
    matrix after it would be profiled on zero input."""
    if all(not bool(h.any()) for h in hidden):
        raise NonFiniteError(f"{what}: zero on every calibration token (an all-zero embedding or layer output); the "
                             f"matrices after it would see no input")
    for b, h in enumerate(hidden):
        if torch.isinf(h.float().square().mean(-1)).any():
            raise NonFiniteError(f"{what}, batch {b}: the activations overflow: max |h| = {h.abs().max().item():.3g}, "
                                 f"whose square exceeds float32 (the norm of such a hidden state is zero); the "
                                 f"weights are far out of range (a scaled or damaged checkpoint?)")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def gram_block(n: int) -> int:
    """Column-block width for :func:`accumulate_gram`: at most 8 blocks, at least 256 columns."""
    return max(256, -(-n // 8))


def accumulate_gram(G: torch.Tensor, X: torch.Tensor, block: int) -> None:
    """``G += X^T X`` on the lower block triangle only (column blocks of width ``block``).

    Skipping the blocks above the diagonal saves 30-45% of the multiply-adds for n >= 576;
    :func:`finish_gram` mirrors them once at the end. ``X`` is ``(tokens, n)`` in the Gram dtype.
    """
    n = X.shape[1]
    for j in range(0, n, block):
        G[j:, j:j + block].add_((X[:, j:].T @ X[:, j:j + block]).to(G.dtype))


def finish_gram(G: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The exactly symmetric Gram from the lower block triangle filled by :func:`accumulate_gram`, in place.

    Each upper off-diagonal block is copied from its mirror and each diagonal block symmetrized from its lower
    triangle, one block at a time: no second ``n x n`` tensor (1.6 GB at n = 14336) is ever built."""
    n = G.shape[0]
    block = block or gram_block(n)
    for j in range(0, n, block):
        e = min(j + block, n)
        D = G[j:e, j:e]
        low = torch.tril(D)
        D.copy_(low + torch.tril(low, -1).T)
        if e < n:
            G[j:e, e:] = G[e:, j:e].T
    return G


class LayerAccumulator:
    """Forward hooks that accumulate one layer's statistics batch by batch (GPTQ's ``add_batch``)."""

    def __init__(self, structure: DecoderStructure, layer: int, device: torch.device, gram_dtype: torch.dtype):
        self.structure, self.layer, self.device = structure, layer, device
        self.gram_dtype = gram_dtype
        self.groups = structure.layer_groups(layer)
        self.grams = {g.key: torch.zeros(g.n, g.n, dtype=PRECISION, device=device) for g in self.groups}
        self.value = structure.value_slice(layer)
        d = structure.dims
        self.value_cov = (None if self.value is None else
                          torch.zeros(d.kv_heads, d.head_dim, d.head_dim, dtype=PRECISION, device=device))
        self.cos_sum, self.tokens = 0.0, 0
        self.timings = {"gram": 0.0, "value_cov": 0.0}
        self.handles: list = []

    def attach(self) -> None:
        for g in self.groups:
            hook = self._gram_hook(g)
            self.handles += [self.structure.modules[n].register_forward_hook(hook) for n in g.members]
        if self.value is not None:
            self.handles.append(self.structure.modules[self.value[0]].register_forward_hook(self._value_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _gram_hook(self, g):
        """``G += X^T X`` once per batch for the group; later members must see the very same input."""
        state = {"x": None, "left": 0}

        def hook(mod, args, out):
            x = args[0]
            if state["left"]:
                prev = state["x"]
                if not (prev.data_ptr() == x.data_ptr() and prev.shape == x.shape) and not torch.equal(prev, x):
                    raise RuntimeError(f"{g.members}: expected one shared input for this group, but the inputs "
                                       f"differ; check ModulePatterns")
            else:
                t0 = time.perf_counter()
                accumulate_gram(self.grams[g.key], x.reshape(-1, x.shape[-1]).to(self.gram_dtype), gram_block(g.n))
                _sync(self.device)
                self.timings["gram"] += time.perf_counter() - t0
                state["left"] = len(g.members)
            state["left"] -= 1
            state["x"] = x if state["left"] else None

        return hook

    def _value_hook(self, mod, args, out):
        """``C_h += Y_h^T Y_h`` per KV head from the value outputs (the tail of a fused qkv output)."""
        t0 = time.perf_counter()
        d, width = self.structure.dims, self.value[1]
        Y = out[..., -width:].reshape(-1, d.kv_heads, d.head_dim).to(PRECISION).transpose(0, 1)
        self.value_cov.add_(Y.transpose(1, 2) @ Y)
        _sync(self.device)
        self.timings["value_cov"] += time.perf_counter() - t0

    def add_cosines(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate ``cos(x_l, x_{l+1})`` per token (float64) for ``t_l``."""
        xf, yf = x.reshape(-1, x.shape[-1]).to(PRECISION), y.reshape(-1, y.shape[-1]).to(PRECISION)
        self.cos_sum += float(torch.nn.functional.cosine_similarity(xf, yf, dim=-1, eps=1e-30).sum())
        self.tokens += xf.shape[0]

    def stats(self) -> LayerStats:
        for g in self.groups:
            self.grams[g.key] = finish_gram(self.grams[g.key], gram_block(g.n))
            check_finite(self.grams[g.key], f"input Gram of {g.key} (decoder layer {self.layer}; non-finite "
                                            f"activations)")
        if self.value_cov is not None:
            check_finite(self.value_cov, f"value-output covariance of decoder layer {self.layer}")
        return LayerStats(self.layer, self.grams, self.value_cov, self.cos_sum, self.tokens, dict(self.timings))


@torch.no_grad()
def run_layer(structure: DecoderStructure, layer: int, module: torch.nn.Module, inputs: list[torch.Tensor],
              calls: list, device: torch.device, config: StreamConfig, collect: bool = True
              ) -> tuple[list[torch.Tensor], LayerStats | None, bool]:
    """Run the resident decoder layer ``module`` on ``inputs`` (one tensor per batch).

    Returns its outputs (the next layer's inputs), its statistics (with ``collect``) and whether it returns tuples.
    """
    if layer == 0:
        check_range(inputs, f"input of decoder layer 0 ({structure.layers_path}.0, the embedding output)")
    acc = LayerAccumulator(structure, layer, device, config.product_dtype) if collect else None
    outputs, as_tuple = [], False
    try:
        if acc is not None:
            acc.attach()
        t0 = time.perf_counter()
        for x, (args, kwargs) in zip(inputs, calls):
            out = module(x, *args, **kwargs)
            as_tuple = isinstance(out, (tuple, list))
            y = _layer_output(out)
            outputs.append(y)
            if acc is not None:
                acc.add_cosines(x, y)
        _sync(device)
        total = time.perf_counter() - t0
    finally:
        if acc is not None:
            acc.remove()
    stats = acc.stats() if acc is not None else None
    for b, y in enumerate(outputs):
        if not torch.isfinite(y).all():
            raise NonFiniteError(f"output of decoder layer {layer} ({structure.layers_path}.{layer}), batch {b}: "
                                 f"non-finite activations (NaN/Inf)")
    if layer + 1 < structure.num_layers:
        check_range(outputs, f"output of decoder layer {layer} ({structure.layers_path}.{layer})")
    if stats is not None:
        stats.timings["forward"] = total - stats.timings["gram"] - stats.timings["value_cov"]
    return outputs, stats, as_tuple
