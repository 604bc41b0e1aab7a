# Shared decomposer machinery: low-rank modules, the method registry, and the in-place entry point compress_.
"""Turn an :class:`~rankalloc.allocators.allocation.Allocation` into a compressed transformers model.

Contract of ``compress_(model, allocation, config, profile)``:

- ``config`` is the frozen config dataclass of one method. ``type(config)`` selects the handler in
  :data:`METHODS` (``name -> (config class, handler)``, filled in ``decomposers/__init__.py``).
- Only the allocation's components are touched. A dense choice leaves its module as it is.
- Every factor is computed in float64 (``numerics.PRECISION``) on the weight's device and cast back
  to the module's dtype at the very end.
- Bad input raises ``ValueError`` naming the component before any module is modified: a name that is
  not in the model, a shape that disagrees with the module, a rank outside ``[0, min(m, n)]``, a sparse
  choice given to a method without a sparse part.
- Afterwards the realized parameter count of the components equals ``allocation.cost["params"]``
  exactly, or ``RuntimeError`` is raised.

Parameter counting. "Parameters" are stored weight entries, biases excluded, as in the cost models
(``Params`` prices rank r at ``r(m+n)``). A bias is kept unchanged and counted nowhere.

Rank 0. A rank-0 matrix becomes a :class:`LowRankLinear` with empty ``first`` (``0 x n``) and
``second`` (``m x 0``) weights: 0 parameters, and it outputs its bias (zeros without one). The model
still runs and saves; the count stays exact.

Handler contract (every method, including ``sslc`` written elsewhere):
``handler(model, allocation, config, profile, progress) -> list[ComponentReport]``, one report per
component of the allocation. A per-matrix method only writes ``build(module, choice, W, G, config, name)
-> nn.Module | (nn.Module, info)`` and wraps it with :func:`linear_handler`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from rankalloc.allocators.costs import FlatParams, Params
from rankalloc.allocators.problem import DENSE, Choice, Component
from rankalloc.decomposers.host import check_single_input
from rankalloc.profiling.numerics import PRECISION, check_finite

Handler = Callable[..., list]
"""``handler(model, allocation, config, profile, progress) -> list[ComponentReport]``."""

METHODS: dict[str, tuple[type, Handler]] = {}
"""Registry: method name -> (config class, handler). Filled in ``decomposers/__init__.py``."""

MODULE_TYPES: dict[str, tuple[type, Callable, Callable]] = {}
"""Registry for save/load: type name -> (module class, ``spec(module) -> dict``,
``build(spec, original) -> module`` with uninitialised weights of the saved shapes). Filled in
``decomposers/__init__.py``."""


# ----------------------------------------------------------------------------- modules
def empty_linear(in_features: int, out_features: int, bias: bool, dtype=None, device=None) -> nn.Linear:
    """An ``nn.Linear`` with uninitialised storage (no random init: factors are copied in right after)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = int(in_features), int(out_features)
    lin.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
    if bias:
        lin.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
    else:
        lin.register_parameter("bias", None)
    return lin


class LowRankLinear(nn.Module):
    """``y = A (B x) + b``: ``first`` = ``nn.Linear(n -> r)`` holding ``B`` (``r x n``, no bias), ``second`` =
    ``nn.Linear(r -> m)`` holding ``A`` (``m x r``) and the original bias ``b``.

    It stores ``r(m+n)`` weight entries. Rank 0 is allowed: the output is then ``b`` (or zeros).
    """

    spec_type = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.first = empty_linear(in_features, rank, False, dtype, device)
        self.second = empty_linear(rank, out_features, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, dtype, device) -> "LowRankLinear":
        """Cast float64 factors ``A`` (``m x r``) and ``B`` (``r x n``) to ``dtype`` on ``device``."""
        (m, r), (r2, n) = A.shape, B.shape
        if r != r2:
            raise ValueError(f"LowRankLinear: factor shapes disagree, A is {m}x{r} and B is {r2}x{n}")
        mod = cls(n, m, r, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.first.weight.copy_(B.to(device=device, dtype=dtype))
            mod.second.weight.copy_(A.to(device=device, dtype=dtype))
            if bias is not None:
                mod.second.bias.copy_(bias.detach().to(device=device, dtype=dtype))
        return mod

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: Mapping, original: nn.Module) -> "LowRankLinear":
        p = next(original.parameters())
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=p.dtype, device=p.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.second.bias is not None}")


def weight_params(module: nn.Module) -> int:
    """Stored weight entries of ``module``: all parameters except those named ``bias``."""
    return int(sum(p.numel() for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] != "bias"))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed (``in x out``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``m x n`` (out x in) weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (a view, model dtype)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    raise TypeError(f"expected nn.Linear or Conv1D, received {type(module).__name__}")


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


def low_rank_module(module: nn.Module, factors: Factors) -> tuple[LowRankLinear, dict]:
    """The :class:`LowRankLinear` replacing ``module`` (its bias, dtype and device), and report info."""
    W = weight_matrix(module)
    new = LowRankLinear.from_factors(factors.A, factors.B, getattr(module, "bias", None), W.dtype, W.device)
    return new, {"predicted_error": factors.error, "delta": factors.delta, **factors.info}


# ----------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class ComponentReport:
    """What happened to one component: its choice, weight parameters before/after, time.

    ``fixed_params`` are weights the method keeps outside the allocation's accounting (SoLA's prime
    neurons); ``predicted_error`` the method's own error estimate (None when it has none).
    """

    name: str
    choice: Choice
    module: str
    params_before: int
    params_after: int
    seconds: float = 0.0
    fixed_params: int = 0
    predicted_error: float | None = None
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "choice": self.choice.to_json(), "module": self.module,
                "params_before": self.params_before, "params_after": self.params_after,
                "fixed_params": self.fixed_params, "predicted_error": self.predicted_error,
                "seconds": self.seconds, "info": _jsonable(self.info)}


