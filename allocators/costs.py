# Cost models: r(m+n) per rank-r factorisation (SVD-LLM, Wang et al., 2024), head-wise V/O (FLAT-LLM, Tian et al., 2025, Sec. 3.2)
"""Cost models: pure functions of (component shape, choice), vectorised over candidates.

A cost model has a ``name``, a ``unit``, ``cost(component, ranks, sparsity) -> float array``
and ``dense(component) -> float``. ``ranks == -1`` means dense. ``sparsity`` is the kept
fraction ``k`` of a sparse + low-rank candidate. To add one, write a frozen dataclass with
these members and register it with ``@register_cost_model("name")`` (or pass it in
``AllocationProblem.costs``). :data:`COST_MODELS` is the registry's dict (the same object as
``rankalloc.allocators.registry.COST_MODELS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from rankalloc.allocators.registry import _COST_MODELS as COST_MODELS
from rankalloc.allocators.registry import register_cost_model

DENSE = -1
"""Rank value that stands for "keep the matrix dense"."""
KV_KINDS = ("k", "v")
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "int8": 1, "float8": 1, "fp8": 1}


@runtime_checkable
class CostModel(Protocol):
    """Contract: ``cost`` is pure and elementwise. ``cost(c, [-1], [0]) == dense(c)``.
    Costs are finite and >= 0."""

    name: str
    unit: str

    def cost(self, component, ranks: np.ndarray, sparsity: np.ndarray) -> np.ndarray: ...

    def dense(self, component) -> float: ...


SPARSE_FORMAT = "CSR"
"""How a sparse part is stored and priced (the one place): CSR, i.e. the kept values, one column index per value
(int16 when the matrix has at most 2**15 columns, else int32) and ``m + 1`` int32 row pointers (none when nothing
is kept). Below a kept fraction of about 1/16 this is smaller than a bitmask (``m n`` bits plus the values)."""

INDEX_BITS_PER_PARAM = 16
"""Index storage is counted in parameters of 16 bits (bf16/fp16, as 7B-70B checkpoints are stored): an int16
column index costs 1 parameter, an int32 row pointer 2."""


def sparse_counts(component, sparsity) -> np.ndarray:
    """``ceil(k m n)``, the kept entries of a sparse part with kept fraction ``k`` (vectorised, float64)."""
    return np.ceil(np.asarray(sparsity, dtype=np.float64) * component.m * component.n)


def column_index_bits(n: int) -> int:
    """Bits of one CSR column index of a matrix with ``n`` columns (see :data:`SPARSE_FORMAT`)."""
    return 16 if n <= 2**15 else 32


def sparse_index_bits(component, nnz) -> np.ndarray:
    """Index bits of a CSR sparse part with ``nnz`` kept entries (vectorised): column indices plus row pointers."""
    nnz = np.asarray(nnz, dtype=np.float64)
    return np.where(nnz > 0, nnz * column_index_bits(component.n) + (component.m + 1) * 32.0, 0.0)


def _lowrank_sparse(component, ranks, sparsity, per_value: float, per_sparse_value: float, per_index_bit: float = 0.0):
    r = np.asarray(ranks, dtype=np.float64)
    m, n = component.m, component.n
    nnz = sparse_counts(component, sparsity)
    low = r * (m + n) * per_value + nnz * per_sparse_value + sparse_index_bits(component, nnz) * per_index_bit
    return np.where(r == DENSE, m * n * per_value, low)


@register_cost_model("params")
@dataclass(frozen=True)
class Params:
    """Parameters stored: ``r(m+n)`` for rank r, ``m*n`` dense; a sparse + low-rank candidate adds its
    ``ceil(k*m*n)`` values and their CSR indices in 16-bit parameters (:data:`SPARSE_FORMAT`): one per int16 column
    index and two per int32 row pointer, so about ``2 ceil(k*m*n) + 2(m+1)``."""

    name: str = "params"
    unit: str = "parameters"

    def cost(self, component, ranks, sparsity):
        return _lowrank_sparse(component, ranks, sparsity, 1.0, 1.0, 1.0 / INDEX_BITS_PER_PARAM)

    def dense(self, component) -> float:
        return float(component.m * component.n)


@register_cost_model("flops")
@dataclass(frozen=True)
class Flops:
    """Multiply-adds counted as 2 FLOPs per token: ``2r(m+n)`` low-rank, ``2mn`` dense, ``2kmn`` sparse part."""

    name: str = "flops"
    unit: str = "FLOPs per token"

    def cost(self, component, ranks, sparsity):
        return _lowrank_sparse(component, ranks, sparsity, 2.0, 2.0)

    def dense(self, component) -> float:
        return 2.0 * component.m * component.n


@register_cost_model("kv")
@dataclass(frozen=True)
class KVCache:
    """KV-cache bytes per token for key/value projections whose cached state is the rank-r latent.

    A dense k/v projection caches its ``m`` outputs. At rank r the cache holds the latent ``Bx``
    (``min(r, m)`` values) and ``A`` is applied on read. Other kinds cost 0. A sparse part is applied
    on read too, so it adds nothing to the cache.
    """

    bytes_per_value: float = 2.0
    kinds: tuple[str, ...] = KV_KINDS
    name: str = "kv"
    unit: str = "KV-cache bytes per token"

    def __post_init__(self):
        if not self.bytes_per_value > 0:
            raise ValueError(f"KVCache: expected bytes_per_value > 0, received {self.bytes_per_value!r}")

    def cost(self, component, ranks, sparsity):
        r = np.asarray(ranks, dtype=np.float64)
        if component.kind not in self.kinds:
            return np.zeros_like(r)
        m = component.m
        return np.where(r == DENSE, m, np.minimum(r, m)) * self.bytes_per_value

    def dense(self, component) -> float:
        return float(component.m * self.bytes_per_value) if component.kind in self.kinds else 0.0


@register_cost_model("bytes")
@dataclass(frozen=True)
class Bytes:
    """Storage bytes at a dtype. A sparse part adds its values and its CSR indices (:data:`SPARSE_FORMAT`)."""

    dtype: str = "bfloat16"
    name: str = "bytes"
    unit: str = "bytes"

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"Bytes: unknown dtype {self.dtype!r}; expected one of {sorted(DTYPE_BYTES)}")

    def cost(self, component, ranks, sparsity):
        b = DTYPE_BYTES[self.dtype]
        return _lowrank_sparse(component, ranks, sparsity, b, b, 1.0 / 8)

    def dense(self, component) -> float:
        return float(component.m * component.n * DTYPE_BYTES[self.dtype])


@dataclass(frozen=True)
class FlatParams:
    """Parameters when FLAT-LLM's head-wise PCA shrinks V and O together (FLAT-LLM, Sec. 3.2).

    A ``vo`` component (one per layer; ``m`` = O's output dim, ``n`` = V's input dim) takes a value
    head rank ``r`` in [0, head_dim]. V keeps ``kv_heads * r`` rows (``kv_heads*r*n`` parameters)
    and O keeps ``heads * r`` input columns (``m*heads*r``). Dense is ``r = head_dim``. Every other
    kind is priced like :class:`Params`.
    """

    head_dim: int
    heads: int
    kv_heads: int
    name: str = "params"
    unit: str = "parameters"

    def __post_init__(self):
        for f in ("head_dim", "heads", "kv_heads"):
            if getattr(self, f) < 1:
                raise ValueError(f"FlatParams: expected {f} >= 1, received {getattr(self, f)!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"FlatParams: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def _per_rank(self, component) -> float:
        return float(self.kv_heads * component.n + self.heads * component.m)

    def cost(self, component, ranks, sparsity):
        if component.kind != "vo":
            return Params().cost(component, ranks, sparsity)
        r = np.asarray(ranks, dtype=np.float64)
        return np.where(r == DENSE, self.head_dim, r) * self._per_rank(component)

    def dense(self, component) -> float:
        if component.kind != "vo":
            return Params().dense(component)
        return self.head_dim * self._per_rank(component)
