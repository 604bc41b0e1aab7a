"""Choose a rank per matrix from error curves under a budget (no model needed).

Library functions (explicit arguments, usable from Python): :func:`load_problem`,
:func:`allocate`, :func:`format_table`, :func:`summary_line`, :func:`result_dict`.
``add_arguments``/``run`` wire them to ``rankalloc allocate``.
"""

from __future__ import annotations

import math
from functools import reduce
from pathlib import Path
from typing import Sequence

HELP = "Choose a rank per matrix from error curves under a budget (no model needed)"

EPILOG = """\
Budgets are the fraction of the dense cost REMOVED: --budget 0.4 keeps 60% of the parameters
(or FLOPs, KV cache, bytes with --cost) of the matrices listed in the curves.

CURVES is a profile directory (from `rankalloc profile`; ranks are kept on --grid, default 16)
or a long CSV with columns component,m,n,rank,error and optional kind,layer,weight,sparsity.
For a CSV the candidates are exactly its rows plus "dense" (error 0); --grid then only checks
them (default: the largest grid that holds every listed rank).

examples:
  rankalloc allocate --curves studies/fixtures/curves_small.csv --solver exact --budget 0.4
  rankalloc allocate --curves runs/smollm2 --kind fisher --solver exact --budget 0.3 --out alloc.json
  rankalloc allocate --curves my.csv --solver greedy --budget 0.5 --cost kv
  rankalloc allocate --curves my.csv --solver exact --budget 0.4 --time-limit 5
  rankalloc allocate --plugin my_solver.py --solver mine --curves my.csv --budget 0.4

exit codes: 0 success, 1 error (bad input, missing file, unreachable budget), 2 usage error.
"""


# ----------------------------------------------------------------------------- library functions
def _csv_grid(cs) -> int:
    """The largest grid holding every listed low-rank rank (1 if there are none)."""
    import numpy as np

    ranks = [int(r) for c in cs.components for r in np.asarray(cs.ranks[c.name]) if r > 0]
    g = reduce(math.gcd, ranks, 0) or 1
    for c in cs.components:  # a component too small for g only lists rank 0: shrink g to fit it
        if c.max_rank < g:
            g = math.gcd(g, c.max_rank)
    return g


def _pick_kind(kinds: Sequence[str], kind: str | None, source: str) -> str:
    if kind is not None:
        if kind not in kinds:
            raise ValueError(f"curve kind {kind!r} is not in {source}; expected one of {list(kinds)}")
        return kind
    if len(kinds) == 1:
        return kinds[0]
    if "fisher" in kinds:
        return "fisher"
    raise ValueError(f"{source} has several curve kinds {list(kinds)}: choose one with --kind")


def load_problem(curves, budget: float, cost: str = "params", kind: str | None = None,
                 grid: int | None = None):
    """The allocation problem for a curves file or profile directory.

    Args:
        curves: a long CSV (candidates = its rows plus dense) or a profile directory (ranks on ``grid``).
        budget: fraction of the dense ``cost`` removed, in [0, 1).
        cost: a registered cost model name (``params``, ``flops``, ``kv``, ``bytes``, or one registered by a plugin).
        kind: the curve kind (error column); default the only one, else ``fisher``.
        grid: rank grid; default 16 for a profile directory, the largest grid holding every row for a CSV.

    Raises ValueError when the budget is outside [0, 1) or unreachable, saying what is reachable.
    """
    from rankalloc.allocators.curveset import read_curves
    from rankalloc.allocators.problem import AllocationProblem, Budget, removed_fraction
    from rankalloc.allocators.registry import get_cost_model

    path = Path(curves)
    model = get_cost_model(cost)()  # unknown name: ValueError listing the known ones
    cs = read_curves(path)
    kind = _pick_kind(cs.kinds, kind, str(path))
    if path.is_dir():
        grid = 16 if grid is None else grid
        curve_list = cs.curves(kind, grid=grid)
    else:
        if grid is None:
            grid = _csv_grid(cs)
        curve_list = cs.curves(kind, grid=1)  # every row is a candidate; the problem checks the grid
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"--grid: expected a positive integer, received {grid!r}")
    base = AllocationProblem(curve_list, (Budget(cost, removed=0.0),), {cost: model}, weights=cs.weights,
                             grid=grid, objective=kind, layer_scores=cs.layer_scores, name=cs.name)
    dense = base.dense_costs[cost]
    if dense <= 0:
        raise ValueError(f"--cost {cost}: the dense {cost} cost of these curves is 0 "
                         f"(for kv, no component has kind k or v), so no fraction of it can be removed")
    reachable = 1.0 - base.min_costs[cost] / dense
    where = f"with these curves, --cost {cost} and grid {grid}, 0 to {reachable:.2%} removed is reachable"
    try:
        removed_fraction(budget, f"--budget {budget!r}")
    except ValueError as exc:
        raise ValueError(f"{exc}; {where}") from None
    problem = base.with_budgets(Budget(cost, removed=float(budget)))
    why = problem.infeasibility_message()
    if why is not None:
        raise ValueError(f"--budget {budget:g} ({budget:.2%} removed) is unreachable: {why}; {where}")
    return problem


