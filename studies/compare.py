"""Every allocator at every removed budget, compressed and evaluated: one table.

:func:`compare` takes a prepared run and its profile, solves each (method, curve kind, budget)
problem with each solver, builds the compressed model, measures its perplexity on the held-out
windows and returns one row per solve. The dense perplexity is measured once, on the same windows.
:func:`format_table` renders the frame for a terminal.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Callable, Sequence

COLUMNS = ("method", "solver", "kind", "budget_removed", "cost_model", "status", "predicted_objective",
           "removed_budgeted", "removed_linear_params", "removed_model_params", "ppl", "dense_ppl", "solve_s",
           "compress_s", "allocation")
"""Columns of the comparison frame (``removed_*`` are realized fractions REMOVED)."""

HEADERS = {"method": "method", "solver": "solver", "kind": "kind", "budget_removed": "budget removed",
           "cost_model": "cost", "status": "status", "predicted_objective": "predicted objective",
           "removed_budgeted": "removed (cost)", "removed_linear_params": "params removed (linear)",
           "removed_model_params": "params removed (model)", "ppl": "perplexity", "dense_ppl": "dense ppl",
           "solve_s": "solve s", "compress_s": "compress s", "allocation": "allocation"}


def _name(method: str, kind: str, solver: str, removed: float) -> str:
    return f"{method}-{kind}-{solver}-{removed:.4g}.json"


def compare(run, prof, ratios: Sequence[float], solvers: Sequence[str] = ("uniform", "exact"),
            methods: Sequence[str] = ("fisher_svd",), kinds: Sequence[str] = ("fisher",), *, cost: str = "params",
            grid: int = 16, time_limit: float | None = None, out: str | Path | None = None, batch_size: int = 4,
            progress: bool = True, log: Callable[[str], None] | None = None, sequential=None):
    """Solve, compress and evaluate every (method, kind, budget, solver); returns a ``pandas.DataFrame``.

    Args:
        run: a :class:`~rankalloc.profiling.run.Run` (model, tokenizer, text, evaluation settings).
        prof: the profile of ``run.model``.
        ratios: budgets, each the fraction of the dense ``cost`` of the linear matrices REMOVED.
        solvers, methods, kinds: registered solver names, decomposition methods, curve kinds.
        cost: the budgeted resource (a registered cost model name).
        grid: rank grid of the candidates. time_limit: seconds, for solvers that take one.
        out: directory for one allocation JSON per row (``rankalloc compress --allocation`` reads them).
        log: called with a one-line note for each solve that produced no allocation.
        sequential: a :class:`~rankalloc.decomposers.sequential.SequentialConfig`: every allocation is built with
            sequential calibration on the run's calibration sequences (per-matrix methods and flat, model in memory).

    Every input is validated before any model is built: an unknown solver, method, cost model or
    curve kind, or an unreachable budget, raises ``ValueError`` saying what is available.
    The frame holds :data:`COLUMNS`; ``attrs`` hold the dense perplexity, its protocol and counts.
    A solver that finds no allocation within a budget (or raises ``ValueError`` on the problem, e.g.
    IPRS without layer scores) gets a row with its status and NaN measurements, and ``log`` says why.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from rankalloc.decomposers.base import factorize_once
    from rankalloc.decomposers.evaluate import evaluate, model_params
    from rankalloc.decomposers.problems import method_curves, problem_for
    from rankalloc.profiling.run import evaluation_ids, linear_params
    from rankalloc.studies.options import build_solvers

    ratios, methods, kinds = list(ratios), list(methods), list(kinds)
    for what, items in (("ratios", ratios), ("solvers", solvers), ("methods", methods), ("kinds", kinds)):
        if not len(items):
            raise ValueError(f"compare: expected at least one of {what}, received none")
    built = build_solvers(solvers, time_limit)  # unknown name: ValueError listing the known ones
    if sequential is not None:
        from rankalloc.decomposers.sequential import check_sequential

        from rankalloc.profiling.run import profile_calibration_ids

        for m in methods:
            check_sequential(m, prof, run, sequential.samples)
        profile_calibration_ids(prof, run.tokenizer, run.text)  # another text is refused before any work
    curves = {m: method_curves(prof, m, run.model, grid=grid, progress=progress) for m in methods}
    cases = {(m, k, r): problem_for(prof, m, k, r, cost=cost, grid=grid, curves=curves[m])
             for m in methods for k in kinds for r in ratios}  # every problem first: bad input fails before compressing
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    ids = evaluation_ids(run)
    dense = evaluate(run.model, run, batch_size=batch_size, progress=progress, ids=ids)
    ctx = dict(run=run, prof=prof, cost=cost, curves=curves, outdir=outdir, ids=ids, batch_size=batch_size,
               sequential=sequential,
               dense_ppl=dense.ppl, dense_model_params=model_params(run.model), dense_linear=linear_params(prof),
               say=log or (lambda msg: None))
    rows = []
    bar = tqdm(total=len(cases) * len(built), desc="compare", unit="solve", disable=not progress)
    with factorize_once():  # one factorization per matrix serves every allocation, each truncated at its rank
        for (m, k, r), problem in cases.items():
            for s, solver in built.items():
                bar.set_postfix_str(f"{m}/{k} {s} at {r:.0%} removed")
                rows.append(_row(ctx, m, k, r, problem, s, solver))
                gc.collect()  # the compressed copy is gone; give its memory back before the next one
                bar.update(1)
    bar.close()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame.attrs.update(dense_ppl=dense.ppl, protocol=dense.protocol, dense_model_params=ctx["dense_model_params"],
                       dense_linear_params=ctx["dense_linear"], profile=str(prof.path))
    return frame


