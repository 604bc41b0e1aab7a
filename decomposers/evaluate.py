# Evaluation: windowed perplexity (the WikiText-2 protocol of SVD-LLM, Wang et al., 2024, Sec. 4) and throughput.
"""Perplexity and generation throughput of a (compressed) causal LM.

Perplexity protocol, stated with every figure (``PerplexityResult.protocol``): the text is cut into
non-overlapping windows of ``T`` tokens (``ids`` of shape ``(W, T)``, usually BOS + ``T - 1`` text
tokens, see ``profiling.text.evaluation_ids``). Each window is one forward pass with no context from
other windows, and scores its ``T - 1`` next-token predictions: the targets are positions
``1..T-1``; position 0 (the BOS) is never a target. The negative log-likelihood is accumulated in
float64 from float64 log-softmax. Positions whose logits hold any NaN/Inf are COUNTED and enter
the mean with the value float64 arithmetic gives them (NaN for NaN logits, +Inf for a -Inf target
logit), so a model that breaks shows a non-finite perplexity: nothing is ever dropped.

Several processes (torchrun; :mod:`~rankalloc.profiling.distributed`): the windows are split across the ranks in
whole batches (each batch the one a single process forms), and the float64 sums (NLL, scored tokens, non-finite
positions) are all-reduced, so every rank gets the one-process figure up to the order of one final addition.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rankalloc.decomposers.host import output_cache, with_cache
from rankalloc.profiling import distributed

LOGIT_CHUNK = 128
"""Positions per float64 log-softmax chunk (bounds the float64 copy of the logits to 128 x vocab)."""


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``, ``nll`` the mean NLL per scored token (nats); see the module docstring."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    bos: bool
    nonfinite_tokens: int
    protocol: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ThroughputResult:
    """Median over ``repeats`` timed runs (after one warm-up) of prefill and greedy decode speed."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    memory_measure: str
    prompt_len: int
    gen_tokens: int
    batch_size: int
    repeats: int
    device: str


