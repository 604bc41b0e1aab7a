# From a method's curves to its budget problem and back: budgets as fractions removed, allocations on disk.
"""The budget problem of a registered method, allocations saved as JSON, and the copy-then-compress wrapper.

Budgets are fractions REMOVED of the dense cost of the profiled linear matrices (SoLA's prime neurons, kept dense
outside its curves, count as kept). Every function takes explicit arguments; nothing reads a command-line
namespace.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Mapping, Sequence

from rankalloc.allocators.problem import AllocationProblem, Budget, removed_fraction
from rankalloc.allocators.registry import get_cost_model
from rankalloc.decomposers.registry import MethodCurves, get_method


def method_curves(prof, method: str = "svd", model=None, *, grid: int = 16, progress: bool = True) -> MethodCurves:
    """The curve set of the registered ``method`` for profile ``prof`` (``model`` computes what the profile lacks)."""
    m = get_method(method)
    if model is not None:
        m.check_model(model)
    return m.curves(prof, model, grid=grid, progress=progress)


def method_grid(mc: MethodCurves, grid: int) -> int:
    """``grid``, capped at what the method's candidates admit (FLAT's value-head ranks stop at head_dim)."""
    return grid if mc.max_grid is None else min(grid, mc.max_grid)


def reachable_removed(problem: AllocationProblem, resource: str, fixed: float = 0.0) -> float:
    """The largest fraction of ``resource`` removable on the problem's grid (``fixed`` dense cost kept)."""
    dense = problem.dense_costs[resource] + fixed
    return 1.0 - (problem.min_costs[resource] + fixed) / dense if dense > 0 else 0.0


def cost_model(mc: MethodCurves, cost: str):
    """The cost model that prices ``mc`` in ``cost``: the method's own (FLAT's ``FlatParams``), else the registry's;
    a resource the method cannot be priced in is a ``ValueError``."""
    get_method(mc.method).check_cost(cost)
    return mc.costs[cost] if cost in mc.costs else get_cost_model(cost)()


def problem_for(prof, method: str = "svd", kind: str = "fisher", removed: float = 0.2, *,
                cost: str = "params", grid: int = 16, extra_budgets: Sequence[Budget] = (),
                model=None, curves: MethodCurves | None = None) -> AllocationProblem:
    """The allocation problem of ``method`` at ``removed`` (fraction of the dense ``cost`` removed).

    ``curves``: the method's curves from :func:`method_curves` (computed here when None; pass them when building
    many problems). Raises ``ValueError`` for an unknown method, cost model or curve kind (listing the known ones),
    and for a budget outside [0, 1) or beyond what the grid can reach (saying what is reachable).
    """
    get_method(method)
    mc = curves if curves is not None else method_curves(prof, method, model, grid=grid)
    if mc.method != method:
        raise ValueError(f"problem_for: curves of method {mc.method!r} given for method {method!r}")
    costs = {cost: cost_model(mc, cost)}
    cs = mc.curve_set
    get_method(method).check_kind(kind)
    if kind not in cs.kinds:
        hint = (" (profile with kinds including 'fisher')" if kind in ("fisher", "fisher_svd")
                and "fisher" not in prof.kinds else "")
        raise ValueError(f"method {method!r}: curve kind {kind!r} is not available{hint}; this profile offers "
                         f"{list(cs.kinds)} for it")
    g = method_grid(mc, grid)
    base = AllocationProblem.from_profiles(cs, costs, Budget(cost, removed=0.0), kind=kind, grid=g,
                                           name=f"{method}/{kind}")
    fixed = mc.fixed_params if cost == "params" else 0
    where = (f"with method {method}, cost {cost} and grid {g}, 0 to {reachable_removed(base, cost, fixed):.2%} "
             f"removed is reachable")
    try:
        removed_fraction(removed, f"budget {removed!r}")
    except ValueError as exc:
        raise ValueError(f"{exc}; {where}") from None
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


def allocation_record(allocation, prof, method: str, cost: str, removed: float) -> dict:
    """What gets written as an allocation JSON: :meth:`Allocation.to_dict` plus the inputs that produced it
    (read back by :func:`load_allocation`)."""
    out = allocation.to_dict()
    out.update({"method": method, "kind": allocation.problem.objective, "cost_model": cost,
                "grid": allocation.problem.grid, "budget_removed": {cost: float(removed)},
                "curves": str(getattr(prof, "path", ""))})
    from rankalloc.allocators.allocation import seal
    from rankalloc.profiling.store import identity

    if getattr(prof, "meta", None):
        out["profile"] = identity(prof.meta)

    return seal(out)


