"""The public pipeline in a few calls: prepare -> profile -> problem -> solve -> compress -> evaluate.

::

    from rankalloc.allocators.registry import get_solver
    from rankalloc.studies.pipeline import prepare, profile, problem_for, compress, evaluate
    run = prepare()                                   # default SmolLM2-135M + gensim Wikipedia text
    prof = profile(run)                               # cached profile store
    problem = problem_for(prof, method="svd", kind="fisher", removed=0.3)
    allocation = get_solver("exact").solve(problem)
    model, report = compress(run.model, prof, allocation, method="svd")
    result = evaluate(model, run)

Every function takes explicit arguments; nothing reads a command-line namespace. Budgets are
fractions REMOVED of the dense cost of the profiled linear matrices.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from rankalloc.allocators.costs import COST_MODELS, FlatParams
from rankalloc.allocators.problem import AllocationProblem, Budget

METHOD_NAMES = ("svd", "fisher_svd", "pgsvd", "sola", "sslc", "flat")
"""Decomposition methods understood by :func:`problem_for` and :func:`compress` (``decomposers.METHODS``)."""

PROFILE_KINDS = ("whitened", "energy", "relative", "epsilon", "fisher", "probe")
"""Curve kinds ``profile_model`` computes (``fisher`` also yields ``fisher_svd``)."""

DEFAULT_KINDS = ("whitened", "energy", "relative", "epsilon", "fisher")

SSLC_SPARSITIES = (0.0, 0.01, 0.02, 0.04)
"""Kept sparse fractions of the SSLC table that :func:`method_curves` computes when a profile has none."""


@dataclass(frozen=True)
class Run:
    """A loaded model plus its text split and the calibration/evaluation settings."""

    loaded: object          # profiling.data.LoadedModel
    text: object            # profiling.text.TextSplit
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval_seqlen: int = 512
    eval_windows: int = 60
    device: str = "auto"

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def prepare(model: str | None = None, text=None, *, samples: int = 128, seqlen: int = 512, seed: int = 0,
            eval_seqlen: int | None = None, eval_windows: int = 60, device: str = "auto",
            progress: bool = True) -> Run:
    """Load the model (default SmolLM2-135M-Instruct) and the text (default gensim Wikipedia).

    ``eval_seqlen`` defaults to ``seqlen``. Nothing is tokenized yet.
    """
    from rankalloc.profiling.data import load_model
    from rankalloc.profiling.text import load_text

    eval_seqlen = seqlen if eval_seqlen is None else eval_seqlen
    for what, value, least in (("samples", samples, 1), ("seqlen", seqlen, 2), ("eval_seqlen", eval_seqlen, 2),
                               ("eval_windows", eval_windows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{what}: expected an integer >= {least}, received {value!r}")
    return Run(load_model(model, progress=progress), load_text(text, progress=progress), samples, seqlen, seed,
               eval_seqlen, eval_windows, device)


def profile_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds to ask ``profile_model`` for so that ``kinds`` are in the profile (``fisher_svd`` comes
    with ``fisher``; ``whitened`` is always there)."""
    need = {"whitened"}
    for k in kinds:
        k = "fisher" if k == "fisher_svd" else k
        if k not in PROFILE_KINDS:
            raise ValueError(f"curve kind {k!r}: expected some of {list(PROFILE_KINDS) + ['fisher_svd']}")
        need.add(k)
    return tuple(k for k in PROFILE_KINDS if k in need)


