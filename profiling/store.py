# Profile store: one directory per profiling run (layout below); read without a model, written atomically.
"""The on-disk profile that allocators and decomposers read.

Layout of a profile directory::

    meta.json                        model id + fingerprint, calibration hash, settings (the store mode among
                                     them), layer scores, components, finished layers, cache key (KEY_FIELDS)
    layers/layer_XXX.npz             per layer: sigma:<name> (of W S), sigma_w:<name> (of W),
                                     delta:<name> (damping), <kind>:<name> curves, neuron_norms,
                                     value_cov (kv_heads, head_dim, head_dim), t (= t_l), tokens
    roots/layer_XXX.safetensors      per input group (keyed by its first member): the Cholesky factor S of the
                                     damped input Gram, S S^T = G + delta I, lower triangle packed row by row
                                     (float32 in the compact store, float64 in the full one)
    fisher/layer_XXX.safetensors     per component, what its two-sided Fisher truncation needs (fisher kinds):
                                     <name>|right (n x r*) or <name>|left_a (m x r*) and <name>|left_b (r* x m)
    extra_fisher/layer_XXX.npz       SoLA marginal and FLAT value-head loss curves, computed in the backward
    grams/layer_XXX.safetensors      float64 input Grams sum_t x x^T (full store only)
    output_grams/layer_XXX.safetensors   float64 output-gradient Grams (full store only)
    kinds/<kind>.npz                 curve kinds added after profiling (write_kind), keyed by component
    extra/<name>.csv                 other curve sets (write_extra): sola, flat, sslc ...
    curves.csv                       long-format curves of every kind; written once all layers are done
    checksums.json                   sha256, size and expected contents (array names, shapes, dtypes; for
                                     curves.csv the component list) of every file above (profiling.files)
    .rankalloc.lock                  while a run writes here: its pid, host, start time and command line
    scratch/                         layer inputs kept for the layer-streamed backward; removed when done

Store modes (``settings["store"]``): ``compact`` (default) keeps what the curves and every decomposer need at no
more than the model's own size: float32 input roots (the input Gram is ``S S^T - delta I``) and the Fisher bases
up to the break-even rank ``r* = mn / (m + n)``. ``full`` also keeps every float64 Gram (8 n^2 bytes each).

Every file is written to a temporary name and moved into place with ``os.replace``, so an
interrupted run never leaves a half-written file, and its checksum is recorded in ``checksums.json``.
Each reader verifies a file the first time this process opens it (then caches the result), and checks
what a checksum cannot: a Gram is square, finite, symmetric with a non-negative diagonal; a Cholesky
root has a positive diagonal; curves.csv lists exactly the profiled components. A failed check is a
``ValueError`` naming the file. Writers hold the folder's lock (:func:`~rankalloc.profiling.files.folder_lock`).
Reading curves needs numpy and pandas only; torch is imported lazily by the Gram and covariance accessors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from rankalloc.allocators.problem import Component, Curve
from rankalloc.profiling import files
from rankalloc.profiling.files import _load_tensor, _load_tensors, atomic_save_tensors, atomic_savez, atomic_write_bytes

FORMAT = 3
"""Store format: 3 added ``checksums.json``; a profile in another format is refused (profile it again)."""
STORES = ("compact", "full")
"""Profile store modes; see the module docstring."""

KEY_FIELDS = ("fingerprint", "source_id", "calibration_hash", "n_samples", "seqlen", "seed", "settings")
"""Meta fields that must agree for a run to resume into an existing profile directory."""

FLAGS = {"fingerprint": "--model", "source_id": "--text", "calibration_hash": "--text/--samples/--seqlen/--seed",
         "n_samples": "--samples", "seqlen": "--seqlen", "seed": "--seed", "batch_size": "--batch-size",
         "store": "--store", "fisher_samples": "--fisher-samples", "fisher_labels": "--fisher-labels"}
"""The ``rankalloc profile`` option that sets each key field (and setting), for error messages."""


def setting_differences(old: dict, new: dict, fields=KEY_FIELDS) -> list[str]:
    """One phrase per key field (each setting on its own) that differs between two metas, naming its option."""
    out = []
    for k in fields:
        if k == "settings":
            a, b = old.get(k) or {}, new.get(k) or {}
            for s in sorted(set(a) | set(b)):
                if a.get(s) != b.get(s):
                    flag = FLAGS.get(s, f"the {s} setting")
                    out.append(f"{flag} ({s}): {_shown(a.get(s))} in the profile, {_shown(b.get(s))} now")
        elif old.get(k) != new.get(k):
            out.append(f"{FLAGS.get(k, k)} ({k}): {_shown(old.get(k))} in the profile, {_shown(new.get(k))} now")
    return out


def _shown(value) -> str:
    return "not set" if value is None else repr(value)


def mismatch_error(path, diff: list[str]) -> ValueError:
    return ValueError(f"{path} holds a profile made with other settings: {'; '.join(diff)}. Rerun with the "
                      f"profile's settings to use it, add --restart to discard it and profile again, or use another "
                      f"--out directory")

IDENTITY_FIELDS = ("model_id", "fingerprint", "source_id", "text_path", "calibration_hash", "n_samples", "seqlen",
                   "tokens", "version")


def identity(meta: dict) -> dict:
    """What a profile's outputs (allocation JSONs, compressed folders) record of it: the model and its fingerprint,
    the text, the calibration and the library version, as far as ``meta`` has them."""
    return {k: meta[k] for k in IDENTITY_FIELDS if k in meta}


BASE_CURVE_KINDS = ("whitened", "energy", "relative", "epsilon")


def _symmetric(G: np.ndarray, rtol: float = 1e-9) -> bool:
    """``|G - G^T| <= rtol * max|diag G|`` (float round-off of a product allowed), checked 512 rows at a time."""
    tol = rtol * float(np.abs(np.diagonal(G)).max(initial=0.0))
    return all(float(np.abs(G[i:i + 512] - G[:, i:i + 512].T).max(initial=0.0)) <= tol
               for i in range(0, G.shape[0], 512))


class Profile:
    """A profile directory. Open one with :meth:`Profile.load`; ``profile_model`` creates them."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self._frame = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, path, *, any_format: bool = False) -> "Profile":
        """Open an existing profile directory (no model needed); one in another store format is refused."""
        path = Path(path)
        meta = path / "meta.json"
        if not meta.exists():
            raise FileNotFoundError(f"{path} is not a profile directory ({meta.name} is missing); create one with "
                                    f"`rankalloc profile --out {path}` or rankalloc.profiling.profile_model(...)")
        data = files.read_json(meta, f"profile it again: rankalloc profile --restart --out {path}")
        if not isinstance(data, dict):
            raise ValueError(f"{meta}: expected a JSON object (profile metadata)")
        if not any_format and data.get("format") != FORMAT:
            raise ValueError(f"{path} holds a profile in store format {data.get('format')!r}; this rankalloc reads "
                             f"format {FORMAT} (with checksums): profile it again with `rankalloc profile --restart "
                             f"--out {path}`")
        return cls(path, data)

    @classmethod
    def start(cls, path, meta: dict, resume: bool = True) -> "Profile":
        """Open ``path`` for a run described by ``meta``: resume a matching run, or start a new one.

        A directory holding a profile with another cache key (model fingerprint, calibration ids,
        settings ...) is refused with ``ValueError``, so a cache is never reused for another model.
        With ``resume=False`` the profile's own files are removed first.
        """
        path = Path(path)
        with files.folder_lock(path):
            if (path / "meta.json").exists():
                old = cls.load(path, any_format=True)
                if resume and old.meta.get("format") != FORMAT:
                    raise ValueError(f"{path} holds a profile in store format {old.meta.get('format')!r} (this "
                                     f"rankalloc writes format {FORMAT}); profile again with --restart, or use "
                                     f"another --out directory")
                if resume:
                    diff = setting_differences(old.meta, meta)
                    if diff:
                        raise mismatch_error(path, diff)
                    return old
                old.clear()
            for sub in ("layers", "roots"):
                (path / sub).mkdir(exist_ok=True)
            prof = cls(path, dict(meta, format=FORMAT, finished_layers=[], layer_scores={}, timings={}))
            prof._write_meta()
            return prof

    def clear(self) -> None:
        """Delete this profile's own files (nothing else in the directory)."""
        with files.folder_lock(self.path):
            for sub in ("layers", "roots", "fisher", "extra_fisher", "grams", "output_grams", "kinds", "extra"):
                d = self.path / sub
                if d.is_dir():
                    for f in d.iterdir():
                        if re.fullmatch(r"\.?[\w.-]+\.(npz|safetensors|csv)(\.tmp\d+)?", f.name):
                            f.unlink()
            for f in ("curves.csv", "meta.json", files.CHECKSUMS):
                (self.path / f).unlink(missing_ok=True)
            import shutil

            shutil.rmtree(self.path / "scratch", ignore_errors=True)

    # ------------------------------------------------------------------ metadata
    @property
    def components(self) -> tuple[Component, ...]:
        return tuple(Component(n, int(m), int(k), kind, int(l)) for n, m, k, kind, l in self.meta["components"])

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    @property
    def fisher_loss_tokens(self) -> int:
        """Predicted tokens the output-gradient Grams sum over (all calibration sequences unless the Fisher
        step used a subset; see ``add_fisher_curves(samples=)``)."""
        return int(self.meta.get("fisher_loss_tokens", self.meta["n_samples"] * (self.meta["seqlen"] - 1)))

    @property
    def num_layers(self) -> int:
        return int(self.meta["config"]["num_layers"])

    @property
    def finished_layers(self) -> list[int]:
        return list(self.meta.get("finished_layers", []))

    @property
    def complete(self) -> bool:
        return len(self.finished_layers) == self.num_layers and (self.path / "curves.csv").exists()

    @property
    def layer_scores(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in self.meta.get("layer_scores", {}).items()}

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.meta.get("kinds", ()))

    def select_kinds(self, allowed, kinds, label: str) -> list[str]:
        """``kinds`` (default: every kind of ``allowed`` this profile has), checked to be a non-empty subset of
        ``allowed`` that the profile holds; ``ValueError`` naming ``label`` (e.g. "FLAT") otherwise."""
        have = set(self.kinds)
        kinds = [k for k in allowed if k in have] if kinds is None else list(kinds)
        bad = [k for k in kinds if k not in allowed or k not in have]
        if bad or not kinds:
            raise ValueError(f"kinds: expected a non-empty subset of {sorted(set(allowed) & have)} ({label} kinds this "
                             f"profile has), received {kinds!r}")
        return kinds

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise ValueError(f"component {name!r} is not in the profile at {self.path} "
                         f"(it has {len(self.meta['components'])} components, e.g. {self.meta['components'][0][0]!r})")

    def _write_meta(self) -> None:
        with files.folder_lock(self.path):
            atomic_write_bytes(self.path / "meta.json", json.dumps(self.meta, indent=1, sort_keys=True).encode())

    def _layer_file(self, sub: str, layer: int, ext: str) -> Path:
        return self.path / sub / f"layer_{layer:03d}.{ext}"

    # ------------------------------------------------------------------ integrity
    @property
    def _remedy(self) -> str:
        return f"profile it again: rankalloc profile --restart --out {self.path}"

    def _save(self, path: Path, arrays: dict) -> None:
        """Write one store file atomically (npz or safetensors by its suffix) and record its checksum."""
        with files.folder_lock(self.path):
            path.parent.mkdir(exist_ok=True)
            save = atomic_savez if path.suffix == ".npz" else atomic_save_tensors
            files.record(self.path, path, save(path, arrays))

    def _verified(self, path: Path) -> dict:
        """``path`` checked against ``checksums.json`` (once per process); returns its entry."""
        return files.verify(self.path, path, self._remedy)

    def _npz(self, path: Path) -> dict:
        rec = self._verified(path)
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        files.check_contents(path, rec, arrays, self._remedy)
        return arrays

    def _csv(self, path: Path):
        import pandas as pd

        self._verified(path)
        try:
            return pd.read_csv(path)
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: unreadable CSV ({' '.join(str(exc).split())}); {self._remedy}") from None

    def _tensor(self, path: Path, key: str, what: str):
        """One tensor of a verified safetensors file; ``ValueError`` naming ``what`` and the file if it lacks it."""
        rec = self._verified(path)
        a = _load_tensor(path, key)
        if a is None:
            raise ValueError(f"{what}: {key!r} is not in {path}; {self._remedy}")
        want = (rec.get("contents") or {}).get(key)
        if want is not None and [list(a.shape), a.dtype.str] != want:
            raise ValueError(f"{path}: {key!r} has shape {a.shape} and dtype {a.dtype.str}, but {want[0]} and "
                             f"{want[1]} were written; {self._remedy}")
        return a

    def _gram_checked(self, G: np.ndarray, n: int, what: str, path: Path) -> np.ndarray:
        """A stored Gram read back: square ``n x n``, finite, symmetric, with a non-negative diagonal."""
        problem = None
        if G.shape != (n, n):
            problem = f"shape {G.shape}, expected ({n}, {n})"
        elif not np.isfinite(G).all():
            problem = f"{int((~np.isfinite(G)).sum())} non-finite values"
        elif not _symmetric(G):
            problem = f"not symmetric (max |G - G^T| = {float(np.abs(G - G.T).max()):.3g})"
        elif (np.diagonal(G) < 0).any():
            problem = f"negative diagonal entries (min {float(np.diagonal(G).min()):.3g}): not a Gram matrix"
        if problem:
            raise ValueError(f"{path}: the {what} is damaged: {problem}; {self._remedy}")
        return G

    # ------------------------------------------------------------------ curves
    def to_frame(self):
        """The long-format curves table (``curves.csv``) as a pandas DataFrame."""
        if self._frame is None:
            csv = self.path / "curves.csv"
            if not csv.exists():
                raise FileNotFoundError(
                    f"{self.path} is an unfinished profile ({len(self.finished_layers)}/{self.num_layers} layers "
                    f"done; curves.csv is missing); finish it with `rankalloc profile --out {self.path}`")
            frame = self._csv(csv)
            self._check_frame(frame, csv)
            self._frame = frame
        return self._frame

    def _check_frame(self, frame, csv: Path) -> None:
        """``curves.csv`` lists every profiled component, in order, with ranks 0..min(m, n) and its kinds."""
        comps = self.components
        missing = [c for c in ("component", "m", "n", "rank", *self.kinds) if c not in frame.columns]
        if missing:
            raise ValueError(f"{csv}: missing columns {missing}; {self._remedy}")
        names = list(dict.fromkeys(frame["component"].astype(str)))
        want = [c.name for c in comps]
        if names != want:
            lost = [n for n in want if n not in names]
            raise ValueError(f"{csv}: lists {len(names)} components, the profile has {len(want)} (missing "
                             f"{lost[:3]}{' ...' if len(lost) > 3 else ''}); {self._remedy}")
        counts = frame.groupby(frame["component"].astype(str), sort=False).size()
        for c in comps:
            if counts[c.name] != c.max_rank + 1:
                raise ValueError(f"{csv}: component {c.name!r} has {counts[c.name]} rows, expected "
                                 f"{c.max_rank + 1} (ranks 0..{c.max_rank}); {self._remedy}")

    def curve_set(self, kinds=None):
        """A :class:`~rankalloc.allocators.curveset.CurveSet` with ranks 0..min(m, n) (no dense row)."""
        from rankalloc.allocators.curveset import CurveSet

        df = self.to_frame()
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            missing = [k for k in kinds if k not in df.columns]
            if missing:
                raise ValueError(f"curve kinds {missing} are not in the profile at {self.path}; "
                                 f"it has {list(self.kinds)}")
        return CurveSet.from_frame(df, name=self.path.name, error_columns=kinds, layer_scores=self.layer_scores)

    def _layer_arrays(self, layer: int) -> dict:
        f = self._layer_file("layers", layer, "npz")
        if not f.exists():
            raise ValueError(f"layer {layer} is not in the profile at {self.path} "
                             f"(finished layers: {self.finished_layers})")
        return self._npz(f)

    def spectrum(self, name: str, whitened: bool = True) -> np.ndarray:
        """Singular values of ``W S`` (``whitened=True``) or of ``W``, descending, float64."""
        c = self.component(name)
        key = f"{'sigma' if whitened else 'sigma_w'}:{name}"
        arrays = self._layer_arrays(c.layer)
        if key not in arrays:
            raise ValueError(f"{name}: the weight spectrum was not profiled (epsilon curves were not requested)")
        return arrays[key]

    def damping_delta(self, name: str) -> float:
        """The absolute damping ``delta`` added to the input Gram of ``name`` before its Cholesky."""
        return float(self._layer_arrays(self.component(name).layer)[f"delta:{name}"])

    def _base_curves(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for layer in range(self.num_layers):
            for key, arr in self._layer_arrays(layer).items():
                kind, _, name = key.partition(":")
                if name and kind in BASE_CURVE_KINDS:
                    out.setdefault(kind, {})[name] = arr
        return out

    def _write_curves(self) -> None:
        from rankalloc.allocators.curveset import CurveSet

        comps = self.components
        errors = self._base_curves()
        kinds_dir = self.path / "kinds"
        if kinds_dir.is_dir():
            for f in sorted(kinds_dir.glob("*.npz")):
                errors[f.stem] = self._npz(f)
        ranks = {c.name: np.arange(c.max_rank + 1) for c in comps}
        cs = CurveSet(comps, ranks, errors, layer_scores=self.layer_scores, name=self.path.name)
        with files.folder_lock(self.path):
            csv = self.path / "curves.csv"
            cs.write_csv(csv)
            files.record(self.path, csv, {"components": [c.name for c in comps], "kinds": list(errors)})
            self.meta["kinds"] = list(errors)
            self._write_meta()
        self._frame = None

    # ------------------------------------------------------------------ statistics (torch)
    @property
    def store_mode(self) -> str:
        return self.meta.get("settings", {}).get("store", "full")

    def _group(self, name: str) -> tuple[Component, str]:
        return self.component(name), self.meta["gram_keys"][name]

    def input_root(self, name: str):
        """``(S, delta)``: the lower Cholesky factor of the damped input Gram of ``name``, ``S S^T = G + delta I``
        (torch float64, n x n), exactly the whitening the profile's curves were computed with."""
        import torch

        from rankalloc.profiling.numerics import unpack_lower

        c, key = self._group(name)
        f = self._layer_file("roots", c.layer, "safetensors")
        if not f.exists():
            raise ValueError(f"{name}: no input root {key!r} in {f} (layer {c.layer} unfinished)")
        packed = self._tensor(f, key, f"input root of {name}")
        if packed.shape != (c.n * (c.n + 1) // 2,) or not np.isfinite(packed).all():
            raise ValueError(f"{f}: the input root {key!r} is damaged (shape {packed.shape}, expected "
                             f"({c.n * (c.n + 1) // 2},), or non-finite values); {self._remedy}")
        S = unpack_lower(torch.from_numpy(packed), c.n)
        if not bool((torch.diagonal(S) > 0).all()):
            raise ValueError(f"{f}: the input root {key!r} is damaged: a Cholesky factor has a positive diagonal, "
                             f"this one has {int((torch.diagonal(S) <= 0).sum())} entries <= 0; {self._remedy}")
        return S, self.damping_delta(name)

    def input_gram(self, name: str):
        """``sum_t x_t x_t^T`` over the calibration tokens of the input of ``name`` (torch float64, n x n): stored
        in the full store, else ``S S^T - delta I`` from the stored root (float32 round-off)."""
        import torch

        c, key = self._group(name)
        f = self._layer_file("grams", c.layer, "safetensors")
        if self.store_mode == "full":
            G = self._tensor(f, key, f"input Gram of {name}")
            return torch.from_numpy(self._gram_checked(G, c.n, f"input Gram {key!r}", f))
        S, delta = self.input_root(name)
        G = S @ S.T
        G.diagonal().sub_(delta)
        return G

    def output_gram(self, name: str):
        """``sum_t g_t g_t^T``, ``g = dL/d(output)`` of ``name`` (torch float64, m x m); full store only."""
        import torch

        c = self.component(name)
        f = self._layer_file("output_grams", c.layer, "safetensors")
        G = _load_tensor(f, name) if f.exists() and self._verified(f) is not None else None
        if G is None:
            how = ("profile with kinds including 'fisher'" if "fisher" not in self.kinds else
                   "this compact profile keeps the Fisher bases instead; profile with --store full to keep every "
                   "float64 Gram")
            raise ValueError(f"{name}: no output-gradient Gram in the profile at {self.path}; {how}")
        return torch.from_numpy(self._gram_checked(G, c.m, f"output-gradient Gram {name!r}", f))

    def has_output_grams(self) -> bool:
        """True when every component's output-gradient Gram is stored (full store with ``fisher``)."""
        from safetensors import safe_open

        by_layer: dict[int, set] = {}
        for c in self.components:
            by_layer.setdefault(c.layer, set()).add(c.name)
        for layer, names in by_layer.items():
            f = self._layer_file("output_grams", layer, "safetensors")
            if not f.exists():
                return False
            self._verified(f)
            with safe_open(str(f), framework="numpy") as h:
                if not names <= set(h.keys()):
                    return False
        return True

    def fisher_basis(self, name: str) -> dict:
        """What the two-sided Fisher truncation of ``name`` needs (``profiling.fisher.fisher_component``):
        ``{"right": V}`` or ``{"left_a": A, "left_b": B}`` (torch float64), up to the break-even rank."""
        import torch

        c = self.component(name)
        f = self._layer_file("fisher", c.layer, "safetensors")
        if f.exists():
            from safetensors import safe_open

            self._verified(f)
            with safe_open(str(f), framework="numpy") as h:
                keys = [k for k in h.keys() if k.split("|")[0] == name]
                parts = {k.split("|")[1]: h.get_tensor(k) for k in keys}
            if parts:
                rows = {"right": c.n, "left_a": c.m, "left_b": None}
                bad = [p for p, a in parts.items() if p not in rows or a.ndim != 2 or not np.isfinite(a).all()
                       or (rows[p] is not None and a.shape[0] != rows[p])]
                if bad:
                    raise ValueError(f"{f}: the Fisher basis of {name} is damaged (parts {bad}: unknown, not "
                                     f"2-D of the matrix's size, or non-finite); {self._remedy}")
                return {p: torch.from_numpy(a).to(torch.float64) for p, a in parts.items()}
        raise ValueError(f"{name}: no Fisher basis in the profile at {self.path}; profile with kinds including "
                         f"'fisher'")

    def fisher_extra(self, kind: str, name: str, layer: int) -> np.ndarray | None:
        """A SoLA or FLAT loss curve of layer ``layer`` computed in the backward (``extra_fisher``), or None."""
        f = self._layer_file("extra_fisher", layer, "npz")
        if not f.exists():
            return None
        return self._npz(f).get(f"{kind}:{name}")

    def neuron_norms(self, layer: int) -> np.ndarray:
        """``a_i = ||h_{:,i}||_2`` over the calibration tokens, ``h`` the input of down_proj of ``layer``."""
        arrays = self._layer_arrays(layer)
        if "neuron_norms" not in arrays:
            raise ValueError(f"layer {layer} has no down projection; no FFN neuron norms")
        return arrays["neuron_norms"]

    def prime_neurons(self, layer: int, gamma: float = 0.15) -> np.ndarray:
        """Sorted indices of the top ``ceil(gamma * d)`` FFN neurons by norm (SoLA's prime neurons)."""
        from rankalloc.profiling.architectures import prime_count

        a = self.neuron_norms(layer)
        k = prime_count(len(a), gamma)
        top = np.argsort(-a, kind="stable")[:k]
        return np.sort(top)

    def value_covariance(self, layer: int):
        """``sum_t y_{t,h} y_{t,h}^T`` per KV head ``h`` of the value projection output (torch float64)."""
        import torch

        arrays = self._layer_arrays(layer)
        if "value_cov" not in arrays:
            raise ValueError(f"layer {layer}: no value-output covariance (no v projection found, or the config "
                             f"lacks num_key_value_heads/head_dim)")
        return torch.from_numpy(arrays["value_cov"])

    # ------------------------------------------------------------------ writers
    def _write_layer(self, layer: int, arrays: dict, roots: dict, grams: dict | None, score: float) -> None:
        """Store one finished layer, then record it in meta (so a crash never marks a layer half-written)."""
        with files.folder_lock(self.path):
            self._save(self._layer_file("layers", layer, "npz"), arrays)
            self._save(self._layer_file("roots", layer, "safetensors"), roots)
            if grams is not None:
                self._save(self._layer_file("grams", layer, "safetensors"), grams)
            self.meta["finished_layers"] = sorted(set(self.finished_layers) | {layer})
            self.meta["layer_scores"][str(layer)] = float(score)
            self._write_meta()

    def write_fisher_layer(self, layer: int, bases: dict, extras: dict, grams: dict | None) -> None:
        """Store one layer's Fisher bases (``{name: {part: array}}``), SoLA/FLAT loss curves and, in the full
        store, its float64 output-gradient Grams."""
        with files.folder_lock(self.path):
            self._save(self._layer_file("fisher", layer, "safetensors"),
                       {f"{n}|{part}": a for n, parts in bases.items() for part, a in parts.items()})
            self._save(self._layer_file("extra_fisher", layer, "npz"), extras)
            if grams is not None:
                self._save(self._layer_file("output_grams", layer, "safetensors"), grams)

    def _check_complete(self, what: str) -> None:
        if len(self.finished_layers) != self.num_layers:
            raise ValueError(f"{what}: the profile at {self.path} is unfinished "
                             f"({len(self.finished_layers)}/{self.num_layers} layers)")

    def write_kind(self, kind: str, errors: dict) -> None:
        """Add or replace curve kind ``kind``: ``errors[name]`` over ranks 0..min(m, n) for every component."""
        if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z][\w-]*", kind) or kind in (
                "component", "m", "n", "kind", "layer", "rank", "sparsity", "weight"):
            raise ValueError(f"curve kind: expected an identifier that is not a column name, received {kind!r}")
        self._check_complete(f"write_kind({kind!r})")
        comps = self.components
        missing = [c.name for c in comps if c.name not in errors]
        unknown = sorted(set(errors) - {c.name for c in comps})
        if missing or unknown:
            raise ValueError(f"write_kind({kind!r}): expected one curve per component; missing {missing[:5]} "
                             f"({len(missing)}), unknown {unknown[:5]} ({len(unknown)})")
        arrays = {}
        for c in comps:
            e = np.asarray(errors[c.name], dtype=np.float64).reshape(-1)
            if len(e) != c.max_rank + 1:
                raise ValueError(f"write_kind({kind!r}): component {c.name!r} ({c.m}x{c.n}) expected "
                                 f"{c.max_rank + 1} errors (ranks 0..{c.max_rank}), received {len(e)}")
            Curve(c, np.arange(c.max_rank + 1), e)  # validates: finite, >= 0, non-increasing in rank
            arrays[c.name] = e
        with files.folder_lock(self.path):
            self._save(self.path / "kinds" / f"{kind}.npz", arrays)
            self._write_curves()

    def write_output_grams(self, grams: dict) -> None:
        """Store output-gradient Grams ``sum_t g g^T`` (``m x m``) for some components (float64)."""
        by_layer: dict[int, dict] = {}
        for name, G in grams.items():
            c = self.component(name)
            a = G.detach().to("cpu").double().numpy() if hasattr(G, "detach") else np.asarray(G, dtype=np.float64)
            if a.shape != (c.m, c.m):
                raise ValueError(f"output Gram of {name}: expected shape ({c.m}, {c.m}), received {a.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"output Gram of {name}: {int((~np.isfinite(a)).sum())} non-finite values")
            if not _symmetric(a):
                raise ValueError(f"output Gram of {name}: not symmetric (max |G - G^T| = "
                                 f"{float(np.abs(a - a.T).max()):.3g}); a Gram sum_t g g^T is")
            by_layer.setdefault(c.layer, {})[name] = a
        with files.folder_lock(self.path):
            for layer, new in sorted(by_layer.items()):
                f = self._layer_file("output_grams", layer, "safetensors")
                merged = _load_tensors(f) if f.exists() and self._verified(f) is not None else {}
                merged.update(new)
                self._save(f, merged)

    def write_extra(self, name: str, curve_set, details: dict | None = None) -> None:
        """Store another curve set (e.g. ``"sola"``, ``"flat"``, ``"sslc"``) as ``extra/<name>.csv``; ``details``
        (JSON values, e.g. the grid it was built on) go into its file record, read back by :meth:`extra_details`."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][\w-]*", name):
            raise ValueError(f"extra curve set name: expected an identifier, received {name!r}")
        details = dict(details or {})
        if "components" in details:
            raise ValueError(f"extra curve set {name!r}: 'components' is recorded from the curve set, not a detail")
        with files.folder_lock(self.path):
            f = self.path / "extra" / f"{name}.csv"
            f.parent.mkdir(exist_ok=True)
            curve_set.write_csv(f)
            files.record(self.path, f, {"components": [c.name for c in curve_set.components], **details})

    def extra_details(self, name: str) -> dict:
        """The ``details`` :meth:`write_extra` recorded with the curve set ``name`` (empty for one stored without)."""
        f = self._extra_file(name)
        rec = self._verified(f)
        return {k: v for k, v in (rec.get("contents") or {}).items() if k != "components"}

    def _extra_file(self, name: str):
        """The file of the curve set ``name``; a one-line error naming the sets there when it is missing."""
        f = self.path / "extra" / f"{name}.csv"
        if not f.exists():
            have = sorted(p.stem for p in (self.path / "extra").glob("*.csv")) if (self.path / "extra").is_dir() else []
            raise ValueError(f"no extra curve set {name!r} in the profile at {self.path}; it has {have}")
        return f

    def has_extra(self, name: str) -> bool:
        """Whether :meth:`write_extra` stored a curve set ``name`` here."""
        return (self.path / "extra" / f"{name}.csv").is_file()

    def extra(self, name: str):
        """The curve set stored by :meth:`write_extra` under ``name``."""
        from rankalloc.allocators.curveset import CurveSet

        f = self._extra_file(name)
        frame = self._csv(f)
        try:
            return CurveSet.from_frame(frame, name=name, layer_scores=self.layer_scores)
        except ValueError as exc:
            raise ValueError(f"{f}: {exc}") from None

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.finished_layers)}/{self.num_layers} layers"
        return (f"Profile({str(self.path)!r}, model={self.meta.get('model_id')!r}, {len(self.meta['components'])} "
                f"components, {self.tokens} tokens, {state})")