def check_same_model(src: str, data: Mapping, prof) -> None:
    """``ValueError`` when the allocation records the profile it was solved on and that profile's model is not the
    model of ``prof``: its ranks were chosen on another model's curves, even where the matrix names and shapes agree.
    The same model calibrated otherwise is accepted (the choices are re-priced on ``prof``'s curves)."""
    made = data.get("profile")
    here = (getattr(prof, "meta", None) or {}).get("fingerprint")
    if not isinstance(made, Mapping) or made.get("fingerprint") is None or here is None:
        return  # an allocation from a curves CSV, or written before the record: nothing to check against
    if made["fingerprint"] != here:
        raise ValueError(f"{src}: solved on the curves of model {made.get('model_id')!r} (fingerprint "
                         f"{made['fingerprint']}), but the profile at {prof.path} is of model "
                         f"{prof.meta.get('model_id')!r} (fingerprint {here}); allocate on this profile "
                         f"(`rankalloc allocate --curves {prof.path}`)")


def _choice(src: str, name: str, value):
    """A saved choice (``"dense"``, a rank >= 0, or ``[rank, kept sparse fraction]``) as a :class:`Choice`."""
    from rankalloc.allocators.costs import DENSE
    from rankalloc.allocators.problem import Choice

    def rank_ok(r):
        return isinstance(r, int) and not isinstance(r, bool) and r >= 0

    if value == "dense":
        return Choice(DENSE)
    if rank_ok(value):
        return Choice(value)
    if (isinstance(value, list) and len(value) == 2 and rank_ok(value[0]) and not isinstance(value[1], bool)
            and isinstance(value[1], (int, float)) and 0 <= value[1] <= 1):
        return Choice(value[0], float(value[1]))
    raise ValueError(f"{src}: component {name!r}: expected a rank (an integer >= 0), \"dense\" or [rank, kept "
                     f"sparse fraction], received {value!r}")


def load_allocation(prof, data, method: str = "svd", model=None):
    """Rebuild the :class:`Allocation` saved in ``data`` (a dict or a JSON path) against ``prof``'s curves.

    The choices are re-priced on the method's curves (every rank is a candidate, so any grid works) under the saved
    absolute budgets. Raises ``ValueError`` naming the file when it is not JSON, when its contents no longer match
    the sha256 it was written with (damaged or edited; see :func:`~rankalloc.allocators.allocation.check_seal`),
    when a field is malformed, when it names components the method's curves do not have or lacks some, when it was
    priced with a cost model that is not registered, and when its choices exceed the budget it records.
    """
    from rankalloc.allocators.allocation import Allocation, Status, check_seal
    from rankalloc.profiling.files import read_json

    src = "allocation JSON"
    if not isinstance(data, Mapping):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"allocation file {path} does not exist; create one with "
                                    f"`rankalloc allocate --curves PROFILE_DIR --budget 0.3 --out {path}`")
        src = f"allocation file {path}"
        data = read_json(path, "expected the output of `rankalloc allocate --out`")
        if not isinstance(data, dict):
            raise ValueError(f"{src}: expected a JSON object, the output of `rankalloc allocate --out`")
        check_seal(data, src)
    for key in ("choices", "budget"):
        if key not in data:
            raise ValueError(f"{src}: missing {key!r}; expected the output of `rankalloc allocate --out`")
    if not isinstance(data["choices"], Mapping) or not isinstance(data["budget"], Mapping) or not data["budget"]:
        raise ValueError(f"{src}: expected 'choices' {{component: choice}} and 'budget' {{resource: limit}}")
    for res, limit in data["budget"].items():
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
            raise ValueError(f"{src}: budget {res!r}: expected a finite number >= 0, received {limit!r}")
    if data.get("status", "feasible") not in {s.value for s in Status}:
        raise ValueError(f"{src}: status: expected one of {[s.value for s in Status]}, received {data['status']!r}")
    saved = data.get("method")
    if saved is not None and saved != method:
        raise ValueError(f"{src}: made for method {saved!r}; compress it with --method {saved}, received "
                         f"{method!r}")
    check_same_model(src, data, prof)
    kind = data.get("kind") or data.get("objective_kind")
    mc = method_curves(prof, method, model)
    if kind not in mc.curve_set.kinds:
        raise ValueError(f"{src}: it optimised curve kind {kind!r}, which the {method} curves of {prof.path} "
                         f"do not have ({list(mc.curve_set.kinds)}); was it made from another profile?")
    names = {c.name for c in mc.curve_set.components}
    choices = {n: _choice(src, n, v) for n, v in data["choices"].items()}
    unknown = sorted(set(choices) - names)
    if unknown:
        raise ValueError(f"{src}: names {len(unknown)} components that the {method} curves of {prof.path} "
                         f"do not have (e.g. {unknown[:3]}); was it made from another profile or method?")
    costs = {res: cost_model(mc, res) for res in data["budget"]}
    budgets = tuple(Budget(res, limit=float(limit)) for res, limit in data["budget"].items())
    problem = AllocationProblem(mc.curve_set.curves(kind, grid=1), budgets, costs, grid=1, objective=kind,
                                layer_scores=mc.curve_set.layer_scores, name=f"{method}/{kind}")
    idx = []
    for cv in problem.curves:
        c = cv.component.name
        if c not in choices:
            raise ValueError(f"{src}: no choice for component {c!r} ({len(choices)} choices for "
                             f"{len(problem.curves)} components)")
        try:
            idx.append(cv.index_of(choices[c]))
        except ValueError as exc:
            raise ValueError(f"{src}: {exc}") from None
    _, cost = problem.evaluate(idx)
    if not problem.is_feasible(cost):
        over = "; ".join(f"{r} {cost[r]:,.6g} > {problem.limits[r]:,.6g}" for r in problem.resources
                         if cost[r] > problem.limits[r])
        raise ValueError(f"{src}: its choices cost more than the budget it records ({over}); the choices and the "
                         f"budget disagree (edited by hand?): fix them, or allocate again")
    return Allocation.from_dict(problem, dict(data, choices={n: ch.to_json() for n, ch in choices.items()}))


