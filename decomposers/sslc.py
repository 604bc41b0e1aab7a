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

``scaling="fisher"`` (the default; not in the paper) runs both steps in the two-sided K-FAC metric that the
``fisher`` curves price, ``||S_g^T (W - L - S) S_x||_F^2 = tr(G_g E G_x E^T)`` with ``S_g S_g^T = G_g + delta_g I``
the output-gradient Gram (K-FAC, Martens & Grosse, 2015, Sec. 3; see ``profiling.fisher``): (a) ``L`` is the exact
rank-r minimiser for the current ``S`` (Eckart-Young in the two-sided whitened basis, an exact SVD, no BRP), and
(b) the salience is ``delta_ij = R_ij^2 (G_g)_ii (G_x)_jj``, the diagonal of that metric. The alternation starts
from ``S = 0`` as GoDec does (its first ``L`` is the two-sided Fisher SVD). One more candidate is the exact ``L``
for ``S`` = the most salient entries of ``W``: the fit the ``fisher`` kind of the SSLC table prices
(``profiling.sslc_table``, same selection rule ``sslc_table.support``). The iterate of least error after either
step is returned, so its error is at most the table's at ``(r, k)`` and the rank-only curve's at ``r``.
``k = 0`` is exactly the two-sided Fisher SVD. It needs the output-gradient Grams
(a ``--store full`` profile).

Stored size: ``r (m + n)`` factor entries, ``ceil(k m n)`` sparse values and their CSR indices
(``allocators.costs.SPARSE_FORMAT``: an int16 column index per value, ``m + 1`` int32 row pointers): exactly the
``Params`` cost of the choice ``(r, k)``, which counts an index in 16-bit parameters.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankalloc.allocators.costs import INDEX_BITS_PER_PARAM, column_index_bits
from rankalloc.decomposers.base import activation_error, allocation_items, check_matrix, linear_handler
from rankalloc.decomposers.modules import LowRankLinear, balanced_factors
from rankalloc.decomposers.registry import Method, MethodCurves, NeedsModel, register_method
from rankalloc.profiling.numerics import (PRECISION, Damping, NumericalError, check_finite, damped_cholesky,
                                         dead_channels, lower_t_times_, svd, times_lower_)
from rankalloc.profiling.sslc_table import (DEFAULT_SPARSITIES, LOSS_KINDS, add_sslc_curves, built_fractions,
                                            fraction_grid, salience_weights, same_fractions, support,
                                            table_fractions)


SCALINGS = ("diag", "whiten", "fisher")
"""Metric of the alternation: the paper's ``D = diag(d)``, the full ``chol(G)`` (SVD-LLM whitening) for the
low-rank step, or the two-sided K-FAC metric for both steps (needs the output-gradient Grams)."""


