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
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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


def main(argv=None) -> int:
    from rankalloc.studies.study_quality import study_parser

    ap = study_parser(__doc__)
    ap.add_argument("--probe-samples", type=int, default=8, help="calibration sequences the loss is measured on")
    ap.add_argument("--out", default="runs/agreement")
    args = ap.parse_args(argv)

    import rankalloc  # noqa: F401
    from rankalloc.profiling.predict import curve_kind_agreement
    from rankalloc.profiling.text import calibration_ids
    from rankalloc.profiling.run import prepare, profile

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    run = prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen)
    prof = profile(run, kinds=KINDS, out=args.profile)
    ids = calibration_ids(run.tokenizer, run.text, n_samples=args.samples, seqlen=args.seqlen, seed=run.seed)
    allocs = allocations_for(prof, ratios)
    table = curve_kind_agreement(prof, run.model, ids, KINDS, allocs, n_probe_samples=args.probe_samples)
    per = table.attrs["allocations"]
    table["within_ratio_spearman"] = [within_ratio_spearman(per, KINDS)[k] for k in table.index]
    per.to_csv(out / "allocations.csv", index=False)
    table.to_csv(out / "agreement.csv")
    print(f"\n{len(per)} allocations ({len(ALLOCATORS)} solver/kind pairs x ratios {ratios}), whitened truncation; "
          f"loss on {args.probe_samples} x {args.seqlen} calibration tokens, dense loss "
          f"{table.attrs['dense_loss']:.4f} nats")
    print(per[["allocation", "removed", "measured_increase"]].to_string(index=False))
    print()
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
