# The method registry: a decomposition method is its decomposer plus the curves that price it, registered once.
"""One entry per decomposition method, written in the method's own file.

A :class:`Method` holds everything the rest of the library needs to know about a method:

- ``config``: its frozen hyperparameter dataclass (``type(config)`` selects the method in ``compress_``);
- ``compress``: the model-level handler ``compress(model, allocation, config, profile, progress)
  -> list[ComponentReport]`` (a per-matrix method wraps its builder with ``base.linear_handler``);
- ``curves``: ``curves(profile, model, grid, progress) -> MethodCurves``, the components it allocates over and
  the cost models that price them (FLAT's merged ``vo`` heads, SoLA's marginal neurons, SSLC's (rank,
  sparsity) table, or the profile's own curves);
- ``modules``: the module classes it puts into a model (``spec_type``, ``spec()``, ``from_spec()``), so that
  ``load_compressed`` can rebuild them;
- ``kind``, ``solver``: the curve kind and solver recommended with it; ``needs``: profile kinds its
  decomposer reads besides the input Grams (``fisher_svd`` reads the Fisher output-gradient Grams);
  ``matrixwise``: whether its decomposer fits each profiled matrix on its own from that matrix's Grams, so that
  sequential calibration can hand it re-measured ones (default: the methods whose curves are the profile's own);
- ``resources``: the only cost models (resources) its components can be priced in, None for any registered one
  (FLAT's merged heads and SoLA's split FFNs have a parameter count only); stated here, not found in the curves, so
  that a command refuses ``--cost`` before it profiles (:meth:`Method.check_cost`);
- ``store``: the profile store its curves and decomposer read (``"full"``: the float64 Grams, as SSLC's table and
  fit in the two-sided metric need); :meth:`Method.profile_store` adds what sequential calibration needs, and the
  commands that profile for a method (``compare``, ``pareto``) profile into that store;
- ``kinds``: the only curve kinds its curves can offer, None for any kind the profile holds (SSLC's table is in
  loss units only, ``("fisher",)``; SoLA's and FLAT's sets recompute some kinds); a command refuses a kind outside
  them before it profiles (:meth:`Method.check_kind`);
- ``fits``: ``fits(model)`` raises a one-line ``ValueError`` naming the module when the method cannot compress
  that model's structure (FLAT: a fused q/k/v or an attention class it does not support; SoLA: an FFN that is not
  gated with separate gate/up/down), so a command stops before it profiles (:meth:`Method.check_model`);
- ``joins``, ``remeasure``: how sequential calibration serves a component that is not one matrix (FLAT's ``vo``):
  ``joins(name)`` names the matrix whose input group fits it (None: an ordinary matrix), whose weight is corrected
  like a member's, and ``remeasure(model, component, inputs)`` turns that matrix's compressed-model inputs
  (batches of ``tokens x n``) into the profile statistics the decomposer reads instead, ``{method: {key: value}}``.

``register_method(Method(...))`` in the method's module makes it appear in ``compress_``, ``problem_for``,
``rankalloc compare``/``compress``/``pareto`` and their ``--method`` choices; nothing else is edited. The
package imports every module of ``rankalloc.decomposers`` once (:func:`load_builtins`), and a user's method
is one file passed with ``--plugin``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping

Handler = Callable[..., list]
"""``handler(model, allocation, config, profile, progress) -> list[ComponentReport]``."""


class NeedsModel(ValueError):
    """A method's curves are not stored in the profile yet, and computing them needs the profiled model."""


@dataclass(frozen=True, eq=False)
class MethodCurves:
    """The curves a method allocates over, the cost models it needs, and what it keeps dense outside them.

    ``costs`` overrides registry cost models by resource name (FLAT's ``params`` is ``FlatParams``).
    ``fixed_params`` are dense parameters outside the curve set (SoLA's prime neurons); a ``params`` budget
    over the curve set is reduced by them so "removed" stays a fraction of all linear parameters.
    ``max_grid``: the largest rank grid its candidates admit (FLAT's value-head ranks stop at head_dim).
    """

    method: str
    curve_set: object
    costs: Mapping[str, object] = field(default_factory=dict)
    fixed_params: int = 0
    max_grid: int | None = None


