# Which curve kind to trust: rank correlation of each kind's predicted objective with the measured calibration-loss
# increase of whole allocations (profiling.predict.curve_kind_agreement).
"""Curve-kind agreement on a real model (default SmolLM2-135M + gensim Wikipedia text)::

    python -m rankalloc.studies.study_agreement --samples 64 --profile runs/smol64 --out runs/agreement

Allocations: every solver/objective pair of :data:`ALLOCATORS` at every ratio (fraction of the
decoder linear parameters removed, grid 16), so the set mixes allocations that each kind likes and
dislikes. Each is applied as whitened (SVD-LLM) truncation; its measured loss increase is the mean
next-token cross-entropy on the first ``--probe-samples`` calibration sequences minus the dense one.
Printed per kind: Spearman and Kendall over all allocations ("pooled", where the removed fraction
alone already orders much of the set) and the mean Spearman within one ratio ("within ratio", the
harder question an allocator actually faces: which allocation of the SAME budget is better).
Not a test: it prints figures.

``--per-method``: every registered method (or ``--methods``) builds its own allocations with its own
decomposer, and the loss increase is measured on the EVALUATION text (``--windows`` held-out windows):
``ln(ppl / dense ppl)``. Per method and loss-unit kind it prints the within-budget Spearman of the predicted
objective with the measured increase, and for the method's recommended kind the ratio of the exact optimum's
predicted increase to its measured one at each ratio (:func:`method_agreement`)::

    python -m rankalloc.studies.study_agreement --samples 64 --per-method --windows 8 --out runs/agreement-methods
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rankalloc.profiling.files import atomic_write_csv

KINDS = ("whitened", "energy", "relative", "epsilon", "fisher", "fisher_svd")

ALLOCATORS = (
    # (solver, objective kind)
    ("uniform", "whitened"),
    ("epsilon", "epsilon"),
    ("greedy", "energy"),
    ("exact", "whitened"),
    ("exact", "relative"),
    ("exact", "energy"),
    ("exact", "fisher"),
    ("exact", "fisher_svd"),
    ("greedy", "fisher_svd"),
)


def allocations_for(prof, ratios, allocators=ALLOCATORS, grid: int = 16) -> dict:
    """``label -> Allocation`` for every (solver, kind) of ``allocators`` at every ratio (method svd)."""
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.problems import method_curves, problem_for

    curves = method_curves(prof, "svd", grid=grid)
    out = {}
    for ratio in ratios:
        for solver, kind in allocators:
            problem = problem_for(prof, "svd", kind, ratio, grid=grid, curves=curves)
            out[f"{ratio:.2f}:{solver}:{kind}"] = get_solver(solver).solve(problem)
    return out


def within_ratio_spearman(per, kinds) -> dict:
    """Mean over ratios of Spearman(pred_kind, measured increase) among the allocations of one ratio."""
    import numpy as np
    from scipy.stats import spearmanr

    ratio = per.allocation.str.split(":").str[0]
    out = {}
    for k in kinds:
        vals = []
        for _, g in per.groupby(ratio):
            p, d = g[f"pred_{k}"].to_numpy(), g["measured_increase"].to_numpy()
            vals.append(np.nan if len(g) < 3 or np.ptp(p) == 0 or np.ptp(d) == 0 else spearmanr(p, d)[0])
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


METHOD_ALLOCATORS = (
    # (solver, objective kind): each method's allocations; a kind the method's curves lack is skipped
    ("uniform", "whitened"),
    ("epsilon", "epsilon"),
    ("greedy", "energy"),
    ("greedy", "fisher_svd"),
    ("exact", "relative"),
    ("exact", "fisher_svd"),
    ("exact", "fisher"),
)

LOSS_KINDS = ("fisher", "fisher_svd")


def predicted(problem, allocation) -> float:
    """``sum_l e_l(choice_l)`` of ``problem``'s curves (another kind's problem over the same candidates) at the
    choices of ``allocation``."""
    chosen = {c.name: ch for c, ch in ((cv.component, cv.choice(j)) for cv, j in
                                         zip(allocation.problem.curves, allocation.choice_index))}
    return float(sum(cv.errors[cv.index_of(chosen[cv.component.name])] for cv in problem.curves))


def method_agreement(run, prof, methods, ratios, *, grid: int = 16, eval_ids=None, progress: bool = True,
                     csv=None):
    """Rows ``(method, ratio, solver, kind, removed, ppl, measured, pred_<kind>...)``: each method's allocations
    (:data:`METHOD_ALLOCATORS` plus its paper's allocator; a method with curves of one kind only, such as SSLC's
    table, runs each of those solvers on that kind) compressed with its own decomposer and scored on the
    evaluation windows; ``measured`` is ``ln(ppl / dense ppl)`` in nats. ``csv``: a path the rows so far are
    written to after each allocation."""
    import math

    import pandas as pd
    from tqdm.auto import tqdm

    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.base import factorize_once
    from rankalloc.decomposers.evaluate import evaluate
    from rankalloc.decomposers.problems import compress, method_curves, problem_for
    from rankalloc.decomposers.registry import get_method
    from rankalloc.profiling.run import evaluation_ids

    ids = eval_ids if eval_ids is not None else evaluation_ids(run)
    dense = evaluate(run.model, run, ids=ids, progress=False).ppl
    rows = []
    with factorize_once():
        for method in methods:
            m = get_method(method)
            mc = method_curves(prof, method, run.model, grid=grid, progress=progress)
            kinds = set(mc.curve_set.kinds)
            if len(kinds) == 1:  # one kind (SSLC's (rank, sparsity) table): every solver runs on it
                todo = list(dict.fromkeys((solver, *kinds) for solver, _ in METHOD_ALLOCATORS))
            else:
                todo = [a for a in METHOD_ALLOCATORS if a[1] in kinds]
            for paper in ((m.solver, m.kind), ("iprs", "whitened") if method == "flat" else None):
                if paper is not None and paper not in todo and paper[1] in kinds:
                    todo.append(paper)  # the method's recommended allocator, and FLAT's own (IPRS)
            for ratio in ratios:
                probs = {k: problem_for(prof, method, k, ratio, grid=grid, curves=mc) for k in kinds}
                for solver, kind in tqdm(todo, desc=f"{method} {ratio:.0%}", disable=not progress, leave=False):
                    a = get_solver(solver).solve(probs[kind])
                    model, _ = compress(run, prof, a, method, progress=False)
                    ppl = evaluate(model, run, ids=ids, progress=False).ppl
                    del model
                    row = dict(method=method, ratio=ratio, solver=solver, kind=kind, removed=a.removed(), ppl=ppl,
                               dense_ppl=dense, measured=math.log(ppl / dense))
                    row.update({f"pred_{k}": predicted(probs[k], a) for k in LOSS_KINDS if k in probs})
                    rows.append(row)
                    if csv is not None:
                        atomic_write_csv(csv, pd.DataFrame(rows), index=False)
                    print(f"{method:10s} {ratio:.0%} {solver:8s} {kind:10s} ppl {ppl:9.2f} measured "
                          f"{row['measured']:.3f} " + " ".join(f"{k} {row.get('pred_' + k, float('nan')):.3f}"
                                                               for k in LOSS_KINDS), flush=True)
    return pd.DataFrame(rows)


def method_summary(per) -> "pd.DataFrame":
    """Per (method, kind): mean within-budget Spearman of ``pred_<kind>`` with ``measured`` over the ratios, and per
    ratio the exact optimum of that kind's predicted / measured increase."""
    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    out = []
    per = per.drop_duplicates(["method", "ratio", "solver", "kind"])
    for (method, ), g in per.groupby(["method"]):
        for k in LOSS_KINDS:
            col = f"pred_{k}"
            if col not in g or g[col].isna().all():
                continue
            rhos, ratios = [], {}
            for ratio, h in g.groupby("ratio"):
                ok = len(h) >= 3 and np.ptp(h[col]) > 0 and np.ptp(h.measured) > 0
                rhos.append(spearmanr(h[col], h.measured)[0] if ok else np.nan)
                best = h[(h.solver == "exact") & (h.kind == k)]
                if len(best):
                    ratios[f"pred/measured {ratio:.0%}"] = float(best[col].iloc[0] / best.measured.iloc[0])
            out.append(dict(method=method, kind=k, allocations=len(g), within_budget_spearman=float(np.nanmean(rhos)),
                            **ratios))
    return pd.DataFrame(out)


