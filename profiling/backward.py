# Layer-streamed backward for the K-FAC output-gradient Grams (Martens & Grosse, 2015, Sec. 3), one layer resident.
"""``G_g = sum_s g_s g_s^T`` of every linear map's output gradient, without a full-model backward.

The forward streaming stores each layer's input boundary ``h_l`` on disk (:class:`Boundaries`). The loss
gradient at the last boundary comes from the chunked head (:func:`rankalloc.profiling.head.loss_and_hidden_grad`).
Then for ``l = L-1 .. 0``: the layer is made resident, its forward is recomputed from ``h_l`` batch by batch with
grad enabled, the incoming gradient ``dL/dh_{l+1}`` is backpropagated, tensor hooks on the linear outputs add
``g^T g`` (float64) into the Grams, and ``dL/dh_l`` is kept for the next layer down. The layer is released before
the next one is read. By the chain rule these are the full backward's gradients, so the Grams equal a full
backward's up to float rounding.

Memory: one layer, one boundary of hidden states and two of gradients, and the Grams being accumulated. When a
layer's output Grams would exceed ``gram_budget`` bytes (the 14336-wide gate/up outputs of an 8B model are
1.6 GB each in float64) they are accumulated in groups, one recomputed backward per group.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rankalloc.profiling.numerics import PRECISION, check_finite


class Boundaries:
    """Per-layer, per-batch hidden states written to a scratch folder (``.npy``, the working dtype's bits)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, layer: int, batch: int) -> Path:
        return self.folder / f"h{layer:03d}_{batch:05d}.npy"

    def write(self, layer: int, batch: int, h: torch.Tensor) -> None:
        t = h.detach().to("cpu")
        raw = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        tmp = self._file(layer, batch).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, raw)
        tmp.replace(self._file(layer, batch))

    def read(self, layer: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        f = self._file(layer, batch)
        if not f.is_file():
            raise ValueError(f"{f}: the stored layer input is missing (the profiling scratch was removed mid-run); "
                             f"rerun the same command")
        a = torch.from_numpy(np.load(f))
        t = a.view(torch.bfloat16) if dtype == torch.bfloat16 else a
        return t.to(device=device, dtype=dtype)

    def has(self, layer: int, batches: int) -> bool:
        return all(self._file(layer, b).is_file() for b in range(batches))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def gram_groups(components, budget: float) -> list[list]:
    """Components in groups whose float64 output Grams (``8 m^2`` bytes each) fit ``budget``, largest first.

    A component larger than the budget alone gets a group of its own."""
    order = sorted(components, key=lambda c: -c.m)
    groups, sizes = [], []
    for c in order:
        need = 8.0 * c.m * c.m
        for i, used in enumerate(sizes):
            if used + need <= budget:
                groups[i].append(c)
                sizes[i] += need
                break
        else:
            groups.append([c])
            sizes.append(need)
    return groups


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _hooks(modules: dict, names, grams: dict, timings: dict, taps: dict | None = None, gram_dtype=PRECISION):
    """Forward hooks that register a tensor hook on each named module's output, adding ``g^T g`` into ``grams``
    (float64 accumulators; each batch's product formed in ``gram_dtype``, float64 or float32);
    ``taps[name]`` (callables ``tap(y, g)``) also see each batch's outputs ``y`` and output gradients ``g``."""
    handles = []
    taps = taps or {}

    def make(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if not t.requires_grad:
                return
            y = t.detach() if taps.get(name) else None

            def on_grad(g):
                t0 = time.perf_counter()
                g = g.detach()
                for tap in taps.get(name, ()):
                    tap(y, g)
                g = g.reshape(-1, g.shape[-1]).to(gram_dtype)
                if gram_dtype != PRECISION:  # float32 product, float64 sum (the profile's gram_dtype="float32")
                    gg = (g.T @ g).to(PRECISION)
                    gg = (gg + gg.T).mul_(0.5)  # a float32 GEMM need not be exactly symmetric; the store checks it
                    grams[name] = grams[name].add_(gg) if name in grams else gg
                elif name in grams:
                    grams[name].addmm_(g.T, g)
                else:
                    grams[name] = g.T @ g
                timings["gram"] = timings.get("gram", 0.0) + time.perf_counter() - t0

            t.register_hook(on_grad)
        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(make(n)))
    return handles


def layer_backward(layer_module, structure, layer: int, boundaries: Boundaries, calls: list, grads: list,
                   device, dtype, groups: list[list], on_group, timings: dict,
                   taps: dict | None = None, gram_dtype=PRECISION) -> list[torch.Tensor]:
    """Recompute layer ``layer`` from its stored inputs and backpropagate ``grads`` (one tensor per batch).

    For each group of components, one pass accumulates their output-gradient Grams and calls
    ``on_group(grams)`` (``{name: G_g}``, float64) before the next group. ``taps``: ``{name: [tap(y, g)]}``
    called with every batch's outputs and output gradients of that module. ``gram_dtype``: the dtype of each batch's
    ``g^T g`` (float64, or float32 added into the float64 Grams). Returns ``dL/dh_layer`` per batch.
    """
    new_grads: list[torch.Tensor | None] = [None] * len(grads)
    frozen = {p: p.requires_grad for p in layer_module.parameters()}  # no weight gradients: only dL/dh and G_g
    for p in frozen:
        p.requires_grad_(False)
    try:
        for group in groups:
            _group_pass(layer_module, structure, layer, boundaries, calls, grads, device, dtype, group, on_group,
                        timings, new_grads, taps, gram_dtype)
    finally:
        for p, f in frozen.items():
            p.requires_grad_(f)
    return new_grads


def _group_pass(layer_module, structure, layer, boundaries, calls, grads, device, dtype, group, on_group, timings,
                new_grads, taps=None, gram_dtype=PRECISION) -> None:
    """One recomputed backward of the layer accumulating the output Grams of ``group``; fills ``new_grads``."""
    grams: dict = {}
    names = [c.name for c in group]
    handles = _hooks(structure.modules, names, grams, timings, {n: t for n, t in (taps or {}).items() if n in names},
                     gram_dtype)
    try:
        for b, ((args, kwargs), g_out) in enumerate(zip(calls, grads)):
            t0 = time.perf_counter()
            x = boundaries.read(layer, b, dtype, device).requires_grad_(True)
            with torch.enable_grad():
                y = _layer_output(layer_module(x, *args, **kwargs))
                y.backward(g_out.to(device))
            if new_grads[b] is None:
                new_grads[b] = check_finite(x.grad.detach(), f"loss gradient at the input of decoder layer {layer}")
            timings["backward"] = timings.get("backward", 0.0) + time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    missing = [c.name for c in group if c.name not in grams]
    if missing:
        raise ValueError(f"no output gradient reached {missing[:3]}: expected every module to influence the loss")
    on_group({n: check_finite(G, f"output-gradient Gram of {n}") for n, G in grams.items()})
