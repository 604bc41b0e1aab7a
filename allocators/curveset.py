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
        from rankalloc.profiling.files import atomic_write_csv

        atomic_write_csv(Path(path), self.to_frame(), index=False, float_format="%.17g")

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
        ranks_all = _ranks(df["rank"], name)
        for col in ("m", "n"):
            v = pd_numeric(df[col])
            bad = np.flatnonzero(~(np.isfinite(v) & (v == np.round(v)) & (v >= 1)))
            if len(bad):
                raise ValueError(f"curves table {name!r}, row {int(bad[0]) + 2}: expected a positive integer in "
                                 f"column {col}, received {str(df[col].iloc[bad[0]])!r}")
        sp_all = pd_numeric(df["sparsity"]) if "sparsity" in df.columns else np.zeros(len(df))
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


def pd_numeric(col) -> np.ndarray:
    """A column as float64, anything unparsable as NaN."""
    import pandas as pd

    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)


def _ranks(col, name: str) -> np.ndarray:
    """The rank column: integers >= 0 or ``dense`` (DENSE); a fraction, a negative or other text is an error."""
    raw = col.astype(str).str.strip().str.lower()
    dense = (raw == "dense").to_numpy()
    v = pd_numeric(raw.where(~dense, "0"))
    bad = np.flatnonzero(~dense & ~(np.isfinite(v) & (v == np.round(v)) & (v >= 0)))
    if len(bad):
        raise ValueError(f"curves table {name!r}, row {int(bad[0]) + 2}: expected an integer rank >= 0 or 'dense' "
                         f"in column rank, received {raw.iloc[bad[0]]!r}")
    return np.where(dense, DENSE, v).astype(np.int64)


def read_csv_file(path: Path):
    """``pandas.read_csv`` with decode and parse errors as ``ValueError`` naming the file."""
    import pandas as pd

    try:
        return pd.read_csv(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a CSV with "
                         f"columns component,m,n,rank,error") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None


def _read_meta(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return meta


def read_curves(path, *, name: str | None = None) -> CurveSet:
    """Read curves from a long-format CSV file, or from a profile directory (its ``curves.csv``, verified against
    the profile's checksums and components by :class:`~rankalloc.profiling.store.Profile`).

    A directory of your own (a ``curves.csv``, optionally a ``meta.json`` holding only ``layer_scores``, FLAT-LLM's
    t_l) is read as that CSV with those scores.
    """
    path = Path(path)
    if path.is_dir():
        csv = path / "curves.csv"
        meta = _read_meta(path / "meta.json")
        if meta is not None and "format" in meta:  # written by rankalloc profile
            from rankalloc.profiling.store import Profile

            prof = Profile.load(path)
            if not csv.exists():
                raise FileNotFoundError(f"{path} is not a finished profile: {csv.name} is missing "
                                        f"(create it with `rankalloc profile --out {path}`)")
            frame = prof.to_frame()
            scores = prof.layer_scores or None
        elif csv.exists():
            raw = (meta or {}).get("layer_scores")
            try:
                scores = {int(k): float(v) for k, v in raw.items()} if raw else None
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{path / 'meta.json'}: layer_scores: expected {{layer: score}}, received "
                                 f"{raw!r}") from None
            frame = read_csv_file(csv)
        else:
            raise FileNotFoundError(f"{path} is not a finished profile: {csv.name} is missing "
                                    f"(create it with `rankalloc profile --out {path}`)")
        src = csv
    else:
        if not path.exists():
            raise FileNotFoundError(f"curves file {path} does not exist")
        frame, scores, src = read_csv_file(path), None, path
    try:
        return CurveSet.from_frame(frame, name=name or (path.name if path.is_dir() else path.stem),
                                   layer_scores=scores)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
