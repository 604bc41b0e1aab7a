# Synthetic MCKP instances shaped like LLaMA-2-70B (Touvron et al., 2023, Table 1 shapes), power-law spectra
"""Synthetic allocation problems for benchmarks and tests (numpy only, deterministic in ``seed``).

:func:`llama_like_problem` builds an instance the size of LLaMA-2-70B: 80 layers x 7 matrices,
every rank on the grid from 0 to ``min(m, n)`` plus dense. The spectra are power laws
``sigma_i = s * i^(-a) * (1 + noise)`` with per-layer and per-kind ``a`` and ``s``. The error
of rank ``r`` is the tail energy ``T(r) = sum_{i>r} sigma_i^2`` divided by ``T(0)``. So every
matrix starts at error 1 (``objective="normalized"``, SoLA's ``1 - f(r)``). With
``objective="whitened"`` it is then multiplied by a sensitivity ``w`` per matrix (log-normal,
larger near the first and last layers). The sum then acts like a loss increase and no single
matrix dominates it.

:func:`small_random_problem` draws small random instances that brute force can check.
"""

from __future__ import annotations

import numpy as np

from rankalloc.allocators.costs import KVCache, Params
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Component, Curve

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
"""Matrix kinds of one decoder layer, in module order."""

_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

# Spectral decay exponent a (sigma_i ~ i^-a) per kind: query/key spectra fall fastest, value/MLP slowest.
_DECAY = {"q": 0.6, "k": 0.65, "v": 0.35, "o": 0.4, "gate": 0.4, "up": 0.35, "down": 0.45}

OBJECTIVES = ("whitened", "normalized")


def llama_shapes(hidden: int = 8192, mlp: int = 28672, kv: int = 1024) -> dict[str, tuple[int, int]]:
    """``(m, n)`` = (out, in) of each kind of a LLaMA decoder layer (grouped-query attention: k, v are kv x hidden)."""
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}


def tail_errors(sigma: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Normalised tail energy ``T(r) / T(0)`` with ``T(r) = sum_{i>r} sigma_i^2``, at each rank (DENSE -> 0)."""
    s2 = np.sort(np.asarray(sigma, dtype=np.float64) ** 2)[::-1]
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r} s2[i] (0-based)
    r = np.asarray(ranks)
    out = np.where(r == DENSE, 0.0, tail[np.clip(r, 0, len(s2))] / tail[0])
    return np.minimum.accumulate(out)  # exact non-increase despite rounding


def llama_like_problem(layers: int = 80, hidden: int = 8192, mlp: int = 28672, kv: int = 1024, grid: int = 16,
                       removed: float = 0.4, budgets=("params",), kv_removed: float | None = None, seed: int = 0,
                       objective: str = "whitened") -> AllocationProblem:
    """A LLaMA-2-70B-shaped allocation problem (defaults: 80 x 7 = 560 matrices, up to 514 candidates each).

    Args:
        layers, hidden, mlp, kv: model shape (k/v projections are ``kv x hidden``).
        grid: rank grid; candidates are ranks ``0, grid, ..., min(m, n)`` (on the grid) and dense.
        removed: fraction of the parameters removed (the ``params`` budget).
        budgets: resources to budget, a subset of ``("params", "kv")`` in any order; ``kv`` is the
            KV cache per token priced by :class:`KVCache` (2 bytes per value).
        kv_removed: fraction of the KV cache removed (default: ``removed``).
        seed: the instance is a deterministic function of all arguments.
        objective: ``"normalized"`` (tail energy / total energy per matrix) or ``"whitened"``
            (the same times a per-matrix sensitivity).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"llama_like_problem: expected objective in {OBJECTIVES}, received {objective!r}")
    budgets = (budgets,) if isinstance(budgets, str) else tuple(budgets)
    if not budgets or set(budgets) - {"params", "kv"} or len(set(budgets)) != len(budgets):
        raise ValueError(f"llama_like_problem: expected budgets to be distinct names from ('params', 'kv'), "
                         f"received {budgets!r}")
    for name, v in (("layers", layers), ("hidden", hidden), ("mlp", mlp), ("kv", kv)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"llama_like_problem: expected a positive integer {name}, received {v!r}")
    rng = np.random.default_rng(seed)
    shapes = llama_shapes(hidden, mlp, kv)
    depth = np.arange(layers) / max(layers - 1, 1)
    curves = []
    for l in range(layers):
        # early and late layers are more sensitive; a slow drift in the decay with depth
        edge = 1.0 + 2.0 * np.exp(-l / 2.0) + 1.0 * np.exp(-(layers - 1 - l) / 2.0)
        for kind in KINDS:
            m, n = shapes[kind]
            p = min(m, n)
            a = _DECAY[kind] * (1.0 + 0.15 * np.sin(3.0 * depth[l] + KINDS.index(kind))) + rng.normal(0.0, 0.04)
            i = np.arange(1, p + 1, dtype=np.float64)
            sigma = rng.lognormal(0.0, 0.3) * i ** (-max(a, 0.05)) * np.exp(rng.normal(0.0, 0.05, p))
            ranks = np.append(np.arange(0, p + 1, grid), DENSE)
            err = tail_errors(sigma, ranks)
            if objective == "whitened":
                err = err * edge * rng.lognormal(0.0, 0.5)
            curves.append(Curve(Component(f"model.layers.{l}.{_MODULE[kind]}", m, n, kind, l), ranks, err))
    bud, costs = [], {}
    for res in budgets:
        if res == "params":
            bud.append(Budget("params", removed=removed))
            costs["params"] = Params()
        else:
            bud.append(Budget("kv", removed=removed if kv_removed is None else kv_removed))
            costs["kv"] = KVCache()
    return AllocationProblem(curves, tuple(bud), costs, grid=grid, objective=objective,
                             name=f"llama-like-{layers}x{len(KINDS)}-seed{seed}")


