# SSLC (Zong et al., 2025, "1+1>2: A Synergistic Sparse and Low-Rank Compression Method for LLMs"), Sec. 3:
#   min_{L,S} ||(W - L - S) X||_F   s.t.  rank(L) <= r,  ||S||_0 <= ceil(k m n)
"""SSLC: sparse plus low-rank approximation of a weight matrix in the activation metric.

Notation (paper): ``W`` is ``m x n`` (out x in), ``X`` the ``n x T`` calibration inputs and
``G = X X^T`` their Gram (summed, not averaged). ``d_j = ||X_j||_2 = sqrt(G_jj)`` are the input
channel norms and ``D = diag(d)``. The algorithm alternates

(a) low-rank step: ``L`` = rank-``r`` approximation of ``(W - S) D`` by bilateral random
    projection (BRP, GoDec's randomized SVD with power iterations), un-scaled by ``D^{-1}``;
(b) sparse step: ``S`` = the residual ``R = W - L`` on the ``k`` entries of largest salience
    ``delta_ij = (|R_ij| * d_j)^2``.

The top ``keep_top`` fraction of weights by the salience of ``W`` itself (1% in the paper) is
fixed in the support of ``S`` from the start and counted WITHIN the ``ceil(k m n)`` budget: the
other ``ceil(k m n) - ceil(keep_top m n)`` entries are chosen each iteration. When the budget is
smaller than the fixed set, the budget's worth of the most salient weights is kept.

The alternation starts from ``S = 0`` (as GoDec does), so the first low-rank step is the plain
scaled rank-``r`` approximation; the fixed set enters at the first sparse step. Both steps are
exact minimisers of the diagonal surrogate ``||(W - L - S) D||_F`` (up to the randomized SVD).
The iterate returned is the one with the smallest TRUE activation error
``||(W - L - S) X||_F^2 = tr(E G E^T)``, which is reported.

``scaling="whiten"`` (not in the paper) runs the low-rank step in the full metric instead:
``L = Q Q^T (W - S)`` with ``Q`` the BRP basis of ``(W - S) S_x``, ``S_x = chol(G + delta I)``
(the SVD-LLM whitening), which is the exact rank-``r`` minimiser of ``||(W - S - L) X||`` for the
current ``S``; the sparse step is unchanged. Measured on SmolLM2-135M (q_proj of layer 3, down_proj of
layers 3 and 11, v_proj of layer 20; 20% and 40% of each matrix removed; Grams of 4k-12k Wikipedia
tokens), as the error ratio to the whitened SVD at the equal-parameter rank
``r' = ceil((ceil(kmn) + r(m+n)) / (m+n))`` (below 1: SSLC is better):

====== ================ ===================
k      paper (``diag``) ``whiten``
====== ================ ===================
0.01   1.49 - 1.86      0.91 - 1.11
0.05   0.88 - 1.04      0.64 - 0.71
0.10   0.60 - 0.69      0.45 - 0.52
====== ================ ===================

At ``k = 0.01`` the whole sparse budget is the fixed top 1% of ``W``, which the low-rank part
mostly covers already.

Stored size: ``r (m + n)`` factor entries plus ``ceil(k m n)`` sparse values: exactly the
``Params`` cost of the choice ``(r, k)``. The sparse column indices are buffers (not parameters),
priced separately by the ``Bytes`` cost model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankalloc.decomposers.base import activation_error, check_matrix, linear_handler
from rankalloc.decomposers.modules import LowRankLinear
from rankalloc.decomposers.registry import Method, MethodCurves, NeedsModel, register_method
from rankalloc.profiling.numerics import (PRECISION, Damping, NumericalError, check_finite, damped_cholesky,
                                         dead_channels, svd)


SCALINGS = ("diag", "whiten")
"""Metric of the low-rank step: the paper's ``D = diag(d)``, or the full ``chol(G)`` (SVD-LLM whitening)."""


