# SVD-LLM (Wang et al., 2024), Sec. 3.1: truncation-aware data whitening.
"""Whitened SVD: the rank-r ``W ~ A B`` minimising ``||(W - A B) X||_F`` for calibration inputs ``X``.

Notation (paper): ``W`` is ``m x n``, ``X`` is ``n x T``, ``S`` is the Cholesky factor of the
input Gram, ``S S^T = X X^T + delta I`` (relative damping ``delta = damp * mean(diag)``). With the
SVD ``W S = U Sigma V^T`` and the truncation to the top ``r`` singular triplets,

    A = U_r Sigma_r                (m x r)
    B = V_r^T S^{-1}               (r x n, by a triangular solve; no explicit inverse)

and the truncation error is exactly the tail of the whitened spectrum,
``||(W - A B) X||_F^2 + delta ||W - A B||_F^2 = sum_{i>r} sigma_i^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankalloc.decomposers.base import Factors, check_matrix, linear_handler, low_rank_module, truncation
from rankalloc.decomposers.modules import LowRankLinear
from rankalloc.decomposers.registry import Method, profile_curves, register_method
from rankalloc.profiling.numerics import PRECISION, Damping, damped_cholesky, svd, tail_sums


@dataclass(frozen=True)
class SVDConfig:
    """Whitened SVD settings: relative Cholesky damping ``damp`` (times the mean Gram diagonal)."""

    damp: float = 1e-6

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"SVDConfig: expected damp > 0, received {self.damp!r}")


def whitened_svd(W: torch.Tensor, G: torch.Tensor, rank: int, damp: float = 1e-6, name: str = "matrix") -> Factors:
    """Rank-``rank`` factors ``A = U_r Sigma_r``, ``B = V_r^T S^{-1}`` of ``W`` whitened by ``G = X X^T``.

    ``Factors.error`` is ``sum_{i>r} sigma_i(W S)^2``, the predicted ``||(W - AB) X||^2`` under the
    damped Gram ``G + delta I`` (``delta`` in ``Factors.delta``). Float64 on ``W``'s device.
    """
    check_matrix(W, G, rank, name)
    W = W.detach().to(PRECISION)
    S, delta = damped_cholesky(G.to(device=W.device), name, Damping(damp))  # S S^T = G + delta I
    U, sigma, Vh = svd(W @ S, f"W S of {name}")
    A = U[:, :rank] * sigma[:rank]
    B = torch.linalg.solve_triangular(S, Vh[:rank], upper=False, left=False)  # B S = V_r^T
    tails = tail_sums(sigma)
    return Factors(A, B, float(tails[rank]), delta, {"tails": tails.cpu().numpy()})


def svd_build(module, choice, W, G, config: SVDConfig, name: str):
    """Per-matrix builder: the :class:`LowRankLinear` of :func:`whitened_svd` at ``choice.rank`` (one factorization
    per matrix inside :func:`~rankalloc.decomposers.base.factorize_once`)."""
    f = truncation(("svd", name, config.damp), W, int(choice.rank),
                   lambda r: whitened_svd(W, G, r, config.damp, name))
    return low_rank_module(module, f)


compress_svd = linear_handler(svd_build, name="svd")

register_method(Method("svd", SVDConfig, compress_svd, profile_curves("svd"),
                       "SVD-LLM whitened SVD of each matrix (plain low-rank factors)", modules=(LowRankLinear,),
                       kind="fisher_svd", solver="exact"))