@dataclass(frozen=True)
class SSLCConfig:
    """SSLC settings: alternations, fixed top fraction, BRP power iterations (``diag``/``whiten``), seed, relative
    damping of the input Gram (``damp``) and of the output-gradient Gram (``output_damp``, ``fisher`` only), and the
    metric (``scaling``, see :data:`SCALINGS`)."""

    iterations: int = 10
    keep_top: float = 0.01
    power_iters: int = 2
    seed: int = 0
    damp: float = 1e-6
    scaling: str = "fisher"
    output_damp: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"SSLCConfig: expected iterations >= 1, received {self.iterations!r}")
        if not 0.0 <= self.keep_top < 1.0:
            raise ValueError(f"SSLCConfig: expected keep_top in [0, 1), received {self.keep_top!r}")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ValueError(f"SSLCConfig: expected power_iters >= 0, received {self.power_iters!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"SSLCConfig: expected an integer seed, received {self.seed!r}")
        for f in ("damp", "output_damp"):
            if not getattr(self, f) > 0:
                raise ValueError(f"SSLCConfig: expected {f} > 0, received {getattr(self, f)!r}")
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


def sslc(W: torch.Tensor, G: torch.Tensor, rank: int, sparsity: float, config: SSLCConfig = SSLCConfig(),
         name: str = "matrix", Gg: torch.Tensor | None = None) -> SSLCResult:
    """Sparse plus low-rank ``W ~ U V + S`` minimising ``||(W - U V - S) X||`` (see module docstring), or, with
    ``config.scaling == "fisher"``, ``tr(G_g E G_x E^T)`` (:func:`sslc_fisher`; ``Gg`` is then required).

    ``W``: ``m x n`` weight; ``G``: ``n x n`` input Gram ``X X^T``; ``rank`` r in ``[0, min(m, n)]``;
    ``sparsity`` k in ``[0, 1)`` (kept fraction); ``Gg``: the ``m x m`` output-gradient Gram. Deterministic for a
    given ``config.seed``.
    """
    m, n = check_matrix(W, G, rank, name)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name}: expected a kept sparse fraction k in [0, 1), received {sparsity!r}")
    if config.scaling == "fisher":
        if Gg is None:
            raise ValueError(f"{name}: SSLC with scaling='fisher' needs the output-gradient Gram (a profile with "
                             f"kind fisher and --store full), or SSLCConfig(scaling='whiten') for the input metric")
        return sslc_fisher(W, G, Gg, rank, sparsity, config, name)
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
    fixed = support(((W.abs() * d) ** 2).reshape(-1), fixed_count)
    S = torch.zeros_like(W)

    best, history = None, []
    for _ in range(config.iterations):
        # (a) L = rank-r BRP of (W - S) D, un-scaled: L = Q Q^T (W - S) D D^{-1}
        Q = brp(scale(W - S), rank, config.power_iters, generator, name)
        U, V = Q, Q.T @ (W - S)
        # (b) S = R on the top-nnz entries of delta_ij = (|R_ij| d_j)^2, the fixed set always included
        R = W - U @ V
        index = support(((R.abs() * d) ** 2).reshape(-1), nnz, fixed)
        S = torch.zeros(m * n, dtype=PRECISION, device=W.device)
        S[index] = R.flatten()[index]
        S = S.view(m, n)
        err = activation_error(R - S, G)
        history.append(err)
        if best is None or err < best[0]:
            best = (err, U, V, index, S.flatten()[index])
    err, U, V, index, values = best
    return SSLCResult(U, V, index, values, (m, n), err, tuple(history), fixed_count, dead)