@dataclass(frozen=True)
class SSLCConfig:
    """SSLC settings: alternations, fixed top fraction, BRP power iterations, seed, relative damping,
    and the low-rank step's metric (``scaling``, see :data:`SCALINGS`)."""

    iterations: int = 10
    keep_top: float = 0.01
    power_iters: int = 2
    seed: int = 0
    damp: float = 1e-6
    scaling: str = "whiten"

    def __post_init__(self):
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"SSLCConfig: expected iterations >= 1, received {self.iterations!r}")
        if not 0.0 <= self.keep_top < 1.0:
            raise ValueError(f"SSLCConfig: expected keep_top in [0, 1), received {self.keep_top!r}")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ValueError(f"SSLCConfig: expected power_iters >= 0, received {self.power_iters!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"SSLCConfig: expected an integer seed, received {self.seed!r}")
        if not self.damp > 0:
            raise ValueError(f"SSLCConfig: expected damp > 0, received {self.damp!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"SSLCConfig: expected scaling in {SCALINGS}, received {self.scaling!r}")


@dataclass(frozen=True, eq=False)
class SSLCResult:
    """``W ~ U V + S`` in float64. ``S`` is given by sorted flat indices ``i * n + j`` and values.

    ``error`` is ``||(W - U V - S) X||_F^2`` of the returned iterate; ``history`` the same for
    every iteration; ``fixed`` the number of support entries fixed from the start.
    """

    U: torch.Tensor          # m x r
    V: torch.Tensor          # r x n
    index: torch.Tensor      # (nnz,) int64, ascending flat indices
    values: torch.Tensor     # (nnz,) float64
    shape: tuple[int, int]
    error: float
    history: tuple[float, ...]
    fixed: int
    dead: int

    @property
    def S(self) -> torch.Tensor:
        m, n = self.shape
        return torch.zeros(m * n, dtype=self.values.dtype, device=self.values.device).index_put_(
            (self.index,), self.values).view(m, n)

    @property
    def L(self) -> torch.Tensor:
        return self.U @ self.V


def sparse_count(m: int, n: int, sparsity: float) -> int:
    """``ceil(k m n)`` computed exactly as the ``Params`` cost model does (float64 product)."""
    return int(math.ceil(float(sparsity) * m * n))


def input_norms(G: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, int]:
    """``d_j = sqrt(G_jj + delta)``, ``delta = damp * mean(diag G)`` (float64), and the dead-channel count.

    The damping keeps dead channels (``G_jj = 0``) at a small positive norm, so nothing divides by zero.
    """
    G = check_finite(G.to(PRECISION), f"input Gram of {name}")
    diag = torch.diagonal(G)
    mean_diag = diag.mean().item()
    if not mean_diag > 0:
        raise NumericalError(f"input Gram of {name} is zero: the input was never active on the calibration data")
    return torch.sqrt(diag.clamp_min(0) + damp * mean_diag), int(len(dead_channels(G)))


def brp(A: torch.Tensor, r: int, power_iters: int, generator: torch.Generator, name: str = "matrix") -> torch.Tensor:
    """Orthonormal ``Q`` (``m x r``) with ``Q Q^T A`` the BRP rank-``r`` approximation of ``A`` (GoDec).

    ``Y1 = A Omega``, ``Y2 = A^T Y1`` with power iterations ``Y1 <- A Y2`` (re-orthonormalised each
    time, float64), then ``L = Y1 (A2^T Y1)^+ Y2^T`` with ``A2 = Y1``, i.e. ``L = P_{Y1} A``. The
    pseudo-inverse is guarded by dropping directions of ``Y1`` below ``eps * max`` singular value;
    dropped directions become zero columns, so ``Q`` always has exactly ``r`` columns.
    """
    m, n = A.shape
    Q = torch.zeros(m, r, dtype=PRECISION, device=A.device)
    if r == 0:
        return Q
    Omega = torch.randn(n, r, generator=generator, dtype=PRECISION).to(A.device)
    Y1 = A @ Omega
    for _ in range(power_iters):
        Y1 = torch.linalg.qr(Y1).Q
        Y2 = A.T @ Y1
        Y1 = A @ Y2
    U, s, _ = svd(Y1, f"BRP projection of {name}")
    keep = s > s.max() * max(m, n) * torch.finfo(PRECISION).eps if s.numel() and s.max() > 0 else s > 0
    kept = int(keep.sum())
    Q[:, :kept] = U[:, keep]
    return Q


def _top(salience: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` largest entries (ties broken by lower index), ascending."""
    order = torch.argsort(salience.flatten(), descending=True, stable=True)[:count]
    return torch.sort(order).values


def sslc(W: torch.Tensor, G: torch.Tensor, rank: int, sparsity: float, config: SSLCConfig = SSLCConfig(),
         name: str = "matrix") -> SSLCResult:
    """Sparse plus low-rank ``W ~ U V + S`` minimising ``||(W - U V - S) X||`` (see module docstring).

    ``W``: ``m x n`` weight; ``G``: ``n x n`` input Gram ``X X^T``; ``rank`` r in ``[0, min(m, n)]``;
    ``sparsity`` k in ``[0, 1)`` (kept fraction). Deterministic for a given ``config.seed``.
    """
    m, n = check_matrix(W, G, rank, name)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name}: expected a kept sparse fraction k in [0, 1), received {sparsity!r}")
    W = check_finite(W.detach().to(PRECISION), f"weight of {name}")
    G = G.to(device=W.device, dtype=PRECISION)
    d, dead = input_norms(G, config.damp, name)
    nnz = sparse_count(m, n, sparsity)
    fixed_count = min(sparse_count(m, n, config.keep_top), nnz)
    generator = torch.Generator().manual_seed(config.seed)
    if config.scaling == "whiten":
        Sx = damped_cholesky(G, name, Damping(config.damp))[0]  # S_x S_x^T = G + delta I
        scale = lambda A: A @ Sx  # noqa: E731
    else:
        scale = lambda A: A * d  # noqa: E731  (A D)

    # the most salient weights of W itself are in the support of S from the first sparse step on;
    # GoDec's start S = 0 makes the first low-rank step the plain (scaled) rank-r approximation
    fixed = _top((W.abs() * d) ** 2, fixed_count)
    S = torch.zeros_like(W)

    best, history = None, []
    for _ in range(config.iterations):
        # (a) L = rank-r BRP of (W - S) D, un-scaled: L = Q Q^T (W - S) D D^{-1}
        Q = brp(scale(W - S), rank, config.power_iters, generator, name)
        U, V = Q, Q.T @ (W - S)
        # (b) S = R on the top-nnz entries of delta_ij = (|R_ij| d_j)^2, the fixed set always included
        R = W - U @ V
        salience = ((R.abs() * d) ** 2).contiguous()  # a transposed (Conv1D) weight gives strided results
        salience.view(-1)[fixed] = math.inf
        index = _top(salience, nnz)
        S = torch.zeros(m * n, dtype=PRECISION, device=W.device)
        S[index] = R.flatten()[index]
        S = S.view(m, n)
        err = activation_error(R - S, G)
        history.append(err)
        if best is None or err < best[0]:
            best = (err, U, V, index, S.flatten()[index])
    err, U, V, index, values = best
    return SSLCResult(U, V, index, values, (m, n), err, tuple(history), fixed_count, dead)


class SparseLowRankLinear(LowRankLinear):
    """``y = x (A B + S)^T + b``: the two Linear factors of :class:`LowRankLinear` (``first`` holds ``B``,
    ``second`` holds ``A`` and the bias) plus a sparse ``S``.

    ``S`` is stored as ``sparse_values`` (a parameter, ``nnz`` entries) and ``sparse_index`` (a persistent
    buffer of ascending flat indices ``i * in_features + j``; int32 when they fit), so it saves and loads
    with safetensors. Without autograd (inference, ``torch.no_grad``) in float32/float64, the forward
    multiplies by a CSR copy of ``S`` built once and rebuilt only when the values or indices change;
    otherwise (training, half precision) it scatters ``S`` into a dense scratch matrix, which is
    differentiable and works on every dtype. Weight entries stored: ``r (m + n) + nnz``.
    """

    spec_type = "sslc"

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = True, dtype=None,
                 device=None):
        super().__init__(in_features, out_features, rank, bias, dtype=dtype, device=device)
        self.nnz = int(nnz)
        idx_dtype = torch.int32 if in_features * out_features < 2**31 else torch.int64
        self.sparse_values = nn.Parameter(torch.zeros(self.nnz, dtype=dtype, device=device))
        self.register_buffer("sparse_index", torch.zeros(self.nnz, dtype=idx_dtype, device=device))

    def sparse_weight(self) -> torch.Tensor:
        """``S`` as a dense ``m x n`` matrix."""
        flat = self.sparse_values.new_zeros(self.out_features * self.in_features)
        flat = flat.index_put((self.sparse_index.long(),), self.sparse_values)
        return flat.view(self.out_features, self.in_features)

    def sparse_csr(self) -> torch.Tensor:
        """``S`` as a CSR tensor (values detached), cached until ``sparse_values``/``sparse_index`` change."""
        v, idx = self.sparse_values, self.sparse_index
        key = (v._version, idx._version, v.data_ptr(), idx.data_ptr(), v.dtype, v.device)
        if self.__dict__.get("_csr_key") != key:
            flat = idx.long()
            crow = torch.zeros(self.out_features + 1, dtype=torch.int64, device=flat.device)
            crow[1:] = torch.bincount(flat // self.in_features, minlength=self.out_features).cumsum(0)
            try:
                with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                    csr = torch.sparse_csr_tensor(crow, flat % self.in_features, v.detach(),
                                                  (self.out_features, self.in_features), check_invariants=True)
            except RuntimeError as exc:
                raise ValueError(f"SparseLowRankLinear ({self.out_features}x{self.in_features}): sparse_index must "
                                 f"hold ascending, distinct flat indices ({exc})") from None
            self.__dict__["_csr"], self.__dict__["_csr_key"] = csr, key
        return self.__dict__["_csr"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if (torch.is_grad_enabled() and self.sparse_values.requires_grad) or \
                x.dtype not in (torch.float32, torch.float64) or x.dtype != self.sparse_values.dtype:
            return out + F.linear(x, self.sparse_weight())
        x2 = x.reshape(-1, self.in_features)
        return out + torch.sparse.mm(self.sparse_csr(), x2.T).T.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_result(cls, result: SSLCResult, bias: torch.Tensor | None, dtype, device) -> "SparseLowRankLinear":
        """Cast the float64 SSLC result to ``dtype`` on ``device``, keeping ``bias``."""
        m, n = result.shape
        mod = cls(n, m, result.U.shape[1], len(result.values), bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.first.weight.copy_(result.V.to(device=device, dtype=dtype))
            mod.second.weight.copy_(result.U.to(device=device, dtype=dtype))
            mod.sparse_values.copy_(result.values.to(device=device, dtype=dtype))
            mod.sparse_index.copy_(result.index.to(device=device, dtype=mod.sparse_index.dtype))
            if bias is not None:
                mod.second.bias.copy_(bias.detach().to(device=device, dtype=dtype))
        return mod

    def spec(self) -> dict:
        return {**super().spec(), "nnz": self.nnz}

    @classmethod
    def from_spec(cls, spec, original: nn.Module) -> "SparseLowRankLinear":
        p = next(original.parameters())
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["nnz"], spec["bias"],
                   dtype=p.dtype, device=p.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nnz={self.nnz}"


def sslc_handler(module: nn.Module, choice, W: torch.Tensor, G: torch.Tensor, config: SSLCConfig,
                 name: str = "matrix") -> tuple[SparseLowRankLinear, dict]:
    """Per-matrix builder (``base.linear_handler`` contract): the SSLC module replacing ``module`` for
    ``choice = Choice(rank, sparsity)``, and report info (``predicted_error`` = ``||(W - L - S) X||_F^2``).

    ``W`` is the module's ``m x n`` weight, ``G`` its ``n x n`` input Gram. The new module takes the
    weight's dtype and device and keeps the bias.
    """
    if choice.is_dense:
        raise ValueError(f"{name}: SSLC received the dense choice; dense matrices are left in place by the caller")
    res = sslc(W, G, int(choice.rank), float(choice.sparsity), config, name)
    new = SparseLowRankLinear.from_result(res, getattr(module, "bias", None), dtype=W.dtype, device=W.device)
    info = {"predicted_error": res.error, "nnz": len(res.values), "fixed": res.fixed, "dead_channels": res.dead,
            "iterations_error": list(res.history)}
    return new, info


SPARSITIES = (0.0, 0.01, 0.02, 0.04)
"""Kept sparse fractions of the (rank, sparsity) table computed when a profile has none."""


def sslc_curves(profile, model=None, grid: int = 16, progress: bool = True) -> MethodCurves:
    """(rank, kept sparsity) candidates: the profile's extra ``sslc`` table, or computed with ``model`` on ranks that
    are multiples of ``grid`` (and stored in the profile)."""
    from rankalloc.profiling.sslc_table import add_sslc_curves

    if profile.has_extra("sslc"):
        return MethodCurves("sslc", profile.extra("sslc"))
    if model is None:
        raise NeedsModel(f"method 'sslc': the profile at {profile.path} has no SSLC table; pass the model to compute "
                         f"it (rankalloc.profiling.sslc_table.add_sslc_curves)")
    top = max(c.max_rank for c in profile.components)
    return MethodCurves("sslc", add_sslc_curves(profile, model, np.arange(0, top + 1, grid), SPARSITIES,
                                                progress=progress))


compress_sslc = linear_handler(sslc_handler, sparse=True, name="sslc")

register_method(Method("sslc", SSLCConfig, compress_sslc, sslc_curves,
                       "SSLC sparse + low-rank: W ~ L + S in the activation metric, (rank, sparsity) per matrix",
                       modules=(SparseLowRankLinear,), kind="whitened", solver="exact"))
