# Where FLAT's loss-unit curves misprice a whole allocation: the measured loss of each kind's cuts in each band of
# layers, one part at a time, against the additive prediction of the curves that chose it.
"""FLAT allocation pricing by part (default SmolLM2-135M + gensim Wikipedia text)::

    python -m rankalloc.studies.study_flat_bands --text news --samples 64 --ratio 0.4 --probe-samples 16 \\
        --profile runs/news64-full

At ``--ratio`` removed, the exact optimum of FLAT's ``--kind`` curves (default ``fisher_svd``) and FLAT's IPRS
allocation (on ``whitened``) are split into parts: one kind (vo, q, k, or the MLP's gate, up and down) in one band
of ten decoder layers. Each part is built alone with the FLAT decomposer (every other matrix dense), and its mean
next-token loss increase on the first ``--probe-samples`` calibration sequences is printed beside the sum of the
curve values that priced it (``ratio`` = predicted / measured). A part the curves overprice is one the exact
solver avoids; one they underprice (several cut matrices compounding) is one it overuses.

Not a test: it prints figures.
"""

from __future__ import annotations

import sys
import time

PARTS = {"vo": ("vo",), "q": ("q",), "k": ("k",), "mlp": ("gate", "up", "down")}


def main(argv=None) -> int:
    from rankalloc.studies.study_quality import probe_parser, probe_setup

    ap = probe_parser(__doc__, probe_samples=16)
    ap.add_argument("--ratio", type=float, default=0.4, help="fraction of linear-layer parameters removed")
    ap.add_argument("--kind", default="fisher_svd", help="FLAT curve kind of the exact optimum")
    ap.add_argument("--band", type=int, default=10, help="decoder layers per band")
    args = ap.parse_args(argv)

    import pandas as pd

    from rankalloc.allocators.allocation import Allocation, Status
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.base import factorize_once
    from rankalloc.decomposers.problems import compress, method_curves, problem_for
    from rankalloc.profiling.probe import calibration_loss

    t0 = time.perf_counter()
    run, prof, ids = probe_setup(args)
    curves = method_curves(prof, "flat", run.model)
    priced = problem_for(prof, "flat", args.kind, args.ratio, curves=curves)
    allocations = {f"exact on {args.kind}": get_solver("exact").solve(priced),
                   "iprs": get_solver("iprs").solve(problem_for(prof, "flat", "whitened", args.ratio, curves=curves))}
    dense = calibration_loss(run.model, ids)
    layers = 1 + max(c.layer for c in priced.components)
    rows = []
    with factorize_once():
        for label, allocation in allocations.items():
            whole = allocation.ranks
            for part, kinds in PARTS.items():
                for lo in range(0, layers, args.band):
                    ranks = {c.name: whole[c.name] if c.kind in kinds and lo <= c.layer < lo + args.band else -1
                             for c in priced.components}
                    index = tuple(cv.index_of(ranks[cv.component.name]) for cv in priced.curves)
                    predicted, cost = priced.evaluate(index)
                    if predicted == 0:
                        continue
                    alone = Allocation(priced, "part", Status.FEASIBLE, index, predicted, cost)
                    model, _ = compress(run, prof, alone, method="flat", progress=False)
                    measured = calibration_loss(model, ids) - dense
                    del model
                    rows.append({"allocation": label, "part": part,
                                 "layers": f"{lo}-{min(lo + args.band, layers) - 1}", "predicted": predicted,
                                 "measured": measured,
                                 "ratio": predicted / measured if measured > 0 else float("nan")})
                    print(rows[-1], flush=True)
    print(f"\n{args.ratio:.0%} removed; loss in nats per predicted token on {ids.shape[0]} x {ids.shape[1]} "
          f"calibration tokens (dense {dense:.4f}); each part built alone")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "study_flat_bands"))
