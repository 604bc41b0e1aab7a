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

``fisher`` (when the profile has output-gradient Grams): FLAT's truncation changes ``W_v`` by
``dW_v = -P_r W_v`` with ``P_r = blockdiag_h(I - Q_{h,r} Q_{h,r}^T)``, whose K-FAC loss increase
(see :mod:`~rankalloc.profiling.fisher`) is ``tr(P_r C P_r G_g) / (2 N_x N_loss)``; keeping only the
per-head diagonal blocks of ``C`` (the covariance is stored per head) gives
``sum_h sum_{i>r} lambda_{h,i} q_{h,i}^T G_g^{hh} q_{h,i} / (2 N_x N_loss)``, non-increasing in ``r``.
``fisher_svd`` prices what the FLAT decomposer builds: that ``vo`` curve, plus the one-sided
(whitened SVD) ``fisher_svd`` curves of q, k, gate, up and down, which the decomposer factorizes by
whitened SVD. ``fisher`` pairs the same ``vo`` curve with the two-sided curves of the others, which
underprice their whitened-SVD truncation. Even with ``fisher_svd``, the exact optimum did worse than
IPRS on SmolLM2 at 30-40% removed (perplexity 297 against 130 at 40%; cause not established), so
FLAT's allocator is IPRS; see the README's quality table.
"""

from __future__ import annotations

import numpy as np
import torch

from rankalloc.allocators.curveset import CurveSet
from rankalloc.allocators.problem import Component
from rankalloc.profiling.numerics import PRECISION, NumericalError, check_finite, fix_signs

KEEP_KINDS = ("q", "k", "gate", "up", "down")
FLAT_KINDS = ("whitened", "energy", "relative", "fisher", "fisher_svd")


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


def flat_fisher_curve(C: torch.Tensor, Gg: torch.Tensor, n_tokens: int, n_loss_tokens: int,
                      name: str = "value covariance") -> np.ndarray:
    """K-FAC loss increase of FLAT's head-rank-``r`` truncation (per-head blocks; see the module doc)."""
    heads, d, _ = C.shape
    if tuple(Gg.shape) != (heads * d, heads * d):
        raise ValueError(f"{name}: expected a {heads * d}x{heads * d} output-gradient Gram of the value projection, "
                         f"received {tuple(Gg.shape)}")
    Gg = Gg.to(PRECISION)
    out = 0.0
    for h in range(heads):
        lam, Q = eig_desc(C[h], f"{name}, head {h}")
        block = Gg[h * d:(h + 1) * d, h * d:(h + 1) * d]
        terms = lam * torch.einsum("ik,ij,jk->k", Q, 0.5 * (block + block.T), Q).clamp_min(0.0)
        out = out + _tail(terms)
    return (out / (2.0 * n_tokens * n_loss_tokens)).numpy()


def fisher_extras(profile, c: Component, W: torch.Tensor, Gg: torch.Tensor, n_loss: int) -> dict[str, np.ndarray]:
    """FLAT's value-head loss curve of one layer, computed in the layer-streamed backward from the value
    projection's output-gradient Gram (the compact store keeps no such Gram)."""
    if c.kind != "v":
        return {}
    try:
        C = profile.value_covariance(c.layer)
    except ValueError:
        return {}
    curve = flat_fisher_curve(C, Gg, profile.tokens, n_loss, f"value covariance of layer {c.layer}")
    return {f"fisher:{vo_name(c.name)}": curve}


def head_bases(profile, layer: int) -> torch.Tensor:
    """Eigenvectors of each KV head's value covariance as columns, by descending eigenvalue:
    ``(kv_heads, head_dim, head_dim)`` float64; ``Q[h][:, :r]`` is the basis FLAT keeps at head rank r."""
    C = profile.value_covariance(layer)
    return torch.stack([eig_desc(C[h], f"value covariance of layer {layer}, head {h}")[1] for h in range(C.shape[0])])


def vo_name(v_name: str) -> str:
    """``model.layers.3.self_attn.v_proj`` -> ``model.layers.3.self_attn.vo``."""
    return v_name.rsplit(".", 1)[0] + ".vo"


def flat_curve_set(profile, kinds=None) -> CurveSet:
    """FLAT-LLM's curve set (see the module doc). ``kinds``: default every kind of :data:`FLAT_KINDS`
    the profile has ("fisher" needs its output-gradient Grams)."""
    kinds = profile.select_kinds(FLAT_KINDS, kinds, "FLAT")
    cfg = profile.meta["config"]
    head_dim = int(cfg["head_dim"])
    base = profile.curve_set(kinds)
    by_layer: dict[int, dict[str, Component]] = {}
    for c in base.components:
        by_layer.setdefault(c.layer, {})[c.kind] = c
    n_loss = profile.fisher_loss_tokens
    comps, ranks, errors = [], {}, {k: {} for k in kinds}
    for layer in sorted(by_layer):
        found = by_layer[layer]
        if "qkv" in found or "gate_up" in found:
            fused = found.get("qkv", found.get("gate_up"))
            raise ValueError(f"component {fused.name!r}: FLAT-LLM curves need separate q/k/v and gate/up projections; "
                             f"received a fused {fused.kind!r} projection")
        if "v" not in found or "o" not in found:
            raise ValueError(f"layer {layer}: FLAT-LLM needs a v and an o projection, found kinds {sorted(found)}")
        v, o = found["v"], found["o"]
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
        if {"fisher", "fisher_svd"} & set(kinds):
            stored = profile.fisher_extra("fisher", vo.name, layer)
            if stored is None:
                stored = flat_fisher_curve(C, profile.output_gram(v.name), profile.tokens, n_loss,
                                           f"value covariance of layer {layer}")
            curves["fisher"] = curves["fisher_svd"] = stored
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
