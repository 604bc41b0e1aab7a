# Clean-interpreter CP-SAT solve for processes where cvxpy/highspy loaded libhighs before OR-tools
"""``python -m rankalloc.allocators.cpsat_worker IN.npz OUT.npz``: run :func:`cpsat.solve_arrays` on plain arrays.

``import rankalloc`` (implied by ``-m``) loads OR-tools before anything else, so CP-SAT works
here even when the parent process had imported cvxpy first.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
    from rankalloc._ortools_first import ORTOOLS_IN_PROCESS
    from rankalloc.allocators.cpsat import solve_arrays

    if len(argv) != 2:
        print("usage: python -m rankalloc.allocators.cpsat_worker IN.npz OUT.npz", file=sys.stderr)
        return 2
    if not ORTOOLS_IN_PROCESS:
        print("OR-tools cannot be imported in a clean interpreter either (is it installed?)", file=sys.stderr)
        return 3
    with np.load(argv[0], allow_pickle=False) as a:
        time_limit, workers, bits, seed = a["params"].tolist()
        out = solve_arrays(a["errors"], a["costs"], a["offsets"], a["limits"], time_limit, int(workers),
                           a["hint"] if "hint" in a else None, int(bits), int(seed),
                           a["floors"] if "floors" in a else None)
    np.savez(argv[1], status=np.array(out["status"]),
             choice=out["choice"] if out["choice"] is not None else np.zeros(0, dtype=np.int64),
             has_choice=out["choice"] is not None, bound=np.float64(out["bound"] or 0.0),
             has_bound=out["bound"] is not None, scale=out["scale"], shift=out["shift"],
             costs_exact=out["costs_exact"], wall=out["wall"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
