# Probe curves: measured calibration-loss increase of truncating one matrix (whitened SVD as in
# SVD-LLM, Wang et al., 2024, Sec. 3.1), rerunning only the decoder layers after it.
"""Measured loss-unit curves, and the model helpers the loss-aware profilers share.

``probe_curve`` truncates ONE component ``W`` to rank ``r`` by whitened SVD,
``W_r = U_r Sigma_r V_r^T S^{-1}`` with ``S S^T = G_x + delta I`` (``W S = U Sigma V^T``), and measures
the mean next-token cross-entropy on a small probe subset of the calibration ids. The hidden
states leaving every decoder layer are cached once (dense model), so a probe of a component in
layer ``l`` reruns only layers ``l..L-1`` plus the head: layers before ``l`` are replaced by
stubs that return their cached outputs, and the model's own forward does the rest (embeddings,
rotary tables, masks, final norm, LM head), so no architecture-specific code is needed.

Curve = measured ``L(W_r) - L(W)`` at a few ranks (``probe_ranks``), then:
1. rank ``min(m, n)`` is added with increase 0: there ``W_r = U Sigma V^T S^{-1} = W`` exactly;
2. made monotone: ``e(r) <- min_{r' <= r} e(r')``, the running minimum taken from rank 0 upward
   (a measured increase can only be lowered by a smaller one found at a lower rank, so the
   result is non-increasing in rank and never above a measurement), then clipped at 0;
3. linearly interpolated between measured ranks to every rank ``0..min(m, n)``.
The probe subset is small (``n_probe_samples`` sequences), so the values are noisy where the
increase is tiny; they are exact measurements only at the measured ranks.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from rankalloc.profiling.architectures import find_structure, weight_of
from rankalloc.profiling.calibration import replaced_forwards
from rankalloc.profiling.numerics import PRECISION, Damping, check_finite, damped_cholesky, svd

# ----------------------------------------------------------------------------- model helpers


def component_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module called ``name`` in ``model`` (ValueError naming it if absent)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"component {name!r}: no such module in the model "
                         f"({type(model).__name__}); is the profile from another model?") from None


def read_weight(module: torch.nn.Module, name: str = "") -> torch.Tensor:
    """The weight as an ``(out, in)`` float64 matrix (a copy), whatever the module's layout."""
    return check_finite(weight_of(module).detach().to(PRECISION), f"weight of {name}").clone()


def model_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The ``(out, in)`` float64 weight of the matrix ``name`` of ``model`` (a copy): from memory, or, for an
    out-of-core skeleton (:func:`~rankalloc.profiling.weights.load_out_of_core`), that one tensor read from its
    checkpoint, so curves that need a weight (SoLA's, SSLC's) are built one matrix resident at a time."""
    from rankalloc.profiling.weights import source_of

    module = component_module(model, name)
    if weight_of(module).device.type != "meta":
        return read_weight(module, name)
    weights = source_of(model)
    if weights is None:
        raise ValueError(f"weight of {name}: on the meta device, and the model has no checkpoint to read it from "
                         f"(load it with load_out_of_core, or in memory)")
    return check_finite(weights.matrix(module, name).to(PRECISION), f"weight of {name}").clone()


def write_weight_(module: torch.nn.Module, W: torch.Tensor) -> None:
    """Copy an ``(out, in)`` matrix into the module's weight, in its dtype and layout (in place)."""
    w = weight_of(module)
    if tuple(W.shape) != tuple(w.shape):
        raise ValueError(f"expected a weight of shape {tuple(w.shape)}, received {tuple(W.shape)}")
    with torch.no_grad():
        w.copy_(W.to(dtype=w.dtype, device=w.device))


def profile_damping(profile) -> Damping:
    """The Cholesky damping the profile was computed with (its settings), so curves stay consistent."""
    d = profile.meta.get("settings", {}).get("damping")
    return Damping(**d) if d else Damping()