def _row(ctx: dict, m: str, k: str, r: float, problem, s: str, solver) -> dict:
    """One solve, compression and evaluation of :func:`compare` (NaN measurements when no allocation came back)."""
    from rankalloc.allocators.allocation import solved
    from rankalloc.decomposers.problems import allocation_record, compressed_perplexity
    from rankalloc.profiling.files import atomic_write_json

    cost = ctx["cost"]
    row = dict(method=m, solver=s, kind=k, budget_removed=float(r), cost_model=cost, status="",
               predicted_objective=math.nan, removed_budgeted=math.nan, removed_linear_params=math.nan,
               removed_model_params=math.nan, ppl=math.nan, dense_ppl=ctx["dense_ppl"], solve_s=math.nan,
               compress_s=math.nan, allocation="")
    try:
        alloc = solved(solver, problem)
    except ValueError as exc:
        ctx["say"](f"{m}/{k} at {r:.2%} removed: solver {s} failed: {' '.join(str(exc).split())}")
        return dict(row, status="error")
    row.update(status=str(alloc.status), solve_s=alloc.solve_seconds)
    if not alloc.feasible:
        ctx["say"](f"{m}/{k} at {r:.2%} removed: solver {s} found no allocation ({alloc.status}): {alloc.message}")
        return row
    fixed = ctx["curves"][m].fixed_params if cost == "params" else 0  # SoLA's prime neurons count as kept
    dense_cost = problem.dense_costs[cost] + fixed
    row.update(predicted_objective=alloc.objective,
               removed_budgeted=1.0 - (alloc.cost[cost] + fixed) / dense_cost if dense_cost else 0.0)
    if ctx["outdir"] is not None:
        row["allocation"] = _name(m, k, s, r)
        record = allocation_record(alloc, ctx["prof"], m, cost, r)
        atomic_write_json(ctx["outdir"] / row["allocation"], record)
    t0 = time.perf_counter()
    res, kept = compressed_perplexity(ctx["run"], ctx["prof"], alloc, m, ids=ctx["ids"], batch_size=ctx["batch_size"],
                                      sequential=ctx["sequential"])
    row["compress_s"] = time.perf_counter() - t0 - res.seconds  # compression alone (out of core: also the writing)
    dense_params = ctx["dense_model_params"]
    row["removed_linear_params"] = (dense_params - kept) / ctx["dense_linear"]
    row["removed_model_params"] = 1.0 - kept / dense_params
    row["ppl"] = res.ppl
    return row


def _cell(col: str, v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if col.startswith(("removed", "budget")):
            return f"{v:.2%}"
        if col.endswith("_s"):
            return f"{v:.2f}"
        return f"{v:.6g}" if col == "predicted_objective" else f"{v:.4f}"
    return str(v)


def format_table(frame, columns: Sequence[str] | None = None) -> str:
    """The frame as an aligned text table (fractions as percentages, missing values as '-')."""
    cols = list(columns or [c for c in COLUMNS if c != "allocation"])
    text = [[HEADERS.get(c, c) for c in cols]]
    for rec in frame[cols].to_dict("records"):
        text.append([_cell(c, rec[c]) for c in cols])
    widths = [max(len(r[i]) for r in text) for i in range(len(cols))]
    left = {"method", "solver", "kind", "cost_model", "status", "allocation"}
    lines = []
    for j, r in enumerate(text):
        lines.append("  ".join(x.ljust(w) if c in left else x.rjust(w) for x, w, c in zip(r, widths, cols)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
