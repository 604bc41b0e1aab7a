# SoLA (Huang et al., 2025), Sec. 3: prime / marginal FFN neurons; only the marginal part is low-rank.
"""Curves of SoLA's split FFN: prime neurons stay dense, marginal sub-matrices get whitened SVD.

Neuron ``i`` of layer ``l`` has activation norm ``a_i = ||h_{:,i}||_2`` (``h`` = input of
down_proj); the top ``ceil(gamma d)`` are prime (``profile.prime_neurons``), the rest marginal
(``M``). The FFN ``y = W_down act(W_gate x) * (W_up x)`` splits exactly into a prime and a
marginal part, and only the marginal sub-matrices are factorized:

- ``gate[M, :]`` and ``up[M, :]`` (rows; fused ``gate_up``: rows ``M`` and ``d + M``): the input is
  ``x`` as before, so the whitened spectrum uses the full input Gram ``G_x``.
- ``down[:, M]`` (columns): the output error is ``(W_M - L) h_M`` because the prime columns are
  kept exactly, so ``||(W_M - L) H_M||^2`` uses the principal sub-Gram ``G_h[M, M]``. The
  prime/marginal cross term never enters: a Schur complement
  ``G_MM - G_MP G_PP^{-1} G_PM`` would be the right metric only if ``W_down[:, P]`` were
  re-fitted to absorb the part of the error predictable from ``h_P``; SoLA keeps it unchanged.

Components are named ``<name>#marginal`` (kind and layer of the original). Attention components
keep the profile's curves. The prime parts are dense and fixed: ``fixed_params`` is their total
parameter count (= original FFN parameters - dense cost of the marginal components), which a
budget over the curve set's components must be reduced by. Kinds: ``whitened, energy,
relative, epsilon`` (as in :mod:`~rankalloc.profiling.spectra`) and, when the profile has
output-gradient Grams, ``fisher`` and ``fisher_svd`` (K-FAC; gate/up use ``G_g[M, M]``, down
the full output Gram and ``G_h[M, M]``). Only kinds the profile also has are returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rankalloc.allocators.curveset import CurveSet
from rankalloc.allocators.problem import Component
from rankalloc.profiling.fisher import fisher_curve, fisher_svd_curve
from rankalloc.profiling.numerics import PRECISION, Damping, damped_cholesky, singular_values
from rankalloc.profiling.probe import model_weight, profile_damping
from rankalloc.profiling.spectra import BASE_KINDS, curves

FFN_KINDS = ("gate", "up", "gate_up", "down")
GATED_PARTS = ("gate_proj", "up_proj", "down_proj")
"""The projections of the gated FFN that SoLA splits into prime and marginal neurons (Llama-family names)."""
SUFFIX = "#marginal"
SOLA_KINDS = BASE_KINDS + ("fisher", "fisher_svd")


@dataclass(frozen=True, eq=False)
class SoLACurves:
    """The SoLA curve set, the dense parameters of the prime parts, and the prime neurons per layer."""

    curve_set: CurveSet
    fixed_params: int
    prime: dict[int, np.ndarray]
    gamma: float


def marginal_index(component: Component, marginal: np.ndarray, d: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(rows, cols)`` of the marginal sub-matrix of an FFN component (None = all)."""
    if component.kind in ("gate", "up"):
        rows, cols = marginal, None
    elif component.kind == "gate_up":
        rows, cols = np.concatenate([marginal, d + marginal]), None
    elif component.kind == "down":
        rows, cols = None, marginal
    else:
        raise ValueError(f"component {component.name!r}: kind {component.kind!r} is not an FFN kind {FFN_KINDS}")
    size = component.m if cols is None else component.n
    expect = 2 * d if component.kind == "gate_up" else d
    if size != expect:
        what = "rows" if cols is None else "columns"
        raise ValueError(f"component {component.name!r}: expected {expect} neuron {what}"
                         f" (intermediate size {d}), received {size}")
    return rows, cols