def profile_dir(run: Run, root: str | Path | None = None) -> Path:
    """The cached profile directory of ``run``: keyed by model fingerprint, text, samples, seqlen and seed.

    Every curve kind of the run lives there: the spectral kinds are always stored, and loss-aware
    kinds (``fisher``, ``probe``) are added to the same directory when first asked for.
    """
    from rankalloc.profiling.data import cache_dir
    from rankalloc.profiling.text import text_fingerprint

    key = json.dumps({"model": run.loaded.fingerprint, "text": text_fingerprint(run.text), "samples": run.samples,
                      "seqlen": run.seqlen, "seed": run.seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = Path(root) if root is not None else cache_dir() / "profiles"
    return base / f"{Path(str(run.loaded.model_id)).name}-{run.samples}x{run.seqlen}-{digest}"


def profile(run: Run, kinds: Sequence[str] = DEFAULT_KINDS, out: str | Path | None = None, *,
            batch_size: int | None = None, resume: bool = True, progress: bool = True,
            fisher_samples: int | None = None):
    """Profile ``run`` into ``out`` (default :func:`profile_dir`), or open the finished profile there.

    An interrupted run resumes from its first unfinished layer when called again with the same
    arguments; loss-aware kinds missing from a finished profile are added to it. ``batch_size``
    (sequences per forward pass) defaults to the existing profile's, else 8. ``fisher_samples``: Fisher
    output-gradient Grams on the first N calibration sequences only (default all).
    """
    from rankalloc.profiling.profile import profile_model
    from rankalloc.profiling.store import Profile

    want = profile_kinds(kinds)
    path = Path(out) if out is not None else profile_dir(run)
    meta = path / "meta.json"
    if resume and meta.exists():
        prof = Profile.load(path)
        if prof.meta.get("fingerprint") != run.loaded.fingerprint:
            raise ValueError(f"{path} holds a profile of another model (fingerprint {prof.meta.get('fingerprint')}, "
                             f"this model {run.loaded.fingerprint}); use another --out directory")
        if prof.complete and all(k in prof.kinds for k in want):
            return prof
        if batch_size is None:
            batch_size = prof.meta.get("settings", {}).get("batch_size")
    return profile_model(run.model, run.text, out=path, tokenizer=run.tokenizer, n_samples=run.samples,
                         seqlen=run.seqlen, seed=run.seed, device=run.device, kinds=want,
                         model_id=str(run.loaded.model_id), fingerprint=run.loaded.fingerprint,
                         batch_size=batch_size or 8, resume=resume, progress=progress,
                         fisher_samples=fisher_samples)


def linear_params(prof) -> int:
    """Dense parameter count of every profiled linear matrix (the base of "removed")."""
    return int(sum(c.m * c.n for c in prof.components))


# ----------------------------------------------------------------------------- method curves and problems
@dataclass(frozen=True, eq=False)
class MethodCurves:
    """The curves a method allocates over, the cost models it needs, and what it keeps dense outside them.

    ``costs`` overrides registry cost models by resource name (FLAT's ``params`` is :class:`FlatParams`).
    ``fixed_params`` are dense parameters outside the curve set (SoLA's prime neurons); a ``params``
    budget over the curve set is reduced by them so "removed" stays a fraction of all linear parameters.
    ``resources``: the only resources the method can price (None: any registered cost model).
    """

    method: str
    curve_set: object
    costs: Mapping[str, object] = field(default_factory=dict)
    fixed_params: int = 0
    resources: tuple[str, ...] | None = None


def method_curves(prof, method: str = "svd", model=None, *, grid: int = 16, progress: bool = True) -> MethodCurves:
    """The curve set of ``method`` for profile ``prof``.

    - svd, fisher_svd, pgsvd: the profile's curves (one component per linear matrix).
    - sslc: (rank, kept sparsity) candidates: the profile's extra ``sslc`` table, computed with ``model``
      on ranks that are multiples of ``grid`` (and stored) when the profile has none.
    - sola: attention matrices + the marginal-neuron sub-matrices (prime fraction 0.15, the SoLAConfig
      default); the profile's extra ``sola`` set, computed with ``model`` (and stored) when absent.
    - flat: one ``vo`` component per layer (value-head rank) + the other matrices, priced by FlatParams.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHOD_NAMES)}")
    extras = {p.stem for p in (Path(prof.path) / "extra").glob("*.csv")} if hasattr(prof, "path") else set()
    if method in ("svd", "fisher_svd", "pgsvd"):
        return MethodCurves(method, prof.curve_set())
    if method == "sslc":
        if "sslc" in extras:
            return MethodCurves(method, prof.extra("sslc"))
        if model is None:
            raise ValueError(f"method 'sslc': the profile at {prof.path} has no SSLC table; pass the model to "
                             f"compute it (rankalloc.profiling.sslc_table.add_sslc_curves)")
        import numpy as np

        from rankalloc.profiling.sslc_table import add_sslc_curves

        top = max(c.max_rank for c in prof.components)
        return MethodCurves(method, add_sslc_curves(prof, model, np.arange(0, top + 1, grid), SSLC_SPARSITIES,
                                                    progress=progress))
    if method == "sola":
        if "sola" in extras:
            cs = prof.extra("sola")
        elif model is None:
            raise ValueError(f"method 'sola': the profile at {prof.path} has no SoLA curves; pass the model to "
                             f"compute them (rankalloc.profiling.sola.add_sola_curves)")
        else:
            from rankalloc.profiling.sola import add_sola_curves

            cs = add_sola_curves(prof, model, progress=progress).curve_set
        fixed = linear_params(prof) - int(sum(c.m * c.n for c in cs.components))
        return MethodCurves(method, cs, fixed_params=fixed, resources=("params",))
    # flat
    from rankalloc.profiling.flat import flat_curve_set

    cfg = prof.meta["config"]
    cs = prof.extra("flat") if "flat" in extras else flat_curve_set(prof)
    fp = FlatParams(head_dim=cfg["head_dim"], heads=cfg["heads"], kv_heads=cfg["kv_heads"])
    return MethodCurves(method, cs, costs={"params": fp}, resources=("params",))


def method_grid(prof, method: str, grid: int) -> int:
    """FLAT's value-head ranks only go up to head_dim, so its grid is at most head_dim."""
    return min(grid, int(prof.meta["config"]["head_dim"])) if method == "flat" else grid


def reachable_removed(problem: AllocationProblem, resource: str, fixed: float = 0.0) -> float:
    """The largest fraction of ``resource`` removable on the problem's grid (``fixed`` dense cost kept)."""
    dense = problem.dense_costs[resource] + fixed
    return 1.0 - (problem.min_costs[resource] + fixed) / dense if dense > 0 else 0.0


def problem_for(prof, method: str = "svd", kind: str = "fisher", removed: float = 0.2, *,
                cost: str = "params", grid: int = 16, extra_budgets: Sequence[Budget] = (),
                model=None, curves: MethodCurves | None = None) -> AllocationProblem:
    """The allocation problem of ``method`` at ``removed`` (fraction of the dense ``cost`` removed).

    ``curves``: the method's curves from :func:`method_curves` (computed here when None; pass them
    when building many problems). Raises ``ValueError`` for an unknown method, cost model or curve
    kind (listing the known ones), and for a budget outside [0, 1) or beyond what the grid can
    reach (saying what is reachable).
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHOD_NAMES)}")
    mc = curves if curves is not None else method_curves(prof, method, model, grid=grid)
    if mc.method != method:
        raise ValueError(f"problem_for: curves of method {mc.method!r} given for method {method!r}")
    if mc.resources is not None and cost not in mc.resources:
        raise ValueError(f"method {method!r} is priced in {list(mc.resources)} only; received cost {cost!r}")
    if cost not in mc.costs and cost not in COST_MODELS:
        raise ValueError(f"unknown cost model {cost!r}; expected one of {sorted(COST_MODELS)} "
                         f"(a plugin may register more)")
    cs = mc.curve_set
    if kind not in cs.kinds:
        hint = " (profile with kinds including 'fisher')" if kind in ("fisher", "fisher_svd") else ""
        raise ValueError(f"method {method!r}: curve kind {kind!r} is not available{hint}; this profile offers "
                         f"{list(cs.kinds)} for it")
    g = method_grid(prof, method, grid)
    costs = {cost: mc.costs[cost] if cost in mc.costs else COST_MODELS[cost]()}
    base = AllocationProblem.from_profiles(cs, costs, Budget(cost, removed=0.0), kind=kind, grid=g,
                                           name=f"{method}/{kind}")
    fixed = mc.fixed_params if cost == "params" else 0
    reach = reachable_removed(base, cost, fixed)
    where = f"with method {method}, cost {cost} and grid {g}, 0 to {reach:.2%} removed is reachable"
    if isinstance(removed, bool) or not isinstance(removed, (int, float)) or not 0.0 <= removed < 1.0:
        raise ValueError(f"budget {removed!r}: expected the fraction removed in [0, 1); {where}")
    if base.dense_costs[cost] <= 0:
        raise ValueError(f"cost {cost!r}: the dense {cost} cost of these matrices is 0 (for kv, no k/v "
                         f"projection), so no fraction of it can be removed")
    if fixed:
        limit = (1.0 - removed) * (base.dense_costs[cost] + fixed) - fixed
        if limit < 0:
            raise ValueError(f"budget {removed:g} ({removed:.2%} removed) is unreachable: {method} keeps "
                             f"{fixed:,} parameters dense; {where}")
        budget = Budget(cost, limit=limit)
    else:
        budget = Budget(cost, removed=float(removed))
    problem = base.with_budgets(budget, *extra_budgets)
    why = problem.infeasibility_message()
    if why is not None:
        raise ValueError(f"budget {removed:g} ({removed:.2%} removed) is unreachable: {why}; {where}")
    return problem


# ----------------------------------------------------------------------------- allocations on disk
def allocation_record(allocation, prof, method: str, cost: str, removed: float) -> dict:
    """What gets written as an allocation JSON: :meth:`Allocation.to_dict` plus the inputs that produced it
    (read back by :func:`load_allocation`)."""
    out = allocation.to_dict()
    out.update({"method": method, "kind": allocation.problem.objective, "cost_model": cost,
                "grid": allocation.problem.grid, "budget_removed": {cost: float(removed)},
                "curves": str(getattr(prof, "path", ""))})
    return out


def load_allocation(prof, data, method: str = "svd", model=None):
    """Rebuild the :class:`Allocation` saved in ``data`` (a dict or a JSON path) against ``prof``'s curves.

    The choices are re-priced on the method's curves (every rank is a candidate, so any grid works)
    under the saved absolute budgets. Raises ``ValueError`` when the JSON names components the
    method's curves do not have, lacks some, or was priced with a cost model that is not registered.
    """
    from rankalloc.allocators.allocation import Allocation

    if not isinstance(data, Mapping):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"allocation file {path} does not exist; create one with "
                                    f"`rankalloc allocate --curves PROFILE_DIR --budget 0.3 --out {path}`")
        data = json.loads(path.read_text())
    for key in ("choices", "budget"):
        if key not in data:
            raise ValueError(f"allocation JSON: missing {key!r}; expected the output of `rankalloc allocate --out`")
    saved = data.get("method")
    if saved is not None and saved != method:
        raise ValueError(f"the allocation was made for method {saved!r}; compress it with --method {saved}, "
                         f"received {method!r}")
    kind = data.get("kind") or data.get("objective_kind")
    mc = method_curves(prof, method, model)
    if kind not in mc.curve_set.kinds:
        raise ValueError(f"the allocation optimised curve kind {kind!r}, which the {method} curves of {prof.path} "
                         f"do not have ({list(mc.curve_set.kinds)}); was it made from another profile?")
    names = {c.name for c in mc.curve_set.components}
    unknown = sorted(set(data["choices"]) - names)
    if unknown:
        raise ValueError(f"the allocation names {len(unknown)} components that the {method} curves of {prof.path} "
                         f"do not have (e.g. {unknown[:3]}); was it made from another profile or method?")
    costs, budgets = {}, []
    for res, limit in data["budget"].items():
        if res in mc.costs:
            costs[res] = mc.costs[res]
        elif res in COST_MODELS:
            costs[res] = COST_MODELS[res]()
        else:
            raise ValueError(f"the allocation is priced with cost model {res!r}, which is not registered; load the "
                             f"plugin that defines it (--plugin FILE.py); known: {sorted(COST_MODELS)}")
        budgets.append(Budget(res, limit=float(limit)))
    problem = AllocationProblem(mc.curve_set.curves(kind, grid=1), tuple(budgets), costs, grid=1, objective=kind,
                                layer_scores=mc.curve_set.layer_scores, name=f"{method}/{kind}")
    return Allocation.from_dict(problem, data)


# ----------------------------------------------------------------------------- compress and evaluate
def compress(model, prof, allocation, method: str = "svd", *, config=None, inplace: bool = False,
             progress: bool = True):
    """Build the compressed model of ``allocation`` with ``method``; returns ``(model, report)``.

    ``model``: the dense model (or a :class:`Run`); it is deep-copied unless ``inplace``.
    ``config``: the method's config (default: its config class with default settings).
    """
    from rankalloc.decomposers import METHODS, compress_

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    config_cls = METHODS[method][0]
    if config is None:
        config = config_cls()
    elif type(config) is not config_cls:
        raise ValueError(f"method {method!r} takes a {config_cls.__name__}, received {type(config).__name__}")
    model = model.model if isinstance(model, Run) else model
    model = model if inplace else copy.deepcopy(model)
    report = compress_(model, allocation, config, prof, progress=progress)
    return model, report


def evaluation_device(device: str):
    """``"auto"`` -> CUDA when available, else CPU (as profiling does)."""
    from rankalloc.profiling.profile import resolve_device

    return resolve_device(device)


def evaluate(model, run: Run, *, batch_size: int = 4, progress: bool = True, ids=None):
    """Perplexity on the held-out evaluation split (protocol stated in the result).

    ``ids``: the evaluation windows (default ``evaluation_ids(run.tokenizer, run.text, run.eval_seqlen,
    run.eval_windows)``); pass them to score several models on the same windows without re-tokenizing.
    """
    from rankalloc.decomposers.evaluate import perplexity

    if ids is None:
        ids = evaluation_ids(run)
    source = f"held-out evaluation split of text {run.text.name!r} ({run.text.source_id})"
    return perplexity(model, ids, batch_size=batch_size, device=evaluation_device(run.device), progress=progress,
                      source=source)


def evaluation_ids(run: Run):
    """The evaluation windows of ``run`` (``(W, eval_seqlen)`` LongTensor)."""
    from rankalloc.profiling.text import evaluation_ids as windows

    return windows(run.tokenizer, run.text, run.eval_seqlen, run.eval_windows)


def profiled_model(prof, model: str | None = None) -> str | None:
    """The ``--model`` that loads the model ``prof`` was made from: ``model`` when given, else the folder
    or hub id recorded in the profile (None for the default SmolLM2)."""
    if model is not None:
        return model
    from rankalloc.profiling.data import SMOLLM2_ID

    recorded = prof.meta.get("model_id")
    if not recorded or recorded == SMOLLM2_ID:
        return None
    return recorded


def check_same_model(loaded, prof) -> None:
    """``ValueError`` unless ``loaded`` (a LoadedModel) is the model ``prof`` was profiled from."""
    want = prof.meta.get("fingerprint")
    if want is not None and loaded.fingerprint != want:
        raise ValueError(f"the model {loaded.model_id!r} (fingerprint {loaded.fingerprint}) is not the model the "
                         f"profile at {prof.path} was made from ({prof.meta.get('model_id')!r}, fingerprint {want}); "
                         f"pass that model with --model")
