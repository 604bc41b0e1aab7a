# Fisher-whitened SVD: the Kronecker-factored Fisher (K-FAC, Martens & Grosse, 2015, Sec. 3) applied on both sides,
# generalising the row-weighted FWSVD (Hsu et al., 2022).
"""Two-sided Fisher whitening: the rank-r ``W_hat`` minimising ``tr(G_g (W - W_hat) G_x (W - W_hat)^T)``.

Notation: ``W`` is ``m x n``; ``G_x = sum_t x_t x_t^T`` (``n x n``) is the input Gram and
``G_g = sum_t g_t g_t^T`` (``m x m``) the output-gradient Gram, ``g = dL/dy``. Under K-FAC the Fisher
of ``vec(W)`` is ``G_x (x) G_g`` (up to scale), so ``tr(G_g E G_x E^T)`` estimates the loss increase of
the error ``E = W - W_hat``. Both Grams are damped (relative damping) and in float64. With the SVD

    G_g^{1/2} W G_x^{1/2} = U Sigma V^T,

    A = G_g^{-1/2} U_r Sigma_r     (m x r)
    B = V_r^T G_x^{-1/2}           (r x n)

is the exact minimiser (Eckart-Young in the whitened coordinates), with error
``sum_{i>r} sigma_i^2`` under the damped Grams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rankalloc.decomposers.base import (Factors, allocation_items, apply_targets, check_matrix, check_profile_component,
                                        input_gram, linear_target, low_rank_module, truncation)
from rankalloc.decomposers.modules import LowRankLinear, weight_matrix
from rankalloc.decomposers.registry import Method, profile_curves, register_method
from rankalloc.profiling.numerics import PRECISION, Damping, check_finite, psd_roots, svd, tail_sums


@dataclass(frozen=True)
class FisherSVDConfig:
    """Relative damping of the input Gram (``damp``) and of the output-gradient Gram (``output_damp``)."""

    damp: float = 1e-6
    output_damp: float = 1e-6

    def __post_init__(self):
        for f in ("damp", "output_damp"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"FisherSVDConfig: expected {f} > 0, received {v!r}")


def fisher_svd(W: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, rank: int, damp: float = 1e-6,
               output_damp: float = 1e-6, name: str = "matrix", x_roots=None) -> Factors:
    """Rank-``rank`` factors ``A = G_g^{-1/2} U_r Sigma_r``, ``B = V_r^T G_x^{-1/2}`` (see module docstring).

    ``x_roots``: ``psd_roots(Gx, ..., Damping(damp))`` when already computed (matrices sharing an input).

    ``Factors.error`` is ``sum_{i>r} sigma_i^2``: the predicted Fisher-weighted error under the damped Grams.
    """
    m, n = check_matrix(W, Gx, rank, name)
    if tuple(Gg.shape) != (m, m):
        raise ValueError(f"{name} ({m}x{n}): expected an output-gradient Gram of shape ({m}, {m}), "
                         f"received {tuple(Gg.shape)}")
    W = W.detach().to(PRECISION)
    Gg = check_finite(Gg.to(device=W.device, dtype=PRECISION), f"output-gradient Gram of {name}")
    if x_roots is None:
        x_roots = psd_roots(Gx.to(device=W.device, dtype=PRECISION), f"input Gram of {name}", Damping(damp))
    Gx_half, Gx_ihalf = x_roots
    Gg_half, Gg_ihalf = psd_roots(Gg, f"output-gradient Gram of {name}", Damping(output_damp))
    U, sigma, Vh = svd(Gg_half @ W @ Gx_half, f"G_g^1/2 W G_x^1/2 of {name}")
    A = Gg_ihalf @ (U[:, :rank] * sigma[:rank])
    B = Vh[:rank] @ Gx_ihalf
    tails = tail_sums(sigma)
    return Factors(A, B, float(tails[rank]), info={"tails": tails.cpu().numpy()})


def fisher_projection(W: torch.Tensor, basis: dict, rank: int, name: str = "matrix", Sx=None) -> Factors:
    """Rank-``rank`` two-sided Fisher factors from a compact profile's stored basis (``profile.fisher_basis``).

    The optimum of ``tr(G_g E G_x E^T)`` is a projection of ``W`` (``profiling.fisher.fisher_component``):
    ``right``: ``A = W S_x V_r``, ``B = V_r^T S_x^{-1}`` with the profile's input root ``S_x``; ``left``:
    ``A = S_g^{-T} U_r``, ``B = U_r^T S_g^T W``. It is the same matrix the Gram-based :func:`fisher_svd` builds.
    ``Factors.error`` is NaN: the predicted error lives in the profile's ``fisher`` curve.
    """
    W = W.detach().to(PRECISION)
    m, n = W.shape
    stop = (basis["right"] if "right" in basis else basis["left_a"]).shape[1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= stop:
        raise ValueError(f"{name} ({m}x{n}): the compact profile keeps its Fisher basis up to the break-even rank "
                         f"{stop} (above it dense is cheaper); expected a rank in [0, {stop}], received {rank!r} "
                         f"(profile with --store full for every rank)")
    if "right" in basis:
        V = basis["right"][:, :rank].to(device=W.device, dtype=PRECISION)
        Sx = Sx.to(device=W.device, dtype=PRECISION)
        A = W @ (Sx @ V)
        B = torch.linalg.solve_triangular(Sx.T, V, upper=True).T  # V_r^T S_x^{-1}
    else:
        A = basis["left_a"][:, :rank].to(device=W.device, dtype=PRECISION)
        B = basis["left_b"][:rank].to(device=W.device, dtype=PRECISION) @ W
    return Factors(A, B, float("nan"), info={"tails": np.full(rank + 1, np.nan)})


def fisher_weighted_error(E: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor) -> float:
    """``tr(G_g E G_x E^T)`` in float64 (the K-FAC estimate of the loss increase, up to a factor 1/2)."""
    E = E.detach().to(PRECISION)
    return float(((Gg.to(E.device, PRECISION) @ E @ Gx.to(E.device, PRECISION)) * E).sum())


def compress_fisher_svd(model, allocation, config: FisherSVDConfig, profile, progress: bool = True):
    """Model-level handler: every low-rank choice by :func:`fisher_svd` with the profile's two Grams."""
    targets = [linear_target(model, c, ch, method="fisher_svd") for c, ch in allocation_items(allocation)]
    for t in targets:
        if not t.choice.is_dense:
            check_profile_component(profile, t.component)

    keys = profile.meta.get("gram_keys", {})
    shared: dict = {}  # the input roots of the last Gram seen: q/k/v and gate/up read one input
    stored_grams = profile.has_output_grams()

    def factors(t, W, r):
        if not stored_grams:  # compact profile: the stored two-sided basis
            S = profile.input_root(t.name)[0] if "right" in (basis := profile.fisher_basis(t.name)) else None
            return fisher_projection(W, basis, r, t.name, S)
        Gx = input_gram(profile, t)
        key = keys.get(t.name, t.name)
        if shared.get("key") != key:
            shared.update(key=key, roots=psd_roots(Gx, f"input Gram of {t.name}", Damping(config.damp)))
        return fisher_svd(W, Gx, profile.output_gram(t.name), r, config.damp, config.output_damp, t.name,
                          x_roots=shared["roots"])

    def make(t):
        W = weight_matrix(t.module).detach()
        f = truncation(("fisher_svd", t.name, config.damp, config.output_damp, stored_grams), W,
                       int(t.choice.rank), lambda r: factors(t, W, r))
        return low_rank_module(t.module, f)

    return apply_targets(model, targets, make, progress, "fisher_svd")


register_method(Method("fisher_svd", FisherSVDConfig, compress_fisher_svd, profile_curves("fisher_svd"),
                       "two-sided Fisher (K-FAC) whitened SVD: input and output-gradient Grams",
                       modules=(LowRankLinear,), kind="fisher", solver="exact", needs=("fisher",)))
