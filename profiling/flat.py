# FLAT-LLM (Tian et al., 2025), Sec. 3.1-3.2: head-wise PCA of the value outputs, V and O shrunk together.
"""FLAT-LLM's curve set: one merged ``vo`` component per layer plus q, k, gate, up, down.

For KV head ``h`` the value outputs ``Y_h = W_v^h X`` have covariance ``C_h = sum_t y_{t,h} y_{t,h}^T``
(``profile.value_covariance``) with eigen-pairs ``lambda_{h,1} >= ... >= lambda_{h,d}``, ``Q_h``.
Keeping the top-``r`` basis ``Q_{h,r}`` and absorbing it into ``W_v`` (``Q_{h,r}^T W_v^h``) and ``W_o``
(``W_o^h Q_{h,r}``) shrinks the head dimension to ``r``. Its error in the value space is exactly

    ||Y_h - Q_{h,r} Q_{h,r}^T Y_h||_F^2 = sum_{i>r} lambda_{h,i},

so the ``vo`` curve at head rank ``r = 0..head_dim`` is ``sum_h sum_{i>r} lambda_{h,i}`` (kind
``whitened``; ``energy`` and ``relative`` normalise it by ``r = 0``). Its component is
``<layers>.<l>.self_attn.vo`` (kind ``vo``, ``m`` = O's output dim, ``n`` = V's input dim), priced by
:class:`~rankalloc.allocators.costs.FlatParams`. q, k, gate, up, down keep their profiled curves.

``fisher`` (when the profile has the Fisher kinds): FLAT's truncation changes the value outputs by
``dy_s = -P_r y_s`` at every position, ``P_r = blockdiag_h(I - Q_{h,r} Q_{h,r}^T)``. Under the per-position
empirical Fisher of :mod:`~rankalloc.profiling.fisher` (its steps 1-2) the loss increase is

    vo_fisher(r) = sum_s (g_s^T P_r y_s)^2 / (2 N_loss) = sum_s (sum_{i>r} sum_h (q_{h,i}^T g_s)(q_{h,i}^T y_s))^2 / (2 N_loss),

``g_s`` the output gradient of the value projection. It is accumulated token by token in the layer-streamed
backward (:class:`ValueLossTap`), in the basis the decomposer keeps, for every ``r`` at once (then made
non-increasing from the top). It deliberately skips K-FAC's step 3 (``sum_s (y y^T) (x) (g g^T) ~ C (x) G_g /
N_x``, the older curve of this module), because values and their gradients are far from independent across
positions: the attention-sink token (BOS) carries
most of the value gradient (0.66-0.98 of ``tr G_g`` in layers 12-29 of SmolLM2-135M) and almost no value energy
(< 0.001 of ``tr C``), so the Kronecker product charged every value direction with the sink's gradient and priced
FLAT's truncation at 1.8-143x the measured loss in layers 12-29 (head rank 16 in layer 15: measured loss increase
0.0163 nats, K-FAC 0.0951, this curve 0.0250; ``python -m rankalloc.studies.study_flat_values``). ``fisher_svd`` prices what the FLAT decomposer builds: that ``vo`` curve, plus
the one-sided (whitened SVD) ``fisher_svd`` curves of q, k, gate, up and down, which the decomposer factorizes
by whitened SVD. ``fisher`` pairs the same ``vo`` curve with the two-sided curves of the others, which
underprice their whitened-SVD truncation. Profiles made before this curve existed (or without the ``flat``
extra) have no ``vo`` loss curve: their FLAT curve set offers the other kinds only.
"""

from __future__ import annotations

import numpy as np
import torch

from rankalloc.allocators.curveset import CurveSet
from rankalloc.allocators.problem import Component
from rankalloc.profiling.numerics import PRECISION, NumericalError, check_finite, fix_signs

KEEP_KINDS = ("q", "k", "gate", "up", "down")
FLAT_KINDS = ("whitened", "energy", "relative", "fisher", "fisher_svd")
LOSS_KINDS = ("fisher", "fisher_svd")
TOKEN_FISHER = "token_fisher"  # key prefix of the stored vo loss curves (profile.fisher_extra)


