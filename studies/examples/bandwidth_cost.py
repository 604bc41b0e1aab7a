# Example plugin: a "bandwidth" cost model, the memory traffic of decoding one token (weights + KV cache read).
"""Memory bytes read per decoded token, as a cost model a budget can limit.

Decoding is memory-bound: each new token reads every weight once, and attention reads the cached
keys and values of every earlier token. With a rank-r factorization ``A (B x)`` of a k/v projection
the cache holds the r-dimensional latent ``B x`` instead of the m outputs, so both terms shrink:

    bandwidth(r) = bytes(dtype) * [ r (m + n)                       weights of the two factors
                                    + context * min(r, m) if kind in {k, v} ]   latent cache read
    bandwidth(dense) = bytes(dtype) * [ m n + context * m if kind in {k, v} ]

A sparse + low-rank candidate adds its kept entries and their CSR indices (costs.SPARSE_FORMAT). The context
length (tokens already in the cache) is an assumption of the deployment, default 2048.

Use it from the command line (the plugin file registers the model when loaded)::

    rankalloc allocate --plugin studies/examples/bandwidth_cost.py --cost bandwidth \\
        --curves studies/fixtures/curves_small.csv --solver exact --budget 0.4
    rankalloc compare --plugin studies/examples/bandwidth_cost.py --cost bandwidth --ratios 0.3
    rankalloc pareto --plugin studies/examples/bandwidth_cost.py --cost bandwidth --profile DIR

or from Python: ``load_plugin(path)``, then ``Budget("bandwidth", removed=0.4)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rankalloc.allocators.costs import DTYPE_BYTES, KV_KINDS, sparse_counts, sparse_index_bits
from rankalloc.allocators.problem import DENSE
from rankalloc.allocators.registry import register_cost_model


@dataclass(frozen=True)
class Bandwidth:
    """Bytes read from memory per decoded token: weights at ``dtype`` plus the k/v cache over ``context`` tokens."""

    dtype: str = "bfloat16"
    context: int = 2048
    name: str = "bandwidth"
    unit: str = "bytes read per decoded token"

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"Bandwidth: unknown dtype {self.dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"Bandwidth: expected an integer context length >= 0, received {self.context!r}")

    def cost(self, component, ranks, sparsity):
        b = DTYPE_BYTES[self.dtype]
        r = np.asarray(ranks, dtype=np.float64)
        m, n = component.m, component.n
        nnz = sparse_counts(component, sparsity)  # a sparse part: its values and CSR indices (costs.SPARSE_FORMAT)
        weights = np.where(r == DENSE, m * n * b, r * (m + n) * b + nnz * b + sparse_index_bits(component, nnz) / 8)
        if component.kind not in KV_KINDS:
            return weights
        cached = np.where(r == DENSE, m, np.minimum(r, m))
        return weights + self.context * cached * b

    def dense(self, component) -> float:
        b = DTYPE_BYTES[self.dtype]
        kv = self.context * component.m * b if component.kind in KV_KINDS else 0.0
        return float(component.m * component.n * b + kv)


register_cost_model("bandwidth", Bandwidth, replace=True)