def check_calibration_ids(profile, ids: torch.Tensor) -> None:
    """ValueError unless ``ids`` are the token ids the profile's Grams were accumulated on."""
    from rankalloc.profiling.profile import calibration_hash

    want = profile.meta.get("calibration_hash")
    if want is not None and calibration_hash(ids) != want:
        raise ValueError(f"ids are not this profile's calibration ids: expected hash {want} "
                         f"({profile.meta.get('n_samples')} x {profile.meta.get('seqlen')} tokens), received "
                         f"hash {calibration_hash(ids)} ({tuple(ids.shape)})")
    if ids.numel() != profile.tokens:
        raise ValueError(f"ids are not this profile's calibration ids: expected {profile.tokens} tokens, "
                         f"received {ids.numel()} ({tuple(ids.shape)})")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device):
    """Run with ``model`` on ``device`` in eval mode; restore its device and mode afterwards."""
    old_device, was_training = model_device(model), model.training
    device = torch.device(device) if device is not None else old_device
    moved = device != old_device
    if moved:
        model.to(device)
    model.eval()
    try:
        yield device
    finally:
        if moved:
            model.to(old_device)
        model.train(was_training)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def token_loss_sum(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over the batch of next-token cross-entropy (float32 graph) and the number of predicted tokens.

    Every position but the last predicts the next id; the batch's mean loss is ``sum / count``.
    """
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None else {}
    logits = _logits(model(input_ids=batch, **kwargs))
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # half precision -> float32
    target = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return loss, target.numel()


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on ``ids`` (W, T)."""
    dev = model_device(model)
    total, count = 0.0, 0
    for b in range(0, ids.shape[0], batch_size):
        loss, n = token_loss_sum(model, ids[b:b + batch_size].to(dev))
        total += float(loss.double())
        count += n
    if not math.isfinite(total):
        raise ValueError(f"calibration loss is not finite ({total}); the model produces NaN/Inf logits")
    return total / count


class LayerCache:
    """Outputs of every decoder layer on a probe subset (dense model), to rerun from any layer.

    ``loss(start)`` is the mean next-token cross-entropy on the probe ids when layers ``< start``
    return their cached outputs and layers ``>= start`` run with the model's current weights.
    """

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor,
                 batch_size: int = 4):
        self.model, self.layers, self.batch_size = model, layers, batch_size
        self.batches = [ids[b:b + batch_size].to(model_device(model)) for b in range(0, ids.shape[0], batch_size)]
        self.outputs: list[list] = [[] for _ in layers]
        hooks = [layer.register_forward_hook(self._keep(j)) for j, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                losses = [token_loss_sum(model, b) for b in self.batches]
        finally:
            for h in hooks:
                h.remove()
        self.dense_loss = sum(float(l.double()) for l, _ in losses) / sum(n for _, n in losses)
        self._batch = 0

    def _keep(self, j):
        def hook(module, args, out):
            self.outputs[j].append(out)
        return hook

    def _stub(self, j):
        def forward(*args, **kwargs):
            return self.outputs[j][self._batch]
        return forward

    @torch.no_grad()
    def loss(self, start: int) -> float:
        """Mean probe loss, running only layers ``start..L-1`` (and everything after the layers)."""
        with replaced_forwards(list(self.layers)[:start], self._stub):
            total, count = 0.0, 0
            for b, batch in enumerate(self.batches):
                self._batch = b
                loss, n = token_loss_sum(self.model, batch)
                total += float(loss.double())
                count += n
        if not math.isfinite(total):
            raise ValueError(f"probe loss is not finite ({total}) when rerunning from layer {start}")
        return total / count


# ----------------------------------------------------------------------------- truncation


def whitened_factors(W: torch.Tensor, G: torch.Tensor, name: str,
                     damping: Damping = Damping()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, Z)`` with ``W = A Z`` and ``A[:, :r] Z[:r]`` the whitened rank-r truncation of ``W``.

    ``S = chol(G + delta I)``, ``W S = U Sigma V^T``, ``A = U Sigma`` (m x k), ``Z = V^T S^{-1}``
    (k x n), ``k = min(m, n)``; ``Z`` comes from a triangular solve, never an explicit inverse.
    """
    W = W.to(PRECISION)
    S, _ = damped_cholesky(G, name, damping)
    U, s, Vh = svd(W @ S, f"whitened weight of {name}")
    Z = torch.linalg.solve_triangular(S.T, Vh.T, upper=True).T  # Z S = V^T
    return U * s, Z


def probe_ranks(max_rank: int, count: int, grid: int = 16) -> np.ndarray:
    """``count`` ranks ``round(i/count * max_rank)`` on multiples of ``grid`` (0 included, max excluded)."""
    if count < 1:
        raise ValueError(f"expected at least one probe rank per component, received {count!r}")
    g = max(1, min(grid, max_rank))
    r = np.round(np.arange(count) / count * max_rank / g).astype(np.int64) * g
    return np.unique(r[r < max_rank])


def monotone_curve(ranks: np.ndarray, increases: np.ndarray, max_rank: int) -> np.ndarray:
    """Measured increases at ``ranks`` -> non-increasing curve over ``0..max_rank`` (see module doc)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    inc = np.asarray(increases, dtype=np.float64)
    if not np.isfinite(inc).all():
        raise ValueError(f"probe increases must be finite, received {inc.tolist()}")
    if ranks.min() != 0:
        raise ValueError(f"probe ranks must include 0, received {ranks.tolist()}")
    order = np.argsort(ranks)
    r = np.append(ranks[order], max_rank)
    e = np.append(inc[order], 0.0)
    e = np.maximum(np.minimum.accumulate(e), 0.0)
    return np.interp(np.arange(max_rank + 1), r, e)


def probe_curve(cache: LayerCache, module: torch.nn.Module, A: torch.Tensor, Z: torch.Tensor, layer: int,
                ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Measured ``L(W_r) - L(W)`` on the cached probe subset at each of ``ranks`` (module restored after).

    Returns ``(increases, curve over 0..min(m, n))``.
    """
    original = module.weight.detach().clone()
    inc = []
    try:
        for r in ranks:
            write_weight_(module, A[:, :r] @ Z[:r])
            inc.append(cache.loss(layer) - cache.dense_loss)
    finally:
        with torch.no_grad():
            module.weight.copy_(original)
    inc = np.asarray(inc)
    return inc, monotone_curve(ranks, inc, A.shape[1])


def probe_curves(model: torch.nn.Module, components, input_gram, ids: torch.Tensor, ranks_per_component: int = 6,
                 grid: int = 16, batch_size: int = 4, progress: bool = True,
                 layers: torch.nn.ModuleList | None = None, damping: Damping = Damping()) -> dict[str, np.ndarray]:
    """Probe curve of every component (``input_gram(name)`` gives its summed input Gram).

    ``layers``: the decoder layer list (default: found by ``architectures.find_structure``).
    """
    from tqdm.auto import tqdm

    components = list(components)
    layers = find_structure(model).layers if layers is None else layers
    cache = LayerCache(model, layers, ids, batch_size)
    out = {}
    for c in tqdm(components, desc="probe curves", disable=not progress):
        module = component_module(model, c.name)
        W = read_weight(module, c.name)
        if tuple(W.shape) != (c.m, c.n):
            raise ValueError(f"component {c.name!r}: expected a {c.m}x{c.n} weight, received {tuple(W.shape)}")
        A, Z = whitened_factors(W, input_gram(c.name), c.name, damping)
        _, out[c.name] = probe_curve(cache, module, A, Z, c.layer, probe_ranks(c.max_rank, ranks_per_component, grid))
    return out


def add_probe_curves(profile, model: torch.nn.Module, ids: torch.Tensor, ranks_per_component: int = 6,
                     n_probe_samples: int = 8, device="cpu", progress: bool = True, grid: int = 16,
                     batch_size: int = 4) -> dict[str, np.ndarray]:
    """Measure probe curves on the first ``n_probe_samples`` calibration sequences; write kind "probe".

    Cost: about ``ranks_per_component`` reruns per component of layers ``l..L-1`` plus the LM head on
    ``n_probe_samples`` sequences. SmolLM2-135M (210 matrices, 1260 probes of 8 x 512 tokens) timed at
    ``~16.5 + 2.5 (30 - l)`` s per probe on this project's loaded 2-core CPU (about 19 h in all; roughly
    3 h unloaded): the 49k-vocabulary LM head is most of a late-layer probe. Prefer a GPU, or fewer
    ranks / samples."""
    check_calibration_ids(profile, ids)
    if n_probe_samples < 1 or n_probe_samples > ids.shape[0]:
        raise ValueError(f"n_probe_samples: expected 1..{ids.shape[0]} (the calibration sequences), "
                         f"received {n_probe_samples!r}")
    with on_device(model, device):
        layers = model.get_submodule(profile.meta["layers_path"])
        curves = probe_curves(model, profile.components, profile.input_gram, ids[:n_probe_samples],
                              ranks_per_component, grid, batch_size, progress, layers,
                              profile_damping(profile))
    profile.write_kind("probe", curves)
    return curves
