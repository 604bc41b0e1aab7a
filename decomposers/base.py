# Shared decomposer machinery: factors, target validation, per-matrix handlers and the in-place entry point compress_.
"""Turn an :class:`~rankalloc.allocators.allocation.Allocation` into a compressed transformers model.

Contract of ``compress_(model, allocation, config, profile)``:

- ``config`` is the frozen config dataclass of one method. ``type(config)`` selects the registered method
  (:mod:`rankalloc.decomposers.registry`).
- Only the allocation's components are touched. A dense choice leaves its module as it is.
- Every factor is computed in float64 (``numerics.PRECISION``) on the weight's device and cast back
  to the module's dtype at the very end.
- Bad input raises ``ValueError`` naming the component before any module is modified: a name that is
  not in the model, a shape that disagrees with the module, a rank outside ``[0, min(m, n)]``, a sparse
  choice given to a method without a sparse part, a host module whose call contract a replacement would
  not follow (:mod:`rankalloc.decomposers.host`).
- Afterwards the realized parameter count of the components equals ``allocation.cost["params"]``
  exactly, or ``RuntimeError`` is raised.

Parameter counting. "Parameters" are stored weight entries, biases excluded, as in the cost models
(``Params`` prices rank r at ``r(m+n)``). A bias is kept unchanged and counted nowhere.

Rank 0. A rank-0 matrix becomes a :class:`LowRankLinear` with empty ``first`` (``0 x n``) and
``second`` (``m x 0``) weights: 0 parameters, and it outputs its bias (zeros without one). The model
still runs and saves; the count stays exact.

Handler contract (every method): ``handler(model, allocation, config, profile, progress) ->
list[ComponentReport]``, one report per component of the allocation. A per-matrix method only writes
``build(module, choice, W, G, config, name) -> nn.Module | (nn.Module, info)`` and wraps it with
:func:`linear_handler`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from rankalloc.allocators.costs import FlatParams, Params
from rankalloc.allocators.problem import Choice, Component
from rankalloc.decomposers.host import check_single_input
from rankalloc.decomposers.modules import (LowRankLinear, balanced_factors, is_conv1d, stored_params, weight_matrix,
                                          weight_params)
from rankalloc.decomposers.registry import Handler, method_of_config
from rankalloc.decomposers.report import ComponentReport, CompressionReport, config_dict, profile_id
from rankalloc.profiling.numerics import PRECISION, check_finite


# ----------------------------------------------------------------------------- pure maths helpers
def check_matrix(W: torch.Tensor, G: torch.Tensor, rank: int, name: str) -> tuple[int, int]:
    """Validate ``W`` (``m x n``), an ``n x n`` Gram ``G`` and ``rank`` in ``[0, min(m, n)]``; return ``(m, n)``."""
    if W.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, received shape {tuple(W.shape)}")
    m, n = W.shape
    if tuple(G.shape) != (n, n):
        raise ValueError(f"{name} ({m}x{n}): expected an input Gram of shape ({n}, {n}), received {tuple(G.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(m, n):
        raise ValueError(f"{name} ({m}x{n}): expected a rank in [0, {min(m, n)}], received {rank!r}")
    return m, n


def activation_error(E: torch.Tensor, G: torch.Tensor) -> float:
    """``||E X||_F^2 = tr(E G E^T)`` in float64 for ``G = X X^T``."""
    E = E.detach().to(PRECISION)
    return float(((E @ G.to(device=E.device, dtype=PRECISION)) * E).sum())


@dataclass(frozen=True, eq=False)
class Factors:
    """``W ~ A B`` in float64: ``A`` is ``m x r``, ``B`` is ``r x n``.

    ``error`` is the method's own predicted error for these factors (see each method), ``delta`` the
    absolute damping added to the Gram, ``info`` extra diagnostics (e.g. an ALS history).
    """

    A: torch.Tensor
    B: torch.Tensor
    error: float
    delta: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


_FACTORS: dict | None = None


@contextlib.contextmanager
def factorize_once():
    """Inside the block each matrix is factorized once and every rank asked of it is a truncation of that
    factorization (``compare``, ``pareto`` and the quality study compress many allocations of one model).

    The cached factors are kept up to the break-even rank (or the largest rank asked, if higher), in the dtype of the module they become, so a
    truncation gives the same module as a fresh factorization at that rank (columns of ``A`` and rows of ``B`` do
    not depend on the rank)."""
    with _factor_cache({} if _FACTORS is None else _FACTORS):
        yield


@contextlib.contextmanager
def no_factor_cache():
    """Inside the block every matrix is factorized afresh, even within :func:`factorize_once` (sequential
    calibration fits weights that exist for one allocation only; caching them would only hold memory)."""
    with _factor_cache(None):
        yield


@contextlib.contextmanager
def _factor_cache(cache: dict | None):
    """``cache`` serves :func:`truncation` inside the block (None: no cache); the outer one is restored after."""
    global _FACTORS
    outer = _FACTORS
    _FACTORS = cache
    try:
        yield
    finally:
        _FACTORS = outer


def truncation(key: tuple, W: torch.Tensor, rank: int, compute: Callable[[int], Factors]) -> Factors:
    """``compute(rank)`` (factors at ``rank`` with ``info["tails"]``, the error at every rank), or its truncation from
    the cache of :func:`factorize_once`. ``key`` names the method, matrix and settings; a checksum of ``W`` is
    added, so another weight under the same name is never served another's factors."""
    if _FACTORS is None:
        return compute(rank)
    full = (*key, tuple(W.shape), float(W.detach().double().sum()), float(W.detach().double().abs().max()))
    hit = _FACTORS.get(full)
    if hit is None or hit.rank < rank:
        m, n = W.shape
        f = compute(max(rank, (m * n) // (m + n)))  # every rank below break-even is served by the first call
        A, B = balanced_factors(f.A, f.B)  # in float64, as a fresh factorization is (exact: powers of two)
        hit = Factors(A.to(W.dtype), B.to(W.dtype), f.error, f.delta, f.info)
        _FACTORS[full] = hit
    return Factors(hit.A[:, :rank], hit.B[:rank], float(hit.info["tails"][rank]), hit.delta)


def low_rank_module(module: nn.Module, factors: Factors) -> tuple[LowRankLinear, dict]:
    """The :class:`LowRankLinear` replacing ``module`` (its bias, dtype and device), and report info."""
    W = weight_matrix(module)
    new = LowRankLinear.from_factors(factors.A, factors.B, getattr(module, "bias", None), W.dtype, W.device)
    info = {k: v for k, v in factors.info.items() if k != "tails"}  # the error at every rank stays out of reports
    return new, {"predicted_error": factors.error, "delta": factors.delta, **info}


# ----------------------------------------------------------------------------- module lookup and validation
def get_module(model: nn.Module, name: str, what: str = "component") -> nn.Module:
    """``model.get_submodule(name)``, or ``ValueError`` naming the missing module."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what} {name!r}: no module of that name in the model "
                         f"({type(model).__name__}); expected a qualified name such as "
                         f"'model.layers.0.self_attn.q_proj'") from None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_choice(component: Component, choice: Choice, sparse: bool = False, method: str = "") -> None:
    """``ValueError`` naming the component if its choice does not fit its shape or the method."""
    if choice.is_dense:
        return
    if not 0 <= choice.rank <= component.max_rank:
        raise ValueError(f"component {component.name!r} ({component.m}x{component.n}): expected a rank in "
                         f"[0, {component.max_rank}] or dense, received {choice.rank}")
    if choice.sparsity and not sparse:
        raise ValueError(f"component {component.name!r}: method {method or '?'} has no sparse part; expected "
                         f"sparsity 0, received {choice.sparsity:g} (use the sslc method)")


def check_profile_component(profile, component: Component, n_expected: int | None = None) -> None:
    """If the profile lists its components, ``component`` must be there with the same shape."""
    comps = getattr(profile, "components", None)
    if comps is None:
        return
    by_name = {c.name: c for c in comps}
    c = by_name.get(component.name)
    if c is None:
        raise ValueError(f"component {component.name!r} is not in the profile ({len(by_name)} components); "
                         f"profile the same model first")
    if (c.m, c.n) != (component.m, component.n):
        raise ValueError(f"component {component.name!r}: the profile has shape {c.m}x{c.n}, the allocation "
                         f"{component.m}x{component.n}")


@dataclass(frozen=True, eq=False)
class Target:
    """One allocation component resolved to its module."""

    component: Component
    choice: Choice
    module: nn.Module

    @property
    def name(self) -> str:
        return self.component.name


def allocation_items(allocation) -> list[tuple[Component, Choice]]:
    """``(component, choice)`` for every component of ``allocation``, in problem order."""
    return [(cv.component, cv.choice(j)) for cv, j in zip(allocation.problem.curves, allocation.choice_index)]


def linear_target(model: nn.Module, component: Component, choice: Choice, sparse: bool = False,
                  method: str = "") -> Target:
    """Resolve and validate one component that names a Linear/Conv1D module of shape ``m x n``."""
    module = get_module(model, component.name)
    if isinstance(module, nn.Linear) or is_conv1d(module):
        m, n = weight_matrix(module).shape
    else:
        raise ValueError(f"component {component.name!r}: expected an nn.Linear (or Conv1D) module, received "
                         f"{type(module).__name__} (already compressed?)")
    if not choice.is_dense:
        check_single_input(module, component.name, "a low-rank linear")
    if (component.m, component.n) != (m, n):
        raise ValueError(f"component {component.name!r}: the allocation says {component.m}x{component.n}, the "
                         f"module's weight is {m}x{n} (out x in)")
    check_choice(component, choice, sparse, method)
    return Target(component, choice, module)


def input_gram(profile, target: Target) -> torch.Tensor:
    """The profile's input Gram of ``target`` (float64, ``n x n``), checked for shape and finiteness."""
    G = profile.input_gram(target.name)
    n = target.component.n
    if tuple(G.shape) != (n, n):
        raise ValueError(f"component {target.name!r}: the profile's input Gram is {tuple(G.shape)}, "
                         f"expected ({n}, {n})")
    return check_finite(G.to(PRECISION), f"input Gram of {target.name}")


def apply_targets(model: nn.Module, targets: Iterable[Target], make: Callable, progress: bool,
                  desc: str) -> list[ComponentReport]:
    """For each target: dense -> untouched; else ``make(target) -> module | (module, info)`` replaces it."""
    reports = []
    targets = list(targets)
    for t in tqdm(targets, desc=desc, disable=not progress or not targets, leave=False):
        t0 = time.perf_counter()
        before = t.component.m * t.component.n
        if t.choice.is_dense:
            reports.append(ComponentReport(t.name, t.choice, t.name, before, weight_params(t.module), 0.0))
            continue
        out = make(t)
        new, info = out if isinstance(out, tuple) else (out, {})
        replace_module(model, t.name, new)
        info = dict(info)
        pred = info.pop("predicted_error", None)
        reports.append(ComponentReport(t.name, t.choice, t.name, before, stored_params(new),
                                       time.perf_counter() - t0, 0, pred, info))
    return reports


def linear_handler(build: Callable, sparse: bool = False, name: str = "") -> Handler:
    """A model-level handler from a per-matrix ``build(module, choice, W, G, config, name)``.

    ``W`` is the module's ``m x n`` weight (model dtype, a view), ``G`` the profile's ``n x n`` input
    Gram (float64). ``build`` returns the replacement module, or ``(module, info)`` where ``info`` may
    hold ``predicted_error``. Every component is validated before any module is replaced.
    """

    def handler(model, allocation, config, profile, progress=True):
        targets = [linear_target(model, c, ch, sparse, name) for c, ch in allocation_items(allocation)]
        for t in targets:
            if not t.choice.is_dense:
                check_profile_component(profile, t.component)

        def make(t):
            return build(t.module, t.choice, weight_matrix(t.module).detach(), input_gram(profile, t), config, t.name)

        return apply_targets(model, targets, make, progress, name or "compress")

    handler.__name__ = f"{name or 'linear'}_handler"
    handler.__doc__ = f"Model-level handler of {name or 'a per-matrix method'} (see ``linear_handler``)."
    return handler


# ----------------------------------------------------------------------------- entry point
def expected_params(model: nn.Module, allocation) -> int:
    """The allocation's ``params`` cost; priced with ``Params`` (``FlatParams`` for ``vo``) if it has none."""
    if "params" in allocation.cost:
        cost = float(allocation.cost["params"])
    else:
        flat = None
        if any(c.kind == "vo" for c, _ in allocation_items(allocation)):
            cfg = model.config
            heads = cfg.num_attention_heads
            flat = FlatParams(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, heads,
                              getattr(cfg, "num_key_value_heads", None) or heads)
        cost = 0.0
        for c, ch in allocation_items(allocation):
            model_ = flat if flat is not None else Params()
            cost += float(model_.cost(c, [ch.rank], [ch.sparsity])[0])
    if not (math.isfinite(cost) and cost == round(cost)):
        raise RuntimeError(f"the allocation's params cost {cost!r} is not a whole number of parameters")
    return int(round(cost))


def compress_(model: nn.Module, allocation, config, profile, progress: bool = True) -> CompressionReport:
    """Compress ``model`` in place as ``allocation`` says, with the method of ``config``.

    Args:
        model: a transformers causal LM (or any module holding the allocation's modules by name).
        allocation: an :class:`~rankalloc.allocators.allocation.Allocation` whose component names are
            qualified module names (plus the method's own names: SoLA ``...#marginal``, FLAT ``...vo``).
        config: one method's config (``SVDConfig``, ``FisherSVDConfig``, ``PGSVDConfig``, ``SoLAConfig``,
            ``FlatConfig``, ``SSLCConfig``).
        profile: the profile store of the dense model (``input_gram``, ``output_gram``, ...).
        progress: show a progress bar.

    Returns:
        A :class:`CompressionReport`. Raises ``ValueError`` on bad input (before modifying anything),
        ``RuntimeError`` if the realized parameter count differs from ``allocation.cost["params"]``.
    """
    method = method_of_config(config).name
    if not allocation.feasible:
        raise ValueError(f"allocation by {allocation.solver!r} has status {allocation.status}: expected a "
                         f"feasible allocation ({allocation.message})")
    expected = expected_params(model, allocation)
    handler = method_of_config(config).compress
    t0 = time.perf_counter()
    with torch.no_grad():
        reports = list(handler(model, allocation, config, profile, progress))
    return combined_report(method, config, allocation, reports, expected, profile, time.perf_counter() - t0)


def combined_report(method: str, config, allocation, reports, expected: int, profile,
                    seconds: float) -> CompressionReport:
    """The :class:`CompressionReport` of ``reports`` (one per component of ``allocation``, in any order), after
    checking that every component is reported once and that the realized parameter count is ``expected``
    (``RuntimeError`` otherwise)."""
    names = [c.name for c, _ in allocation_items(allocation)]
    got = [r.name for r in reports]
    if sorted(got) != sorted(names):
        missing, extra = sorted(set(names) - set(got)), sorted(set(got) - set(names))
        raise RuntimeError(f"{method}: the handler reported {len(got)} components for {len(names)} in the "
                           f"allocation (missing {missing[:5]}, unexpected {extra[:5]})")
    order = {n: i for i, n in enumerate(names)}
    reports = sorted(reports, key=lambda r: order[r.name])
    realized = sum(r.params_after for r in reports)
    if realized != expected:
        diff = [(r.name, r.params_after) for r in reports][:5]
        raise RuntimeError(f"{method}: realized {realized:,} weight parameters for the allocation's components, "
                           f"but the allocation costs {expected:,} (first components: {diff})")
    return CompressionReport(method, config_dict(config), tuple(reports), expected, profile_id(profile), seconds,
                             {"solver": allocation.solver, "status": str(allocation.status),
                              "objective": allocation.objective, "objective_kind": allocation.problem.objective,
                              "cost": dict(allocation.cost)})