def sslc_fisher(W: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, rank: int, sparsity: float,
                config: SSLCConfig = SSLCConfig(), name: str = "matrix") -> SSLCResult:
    """SSLC in the two-sided K-FAC metric ``||S_g^T (W - L - S) S_x||_F^2`` (module docstring, ``scaling="fisher"``).

    The alternation of ``config.iterations`` steps from ``S = 0`` (GoDec's start), plus the ``L``-step from the
    top-salience entries of ``W``; the iterate of least error after either half-step is returned. ``error`` is in
    the damped two-sided metric (multiply by ``1 / (2 N_x N_loss)`` for nats, as ``profiling.fisher`` does).
    """
    m, n = check_matrix(W, Gx, rank, name)
    if tuple(Gg.shape) != (m, m):
        raise ValueError(f"{name} ({m}x{n}): expected an output-gradient Gram of shape ({m}, {m}), "
                         f"received {tuple(Gg.shape)}")
    W = check_finite(W.detach().to(PRECISION), f"weight of {name}")
    Gx = Gx.to(device=W.device, dtype=PRECISION)
    Gg = check_finite(Gg.to(device=W.device, dtype=PRECISION), f"output-gradient Gram of {name}")
    Sx, dx = damped_cholesky(Gx, f"input Gram of {name}", Damping(config.damp))
    Sg, dg = damped_cholesky(Gg, f"output-gradient Gram of {name}", Damping(config.output_damp))
    weight = salience_weights(Gx, Gg, dx, dg)
    dead = int(len(dead_channels(Gx)))
    nnz = sparse_count(m, n, sparsity)
    fixed_count = min(sparse_count(m, n, config.keep_top), nnz)
    salience_w = (W ** 2 * weight).reshape(-1)
    fixed = support(salience_w, fixed_count)

    def error(E):  # ||S_g^T E S_x||_F^2, E consumed (two in-place triangular products)
        return float(lower_t_times_(Sg, times_lower_(E, Sx)).square().sum())

    def lowrank(A):  # exact rank-r minimiser of ||S_g^T (A - L) S_x||: L = S_g^{-T} [S_g^T A S_x]_r S_x^{-1}
        Uw, sigma, Vh = svd(Sg.T @ A @ Sx, f"K-FAC whitened weight of {name}")
        U = torch.linalg.solve_triangular(Sg.T, Uw[:, :rank] * sigma[:rank], upper=True)
        V = torch.linalg.solve_triangular(Sx.T, Vh[:rank].T, upper=True).T
        return U, V

    def sparse_step(R):  # S = R on the nnz most salient entries (the fixed set always in)
        index = support((R ** 2 * weight).reshape(-1), nnz, fixed)
        return index, R.flatten()[index]

    def dense_s(index, values):
        return torch.zeros(m * n, dtype=PRECISION, device=W.device).index_put_((index,), values).view(m, n)

    empty = (torch.zeros(0, dtype=torch.int64, device=W.device), torch.zeros(0, dtype=PRECISION, device=W.device))
    top = support(salience_w, nnz)
    # GoDec's start S = 0 (its first L is the two-sided Fisher SVD), alternated; then one L-step from the sparse-first
    # start, the fit the loss-unit SSLC table prices
    starts = [(empty, config.iterations if nnz else 1, nnz > 0)]  # (start, steps, alternate)
    if nnz:
        starts.append(((top, W.flatten()[top]), 1, False))
    best, history = None, []
    for (index, values), steps, alternate in starts:
        S = dense_s(index, values)
        for _ in range(steps):
            U, V = lowrank(W - S)
            R = W - U @ V
            candidates = [(error(R - S), index, values)]  # R - S is a new tensor, consumed
            if alternate:
                index, values = sparse_step(R)
                S = dense_s(index, values)
                candidates.append((error(R - S), index, values))
            for err, idx, val in candidates:
                history.append(err)
                if best is None or err < best[0]:
                    best = (err, U, V, idx, val)
    err, U, V, index, values = best
    if len(index) < nnz:  # an iterate of the S = 0 start: store the budget's count, the extra entries at 0
        free = torch.ones(m * n, dtype=torch.bool, device=W.device)
        free[index] = False
        extra = torch.nonzero(free).flatten()[:nnz - len(index)]
        index, order = torch.sort(torch.cat([index, extra]))
        values = torch.cat([values, torch.zeros(len(extra), dtype=PRECISION, device=W.device)])[order]
    return SSLCResult(U, V, index, values, (m, n), err, tuple(history), fixed_count, dead)