def _device_of(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _vocab_size(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _check_ids(ids, model) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        got = f"{type(ids).__name__} {getattr(ids, 'dtype', '')} of shape {tuple(getattr(ids, 'shape', ()))}"
        raise ValueError(f"perplexity: expected ids as a torch.LongTensor of shape (windows, seqlen), received {got}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"perplexity: expected at least 1 window of at least 2 tokens, received shape "
                         f"{tuple(ids.shape)}")
    vocab = _vocab_size(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"perplexity: token ids must lie in [0, {vocab}) (the model's vocabulary), received "
                         f"[{lo}, {hi}]")


def _window_nll(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, int, int]:
    """Summed float64 next-token NLL, scored tokens and non-finite positions of one batch of windows.

    A transformers causal LM runs its base model to the final-normed hidden states, and the head runs on
    ``LOGIT_CHUNK`` tokens at a time (:func:`rankalloc.profiling.head.chunked_nll`): no windows x tokens x vocab
    tensor is built. A model without a separate base model is scored from its full logits, chunk by chunk.
    """
    from rankalloc.profiling.head import chunked_nll

    base = getattr(model, "base_model", model)
    if base is not model and model.get_output_embeddings() is not None:
        out = base(input_ids=batch, use_cache=False)
        normed = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return chunked_nll(model, normed, batch, LOGIT_CHUNK, torch.float64)
    logits, targets = _logits(model(input_ids=batch, use_cache=False)), batch[:, 1:]
    total, bad, scored = 0.0, 0, 0
    for b in range(batch.shape[0]):
        for c in range(0, batch.shape[1] - 1, LOGIT_CHUNK):
            lg = logits[b, c:min(c + LOGIT_CHUNK, batch.shape[1] - 1)].to(torch.float64)
            tg = targets[b, c:c + lg.shape[0]]
            bad += int((~torch.isfinite(lg).all(dim=-1)).sum())
            total += float((torch.logsumexp(lg, dim=-1) - lg.gather(-1, tg[:, None]).squeeze(-1)).sum())
            scored += lg.shape[0]
    return total, scored, bad


def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True,
               source: str = "") -> PerplexityResult:
    """Perplexity of ``model`` on the windows ``ids`` (``(W, T)`` LongTensor); see the module docstring.

    ``device``: where to run (the model is moved there in place); None uses the model's device.
    ``source``: a description of the text (e.g. "held-out evaluation split of gensim wiki"), appended
    to the protocol string.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"perplexity: expected batch_size >= 1, received {batch_size!r}")
    _check_ids(ids, model)
    device = _device_of(model, device)
    W, T = ids.shape
    bos_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    bos = bos_id is not None and bool((ids[:, 0] == bos_id).all())
    was_training = model.training
    model.eval()
    total, nonfinite, scored = 0.0, 0, 0
    part = _windows_of_rank(model, ids, batch_size, source)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in tqdm(range(part.start, part.stop, batch_size), desc="perplexity", unit="batch",
                              disable=not progress or not distributed.is_main()):
                batch = ids[start:start + batch_size].to(device)  # part ends at a batch boundary or at W
                t, n, bad = _window_nll(model, batch)
                total, scored, nonfinite = total + t, scored + n, nonfinite + bad
    finally:
        model.train(was_training)
    return _result(*_summed(total, scored, nonfinite), W, T, bos, source, time.perf_counter() - t0)


def _windows_of_rank(model, ids: torch.Tensor, batch_size: int, source: str) -> slice:
    """This rank's windows (all of them in one process), after checking every rank scores the same job."""
    if distributed.world() > 1:
        from rankalloc.profiling.profile import calibration_hash

        distributed.agree("perplexity", {"windows": calibration_hash(ids), "batch_size": batch_size,
                                         "parameters": model_params(model), "source": source})
    return distributed.batch_slice(ids.shape[0], batch_size, "evaluation windows")


def _summed(total: float, scored: int, nonfinite: int) -> tuple[float, int, int]:
    """The sums over the ranks' windows (float64; one process: as they are)."""
    if distributed.world() == 1:
        return total, scored, nonfinite
    total, scored, nonfinite = distributed.all_reduce_scalars([total, scored, nonfinite],
                                                              "perplexity: summing the windows' losses")
    return total, int(round(scored)), int(round(nonfinite))


def _meta_parameters(model: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def _rest_on(model: torch.nn.Module, big: list, device: torch.device):
    """Inside the block, the materialized parameters outside the ``big`` parts (final norm, position embeddings)
    and every materialized buffer (rotary tables) are on ``device``; afterwards each gets back its own tensor."""
    skip = {id(p) for m in big for p in m.parameters()}
    saved = []
    for sub in model.modules():
        for store, param in ((sub._parameters, True), (sub._buffers, False)):
            for name, t in list(store.items()):
                if t is None or t.device.type == "meta" or t.device == device or (param and id(t) in skip):
                    continue
                saved.append((store, name, t))
                moved = t.detach().to(device)
                store[name] = torch.nn.Parameter(moved, requires_grad=t.requires_grad) if param else moved
    try:
        yield
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def streamed_perplexity(model: torch.nn.Module, weights, ids: torch.Tensor, *, batch_size: int = 4, device=None,
                        progress: bool = True, source: str = "") -> PerplexityResult:
    """:func:`perplexity` with one decoder layer resident at a time (same protocol, windows and semantics).

    ``weights``: the model's :class:`~rankalloc.profiling.weights.Weights` (out of core: a skeleton on ``meta``
    read from its checkpoint, e.g. ``load_model(..., out_of_core=True).weights`` or
    :func:`~rankalloc.decomposers.io.open_compressed`; in memory works too). The embedding is made resident to
    capture every window's layer-0 input and each layer's call arguments
    (:func:`~rankalloc.profiling.calibration.capture_inputs`); then each decoder layer in turn runs over all the
    windows, batch by batch as :func:`perplexity` batches them; then the final norm
    (:func:`~rankalloc.profiling.head.final_hidden`) and the float64 NLL of the head, resident, in chunks of
    tokens (:func:`~rankalloc.profiling.head.chunked_nll`). Non-finite activations are never an error: they reach
    the logits, whose non-finite positions are counted. Peak memory: one part (a layer, the embedding or the head)
    plus the activations of all windows (``W x T x hidden``) and their call arguments.
    ``device``: where the parts run (default: the model's device in memory, CPU out of core).
    """
    from rankalloc.decomposers.streamed import big_parts, decoder_layers, layer_structure
    from rankalloc.profiling.calibration import batches, capture_inputs
    from rankalloc.profiling.head import chunked_nll, final_hidden

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"perplexity: expected batch_size >= 1, received {batch_size!r}")
    _check_ids(ids, model)
    if device is None:
        p = next((p for p in model.parameters() if p.device.type != "meta"), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    W, T = ids.shape
    bos_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    bos = bos_id is not None and bool((ids[:, 0] == bos_id).all())
    structure = layer_structure(model)
    layers = structure.layers
    was_training = model.training
    model.eval()
    total, nonfinite, scored = 0.0, 0, 0
    part = _windows_of_rank(model, ids, batch_size, source)
    mine = ids[part]
    t0 = time.perf_counter()
    bar = tqdm(total=len(layers) + 2, desc="perplexity (streamed)", unit="part",
               disable=not progress or not distributed.is_main())
    try:
        with torch.no_grad(), _rest_on(model, big_parts(model, decoder_layers(model)), device):
            embed = model.get_input_embeddings()
            with weights.resident(embed, weights.prefix_of(embed), device):
                captured = capture_inputs(model, structure, mine, batch_size, device)
            hidden, captured.hidden = captured.hidden, None
            bar.update(1)
            as_tuple = False
            for i, layer in enumerate(layers):
                outputs = []
                with weights.resident(layer, f"{structure.layers_path}.{i}.", device) as module:
                    for x, (args, kwargs) in zip(hidden, captured.calls[i]):
                        out = module(x, *args, **kwargs)
                        as_tuple = isinstance(out, (tuple, list))
                        outputs.append(out[0] if as_tuple else out)
                hidden, captured.calls[i] = outputs, None
                bar.update(1)
            head = model.get_output_embeddings()
            with weights.resident(head, weights.prefix_of(head), device):
                for h, b in zip(hidden, batches(mine, batch_size)):
                    normed = final_hidden(model, layers, h, as_tuple)
                    t, n, bad = chunked_nll(model, normed, b.to(device), LOGIT_CHUNK, torch.float64)
                    total, scored, nonfinite = total + t, scored + n, nonfinite + bad
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return _result(*_summed(total, scored, nonfinite), W, T, bos, source, time.perf_counter() - t0)


def _result(total: float, scored: int, nonfinite: int, W: int, T: int, bos: bool, source: str,
            seconds: float) -> PerplexityResult:
    nll = total / scored
    ppl = math.exp(nll) if nll < 709.0 or math.isnan(nll) else math.inf
    bos_text = f"BOS + {T - 1} text" if bos else "no BOS; position 0 is context only"
    protocol = (f"{W} non-overlapping windows of {T} tokens ({bos_text}), {T - 1} next-token predictions scored "
                f"per window, {scored:,} scored tokens, float64 NLL, {nonfinite} scored positions with non-finite "
                f"logits (counted, never dropped)" + (f", {source}" if source else ""))
    return PerplexityResult(ppl, nll, scored, W, T, bos, nonfinite, protocol, seconds)


class _RSSPeak:
    """Peak resident-set size of this process above its value at start, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def throughput(model: torch.nn.Module, prompt_len: int = 512, gen_tokens: int = 32, batch_size: int = 1, device=None,
               repeats: int = 3, seed: int = 0, progress: bool = True) -> ThroughputResult:
    """Prefill and greedy-decode speed on a random prompt, with the peak memory of the runs.

    Prefill: one forward of ``batch_size x prompt_len`` tokens building the KV cache. Decode:
    ``gen_tokens`` single-token steps reusing the cache. Figures are medians over ``repeats`` runs
    after one warm-up run. Memory on CUDA: ``torch.cuda.max_memory_allocated`` over all runs (weights
    included). On CPU: the peak RSS of the process above its RSS before the warm-up run, sampled with
    psutil during that run only (weights already resident are NOT included); ``memory_measure`` says
    which.
    """
    for what, v in (("prompt_len", prompt_len), ("gen_tokens", gen_tokens), ("batch_size", batch_size),
                    ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"throughput: expected {what} >= 1, received {v!r}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and prompt_len + gen_tokens > max_pos:
        raise ValueError(f"throughput: prompt_len + gen_tokens = {prompt_len + gen_tokens} exceeds the model's "
                         f"max_position_embeddings ({max_pos})")
    device = _device_of(model, device)
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, _vocab_size(model), (batch_size, prompt_len), generator=g).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def run() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past, nxt = output_cache(out), _logits(out)[:, -1:].argmax(-1)
        for _ in range(gen_tokens):
            out = model(input_ids=nxt, **with_cache(model, past))
            past, nxt = output_cache(out), _logits(out)[:, -1:].argmax(-1)
        sync()
        return t1 - t0, time.perf_counter() - t1

    was_training = model.training
    model.eval()
    try:
        times, peak, measure = _timed_runs(run, repeats, device, progress)
    finally:
        model.train(was_training)
    prefill = statistics.median(t[0] for t in times)
    decode = statistics.median(t[1] for t in times)
    return ThroughputResult(batch_size * prompt_len / prefill, batch_size * gen_tokens / decode, peak, measure,
                            prompt_len, gen_tokens, batch_size, repeats, str(device))


def evaluate(model: torch.nn.Module, run, *, batch_size: int = 4, progress: bool = True, ids=None,
             weights=None) -> PerplexityResult:
    """Perplexity of ``model`` on the held-out evaluation split of ``run`` (a :class:`~rankalloc.profiling.run.Run`).

    ``ids``: the evaluation windows (default ``run``'s, :func:`rankalloc.profiling.run.evaluation_ids`); pass them
    to score several models on the same windows without re-tokenizing. ``run.device`` "auto" means CUDA when
    available, else CPU, as in profiling. Out of core (``weights`` out of core, or ``model`` is the run's own
    out-of-core model) the perplexity is streamed, one decoder layer resident (:func:`streamed_perplexity`); a
    skeleton with no ``weights`` to read it from is refused.
    """
    from rankalloc.profiling.profile import resolve_device
    from rankalloc.profiling.run import evaluation_ids

    if weights is None and model is run.model and getattr(run.loaded, "out_of_core", False):
        weights = run.loaded.weights
    if ids is None:
        ids = evaluation_ids(run)
    source = f"held-out evaluation split of text {run.text.name!r} ({run.text.source_id})"
    if weights is not None and weights.out_of_core:
        return streamed_perplexity(model, weights, ids, batch_size=batch_size, device=resolve_device(run.device),
                                   progress=progress, source=source)
    if _meta_parameters(model):
        raise ValueError(f"{type(model).__name__} has parameters on the meta device (an out-of-core skeleton) and no "
                         f"weights to read them from; this step needs the model in memory (run it without "
                         f"--out-of-core)")
    return perplexity(model, ids, batch_size=batch_size, device=resolve_device(run.device), progress=progress,
                      source=source)


def _timed_runs(run, repeats: int, device: torch.device, progress: bool):
    """One warm-up run that is also the memory run, then ``repeats`` timed runs: ``(times, peak bytes, how)``."""
    cuda = device.type == "cuda"
    watch = None
    with torch.inference_mode():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with contextlib.suppress(ImportError):
                watch = _RSSPeak()
        # the warm-up run is the memory run; the timed runs are not perturbed by the RSS sampler
        with watch if watch is not None else contextlib.nullcontext():
            run()
        times = [run() for _ in tqdm(range(repeats), desc="throughput", unit="run", disable=not progress)]
    if cuda:
        return times, int(torch.cuda.max_memory_allocated(device)), (
            "CUDA torch.cuda.max_memory_allocated over the runs (weights + activations + KV cache)")
    if watch is not None:
        return times, int(watch.peak - watch.base), (
            "CPU peak RSS above the pre-run RSS during the warm-up run, sampled every 2 ms with psutil "
            "(excludes resident weights)")
    import resource

    return times, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, (
        "CPU process lifetime peak RSS from resource.getrusage (psutil not installed; includes weights)")


def model_params(model: torch.nn.Module) -> int:
    """Parameters of the whole model (shared tensors, e.g. tied embeddings, counted once)."""
    return sum(p.numel() for p in model.parameters())


def compare_dense(dense_model: torch.nn.Module, compressed_model: torch.nn.Module, ids: torch.Tensor,
                  batch_size: int = 4, device=None, progress: bool = True, source: str = ""):
    """A two-row ``pandas.DataFrame`` (dense, compressed): ppl, nll, tokens, nonfinite_tokens, params,
    params_removed (whole-model fraction) and ppl_vs_dense, on the same windows. ``attrs['protocol']``
    holds the protocol string."""
    import pandas as pd

    rows = {}
    dense_params = model_params(dense_model)
    for label, model in (("dense", dense_model), ("compressed", compressed_model)):
        res = perplexity(model, ids, batch_size=batch_size, device=device, progress=progress, source=source)
        params = model_params(model)
        rows[label] = dict(ppl=res.ppl, nll=res.nll, tokens=res.tokens, nonfinite_tokens=res.nonfinite_tokens,
                           params=params, params_removed=1.0 - params / dense_params, protocol=res.protocol)
    df = pd.DataFrame.from_dict(rows, orient="index")
    df["ppl_vs_dense"] = df["ppl"] / df.loc["dense", "ppl"]
    df.attrs["protocol"] = df.loc["dense", "protocol"]
    return df.drop(columns="protocol")
