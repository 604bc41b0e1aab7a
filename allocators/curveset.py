# Long-format error curves (one row per candidate, one column per curve kind): the input of every problem
"""Cost-free curves of many components and curve kinds, and the long-format CSV they live in.

Long format: one row per (component, candidate) with columns
``component, m, n, rank[, sparsity][, kind, layer, weight]`` and one error column per curve
kind. A user CSV has a single ``error`` column. A profile's ``curves.csv`` has one column per
kind (``whitened, energy, relative, epsilon, fisher, ...``). ``rank`` is an integer, or
``dense``. The dense candidate (error 0) is added whenever a curve lacks one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rankalloc.allocators.problem import DENSE, Component, Curve

BASE_COLUMNS = ("component", "m", "n", "kind", "layer", "rank", "sparsity", "weight")


@dataclass(frozen=True, eq=False)
class CurveSet:
    """Curves of several kinds over the same components and candidates.

    ``ranks[name]`` and ``sparsity[name]`` list a component's candidates. ``errors[kind][name]``
    gives that kind's error for each candidate.
    """

    components: tuple[Component, ...]
    ranks: Mapping[str, np.ndarray]
    errors: Mapping[str, Mapping[str, np.ndarray]]
    sparsity: Mapping[str, np.ndarray] = field(default_factory=dict)
    layer_scores: Mapping[int, float] | None = None
    weights: Mapping[str, float] | None = None
    name: str = ""

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.errors)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component named {name!r} in curve set {self.name!r}")

    def curves(self, kind: str, grid: int = 16, components: Sequence[str] | None = None,
               add_dense: bool = True) -> list[Curve]:
        """The :class:`Curve` of each component for ``kind``, keeping ranks that are multiples of ``grid``."""
        if kind not in self.errors:
            raise ValueError(f"curve kind {kind!r} is not in {self.name or 'this curve set'}; "
                             f"expected one of {list(self.errors)}")
        wanted = None if components is None else set(components)
        out = []
        for c in self.components:
            if wanted is not None and c.name not in wanted:
                continue
            r = np.asarray(self.ranks[c.name])
            s = np.asarray(self.sparsity.get(c.name, np.zeros(len(r))))
            e = np.asarray(self.errors[kind][c.name], dtype=np.float64)
            keep = (r == DENSE) | (r % grid == 0)
            cv = Curve(c, r[keep], e[keep], s[keep])
            out.append(cv.with_dense(0.0) if add_dense else cv)
        if wanted is not None and len(out) != len(wanted):
            missing = wanted - {cv.component.name for cv in out}
            raise ValueError(f"unknown components requested: {sorted(missing)[:5]}")
        return out

    # ------------------------------------------------------------------ long format
    def to_frame(self):
        """The long-format table as a pandas DataFrame (one row per candidate)."""
        import pandas as pd

        rows = {k: [] for k in ("component", "m", "n", "kind", "layer", "rank", "sparsity")}
        errs = {k: [] for k in self.errors}
        for c in self.components:
            r = np.asarray(self.ranks[c.name])
            rows["component"] += [c.name] * len(r)
            rows["m"] += [c.m] * len(r)
            rows["n"] += [c.n] * len(r)
            rows["kind"] += [c.kind] * len(r)
            rows["layer"] += [c.layer] * len(r)
            rows["rank"] += ["dense" if x == DENSE else int(x) for x in r]
            rows["sparsity"] += list(np.asarray(self.sparsity.get(c.name, np.zeros(len(r)))))
            for k in errs:
                errs[k] += list(np.asarray(self.errors[k][c.name], dtype=np.float64))
        df = pd.DataFrame({**rows, **errs})
        if self.weights:
            df["weight"] = df["component"].map(lambda n: self.weights.get(n, 1.0))
        return df

    def write_csv(self, path) -> None:
        """Write the long-format CSV atomically (full float64 precision)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.to_frame().to_csv(tmp, index=False, float_format="%.17g")
        os.replace(tmp, path)

    @classmethod
    def from_frame(cls, df, name: str = "", error_columns: Sequence[str] | None = None,
                   layer_scores: Mapping[int, float] | None = None) -> "CurveSet":
        """Parse a long-format table; see the module docstring for the columns."""
        missing = [c for c in ("component", "m", "n", "rank") if c not in df.columns]
        if missing:
            raise ValueError(f"curves table {name!r}: missing required columns {missing}; "
                             f"expected component,m,n,rank,error (optional kind,layer,weight,sparsity)")
        if error_columns is None:
            error_columns = [c for c in df.columns if c not in BASE_COLUMNS]
        if not error_columns:
            raise ValueError(f"curves table {name!r}: no error column; expected 'error' or curve-kind columns")
        rank_raw = df["rank"].astype(str).str.strip().str.lower()
        ranks_all = np.where(rank_raw == "dense", DENSE, 0)
        numeric = rank_raw != "dense"
        try:
            ranks_all[numeric.to_numpy()] = rank_raw[numeric].astype(float).astype(np.int64).to_numpy()
        except ValueError as exc:
            raise ValueError(f"curves table {name!r}: expected integer ranks or 'dense' in column rank: {exc}") from None
        sp_all = df["sparsity"].to_numpy(dtype=np.float64) if "sparsity" in df.columns else np.zeros(len(df))
        comps, ranks, sparsity, weights = [], {}, {}, {}
        errors: dict[str, dict[str, np.ndarray]] = {k: {} for k in error_columns}
        order = list(dict.fromkeys(df["component"].astype(str)))
        groups = df.groupby(df["component"].astype(str), sort=False).indices
        for cname in order:
            rows = groups[cname]
            sub = df.iloc[rows]
            ms, ns = set(sub["m"].astype(int)), set(sub["n"].astype(int))
            if len(ms) != 1 or len(ns) != 1:
                raise ValueError(f"component {cname!r}: expected one shape, received m={sorted(ms)}, n={sorted(ns)}")
            kind = str(sub["kind"].iloc[0]) if "kind" in df.columns and sub["kind"].notna().all() else ""
            layer = int(sub["layer"].iloc[0]) if "layer" in df.columns and sub["layer"].notna().all() else -1
            comps.append(Component(cname, ms.pop(), ns.pop(), "" if kind == "nan" else kind, layer))
            ranks[cname] = ranks_all[rows]
            sparsity[cname] = sp_all[rows]
            for k in error_columns:
                errors[k][cname] = df[k].to_numpy(dtype=np.float64)[rows]
            if "weight" in df.columns:
                weights[cname] = float(sub["weight"].iloc[0])
        return cls(tuple(comps), ranks, errors, sparsity, layer_scores, weights or None, name)


def read_curves(path, *, name: str | None = None) -> CurveSet:
    """Read curves from a long-format CSV file, or from a profile directory (its ``curves.csv``).

    A profile directory may hold ``meta.json`` with ``layer_scores`` (FLAT-LLM's t_l).
    """
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        csv = path / "curves.csv"
        if not csv.exists():
            raise FileNotFoundError(f"{path} is not a finished profile: {csv.name} is missing "
                                    f"(create it with `rankalloc profile --out {path}`)")
        scores = None
        meta = path / "meta.json"
        if meta.exists():
            raw = json.loads(meta.read_text()).get("layer_scores")
            scores = {int(k): float(v) for k, v in raw.items()} if raw else None
        return CurveSet.from_frame(pd.read_csv(csv), name=name or path.name, layer_scores=scores)
    if not path.exists():
        raise FileNotFoundError(f"curves file {path} does not exist")
    return CurveSet.from_frame(pd.read_csv(path), name=name or path.stem)
