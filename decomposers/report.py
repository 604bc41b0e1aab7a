# Compression reports: what happened to each component, the totals, and their JSON form.
"""``ComponentReport`` per component and ``CompressionReport`` for a whole ``compress_`` call (saved with the model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Mapping

import torch

from rankalloc.allocators.problem import DENSE, Choice


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
    from rankalloc.profiling.store import identity

    out = identity(getattr(profile, "meta", None) or {})
    path = getattr(profile, "path", None)
    if path is not None:
        out["path"] = str(path)
    return _jsonable(out)