def compress(model, prof, allocation, method: str = "svd", *, config=None, inplace: bool = False,
             progress: bool = True, sequential=None, ids=None):
    """Build the compressed model of ``allocation`` with ``method``; returns ``(model, report)``.

    ``model``: the dense model (or a :class:`~rankalloc.profiling.run.Run`); it is deep-copied unless ``inplace``.
    ``config``: the method's config (default: its config class with default settings). Under several processes
    (torchrun) the decoder layers are split across them and every rank gets the same compressed model
    (:func:`~rankalloc.decomposers.streamed.compress_in_parts`).
    ``sequential``: a :class:`~rankalloc.decomposers.sequential.SequentialConfig` to fit each matrix at the inputs
    of the already-compressed layers, on the calibration ``ids`` (default: the profile's calibration sequences, rebuilt
    from the Run's text and checked against the profile).
    """
    from rankalloc.decomposers.base import compress_
    from rankalloc.profiling import distributed

    if sequential is not None:
        from rankalloc.decomposers.sequential import compress_sequential_

        if ids is None:
            if not hasattr(model, "tokenizer"):
                raise ValueError("sequential calibration: pass the calibration ids, or a Run that can make them")
            from rankalloc.profiling.run import profile_calibration_ids

            ids = profile_calibration_ids(prof, model.tokenizer, model.text)  # the profile's, not the run's settings
        if distributed.world() > 1:
            raise ValueError("sequential calibration: runs in one process (each layer waits for the one before)")

    m = get_method(method)
    if config is None:
        config = m.config()
    elif type(config) is not m.config:
        raise ValueError(f"method {method!r} takes a {m.config.__name__}, received {type(config).__name__}")
    model = getattr(model, "model", model) if not hasattr(model, "forward") else model
    model = model if inplace else copy.deepcopy(model)
    if sequential is not None:
        return model, compress_sequential_(model, allocation, config, prof, ids, sequential, progress=progress)
    if distributed.world() > 1:
        from rankalloc.decomposers.streamed import compress_in_parts

        return model, compress_in_parts(model, allocation, config, prof, progress=progress)
    return model, compress_(model, allocation, config, prof, progress=progress)


def compressed_perplexity(run, prof, allocation, method: str, *, ids=None, batch_size: int = 4, config=None,
                          sequential=None):
    """``(perplexity result, whole-model parameters kept)`` of ``allocation`` built with ``method`` on ``run``'s model.

    In memory: a compressed copy, scored and dropped. Out of core (``run.loaded.out_of_core``): a fresh skeleton is
    compressed one layer at a time into a temporary folder (``compress_to_folder``), which is then scored one layer
    at a time (``open_compressed`` + ``streamed_perplexity``) and removed; the dense skeleton is never changed.
    ``sequential``: a ``SequentialConfig`` (in memory only), on the run's calibration sequences.
    """
    import tempfile

    from rankalloc.decomposers.evaluate import evaluate, model_params

    if sequential is not None and getattr(run.loaded, "out_of_core", False):
        raise ValueError("sequential calibration: needs the model in memory (run without --out-of-core)")
    if not getattr(run.loaded, "out_of_core", False):
        model, _ = compress(run if sequential is not None else run.model, prof, allocation, method, config=config,
                            progress=False, sequential=sequential)
        return evaluate(model, run, batch_size=batch_size, progress=False, ids=ids), model_params(model)
    from dataclasses import replace

    from rankalloc.decomposers.io import open_compressed
    from rankalloc.decomposers.streamed import compress_to_folder
    from rankalloc.profiling.weights import load_out_of_core

    skeleton, weights = load_out_of_core(weights_folder(run.loaded), run.loaded.weights.dtype)
    fresh = replace(run.loaded, model=skeleton, weights=weights)
    with tempfile.TemporaryDirectory(prefix="rankalloc-compressed-") as tmp:
        compress_to_folder(fresh, prof, allocation, method, tmp, config=config, progress=False)
        model, cw = open_compressed(tmp, out_of_core=True)
        return evaluate(model, run, batch_size=batch_size, progress=False, ids=ids, weights=cw), model_params(model)


def weights_folder(loaded):
    return loaded.weights.checkpoint.folder