def eig_desc(C: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns, deterministic signs) of PSD ``C``."""
    C = check_finite(C.to(PRECISION), name)
    try:
        lam, Q = torch.linalg.eigh(0.5 * (C + C.T))
    except RuntimeError as exc:
        raise NumericalError(f"eigh of {name} ({tuple(C.shape)}) did not converge: {exc}") from None
    lam, Q = torch.flip(lam, [0]).clamp_min(0.0), torch.flip(Q, [1])
    Q, _ = fix_signs(Q, Q.T)
    return lam, Q


def _tail(terms: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_{i>r} terms_i`` for r = 0..len(terms), exact 0 at the end."""
    return torch.cat([torch.flip(torch.cumsum(torch.flip(terms, [0]), 0), [0]), torch.zeros(1, dtype=PRECISION)])


def dropped_eigenvalues(C: torch.Tensor, name: str = "value covariance") -> np.ndarray:
    """``out[r] = sum_h sum_{i>r} lambda_{h,i}`` for r = 0..head_dim, ``C`` of shape (heads, d, d)."""
    out = 0.0
    for h in range(C.shape[0]):
        lam, _ = eig_desc(C[h], f"{name}, head {h}")
        out = out + _tail(lam)
    return out.numpy()


class ValueLossTap:
    """Accumulates ``sum_s z_s(r)^2`` for r = 0..head_dim, ``z_s(r) = g_s^T P_r y_s`` (see the module doc), from the
    value projection's outputs ``y`` and output gradients ``g`` (``... x kv_heads*head_dim``), batch by batch.

    ``Q``: the kept bases, ``(kv_heads, head_dim, head_dim)`` float64, columns by descending eigenvalue
    (:func:`head_bases`). ``sums`` (float64, ``head_dim + 1``; 0 at ``r = head_dim``) is summed over processes."""

    def __init__(self, Q: torch.Tensor):
        if Q.ndim != 3 or Q.shape[1] != Q.shape[2]:
            raise ValueError(f"ValueLossTap: expected bases of shape (kv_heads, head_dim, head_dim), "
                             f"received {tuple(Q.shape)}")
        self.Q = Q.to(PRECISION)
        self.sums = torch.zeros(Q.shape[1] + 1, dtype=PRECISION, device=Q.device)

    def __call__(self, y: torch.Tensor, g: torch.Tensor) -> None:
        kv, d, _ = self.Q.shape
        a = torch.einsum("nhd,hdk->nhk", y.reshape(-1, kv, d).to(PRECISION), self.Q)
        b = torch.einsum("nhd,hdk->nhk", g.reshape(-1, kv, d).to(PRECISION), self.Q)
        terms = (a * b).sum(1)  # (tokens, d): direction i's share of g^T y, summed over the heads
        z = torch.flip(torch.cumsum(torch.flip(terms, [1]), 1), [1])  # z[:, r] = sum_{i >= r}: dropped at rank r
        self.sums[:d] += (z * z).sum(0)

    def curve(self, n_loss_tokens: int) -> np.ndarray:
        """``vo_fisher(r)``, r = 0..head_dim, in nats per predicted token, made non-increasing from the top
        (``max_{r' >= r}``: a quadratic form of the dropped set need not shrink when a direction is kept, and the
        price of a rank is then never below the estimate of the rank that is built)."""
        if n_loss_tokens < 1:
            raise ValueError(f"ValueLossTap: expected n_loss_tokens >= 1, received {n_loss_tokens!r}")
        return np.maximum.accumulate((self.sums / (2.0 * n_loss_tokens)).cpu().numpy()[::-1])[::-1].copy()


def fisher_tap(profile, c: Component, device=None) -> ValueLossTap | None:
    """The :class:`ValueLossTap` of a value projection (None for other kinds, or without a value covariance)."""
    if c.kind != "v":
        return None
    try:
        Q = head_bases(profile, c.layer)
    except ValueError:
        return None
    return ValueLossTap(Q.to(device) if device is not None else Q)


def fisher_extras(profile, c: Component, W: torch.Tensor, Gg: torch.Tensor, n_loss: int,
                  tap: ValueLossTap | None = None) -> dict[str, np.ndarray]:
    """FLAT's value-head loss curve of one layer (stored as ``token_fisher:<vo>``) from the :class:`ValueLossTap`
    that the layer-streamed backward filled for the value projection."""
    if c.kind != "v" or tap is None:
        return {}
    return {f"{TOKEN_FISHER}:{vo_name(c.name)}": tap.curve(n_loss)}


def head_bases(profile, layer: int) -> torch.Tensor:
    """Eigenvectors of each KV head's value covariance as columns, by descending eigenvalue:
    ``(kv_heads, head_dim, head_dim)`` float64; ``Q[h][:, :r]`` is the basis FLAT keeps at head rank r."""
    C = profile.value_covariance(layer)
    return torch.stack([eig_desc(C[h], f"value covariance of layer {layer}, head {h}")[1] for h in range(C.shape[0])])