@dataclass(frozen=True)
class CompressionReport:
    """The result of :func:`compress_`: one :class:`ComponentReport` per allocation component, and totals.

    ``params_after`` (sum over components) equals ``expected_params`` (the allocation's ``params``
    cost). ``fixed_params`` counts weights kept dense outside the budget (SoLA's prime neurons).
    """

    method: str
    config: dict
    components: tuple[ComponentReport, ...]
    expected_params: int
    profile_id: dict
    seconds: float
    allocation: dict = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(c.params_before for c in self.components)

    @property
    def params_after(self) -> int:
        return sum(c.params_after for c in self.components)

    @property
    def fixed_params(self) -> int:
        return sum(c.fixed_params for c in self.components)

    @property
    def removed(self) -> float:
        """Fraction of the components' dense weight parameters removed (fixed parameters counted as kept)."""
        before = self.params_before + self.fixed_params
        return 1.0 - (self.params_after + self.fixed_params) / before if before else 0.0

    @property
    def choices(self) -> dict[str, Choice]:
        return {c.name: c.choice for c in self.components}

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.config, "expected_params": self.expected_params,
                "params_before": self.params_before, "params_after": self.params_after,
                "fixed_params": self.fixed_params, "removed": self.removed, "seconds": self.seconds,
                "profile": self.profile_id, "allocation": self.allocation,
                "components": [c.to_dict() for c in self.components]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CompressionReport":
        comps = []
        for c in d["components"]:
            ch = c["choice"]
            choice = (Choice(DENSE) if ch == "dense" else
                      Choice(int(ch[0]), float(ch[1])) if isinstance(ch, list) else Choice(int(ch)))
            comps.append(ComponentReport(c["name"], choice, c["module"], c["params_before"], c["params_after"],
                                         c["seconds"], c["fixed_params"], c["predicted_error"], c.get("info", {})))
        return cls(d["method"], d["config"], tuple(comps), d["expected_params"], d["profile"], d["seconds"],
                   d.get("allocation", {}))

    def summary(self) -> str:
        fixed = f" + {self.fixed_params:,} fixed (outside the budget)" if self.fixed_params else ""
        return (f"{self.method}: {len(self.components)} components, weight params {self.params_before:,} -> "
                f"{self.params_after:,}{fixed} ({self.removed:.2%} removed), {self.seconds:.1f} s")


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def config_dict(config) -> dict:
    return _jsonable(asdict(config)) if is_dataclass(config) else {}


def profile_id(profile) -> dict:
    """Identity of the profile used: its path and the model/text fingerprints in its meta (what is there)."""
    meta = getattr(profile, "meta", None) or {}
    out = {k: meta[k] for k in ("model_id", "fingerprint", "source_id", "calibration_hash", "n_samples", "seqlen",
                                "tokens", "version") if k in meta}
    path = getattr(profile, "path", None)
    if path is not None:
        out["path"] = str(path)
    return _jsonable(out)


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
        reports.append(ComponentReport(t.name, t.choice, t.name, before, weight_params(new),
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
def method_of(config) -> str:
    for name, (cls, _) in METHODS.items():
        if type(config) is cls:
            return name
    raise ValueError(f"unknown decomposer config {type(config).__name__}: expected one of "
                     f"{[cls.__name__ for cls, _ in METHODS.values()]}")


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
    method = method_of(config)
    if not allocation.feasible:
        raise ValueError(f"allocation by {allocation.solver!r} has status {allocation.status}: expected a "
                         f"feasible allocation ({allocation.message})")
    expected = expected_params(model, allocation)
    _, handler = METHODS[method]
    t0 = time.perf_counter()
    with torch.no_grad():
        reports = list(handler(model, allocation, config, profile, progress))
    names = [c.name for c, _ in allocation_items(allocation)]
    got = [r.name for r in reports]
    if sorted(got) != sorted(names):
        missing, extra = sorted(set(names) - set(got)), sorted(set(got) - set(names))
        raise RuntimeError(f"{method}: the handler reported {len(got)} components for {len(names)} in the "
                           f"allocation (missing {missing[:5]}, unexpected {extra[:5]})")
    order = {n: i for i, n in enumerate(names)}
    reports.sort(key=lambda r: order[r.name])
    realized = sum(r.params_after for r in reports)
    if realized != expected:
        diff = [(r.name, r.params_after) for r in reports][:5]
        raise RuntimeError(f"{method}: realized {realized:,} weight parameters for the allocation's components, "
                           f"but the allocation costs {expected:,} (first components: {diff})")
    return CompressionReport(method, config_dict(config), tuple(reports), expected, profile_id(profile),
                             time.perf_counter() - t0,
                             {"solver": allocation.solver, "status": str(allocation.status),
                              "objective": allocation.objective, "objective_kind": allocation.problem.objective,
                              "cost": dict(allocation.cost)})

