# Solver benchmark on a LLaMA-2-70B-shaped MCKP (Touvron et al., 2023, Table 1 shapes; see allocators/synthetic.py)
"""Time every registered solver on an 80-layer x 7-matrix instance and report its gap to the exact optimum.

    python -m rankalloc.studies.bench_solvers                 # full benchmark (a few minutes on 2 cores)
    python -m rankalloc.studies.bench_solvers --layers 8      # quick look

For each solver and each budget (20/40/60% of the parameters removed) it prints the median
solve time over ``--repeats`` runs, the objective, the relative gap to the exact optimum
``(objective - optimum) / optimum``, the status and the lower bound. A two-budget case
(parameters and KV cache) follows, where a params-only heuristic can break the KV budget or
waste it. The synthetic instance has no layer scores, so IPRS gets each layer's share of the
rank-0 error as its ``t_l`` (:func:`with_layer_scores`). The output ends with a markdown table
for the README and the speed targets: lagrangian < 50 ms, greedy < 0.5 s, exact proven optimal
in < 10 s for one budget.

This is a benchmark that prints figures, not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Sequence

TARGETS = {"lagrangian": 0.05, "greedy": 0.5, "exact": 10.0}
"""Seconds per single-budget solve that each solver should stay under (exact: proven optimal)."""


@dataclass(frozen=True)
class Row:
    case: str
    solver: str
    seconds: float
    cpu_seconds: float
    objective: float | None
    gap: float | None
    status: str
    lower_bound: float | None
    message: str = ""


def time_solver(solver, problem, repeats: int):
    """``(median wall seconds, median CPU seconds of this process, last allocation)`` over ``repeats`` solves.

    CPU time counts every thread of this process (CP-SAT workers included) and stays meaningful on a
    loaded machine, where wall time does not.
    """
    wall, cpu, alloc = [], [], None
    for _ in range(max(1, repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        alloc = solver.solve(problem)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), alloc


def bench_case(case: str, problem, solver_names: Sequence[str], repeats: int, time_limit: float,
               progress=None) -> list[Row]:
    """Solve ``problem`` with each solver (exact first: its optimum is the reference of every gap)."""
    from rankalloc.allocators.registry import get_solver, solver_options

    names = ["exact"] + [n for n in solver_names if n != "exact"] if "exact" in solver_names else list(solver_names)
    problem.flat, problem.limits, problem.min_costs  # the problem's cached tables: built once, before any timing
    rows, optimum = [], None
    for name in names:
        opts = {"time_limit": time_limit} if "time_limit" in solver_options(name) else {}
        try:
            seconds, cpu, alloc = time_solver(get_solver(name, **opts), problem, repeats if name != "exact" else 1)
        except ValueError as exc:  # e.g. a solver that declares it handles one budget
            rows.append(Row(case, name, float("nan"), float("nan"), None, None, "refused", None,
                            str(exc).split("\n")[0]))
            if progress is not None:
                progress.update(1)
            continue
        feasible = alloc.feasible
        obj = alloc.objective if feasible else None
        if name == "exact" and alloc.status.value == "optimal":
            optimum = alloc.objective
        gap = None if obj is None or optimum is None else (obj - optimum) / max(abs(optimum), 1e-300)
        rows.append(Row(case, name, seconds, cpu, obj, gap, str(alloc.status), alloc.lower_bound, alloc.message))
        if progress is not None:
            progress.update(1)
    return rows


def with_layer_scores(problem):
    """The problem with layer importance ``t_l`` for IPRS, when it has none (synthetic instances).

    ``t_l`` is layer ``l``'s share of the total error at rank 0 (every matrix truncated away), scaled so
    the largest is 1: a stand-in for FLAT-LLM's ``arccos(mean cos(x_l, x_{l+1})) / pi``.
    """
    if problem.layer_scores:
        return problem
    totals: dict[int, float] = {}
    for cv, e in zip(problem.curves, problem.errors):
        totals[cv.component.layer] = totals.get(cv.component.layer, 0.0) + float(e.max())
    top = max(totals.values()) or 1.0
    return problem.replace(layer_scores={l: v / top for l, v in totals.items()})


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or v != v else format(v, spec)


def _secs(v: float) -> str:
    return "-" if v != v else (f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s")


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| case | solver | time | CPU time | objective | gap to exact | status | lower bound |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        gap = ("-" if r.gap is None else "0" if abs(r.gap) < 5e-9
               else f"{r.gap:+.4%}" if abs(r.gap) < 1e-3 else f"{r.gap:+.1%}")
        lines.append(f"| {r.case} | {r.solver} | {_secs(r.seconds)} | {_secs(r.cpu_seconds)} | "
                     f"{_fmt(r.objective, '.6g')} | {gap} | {r.status} | "
                     f"{_fmt(r.lower_bound, '.6g')} |")
    return "\n".join(lines)


def check_targets(rows: Sequence[Row]) -> list[str]:
    """One line per target and single-budget case: met or missed."""
    out = []
    for r in rows:
        if r.solver in TARGETS and "+kv" not in r.case:
            limit = TARGETS[r.solver]
            ok = r.seconds < limit and (r.solver != "exact" or r.status == "optimal")
            extra = "" if r.solver != "exact" else f", {r.status}"
            out.append(f"{'met   ' if ok else 'MISSED'} {r.solver:<10} {r.case:<22} {r.seconds:8.3f} s "
                       f"(CPU {r.cpu_seconds:.3f} s; target < {limit:g} s{extra})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import rankalloc  # noqa: F401  (OR-tools before cvxpy)
    from tqdm import tqdm

    from rankalloc.allocators.registry import SOLVERS
    from rankalloc.allocators.synthetic import llama_like_problem

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.4, 0.6], help="fractions removed")
    ap.add_argument("--kv-removed", type=float, default=0.5, help="KV-cache fraction removed in the two-budget case")
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    ap.add_argument("--repeats", type=int, default=5, help="runs per timing (median); exact runs once")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds for solvers with a time limit")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    shape = dict(layers=a.layers, hidden=8192, mlp=28672, kv=1024, grid=16, seed=a.seed)
    cases = [(f"params {r:.0%}", dict(removed=r)) for r in a.removed]
    cases.append((f"params {a.removed[len(a.removed) // 2]:.0%} +kv {a.kv_removed:.0%}",
                  dict(removed=a.removed[len(a.removed) // 2], budgets=("params", "kv"), kv_removed=a.kv_removed)))
    rows: list[Row] = []
    with tqdm(total=len(cases) * len(a.solvers), desc="solves", file=sys.stderr) as bar:
        for case, extra in cases:
            t0 = time.perf_counter()
            problem = with_layer_scores(llama_like_problem(**shape, **extra))
            build = time.perf_counter() - t0
            bar.write(f"{case}: {problem.describe()} (built in {build:.2f} s)")
            case_rows = bench_case(case, problem, a.solvers, a.repeats, a.time_limit, progress=bar)
            for r in case_rows:
                bar.write(f"  {r.solver:<10} {_fmt(r.seconds, '9.4f')} s (CPU {_fmt(r.cpu_seconds, '.4f')} s)  objective {_fmt(r.objective, '.6g'):>12}  "
                          f"gap {_fmt(r.gap, '+.3%'):>9}  {r.status:<10} lb {_fmt(r.lower_bound, '.6g')}"
                          + (f"  ({r.message[:80]})" if r.message else ""))
            rows += case_rows
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nLLaMA-2-70B-shaped instance: {a.layers} layers x 7 matrices, hidden 8192, MLP 28672, "
          f"KV 1024, grid 16; median of {a.repeats} runs (exact: 1 run); gap = (objective - exact) / exact; "
          f"{os.cpu_count()} CPUs, load average {load:.1f} during the run (wall times inflate under load; "
          f"CPU time is this process's, all threads).\n")
    print(markdown(rows))
    print("\nTargets:")
    print("\n".join(check_targets(rows)))
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "bench_solvers"))