class SparseLowRankLinear(LowRankLinear):
    """``y = x (A B + S)^T + b``: the two Linear factors of :class:`LowRankLinear` (``first`` holds ``B``,
    ``second`` holds ``A`` and the bias) plus a sparse ``S`` stored in CSR (``allocators.costs.SPARSE_FORMAT``).

    ``S`` is ``sparse_values`` (a parameter, ``nnz`` entries in row-major order), ``sparse_col`` (a persistent
    buffer, one column index per value: int16 when ``in_features <= 2**15``, else int32) and ``sparse_crow``
    (``out_features + 1`` int32 row pointers; empty when ``nnz = 0``), so it saves and loads with safetensors
    and :meth:`index_params` is exactly what the ``Params`` cost model charges for the indices. Without autograd
    (inference, ``torch.no_grad``) in float32/float64, the forward multiplies by a CSR tensor built once and
    rebuilt only when the values or indices change; otherwise (training, half precision) it scatters ``S`` into
    a dense scratch matrix, which is differentiable and works on every dtype. Stored: ``r (m + n) + nnz`` weight
    entries plus :meth:`index_params`.
    """

    spec_type = "sslc"

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = True, dtype=None,
                 device=None):
        super().__init__(in_features, out_features, rank, bias, dtype=dtype, device=device)
        self.nnz = int(nnz)
        col_dtype = torch.int16 if column_index_bits(in_features) == 16 else torch.int32
        self.sparse_values = nn.Parameter(torch.zeros(self.nnz, dtype=dtype, device=device))
        self.register_buffer("sparse_col", torch.zeros(self.nnz, dtype=col_dtype, device=device))
        self.register_buffer("sparse_crow", torch.zeros(out_features + 1 if self.nnz else 0, dtype=torch.int32,
                                                        device=device))

    def index_params(self) -> int:
        """Index storage in 16-bit parameters (column indices and row pointers), as ``Params`` prices it."""
        bits = self.sparse_col.numel() * self.sparse_col.element_size() * 8 + self.sparse_crow.numel() * 32
        return bits // INDEX_BITS_PER_PARAM

    def _rows(self) -> torch.Tensor:
        """The row of each stored value (from the row pointers)."""
        if not self.nnz:
            return torch.zeros(0, dtype=torch.int64, device=self.sparse_col.device)
        crow = self.sparse_crow.long()
        return torch.repeat_interleave(torch.arange(self.out_features, device=crow.device), crow.diff())

    def sparse_weight(self) -> torch.Tensor:
        """``S`` as a dense ``m x n`` matrix."""
        if not self.nnz:
            return self.sparse_values.new_zeros(self.out_features, self.in_features)
        return self.sparse_values.new_zeros(self.out_features, self.in_features).index_put(
            (self._rows(), self.sparse_col.long()), self.sparse_values)

    def sparse_csr(self) -> torch.Tensor:
        """``S`` as a CSR tensor (values detached), cached until ``sparse_values`` or the indices change."""
        v, col, crow = self.sparse_values, self.sparse_col, self.sparse_crow
        key = (v._version, col._version, crow._version, v.data_ptr(), col.data_ptr(), crow.data_ptr(), v.dtype,
               v.device)
        if self.__dict__.get("_csr_key") != key:
            try:
                with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                    csr = torch.sparse_csr_tensor(crow.long(), col.long(), v.detach(),
                                                  (self.out_features, self.in_features), check_invariants=True)
            except RuntimeError as exc:
                raise ValueError(f"SparseLowRankLinear ({self.out_features}x{self.in_features}): sparse_crow and "
                                 f"sparse_col must be a valid CSR structure, ascending distinct columns in each "
                                 f"row ({exc})") from None
            self.__dict__["_csr"], self.__dict__["_csr_key"] = csr, key
        return self.__dict__["_csr"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.nnz:
            return out
        if (torch.is_grad_enabled() and self.sparse_values.requires_grad) or \
                x.dtype not in (torch.float32, torch.float64) or x.dtype != self.sparse_values.dtype:
            return out + F.linear(x, self.sparse_weight())
        x2 = x.reshape(-1, self.in_features)
        return out + torch.sparse.mm(self.sparse_csr(), x2.T).T.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_result(cls, result: SSLCResult, bias: torch.Tensor | None, dtype, device) -> "SparseLowRankLinear":
        """Cast the float64 SSLC result to ``dtype`` on ``device``, keeping ``bias`` (the low-rank factors balanced
        first, :func:`~rankalloc.decomposers.modules.balanced_factors`)."""
        m, n = result.shape
        mod = cls(n, m, result.U.shape[1], len(result.values), bias is not None, dtype=dtype, device=device)
        U, V = balanced_factors(result.U, result.V)
        with torch.no_grad():
            mod.first.weight.copy_(V.to(device=device, dtype=dtype))
            mod.second.weight.copy_(U.to(device=device, dtype=dtype))
            mod.sparse_values.copy_(result.values.to(device=device, dtype=dtype))
            if mod.nnz:  # ascending flat indices i * n + j are row-major: columns and row pointers follow
                index = result.index.to(device=device)
                mod.sparse_col.copy_((index % n).to(mod.sparse_col.dtype))
                mod.sparse_crow[1:] = torch.bincount(index // n, minlength=m).cumsum(0).to(torch.int32)
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
                 name: str = "matrix", Gg: torch.Tensor | None = None) -> tuple[SparseLowRankLinear, dict]:
    """Per-matrix builder: the SSLC module replacing ``module`` for ``choice = Choice(rank, sparsity)``, and report
    info (``predicted_error``: the returned iterate's error in the config's metric, see :func:`sslc`).

    ``W`` is the module's ``m x n`` weight, ``G`` its ``n x n`` input Gram, ``Gg`` its output-gradient Gram
    (``scaling="fisher"``). The new module takes the weight's dtype and device and keeps the bias.
    """
    if choice.is_dense:
        raise ValueError(f"{name}: SSLC received the dense choice; dense matrices are left in place by the caller")
    res = sslc(W, G, int(choice.rank), float(choice.sparsity), config, name, Gg)
    new = SparseLowRankLinear.from_result(res, getattr(module, "bias", None), dtype=W.dtype, device=W.device)
    info = {"predicted_error": res.error, "nnz": len(res.values), "fixed": res.fixed, "dead_channels": res.dead,
            "iterations_error": list(res.history)}
    return new, info


def compress_sslc(model, allocation, config: SSLCConfig, profile, progress: bool = True):
    """Model-level handler: every non-dense choice by :func:`sslc_handler` (``base.linear_handler``), with the
    output-gradient Grams under ``scaling="fisher"`` (their presence checked before any module is replaced)."""
    fisher = config.scaling == "fisher"
    if fisher and any(not ch.is_dense for _, ch in allocation_items(allocation)) and not profile.has_output_grams():
        raise ValueError(f"method 'sslc' (scaling='fisher') needs the output-gradient Grams, and the profile at "
                         f"{profile.path} has none; profile with kind fisher and --store full, or use "
                         f"SSLCConfig(scaling='whiten')")

    def build(module, choice, W, G, config, name):
        return sslc_handler(module, choice, W, G, config, name, profile.output_gram(name) if fisher else None)

    return linear_handler(build, sparse=True, name="sslc")(model, allocation, config, profile, progress)


def sslc_curves(profile, model=None, grid: int = 16, progress: bool = True) -> MethodCurves:
    """(rank, kept sparsity) candidates in loss units: the profile's extra ``sslc`` table, or computed with ``model``
    on ranks that are multiples of ``grid`` and stored in the profile (replacing a stored table of an earlier
    version that lacks the ``fisher`` kind, or that was built on other kept fractions than
    :data:`~rankalloc.profiling.sslc_table.DEFAULT_SPARSITIES`)."""
    if not profile.has_output_grams():
        raise ValueError(f"method 'sslc' prices and fits in the two-sided K-FAC metric, which needs the "
                         f"output-gradient Grams, and the profile at {profile.path} has none; profile with kind fisher "
                         f"and --store full (for the input metric: sslc_table.add_sslc_curves(kinds=('whitened',)) "
                         f"and SSLCConfig(scaling='whiten'))")
    stored = profile.extra("sslc") if profile.has_extra("sslc") else None
    if stored is not None:
        built = built_fractions(profile)
        current = (same_fractions(stored, DEFAULT_SPARSITIES) if built is None  # stored before grids were recorded
                   else built == fraction_grid(DEFAULT_SPARSITIES))
        if "fisher" in stored.kinds and current:
            return MethodCurves("sslc", stored)
    if model is None:  # none stored, one of an earlier version in the input metric only, or on other fractions
        what = ("no SSLC table" if stored is None
                else f"an SSLC table without the loss-unit kind ({list(stored.kinds)})" if "fisher" not in stored.kinds
                else f"an SSLC table on kept fractions {list(built or table_fractions(stored))}, not "
                     f"{list(DEFAULT_SPARSITIES)}")
        raise NeedsModel(f"method 'sslc': the profile at {profile.path} has {what}; pass the model to compute "
                         f"it once (problem_for(..., model=run.model), or rankalloc.profiling.sslc_table.add_sslc_curves)")
    top = max(c.max_rank for c in profile.components)
    return MethodCurves("sslc", add_sslc_curves(profile, model, np.arange(0, top + 1, grid), DEFAULT_SPARSITIES,
                                                progress=progress))


register_method(Method("sslc", SSLCConfig, compress_sslc, sslc_curves,
                       "SSLC sparse + low-rank: W ~ L + S in the two-sided K-FAC metric (needs --store full), "
                       "(rank, sparsity) per matrix, the sparse part priced with its CSR indices",
                       modules=(SparseLowRankLinear,), kind="fisher", solver="exact", needs=("fisher",),
                       matrixwise=True, store="full", kinds=LOSS_KINDS))
