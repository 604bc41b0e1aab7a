# SSLC (Zong et al., 2025, "1+1>2: A Synergistic Sparse and Low-Rank Compression Method for LLMs"), Sec. 3:
# sparse + low-rank W ~ L + S with salience delta_ij = (|R_ij| ||X_j||_2)^2; here a one-alternation estimate.
"""A cheap table of the activation-weighted error of a sparse + low-rank fit per (rank, kept sparsity).

For each matrix ``W`` (input Gram ``G``, ``S S^T = G + delta I`` as in the profile) and each
candidate ``(r, k)``, the error ``||(W - L - S_k) S||_F^2 = tr((W - L - S_k)(G + delta I)(W - L - S_k)^T)``
of two half-alternations of SSLC's scheme, keeping the smaller:

- low rank first: ``L = L_r`` (whitened truncated SVD, ``W S = U Sigma V^T``, ``L_r = U_r Sigma_r V_r^T S^{-1}``),
  residual ``R = W - L_r``, then ``S_k`` = the ``ceil(k m n)`` entries of ``R`` of largest salience
  ``delta_ij = R_ij^2 G_jj`` (``G_jj = ||X_j||^2``), kept at their values;
- sparse first: ``S_k`` = the ``ceil(k m n)`` entries of ``W`` of largest salience ``W_ij^2 G_jj``, then
  ``L`` = the whitened rank-r SVD of ``W - S_k``: error ``sum_{i>r} sigma_i((W - S_k) S)^2`` for every r
  from one SVD per ``k``.

Zeroing residual entries one by one ignores the correlations in ``G``, so the first fit can be
worse than no sparse part at all (common once ``L_r`` has absorbed the dominant directions); the
second refits ``L`` after the sparse part and is usually the better one at higher ranks.
``ceil(k m n)`` is the count the :class:`~rankalloc.allocators.costs.Params` cost model charges.

Units: the ``whitened`` kind is a summed squared output error over the calibration tokens (the
same units as the profile's ``whitened`` curve, which it equals at ``k = 0``); ``energy`` divides
it by ``||W S||_F^2``. It estimates, and upper-bounds, what SSLC's full alternation reaches.

Monotonicity: any ``(r', k')`` fit with ``r' <= r`` and ``k' <= k`` is also a valid ``(r, k)`` fit, so
the table keeps ``e(r, k) = min_{r' <= r, k' <= k} e_computed(r', k')`` (running minima along rank,
then along sparsity).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rankalloc.allocators.curveset import CurveSet
from rankalloc.allocators.problem import Component
from rankalloc.profiling.numerics import (PRECISION, Damping, check_finite, damped_cholesky, singular_values, svd,
                                          tail_sums)

SSLC_KINDS = ("whitened", "energy")
DEFAULT_SPARSITIES = (0.0, 0.01, 0.02, 0.05)


def sslc_errors(W: torch.Tensor, G: torch.Tensor, ranks, sparsities, name: str = "W",
                damping: Damping = Damping()) -> tuple[np.ndarray, float]:
    """Table ``E[i, j]`` (rank ``ranks[i]``, kept fraction ``sparsities[j]``), running minima applied,
    and ``||W S||_F^2`` (the error of ``L = 0, S = 0``)."""
    W = check_finite(W.to(PRECISION), f"weight of {name}")
    m, n = W.shape
    ranks = np.asarray(ranks, dtype=np.int64)
    sparsities = np.asarray(sparsities, dtype=np.float64)
    if (np.diff(ranks) <= 0).any() or ranks.min() < 0 or ranks.max() > min(m, n):
        raise ValueError(f"component {name!r}: expected increasing ranks in [0, {min(m, n)}], "
                         f"received {ranks.tolist()}")
    if (np.diff(sparsities) <= 0).any() or sparsities.min() < 0 or sparsities.max() >= 1:
        raise ValueError(f"component {name!r}: expected increasing kept fractions in [0, 1), "
                         f"received {sparsities.tolist()}")
    S, _ = damped_cholesky(G, f"input Gram of {name}", damping)
    Gd = S @ S.T
    U, s, Vh = svd(W @ S, f"whitened weight of {name}")
    Z = torch.linalg.solve_triangular(S.T, Vh.T, upper=True).T  # W = (U s) Z
    col = check_finite(torch.diagonal(G.to(PRECISION)).clamp_min(0.0), f"input Gram diagonal of {name}")
    tail = tail_sums(s)
    counts = [math.ceil(k * m * n) for k in sparsities]
    E = np.empty((len(ranks), len(sparsities)))
    for i, r in enumerate(ranks):  # low rank first: ||T - S_k S||^2 with T = R S, R = W - L_r
        R = (U[:, r:] * s[r:]) @ Z[r:]
        RG = (R @ Gd).reshape(-1)
        Rf = R.reshape(-1)
        order = torch.argsort(Rf ** 2 * col.repeat(m), descending=True, stable=True)
        for j, count in enumerate(counts):
            if count == 0:
                E[i, j] = float(tail[r])
                continue
            keep = order[:count]
            Sk = torch.sparse_coo_tensor(torch.stack([keep // n, keep % n]), Rf[keep], (m, n), check_invariants=True)
            SkG = torch.sparse.mm(Sk, Gd).reshape(-1)[keep]
            E[i, j] = max(0.0, float(tail[r] - 2 * (RG[keep] * Rf[keep]).sum() + (SkG * Rf[keep]).sum()))
    Wf = W.reshape(-1)
    order = torch.argsort(Wf ** 2 * col.repeat(m), descending=True, stable=True)
    for j, count in enumerate(counts):  # sparse first: whitened SVD of W - S_k
        if count == 0:
            continue
        Wk = Wf.clone()
        Wk[order[:count]] = 0.0
        tail_k = tail_sums(singular_values(Wk.reshape(m, n) @ S, f"whitened residual of {name}")).numpy()
        E[:, j] = np.minimum(E[:, j], tail_k[ranks])
    E = np.minimum.accumulate(E, axis=0)
    return np.minimum.accumulate(E, axis=1), float((s ** 2).sum())


def sslc_curve_set(profile, model, ranks, sparsities=DEFAULT_SPARSITIES, progress: bool = True) -> CurveSet:
    """Sparse + low-rank candidates of every profiled component: ``(r, k)`` for ``r`` in ``ranks``
    (clipped to each ``min(m, n)``) and ``k`` in ``sparsities``; kinds :data:`SSLC_KINDS`."""
    from tqdm.auto import tqdm

    from rankalloc.profiling.probe import component_module, profile_damping, read_weight

    ranks = np.unique(np.asarray(ranks, dtype=np.int64))
    if len(ranks) == 0 or ranks.min() < 0:
        raise ValueError(f"ranks: expected non-negative ranks, received {ranks.tolist()}")
    sparsities = np.unique(np.asarray(sparsities, dtype=np.float64))
    damping = profile_damping(profile)
    comps: list[Component] = []
    out_r, out_k, errors = {}, {}, {k: {} for k in SSLC_KINDS}
    for c in tqdm(profile.components, desc="SSLC table", disable=not progress):
        rs = ranks[ranks <= c.max_rank]
        W = read_weight(component_module(model, c.name), c.name)
        E, total = sslc_errors(W, profile.input_gram(c.name), rs, sparsities, c.name, damping)
        comps.append(c)
        out_r[c.name] = np.repeat(rs, len(sparsities))
        out_k[c.name] = np.tile(sparsities, len(rs))
        errors["whitened"][c.name] = E.reshape(-1)
        errors["energy"][c.name] = E.reshape(-1) / total if total > 0 else np.zeros(E.size)
    return CurveSet(tuple(comps), out_r, errors, out_k, layer_scores=profile.layer_scores, name="sslc")


def add_sslc_curves(profile, model, ranks, sparsities=DEFAULT_SPARSITIES, progress: bool = True) -> CurveSet:
    """Compute :func:`sslc_curve_set` and store it as the profile's extra curve set ``"sslc"``."""
    cs = sslc_curve_set(profile, model, ranks, sparsities, progress)
    profile.write_extra("sslc", cs)
    return cs
