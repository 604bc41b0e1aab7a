# PGSVD (Solgi et al., 2025, "Activation-Informed Pareto-Guided Low-Rank Compression"), Sec. 3.2: ALS refinement.
"""Truncated SVD refined by alternating least squares on the activation error.

Notation (paper): ``W`` is ``m x n``, ``X`` the ``n x T`` calibration inputs and ``M = X X^T`` (the
profile's input Gram, summed over tokens). The objective is

    f(A, B) = ||W X - A B X||_F^2 = tr((W - A B) M (W - A B)^T).

Starting from a truncated SVD ``A_0 B_0`` (``init="svd"``, the default: the plain SVD of ``W``, as in the
paper, whose rank comes from the weight-space tolerance ``||W - W_r||_F / ||W||_F <= epsilon``;
``init="whitened"``: SVD-LLM's whitened SVD, which already minimises ``f`` up to the damping, so ALS
barely moves it), each iteration takes the two exact partial minimisers

    A <- W M B^T (B M B^T)^+        (argmin over A for fixed B)
    B <- (A^T A)^+ A^T W            (argmin over B for fixed A: it solves A^T A B M = A^T W M)

in float64. Each step cannot increase ``f``; the iterate with the smallest ``f`` is returned anyway
(guarding round-off), and the loop stops after ``max_iter`` iterations or when the relative improvement
of an iteration falls below ``tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankalloc.decomposers.base import Factors, activation_error, check_matrix, linear_handler, low_rank_module
from rankalloc.decomposers.modules import LowRankLinear
from rankalloc.decomposers.registry import Method, profile_curves, register_method
from rankalloc.decomposers.svd import whitened_svd
from rankalloc.profiling.numerics import PRECISION, svd

INITS = ("svd", "whitened")


@dataclass(frozen=True)
class PGSVDConfig:
    """ALS settings: iterations ``max_iter``, relative-improvement stop ``tol``, the start ``init``
    (``"svd"`` or ``"whitened"``), and the relative Cholesky damping ``damp`` of the whitened start."""

    max_iter: int = 10
    tol: float = 1e-6
    init: str = "svd"
    damp: float = 1e-6

    def __post_init__(self):
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"PGSVDConfig: expected an integer max_iter >= 0, received {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"PGSVDConfig: expected tol >= 0, received {self.tol!r}")
        if self.init not in INITS:
            raise ValueError(f"PGSVDConfig: expected init in {INITS}, received {self.init!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"PGSVDConfig: expected damp > 0, received {self.damp!r}")


def truncated_svd(W: torch.Tensor, rank: int, name: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rank-``rank`` SVD factors of ``W``: ``A = U_r Sigma_r``, ``B = V_r^T`` (float64, sign-fixed)."""
    U, sigma, Vh = svd(W, f"weight of {name}")
    return U[:, :rank] * sigma[:rank], Vh[:rank]


def pgsvd(W: torch.Tensor, M: torch.Tensor, rank: int, config: PGSVDConfig = PGSVDConfig(),
          name: str = "matrix") -> Factors:
    """ALS-refined rank-``rank`` factors of ``W`` on ``M = X X^T`` (see module docstring).

    ``Factors.error`` is the true ``tr((W - AB) M (W - AB)^T)`` of the returned factors (undamped M);
    ``Factors.info["history"]`` lists it for the start and after every iteration, ``info["iterations"]``
    the iterations run.

    Cost: ``W M`` and ``tr(W M W^T)`` are formed once; an iteration then costs ``O(r n^2 + m n r)``, using
    ``f(A, B) = tr(W M W^T) - 2 <W M B^T, A> + <A^T A, B M B^T>`` for the history (the returned error
    is recomputed directly).
    """
    check_matrix(W, M, rank, name)
    W = W.detach().to(PRECISION)
    M = M.to(device=W.device, dtype=PRECISION)
    M = 0.5 * (M + M.T)
    if config.init == "whitened":
        start = whitened_svd(W, M, rank, config.damp, name)
        A, B = start.A, start.B
    else:
        A, B = truncated_svd(W, rank, name)
    err = activation_error(W - A @ B, M)
    history = [err]
    best = (err, A, B)
    iterations = 0
    if rank > 0 and config.max_iter > 0:
        WM = W @ M
        wmw = float((WM * W).sum())
        BMBt, WMBt = B @ M @ B.T, WM @ B.T
        for _ in range(config.max_iter):
            A = WMBt @ torch.linalg.pinv(BMBt, hermitian=True)              # A <- W M B^T (B M B^T)^+
            B = torch.linalg.pinv(A.T @ A, hermitian=True) @ (A.T @ W)     # B <- (A^T A)^+ A^T W
            BMBt, WMBt = B @ M @ B.T, WM @ B.T
            iterations += 1
            err = max(wmw - 2.0 * float((WMBt * A).sum()) + float(((A.T @ A) * BMBt).sum()), 0.0)
            history.append(err)
            improved = best[0] - err
            if err < best[0]:
                best = (err, A, B)
            if improved <= config.tol * max(abs(history[-2]), 1e-300):
                break
    _, A, B = best
    err = activation_error(W - A @ B, M)
    return Factors(A, B, err, 0.0, {"history": history, "iterations": iterations, "start_error": history[0]})


def pgsvd_build(module, choice, W, G, config: PGSVDConfig, name: str):
    """Per-matrix builder: the :class:`LowRankLinear` of :func:`pgsvd` at ``choice.rank``."""
    return low_rank_module(module, pgsvd(W, G, int(choice.rank), config, name))


compress_pgsvd = linear_handler(pgsvd_build, name="pgsvd")

register_method(Method("pgsvd", PGSVDConfig, compress_pgsvd, profile_curves("pgsvd"),
                       "PGSVD: truncated SVD refined by alternating least squares on the input Gram",
                       modules=(LowRankLinear,), kind="fisher_svd", solver="exact"))