def marginal_curves(W: torch.Tensor, Gx: torch.Tensor, rows, cols, kinds, name: str,
                    damping: Damping = Damping(), Gg: torch.Tensor | None = None, n_tokens: int | None = None,
                    n_loss_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Curves of the sub-matrix ``W[rows][:, cols]`` with input Gram ``Gx[cols, cols]`` (and ``Gg[rows, rows]``)."""
    W = W.to(PRECISION)
    r = torch.as_tensor(rows, dtype=torch.long) if rows is not None else None
    c = torch.as_tensor(cols, dtype=torch.long) if cols is not None else None
    Wm = W if r is None else W[r]
    Wm = Wm if c is None else Wm[:, c]
    G = Gx.to(PRECISION)
    G = G if c is None else G[c][:, c]
    S, _ = damped_cholesky(G, f"input Gram of {name}", damping)
    base = [k for k in kinds if k in BASE_KINDS]
    out = {}
    if base:
        sigma = singular_values(Wm @ S, f"whitened weight of {name}").numpy()
        sigma_w = singular_values(Wm, f"weight of {name}").numpy() if "epsilon" in base else None
        out.update(curves(sigma, sigma_w, tuple(base)))
    loss = [k for k in kinds if k in ("fisher", "fisher_svd")]
    if loss:
        if Gg is None or n_tokens is None:
            raise ValueError(f"{name}: kinds {loss} need the output-gradient Gram and token counts")
        Gs = Gg.to(PRECISION)
        Gs = Gs if r is None else Gs[r][:, r]
        fn = {"fisher": fisher_curve, "fisher_svd": fisher_svd_curve}
        for k in loss:
            out[k] = fn[k](Wm, G, Gs, n_tokens, n_loss_tokens, name, damping)
    return out


def fisher_extras(profile, c: Component, W: torch.Tensor, Gg: torch.Tensor, n_loss: int,
                  tap=None) -> dict[str, np.ndarray]:
    """The SoLA marginal ``fisher`` and ``fisher_svd`` curves of one FFN component at the profile's gamma, computed
    in the layer-streamed backward while its output-gradient Gram exists (the compact store keeps no such Gram)."""
    if c.kind not in FFN_KINDS:
        return {}
    d = int(profile.meta["config"]["intermediate"])
    marginal = np.setdiff1d(np.arange(d), profile.prime_neurons(c.layer, float(profile.meta.get("gamma", 0.15))))
    if len(marginal) == 0:
        return {}
    rows, cols = marginal_index(c, marginal, d)
    name = c.name + SUFFIX
    cv = marginal_curves(W, profile.input_gram(c.name), rows, cols, ("fisher", "fisher_svd"), name,
                         profile_damping(profile), Gg, profile.tokens, n_loss)
    return {f"{k}:{name}": v for k, v in cv.items()}


def check_gated_ffn(components) -> None:
    """One-line ``ValueError`` unless every layer's FFN components are a gated FFN's separate ``gate_proj``,
    ``up_proj`` and ``down_proj`` of one module: SoLA keeps whole neurons (rows of gate and up, columns of down)
    dense, which its decomposer builds for that FFN only (not a fused ``gate_up_proj``, nor an ungated
    ``fc1``/``c_fc`` FFN)."""
    by_layer: dict[int, list[Component]] = {}
    for c in components:
        if c.kind in FFN_KINDS:
            by_layer.setdefault(c.layer, []).append(c)
    for layer, ffn in sorted(by_layer.items()):
        parts = {c.name.rsplit(".", 1)[-1]: c.name.rsplit(".", 1)[0] for c in ffn}
        if sorted(parts) != sorted(GATED_PARTS) or len(set(parts.values())) != 1:
            odd = next((c for c in ffn if c.name.rsplit(".", 1)[-1] not in GATED_PARTS), ffn[0])
            raise ValueError(f"component {odd.name!r}: SoLA splits a gated FFN with separate "
                             f"{', '.join(GATED_PARTS)}; layer {layer} has {sorted(parts)} (use svd, fisher_svd, "
                             f"pgsvd or sslc)")


def fixed_prime_params(components, prime_count: dict[int, int], d: int) -> int:
    """Dense parameters of the prime parts: ``sum`` over FFN components of ``m n - m' n'``."""
    total = 0
    for c in components:
        if c.kind not in FFN_KINDS:
            continue
        p = prime_count[c.layer]
        mult = 2 if c.kind == "gate_up" else 1
        total += (mult * p * c.n) if c.kind != "down" else (c.m * p)
    return int(total)


def _weights(model_or_weights, name: str) -> torch.Tensor:
    if isinstance(model_or_weights, torch.nn.Module):
        return model_weight(model_or_weights, name)
    if name not in model_or_weights:
        raise ValueError(f"component {name!r}: no weight given (expected a model or a dict name -> (out, in) weight)")
    return torch.as_tensor(model_or_weights[name]).to(PRECISION)


def sola_curve_set(profile, model_or_weights, gamma: float = 0.15, kinds=None, progress: bool = False) -> SoLACurves:
    """SoLA's curve set from a profile: attention curves as profiled, FFN marginal parts recomputed.

    ``model_or_weights``: the profiled model, or a dict ``name -> (out, in)`` weight for the FFN
    components. ``kinds``: default every kind of :data:`SOLA_KINDS` the profile has.
    """
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma: expected a prime fraction in [0, 1), received {gamma!r}")
    kinds = profile.select_kinds(SOLA_KINDS, kinds, "SoLA")
    base = profile.curve_set(kinds)
    check_gated_ffn(base.components)
    d = int(profile.meta["config"]["intermediate"])
    damping = profile_damping(profile)
    n_loss = profile.fisher_loss_tokens
    comps, ranks, errors = [], {}, {k: {} for k in kinds}
    prime, prime_counts = {}, {}
    from tqdm.auto import tqdm

    for c in tqdm(base.components, desc="SoLA curves", disable=not progress):
        if c.kind not in FFN_KINDS:
            comps.append(c)
            ranks[c.name] = np.asarray(base.ranks[c.name])
            for k in kinds:
                errors[k][c.name] = np.asarray(base.errors[k][c.name])
            continue
        if c.layer not in prime:
            prime[c.layer] = profile.prime_neurons(c.layer, gamma)
            prime_counts[c.layer] = len(prime[c.layer])
        marginal = np.setdiff1d(np.arange(d), prime[c.layer])
        if len(marginal) == 0:
            continue
        rows, cols = marginal_index(c, marginal, d)
        sub = Component(c.name + SUFFIX, c.m if rows is None else len(rows), c.n if cols is None else len(cols),
                        c.kind, c.layer)
        loss = [k for k in kinds if k in ("fisher", "fisher_svd")]
        stored = {k: profile.fisher_extra(k, sub.name, c.layer) for k in loss} if not profile.has_output_grams() \
            else {}
        if any(v is None for v in stored.values()):
            raise ValueError(f"{sub.name}: the profile at {profile.path} holds no SoLA loss curves for it (they are "
                             f"computed in the Fisher backward at the profile's gamma {profile.meta.get('gamma')}; "
                             f"gamma {gamma} needs a profile with --store full)")
        Gg = profile.output_gram(c.name) if loss and not stored else None
        cv = marginal_curves(_weights(model_or_weights, c.name), profile.input_gram(c.name), rows, cols,
                             [k for k in kinds if k not in stored], sub.name, damping, Gg, profile.tokens, n_loss)
        cv.update(stored)
        comps.append(sub)
        ranks[sub.name] = np.arange(sub.max_rank + 1)
        for k in kinds:
            errors[k][sub.name] = cv[k]
    fixed = fixed_prime_params(base.components, prime_counts, d)
    cs = CurveSet(tuple(comps), ranks, errors, layer_scores=base.layer_scores, name=f"sola-{gamma:g}")
    return SoLACurves(cs, fixed, prime, float(gamma))


def add_sola_curves(profile, model_or_weights, gamma: float = 0.15, progress: bool = True) -> SoLACurves:
    """Compute :func:`sola_curve_set` and store it as the profile's extra curve set ``"sola"``."""
    out = sola_curve_set(profile, model_or_weights, gamma, progress=progress)
    profile.write_extra("sola", out.curve_set)
    return out