def vo_name(v_name: str) -> str:
    """``model.layers.3.self_attn.v_proj`` -> ``model.layers.3.self_attn.vo``."""
    return v_name.rsplit(".", 1)[0] + ".vo"


def value_output_pair(found: dict[str, Component], layer: int) -> tuple[Component, Component]:
    """``(v, o)`` of one layer's components by kind, or a one-line ``ValueError``: FLAT-LLM shrinks separate value
    and output projections (a fused ``qkv`` or ``gate_up`` projection has no value part of its own to absorb)."""
    fused = found.get("qkv", found.get("gate_up"))
    if fused is not None:
        raise ValueError(f"component {fused.name!r}: FLAT-LLM needs separate q/k/v and gate/up projections; "
                         f"received a fused {fused.kind!r} projection (use svd, fisher_svd, pgsvd or sslc)")
    if "v" not in found or "o" not in found:
        raise ValueError(f"layer {layer}: FLAT-LLM needs a v and an o projection, found kinds {sorted(found)}")
    return found["v"], found["o"]


def flat_curve_set(profile, kinds=None) -> CurveSet:
    """FLAT-LLM's curve set (see the module doc). ``kinds``: default every kind of :data:`FLAT_KINDS`
    the profile has; "fisher" and "fisher_svd" need the ``vo`` loss curves stored in the Fisher backward (a profile
    without them offers the other kinds by default, and asking for a loss kind is a ``ValueError``)."""
    asked = kinds is not None
    kinds = profile.select_kinds(FLAT_KINDS, kinds, "FLAT")
    if set(LOSS_KINDS) & set(kinds):
        missing = [c.layer for c in profile.components
                   if c.kind == "v" and profile.fisher_extra(TOKEN_FISHER, vo_name(c.name), c.layer) is None]
        if missing and asked:
            raise ValueError(f"layer {missing[0]}: the profile has no FLAT value-head loss curve (profiled before "
                             f"rankalloc computed it per token, or without the 'flat' extra); profile again with "
                             f"--restart to get the FLAT kinds {list(LOSS_KINDS)}")
        if missing:
            kinds = tuple(k for k in kinds if k not in LOSS_KINDS)
    cfg = profile.meta["config"]
    head_dim = int(cfg["head_dim"])
    base = profile.curve_set(kinds)
    by_layer: dict[int, dict[str, Component]] = {}
    for c in base.components:
        by_layer.setdefault(c.layer, {})[c.kind] = c
    comps, ranks, errors = [], {}, {k: {} for k in kinds}
    for layer in sorted(by_layer):
        found = by_layer[layer]
        v, o = value_output_pair(found, layer)
        for c in found.values():
            if c.kind in KEEP_KINDS:
                comps.append(c)
                ranks[c.name] = np.asarray(base.ranks[c.name])
                for k in kinds:
                    errors[k][c.name] = np.asarray(base.errors[k][c.name])
        vo = Component(vo_name(v.name), o.m, v.n, "vo", layer)
        if head_dim > vo.max_rank:
            raise ValueError(f"component {vo.name!r}: head_dim {head_dim} exceeds min(m, n) = {vo.max_rank}")
        C = profile.value_covariance(layer)
        if C.shape[1] != head_dim:
            raise ValueError(f"layer {layer}: value covariance has head dim {C.shape[1]}, config says {head_dim}")
        dropped = dropped_eigenvalues(C, f"value covariance of layer {layer}")
        total = dropped[0]
        curves = {"whitened": dropped,
                  "energy": dropped / total if total > 0 else np.zeros_like(dropped)}
        curves["relative"] = np.sqrt(curves["energy"])
        if set(LOSS_KINDS) & set(kinds):
            curves["fisher"] = curves["fisher_svd"] = profile.fisher_extra(TOKEN_FISHER, vo.name, layer)
        comps.append(vo)
        ranks[vo.name] = np.arange(head_dim + 1)
        for k in kinds:
            errors[k][vo.name] = curves[k]
    return CurveSet(tuple(comps), ranks, errors, layer_scores=base.layer_scores, name="flat")


def add_flat_curves(profile) -> CurveSet:
    """Compute :func:`flat_curve_set` and store it as the profile's extra curve set ``"flat"``."""
    cs = flat_curve_set(profile)
    profile.write_extra("flat", cs)
    return cs
