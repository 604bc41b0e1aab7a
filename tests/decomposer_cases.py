"""Representative allocations of every decomposition method on the tiny test models (shared by the decomposer tests).

The tiny models of ``conftest`` (hidden 64, 4 heads of dim 16, 2 KV heads, MLP 160, two layers) name their
decoder ``model.layers.N`` in the Llama and Gemma families alike, so one set of cases serves both.
"""

from __future__ import annotations

import numpy as np

from rankalloc.allocators.allocation import Status, finish
from rankalloc.allocators.costs import FlatParams
from rankalloc.allocators.problem import DENSE, AllocationProblem, Budget, Choice, Component, Curve
from rankalloc.decomposers import METHODS, FisherSVDConfig, FlatConfig, PGSVDConfig, SoLAConfig, SVDConfig
from rankalloc.decomposers.sola import marginal_name
from rankalloc.profiling.architectures import prime_count

GAMMA = 0.15
HEAD_DIM, HEADS, KV_HEADS = 16, 4, 2


def allocation_of(choices: dict[Component, Choice], costs=None):
    """A feasible allocation with exactly these choices (curves over every rank, plus dense and sparse ones)."""
    curves, index = [], []
    for c, ch in choices.items():
        ranks = list(range(c.max_rank + 1))
        sparsity = [0.0] * len(ranks)
        if ch.sparsity:
            ranks.append(ch.rank)
            sparsity.append(ch.sparsity)
        errors = [float(c.max_rank + 1 - r) for r in ranks]
        if ch.sparsity:
            errors[-1] = errors[ch.rank] * 0.5
        cv = Curve(c, np.array(ranks + [DENSE]), np.array(errors + [0.0]), np.array(sparsity + [0.0]))
        curves.append(cv)
        index.append(cv.index_of(ch))
    problem = AllocationProblem(curves, Budget("params", limit=1e15), costs=costs or {}, grid=1)
    return finish(problem, "test", index, Status.FEASIBLE)


def linear_choices(profile, rank_of) -> dict[Component, Choice]:
    return {c: rank_of(c) for c in profile.components}


def quarter(c: Component) -> Choice:
    """A quarter of the max rank (at least 1) for every matrix."""
    return Choice(max(1, c.max_rank // 4))


def varied(c: Component) -> Choice:
    """A mix: dense v, rank 0 for layer 1's k, full rank for layer 0's o, a quarter of the max rank otherwise."""
    if c.kind == "v":
        return Choice(DENSE)
    if c.kind == "k" and c.layer == 1:
        return Choice(0)
    if c.kind == "o" and c.layer == 0:
        return Choice(c.max_rank)
    return Choice(max(1, c.max_rank // 4))


def sola_choices(profile, model) -> dict[Component, Choice]:
    cfg = model.config
    d, h = cfg.intermediate_size, cfg.hidden_size
    q = d - prime_count(d, GAMMA)
    out = {c: Choice(max(1, c.max_rank // 3)) for c in profile.components if c.kind in ("q", "k", "v", "o")}
    for layer in range(cfg.num_hidden_layers):
        mlp = f"model.layers.{layer}.mlp"
        for proj, kind, (m, n), r in (("gate_proj", "gate", (q, h), 20), ("up_proj", "up", (q, h), 24),
                                      ("down_proj", "down", (h, q), 16 if layer == 0 else DENSE)):
            out[Component(marginal_name(f"{mlp}.{proj}"), m, n, kind, layer)] = Choice(r)
    return out


def vo_component(layer: int, hidden: int = 64) -> Component:
    return Component(f"model.layers.{layer}.self_attn.vo", hidden, hidden, "vo", layer)


def flat_choices(profile, ranks=(6, 11)) -> dict[Component, Choice]:
    out = {vo_component(l): Choice(r) for l, r in enumerate(ranks)}
    for c in profile.components:
        if c.kind not in ("v", "o"):
            out[c] = Choice(max(1, c.max_rank // 2))
    return out


FLAT_COSTS = {"params": FlatParams(HEAD_DIM, HEADS, KV_HEADS)}


def method_case(name, model, profile):
    """(config, allocation) of a representative compression for method ``name``."""
    if name == "svd":
        return SVDConfig(), allocation_of(linear_choices(profile, varied))
    if name == "fisher_svd":
        return FisherSVDConfig(), allocation_of(linear_choices(profile, varied))
    if name == "pgsvd":
        return PGSVDConfig(init="svd", max_iter=3), allocation_of(linear_choices(profile, varied))
    if name == "sola":
        return SoLAConfig(gamma=GAMMA), allocation_of(sola_choices(profile, model))
    if name == "flat":
        return FlatConfig(), allocation_of(flat_choices(profile), FLAT_COSTS)
    if name == "sslc":
        cfg_cls = METHODS["sslc"].config
        choices = {c: Choice(max(1, c.max_rank // 4), 0.05) if c.kind in ("q", "up") else varied(c)
                   for c in profile.components}
        return cfg_cls(iterations=2), allocation_of(choices)
    raise AssertionError(name)


ALL_METHODS = sorted(METHODS)
