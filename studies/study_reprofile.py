"""Re-allocation at the compressed point (decomposers.reprofile): perplexity and prediction at each step.

Step 0 is the exact optimum of the dense profile's curves, built with sequential calibration (the README's
"sequential" rows). Each later step re-solves on the curves measured while building the step before::

    python -m rankalloc.studies.study_reprofile --samples 64 --windows 20 --ratios 0.4 --iterations 2 \\
        --store full --profile runs/smol64-full --out runs/reprofile

Printed per step: matrices whose choice changed, the objective on the curves it was solved on (``predicted``), on
the curves measured while it was built (``predicted_here``), the perplexity on the evaluation windows and the
measured increase ``ln(ppl / dense ppl)``. Not a test: it prints figures.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from rankalloc.profiling.files import atomic_write_csv
    from rankalloc.studies.study_quality import markdown_table, study_output, study_parser

    ap = study_parser(__doc__)
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows of 512 tokens")
    ap.add_argument("--method", default="fisher_svd", help="a per-matrix rank-only method: svd, fisher_svd, pgsvd")
    ap.add_argument("--kind", default="fisher", help="fisher or fisher_svd")
    ap.add_argument("--iterations", type=int, default=2, help="re-allocations after the dense-curve optimum")
    ap.add_argument("--sequential", type=int, default=64, metavar="N", help="calibration sequences of each build")
    ap.add_argument("--sequential-damp", type=float, default=None, metavar="D",
                    help="the ridge of the correction (SequentialConfig.damp, default 0.1)")
    ap.add_argument("--kinds", default="whitened,fisher", help="curve kinds the profile must hold")
    ap.add_argument("--out", default="runs/reprofile")
    args = ap.parse_args(argv)

    import pandas as pd

    from rankalloc.decomposers.evaluate import evaluate
    from rankalloc.decomposers.reprofile import ReprofileConfig, reprofile_loop
    from rankalloc.decomposers.sequential import SequentialConfig
    from rankalloc.profiling.run import prepare, profile

    t0 = time.perf_counter()
    out = study_output(args.out, args.overwrite, "reprofile.csv")
    ratios = [float(r) for r in args.ratios.split(",")]
    extra = {} if args.sequential_damp is None else {"damp": args.sequential_damp}
    seq = SequentialConfig(samples=args.sequential, **extra)
    loop = ReprofileConfig(iterations=args.iterations)
    run = prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen, eval_windows=args.windows)
    prof = profile(run, kinds=tuple(args.kinds.split(",")), out=args.profile, store=args.store)
    dense = evaluate(run.model, run, progress=False)
    print(f"dense perplexity {dense.ppl:.3f}  ({dense.protocol})", flush=True)
    rows = []
    for ratio in ratios:
        for step in reprofile_loop(run, prof, args.method, args.kind, ratio, sequential=seq, reprofile=loop):
            res = evaluate(step.model, run, progress=False)
            measured = math.log(res.ppl / dense.ppl)
            rows.append(dict(ratio=ratio, method=args.method, kind=args.kind, step=step.iteration,
                             changed=step.changed, removed=step.allocation.removed(), predicted=step.predicted,
                             predicted_here=step.predicted_here, ppl=res.ppl, dense_ppl=dense.ppl,
                             measured=measured, predicted_over_measured=step.predicted / measured,
                             here_over_measured=step.predicted_here / measured, fixed=step.fixed,
                             elapsed_s=time.perf_counter() - t0))
            print(f"{ratio:.0%} step {step.iteration}: {step.changed} changed, predicted {step.predicted:.4f}, "
                  f"at the built point {step.predicted_here:.4f}, ppl {res.ppl:.2f}, measured {measured:.4f}"
                  f"{' (fixed point or cycle next)' if step.fixed else ''}", flush=True)
            atomic_write_csv(out / "reprofile.csv", pd.DataFrame(rows), index=False)
    print(markdown_table(pd.DataFrame(rows)[["ratio", "step", "changed", "removed", "predicted", "predicted_here",
                                              "ppl", "measured", "predicted_over_measured", "here_over_measured"]]))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "study_reprofile"))