def small_random_problem(rng: np.random.Generator, components: int = 4, max_dim: int = 12, grid: int = 1,
                         budgets=("params",), removed: float | None = None, sparse: bool = False,
                         weights: bool = True, kinds=("q", "k", "v", "o")) -> AllocationProblem:
    """A small random problem (integer costs) for exact checks against brute force.

    Shapes are drawn in ``[grid, max_dim]``; candidates are a random subset of the grid ranks plus
    dense (and, with ``sparse``, a few sparse + low-rank candidates). Errors are random and
    non-increasing. ``removed`` (per budget) is drawn in [0.05, 0.9] when None. ``budgets`` may
    name ``params``, ``flops``, ``kv``; k/v kinds make the ``kv`` budget bite.
    """
    budgets = (budgets,) if isinstance(budgets, str) else tuple(budgets)
    curves, w = [], {}
    for l in range(components):
        m, n = (int(x) for x in rng.integers(grid, max_dim + 1, size=2))
        kind = kinds[l % len(kinds)]
        comp = Component(f"model.layers.{l}.{kind}", m, n, kind, l)
        grid_ranks = np.arange(0, min(m, n) + 1, grid)
        k = int(rng.integers(1, min(len(grid_ranks), 5) + 1))
        ranks = np.sort(rng.choice(grid_ranks, size=k, replace=False))
        # errors: decreasing in rank, random gaps
        e = np.cumsum(rng.exponential(1.0, size=k + 1)[::-1])[::-1]
        err = e[:k] * (1 + (ranks == 0) * 0.5)
        err = np.maximum.accumulate(err[::-1])[::-1]  # non-increasing
        cand_r, cand_e, cand_s = list(ranks), list(err), [0.0] * k
        if sparse:  # one kept fraction per component; the same factor keeps errors non-increasing in rank
            s, factor = float(rng.choice([0.05, 0.1])), float(rng.uniform(0.3, 1.0))
            for r, ee in zip(ranks[:2], err[:2]):
                cand_r.append(int(r)), cand_e.append(float(ee) * factor), cand_s.append(s)
        cand_r.append(DENSE), cand_e.append(0.0), cand_s.append(0.0)
        curves.append(Curve(comp, np.array(cand_r), np.array(cand_e), np.array(cand_s)))
        if weights:
            w[comp.name] = float(rng.uniform(0.2, 3.0))
    bud = []
    for res in budgets:
        frac = float(rng.uniform(0.05, 0.9)) if removed is None else removed
        bud.append(Budget(res, removed=frac))
    return AllocationProblem(curves, tuple(bud), grid=grid, weights=w or None, objective="whitened",
                             name="small-random")