def main(argv=None) -> int:
    from rankalloc.studies.study_quality import study_output, study_parser

    ap = study_parser(__doc__)
    ap.add_argument("--probe-samples", type=int, default=8, help="calibration sequences the loss is measured on")
    ap.add_argument("--out", default="runs/agreement")
    ap.add_argument("--per-method", action="store_true",
                    help="each method's own decomposer, loss measured on the evaluation text (see above)")
    ap.add_argument("--methods", default="svd,fisher_svd,pgsvd,sola,flat,sslc",
                    help="with --per-method: the methods to measure")
    ap.add_argument("--windows", type=int, default=8, help="with --per-method: evaluation windows of 512 tokens")
    args = ap.parse_args(argv)
    if args.per_method:
        return _per_method(args)

    import rankalloc  # noqa: F401
    from rankalloc.profiling.predict import curve_kind_agreement
    from rankalloc.profiling.run import calibration_ids, prepare, profile

    t0 = time.perf_counter()
    out = study_output(args.out, args.overwrite, "agreement.csv", "allocations.csv")
    ratios = [float(r) for r in args.ratios.split(",")]
    run = prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen)
    prof = profile(run, kinds=KINDS, out=args.profile, store=args.store)
    ids = calibration_ids(run)
    allocs = allocations_for(prof, ratios)
    table = curve_kind_agreement(prof, run.model, ids, KINDS, allocs, n_probe_samples=args.probe_samples)
    per = table.attrs["allocations"]
    table["within_ratio_spearman"] = [within_ratio_spearman(per, KINDS)[k] for k in table.index]
    atomic_write_csv(out / "allocations.csv", per, index=False)
    atomic_write_csv(out / "agreement.csv", table)
    print(f"\n{len(per)} allocations ({len(ALLOCATORS)} solver/kind pairs x ratios {ratios}), whitened truncation; "
          f"loss on {args.probe_samples} x {args.seqlen} calibration tokens, dense loss "
          f"{table.attrs['dense_loss']:.4f} nats")
    print(per[["allocation", "removed", "measured_increase"]].to_string(index=False))
    print()
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0




def _per_method(args) -> int:
    from rankalloc.profiling.run import check_fit, prepare, profile

    from rankalloc.studies.study_quality import markdown_table, study_output, study_store

    methods = args.methods.split(",")
    store = study_store(args.store, methods)  # names an unknown method; SSLC's table and fit read the full store

    t0 = time.perf_counter()
    out = study_output(args.out, args.overwrite, "method_allocations.csv", "method_agreement.csv")
    ratios = [float(r) for r in args.ratios.split(",")]
    run = prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen, eval_windows=args.windows)
    check_fit(methods, run.model)
    prof = profile(run, kinds=KINDS, out=args.profile, store=store)
    per = method_agreement(run, prof, methods, ratios, csv=out / "method_allocations.csv")
    atomic_write_csv(out / "method_allocations.csv", per, index=False)
    summary = method_summary(per)
    atomic_write_csv(out / "method_agreement.csv", summary, index=False)
    print(f"\n{len(per)} allocations; loss increase ln(ppl / dense) on {args.windows} evaluation windows x 512, "
          f"dense ppl {per.dense_ppl.iloc[0]:.3f}")
    print(markdown_table(summary))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "study_agreement"))
