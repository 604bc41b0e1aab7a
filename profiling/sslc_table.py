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

Loss units (kind ``fisher``, when the profile stores the output-gradient Grams ``G_g``): the sparse-first fit of
SSLC's two-sided alternation (``decomposers.sslc``, ``scaling="fisher"``), priced exactly in the K-FAC metric of
``profiling.fisher``: ``S_k`` = the ``ceil(k m n)`` entries of ``W`` of largest salience
``W_ij^2 (G_g + delta_g I)_ii (G_x + delta_x I)_jj`` (:func:`support`, the decomposer's rule), then ``L`` = the
exact rank-r minimiser of ``||S_g^T (W - S_k - L) S_x||``, so
``fisher(r, k) = sum_{i>r} sigma_i(S_g^T (W - S_k) S_x)^2 / (2 N_x N_loss)`` for every r from one SVD per k. At
``k = 0`` it is the profile's ``fisher`` curve. The fit is an iterate of the decomposer, which returns its
least-error iterate, so each cell is an upper bound of what is built (the alternation usually ends below it).
Instead of running minima (a minimum taken at another cell is not a fit the decomposer makes at this
one), a cell that is not strictly below every cheaper cell (``r' <= r``, ``k' <= k``) is dropped: it is dominated,
and the rest is monotone. Pricing the low-rank-first fit too (GoDec's first sparse step, at every grid rank)
cost about 6x the time on SmolLM2 and changed no optimum at 20 / 30 / 40% removed: on real weights that step is worse
than no sparse part, as the diagonal salience ignores the correlations of both Grams.

Monotonicity (input-metric kinds): any ``(r', k')`` fit with ``r' <= r`` and ``k' <= k`` is also a valid
``(r, k)`` fit, so the table keeps ``e(r, k) = min_{r' <= r, k' <= k} e_computed(r', k')`` (running minima along rank,
then along sparsity).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rankalloc.allocators.curveset import CurveSet
from rankalloc.allocators.problem import Component
from rankalloc.profiling.fisher import _scale
from rankalloc.profiling.numerics import (PRECISION, Damping, check_finite, damped_cholesky, singular_values, svd,
                                          tail_sums)

SSLC_KINDS = ("whitened", "energy")
LOSS_KINDS = ("fisher",)
DEFAULT_SPARSITIES = (0.0, 0.01, 0.02, 0.04)
"""Kept sparse fractions of the table (0: rank-only). Adding 8% was tried: on SmolLM2 at 40% removed, where many sparse
parts sit at 4%, the exact optimum put one matrix at 8% and measured ppl 49.3 against 49.4 (README, "SSLC in loss
units"), for a table one SVD per matrix dearer."""


def fraction_grid(sparsities) -> tuple[float, ...]:
    """A kept-fraction grid in the one form tables record and compare it in: distinct floats, ascending."""
    return tuple(sorted({float(k) for k in sparsities}))


def table_fractions(curve_set) -> tuple[float, ...]:
    """The kept fractions a stored table has cells at (dominated cells are dropped, so a fraction can be missing
    from single matrices, not normally from all)."""
    return fraction_grid(k for c in curve_set.components for k in curve_set.sparsity.get(c.name, ()))


def built_fractions(profile) -> tuple[float, ...] | None:
    """The kept fractions the profile's stored ``sslc`` table was built on, as :func:`add_sslc_curves` records them
    in its file record; ``None`` for a table stored before the grid was recorded."""
    got = profile.extra_details("sslc").get("sparsities")
    return None if got is None else fraction_grid(got)


def same_fractions(curve_set, sparsities) -> bool:
    """Whether a table stored without its grid (before :func:`built_fractions`) was built on the kept fractions
    ``sparsities``, inferred from its cells: every fraction it has is one of them, and it reaches the largest. It
    cannot tell a subset grid that shares the largest fraction; a recorded grid is compared exactly instead."""
    have, want = table_fractions(curve_set), fraction_grid(sparsities)
    return bool(have) and set(have) <= set(want) and max(have) == want[-1]


def salience_weights(Gx: torch.Tensor, Gg: torch.Tensor, delta_x: float, delta_g: float) -> torch.Tensor:
    """``(G_g + delta_g I)_ii (G_x + delta_x I)_jj`` (``m x n``, float64): the diagonal of the two-sided metric,
    which weighs ``X_ij^2`` in SSLC's salience (shared by the decomposer and this table)."""
    return ((torch.diagonal(Gg.to(PRECISION)).clamp_min(0) + delta_g)[:, None]
            * (torch.diagonal(Gx.to(PRECISION)).clamp_min(0) + delta_x)[None, :])


def support(salience: torch.Tensor, count: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending flat indices of the ``count`` largest entries of ``salience`` (flat), the ``fixed`` ones first (the
    one selection rule of SSLC's sparse step, shared by the decomposer and this table)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=salience.device)
    if fixed is not None and len(fixed):
        salience = salience.clone()
        salience[fixed] = math.inf
    return torch.sort(torch.topk(salience, count, sorted=False).indices).values


def sslc_errors(W: torch.Tensor, G: torch.Tensor, ranks, sparsities, name: str = "W",
                damping: Damping = Damping()) -> tuple[np.ndarray, float]:
    """Table ``E[i, j]`` (rank ``ranks[i]``, kept fraction ``sparsities[j]``), running minima applied,
    and ``||W S||_F^2`` (the error of ``L = 0, S = 0``)."""
    W = check_finite(W.to(PRECISION), f"weight of {name}")
    m, n = W.shape
    ranks, sparsities = _check_grid(ranks, sparsities, m, n, name)
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
            Sk = torch.zeros(m * n, dtype=PRECISION, device=R.device)
            Sk[keep] = Rf[keep]  # dense: a GEMM is ~15x faster here than torch.sparse.mm of a COO tensor
            SkG = (Sk.view(m, n) @ Gd).reshape(-1)[keep]
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


def _check_grid(ranks, sparsities, m: int, n: int, name: str):
    ranks = np.asarray(ranks, dtype=np.int64)
    sparsities = np.asarray(sparsities, dtype=np.float64)
    if (np.diff(ranks) <= 0).any() or ranks.min() < 0 or ranks.max() > min(m, n):
        raise ValueError(f"component {name!r}: expected increasing ranks in [0, {min(m, n)}], "
                         f"received {ranks.tolist()}")
    if (np.diff(sparsities) <= 0).any() or sparsities.min() < 0 or sparsities.max() >= 1:
        raise ValueError(f"component {name!r}: expected increasing kept fractions in [0, 1), "
                         f"received {sparsities.tolist()}")
    return ranks, sparsities


def sslc_fisher_errors(W: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, ranks, sparsities, name: str = "W",
                       damping: Damping = Damping()) -> np.ndarray:
    """Table ``E[i, j]`` of ``||S_g^T (W - S_k - L_r) S_x||_F^2`` (loss units before the ``1 / (2 N_x N_loss)``
    scale) for the sparse-first fit at ``(ranks[i], sparsities[j])``, one SVD per kept fraction (module docstring);
    no minima across cells (:func:`undominated` drops the cells that are not worth their cost)."""
    W = check_finite(W.to(PRECISION), f"weight of {name}")
    m, n = W.shape
    ranks, sparsities = _check_grid(ranks, sparsities, m, n, name)
    Sx, dx = damped_cholesky(Gx, f"input Gram of {name}", damping)
    Sg, dg = damped_cholesky(Gg, f"output-gradient Gram of {name}", damping)
    Wf = W.reshape(-1)
    salience = Wf ** 2 * salience_weights(Gx, Gg, dx, dg).reshape(-1)
    E = np.empty((len(ranks), len(sparsities)))
    for j, k in enumerate(sparsities):
        Wk = Wf.clone()
        Wk[support(salience, math.ceil(k * m * n))] = 0.0
        E[:, j] = tail_sums(singular_values(Sg.T @ Wk.view(m, n) @ Sx, f"K-FAC whitened residual of {name}")).numpy()[
            ranks]
    return E


def undominated(ranks: np.ndarray, sparsity: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Mask of the cells strictly below every other cell with ``r' <= r`` and ``k' <= k`` (the cheaper ones); the
    ``k = 0`` cells are kept (the rank-only curve, non-increasing already)."""
    keep = np.ones(len(errors), dtype=bool)
    for c in range(len(errors)):
        if sparsity[c] == 0:
            continue
        cheaper = (ranks <= ranks[c]) & (sparsity <= sparsity[c]) & (np.arange(len(errors)) != c)
        keep[c] = not (errors[cheaper] <= errors[c]).any()
    return keep


def sslc_curve_set(profile, model, ranks, sparsities=DEFAULT_SPARSITIES, progress: bool = True,
                   kinds=None) -> CurveSet:
    """Sparse + low-rank candidates of every profiled component: ``(r, k)`` for ``r`` in ``ranks``
    (clipped to each ``min(m, n)``) and ``k`` in ``sparsities``.

    ``kinds``: :data:`LOSS_KINDS` (needs the profile's output-gradient Grams) and/or :data:`SSLC_KINDS`; default
    ``fisher`` when the profile stores the output-gradient Grams, else ``whitened`` and ``energy``."""
    from tqdm.auto import tqdm

    from rankalloc.profiling.probe import model_weight, profile_damping

    ranks = np.unique(np.asarray(ranks, dtype=np.int64))
    if len(ranks) == 0 or ranks.min() < 0:
        raise ValueError(f"ranks: expected non-negative ranks, received {ranks.tolist()}")
    sparsities = np.unique(np.asarray(sparsities, dtype=np.float64))
    grams = profile.has_output_grams()
    kinds = tuple(kinds) if kinds is not None else (LOSS_KINDS if grams else SSLC_KINDS)
    unknown = [k for k in kinds if k not in LOSS_KINDS + SSLC_KINDS]
    if unknown or not kinds:
        raise ValueError(f"SSLC table: unknown kinds {unknown or list(kinds)}; expected some of "
                         f"{list(LOSS_KINDS + SSLC_KINDS)}")
    if "fisher" in kinds and len(kinds) > 1:
        raise ValueError(f"SSLC table: kind 'fisher' (the two-sided alternation) cannot share a table with {kinds}, "
                         f"which price the input-metric alternation; build them separately")
    if any(k in LOSS_KINDS for k in kinds) and not grams:
        raise ValueError(f"SSLC table kind 'fisher' needs the output-gradient Grams, and the profile at {profile.path} "
                         f"has none; profile with kind fisher and --store full")
    damping = profile_damping(profile)
    scale = _scale(profile.tokens, profile.fisher_loss_tokens) if grams else None
    comps: list[Component] = []
    out_r, out_k, errors = {}, {}, {k: {} for k in kinds}
    for c in tqdm(profile.components, desc="SSLC table", disable=not progress):
        rs = ranks[ranks <= c.max_rank]
        W = model_weight(model, c.name)
        Gx = profile.input_gram(c.name)
        cell_r, cell_k = np.repeat(rs, len(sparsities)), np.tile(sparsities, len(rs))
        if "fisher" in kinds:
            e = (sslc_fisher_errors(W, Gx, profile.output_gram(c.name), rs, sparsities, c.name, damping)
                 * scale).reshape(-1)
            keep = undominated(cell_r, cell_k, e)
            cell_r, cell_k, errors["fisher"][c.name] = cell_r[keep], cell_k[keep], e[keep]
        else:
            E, total = sslc_errors(W, Gx, rs, sparsities, c.name, damping)
            for kind, values in (("whitened", E), ("energy", E / total if total > 0 else np.zeros(E.shape))):
                if kind in kinds:
                    errors[kind][c.name] = values.reshape(-1)
        comps.append(c)
        out_r[c.name], out_k[c.name] = cell_r, cell_k
    return CurveSet(tuple(comps), out_r, errors, out_k, layer_scores=profile.layer_scores, name="sslc")


def add_sslc_curves(profile, model, ranks, sparsities=DEFAULT_SPARSITIES, progress: bool = True,
                    kinds=None) -> CurveSet:
    """Compute :func:`sslc_curve_set` and store it as the profile's extra curve set ``"sslc"``."""
    cs = sslc_curve_set(profile, model, ranks, sparsities, progress, kinds)
    grid = fraction_grid(np.asarray(sparsities, dtype=np.float64).reshape(-1).tolist())
    profile.write_extra("sslc", cs, {"sparsities": list(grid)})
    return cs