def allocate(curves, solver: str = "exact", budget: float = 0.4, cost: str = "params", kind: str | None = None,
             grid: int | None = None, time_limit: float | None = None, plugins: Sequence = ()):
    """Load the curves, build the problem and solve it with the registered ``solver``; returns the Allocation.

    ``plugins`` are Python files executed first (they may register solvers and cost models).
    ``time_limit`` (seconds) is passed to solvers that take one; giving it to one that does not is an error.
    """
    from rankalloc.allocators.allocation import solved
    from rankalloc.allocators.registry import load_plugin
    from rankalloc.studies.options import build_solvers

    for plugin in plugins:
        load_plugin(plugin)
    method = build_solvers([solver], time_limit, strict=True)[solver]  # unknown name: ValueError listing the known
    problem = load_problem(curves, budget, cost=cost, kind=kind, grid=grid)
    return solved(method, problem)


def format_table(allocation) -> str:
    """One row per component: name, shape, choice, (weighted) error and cost in each budgeted resource."""
    problem = allocation.problem
    res = problem.resources
    rows = [("component", "shape", "choice", "error", *res)]
    for l, (cv, j) in enumerate(zip(problem.curves, allocation.choice_index)):
        c = cv.component
        rows.append((c.name, f"{c.m}x{c.n}", str(cv.choice(j)), f"{problem.errors[l][j]:.6g}",
                     *(f"{problem.cost_tables[r][l][j]:.6g}" for r in res)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_line(allocation) -> str:
    """Status, objective, lower bound, cost per resource (with % removed vs the budget) and solve time."""
    p = allocation.problem
    lb = "n/a" if allocation.lower_bound is None else f"{allocation.lower_bound:.6g}"
    costs = "; ".join(
        f"{r} {allocation.cost[r]:.6g} of {p.dense_costs[r]:.6g} dense "
        f"({allocation.removed(r):.2%} removed, budget {1 - p.limits[r] / p.dense_costs[r]:.2%})"
        for r in p.resources)
    return (f"{allocation.solver}: {allocation.status} | objective {allocation.objective:.6g} ({p.objective}) | "
            f"lower bound {lb} | {costs} | {allocation.solve_seconds:.3f} s")


def result_dict(allocation, curves, cost: str, grid: int) -> dict:
    """What ``--out`` writes: :meth:`Allocation.to_dict` plus the inputs that produced it."""
    out = allocation.to_dict()
    out.update({"curves": str(curves), "kind": allocation.problem.objective, "cost_model": cost, "grid": grid,
                "budget_removed": {b.resource: b.removed for b in allocation.problem.budgets}})
    meta = Path(curves) / "meta.json"
    if meta.is_file():  # a profile directory: record which model and text the curves are of
        from rankalloc.profiling.files import read_json
        from rankalloc.profiling.store import identity

        recorded = read_json(meta, "a profile's meta.json")
        if isinstance(recorded, dict) and "format" in recorded:
            out["profile"] = identity(recorded)
    return out


# ----------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--curves", required=True, metavar="FILE",
                        help="a long CSV (component,m,n,rank,error[,kind,layer,weight,sparsity]) or a profile directory")
    parser.add_argument("--solver", default="exact", metavar="NAME",
                        help="uniform, greedy, lagrangian, exact, iprs, epsilon (default: exact)")
    parser.add_argument("--budget", required=True, type=float, metavar="REMOVED",
                        help="fraction of the dense cost to REMOVE, in [0, 1); e.g. 0.4")
    parser.add_argument("--cost", default="params", metavar="MODEL",
                        help="resource the budget limits: params, flops, kv, bytes (default: params)")
    parser.add_argument("--kind", default=None, metavar="KIND",
                        help="curve kind (error column); default: the only one, else fisher")
    parser.add_argument("--grid", type=int, default=None, metavar="G",
                        help="rank grid (default 16 for a profile; for a CSV the largest grid holding every row)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="seconds, for solvers that take a time limit (exact)")
    parser.add_argument("--out", default=None, metavar="JSON",
                        help="write the allocation as JSON here (replacing only an earlier allocation JSON)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it is a file that is not an allocation JSON")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="Python file registering extra solvers or cost models (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line, not the table")


def check_out(out, overwrite: bool = False) -> Path:
    """``--out``: a file path whose folder exists, not a folder, and not a file other than an allocation JSON (unless
    ``overwrite``); checked before solving."""
    from rankalloc.allocators.allocation import is_allocation_file

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give the path of a JSON file, e.g. {out / 'alloc.json'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: its folder {out.parent} does not exist")
    if out.exists() and not overwrite and not is_allocation_file(out):
        raise ValueError(f"--out {out}: exists and is not an allocation JSON; give another path, or --overwrite to "
                         f"replace it")
    return out


def run(args) -> int:
    out = check_out(args.out, args.overwrite) if args.out else None
    allocation = allocate(args.curves, solver=args.solver, budget=args.budget, cost=args.cost, kind=args.kind,
                          grid=args.grid, time_limit=args.time_limit, plugins=args.plugin)
    if not allocation.feasible:
        raise ValueError(f"{allocation.solver} found no allocation within the budget ({allocation.status}): "
                         f"{allocation.message or 'no message'}")
    if not args.quiet:
        print(format_table(allocation))
    print(summary_line(allocation))
    if allocation.message:
        print(f"note: {allocation.message}")
    if out is not None:
        from rankalloc.allocators.allocation import seal
        from rankalloc.profiling.files import atomic_write_json

        atomic_write_json(out, seal(result_dict(allocation, args.curves, args.cost, allocation.problem.grid)))
        print(f"wrote {out}")
    return 0