@dataclass(frozen=True, eq=False)
class Method:
    """A registered decomposition method (see the module docstring)."""

    name: str
    config: type
    compress: Handler
    curves: Callable[..., MethodCurves]
    summary: str
    modules: tuple[type, ...] = ()
    kind: str = "fisher_svd"
    solver: str = "exact"
    needs: tuple[str, ...] = ()
    matrixwise: bool | None = None
    store: str = "compact"
    resources: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    fits: Callable[[object], None] | None = None
    joins: Callable[[str], str | None] | None = None
    remeasure: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Method: expected an identifier as its name, received {self.name!r}")
        if not isinstance(self.config, type):
            raise ValueError(f"method {self.name!r}: expected a config class, received {self.config!r}")
        if self.fits is not None and not callable(self.fits):
            raise ValueError(f"method {self.name!r}: expected a callable fits(model) or None, received {self.fits!r}")
        for what in ("compress", "curves"):
            if not callable(getattr(self, what)):
                raise ValueError(f"method {self.name!r}: expected a callable {what}, received {getattr(self, what)!r}")
        if self.store not in ("compact", "full"):
            raise ValueError(f"method {self.name!r}: store must be 'compact' or 'full', received {self.store!r}")
        for what in ("resources", "kinds"):
            value = getattr(self, what)
            if value is not None and (not isinstance(value, tuple) or not value
                                      or not all(isinstance(r, str) for r in value)):
                raise ValueError(f"method {self.name!r}: {what} must be a non-empty tuple of names or None, "
                                 f"received {value!r}")
        if (self.joins is None) != (self.remeasure is None):
            raise ValueError(f"method {self.name!r}: joins and remeasure go together (sequential calibration of a "
                             f"component that is not one matrix needs both)")
        for cls in self.modules:
            if not all(hasattr(cls, a) for a in ("spec_type", "spec", "from_spec")):
                raise ValueError(f"method {self.name!r}: module class {cls!r} needs spec_type, spec() and from_spec()")

    @property
    def per_matrix(self) -> bool:
        """Whether the method allocates over the profile's own matrices (one component per matrix), so that any
        long curves CSV of matrices serves it (:func:`profile_curves`)."""
        return bool(getattr(self.curves, "per_matrix", False))

    @property
    def fits_each_matrix(self) -> bool:
        """Whether the decomposer fits each profiled matrix from its own Grams (``matrixwise``; by default the
        per-matrix methods), which is what sequential calibration needs."""
        return self.per_matrix if self.matrixwise is None else bool(self.matrixwise)

    @property
    def sequential(self) -> bool:
        """Whether sequential calibration can serve the method: it fits each matrix on its own, or says how its
        other components join a matrix's input group (``joins``, ``remeasure``)."""
        return self.fits_each_matrix or self.joins is not None

    def check_model(self, model) -> None:
        """One-line ``ValueError`` when the method cannot compress ``model`` (``fits``; an out-of-core skeleton
        serves, only module classes and names are read)."""
        if self.fits is not None:
            self.fits(model)

    def check_kind(self, kind: str) -> None:
        """One-line ``ValueError`` when the method's curves cannot offer the curve kind ``kind`` (``kinds``)."""
        if self.kinds is not None and kind not in self.kinds:
            raise ValueError(f"method {self.name!r} offers the curve kinds {list(self.kinds)} only; received kind "
                             f"{kind!r}")

    def check_cost(self, cost: str) -> None:
        """One-line ``ValueError`` when the method cannot be priced in the resource ``cost`` (``resources``)."""
        if self.resources is not None and cost not in self.resources:
            raise ValueError(f"method {self.name!r} is priced in {list(self.resources)} only; received cost {cost!r}")

    def profile_store(self, sequential: bool = False) -> str:
        """The profile store that serves the method: its own ``store``, or ``"full"`` under sequential calibration
        when it reads the output-gradient Grams (``"fisher"`` in ``needs``), which a compact store keeps only as
        the dense point's Fisher basis."""
        return "full" if self.store == "full" or (sequential and "fisher" in self.needs) else "compact"


METHODS: dict[str, Method] = {}
"""Registered methods by name."""

MODULE_TYPES: dict[str, tuple[type, Callable, Callable]] = {}
"""For save/load: ``spec_type`` -> (module class, ``spec(module) -> dict``, ``from_spec(spec, original) ->
module`` with uninitialised weights of the saved shapes); filled from every method's ``modules``."""


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available everywhere (see the module docstring); returns it.

    Re-registering a name with another method raises ``ValueError`` unless ``replace=True``; so does a config
    class that another method already uses (``compress_`` selects the method by its config's type).
    """
    if not isinstance(method, Method):
        raise ValueError(f"register_method: expected a Method, received {method!r}")
    old = METHODS.get(method.name)
    if old is not None and old is not method and not replace:
        raise ValueError(f"register_method: a method named {method.name!r} is already registered; pass "
                         f"replace=True to override it")
    for other in METHODS.values():
        if other.config is method.config and other.name != method.name:
            raise ValueError(f"register_method({method.name!r}): config {method.config.__name__} already belongs to "
                             f"method {other.name!r}; give each method its own config class")
    METHODS[method.name] = method
    for cls in method.modules:
        MODULE_TYPES[cls.spec_type] = (cls, cls.spec, cls.from_spec)
    return method


_LOADED = False


def load_builtins() -> None:
    """Import every module of ``rankalloc.decomposers`` once, so that each registers its method."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import rankalloc.decomposers as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def method_names() -> tuple[str, ...]:
    load_builtins()
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the known methods otherwise."""
    load_builtins()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)} (a plugin may register more)")
    return METHODS[name]


def method_of_config(config) -> Method:
    """The method whose config class is ``type(config)``."""
    load_builtins()
    for m in METHODS.values():
        if type(config) is m.config:
            return m
    raise ValueError(f"unknown decomposer config {type(config).__name__}: expected one of "
                     f"{[m.config.__name__ for m in METHODS.values()]}")


def profile_curves(name: str) -> Callable[..., MethodCurves]:
    """The ``curves`` of a method that allocates over the profile's own matrices (one component per matrix)."""

    def curves(profile, model=None, grid: int = 16, progress: bool = True) -> MethodCurves:
        return MethodCurves(name, profile.curve_set())

    curves.__name__ = f"{name}_curves"
    curves.per_matrix = True
    return curves
