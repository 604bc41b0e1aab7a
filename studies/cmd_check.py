"""Check a solver, a cost model or a decomposition method against the library's contracts (rankalloc.testing).

Library functions: :func:`run_check` (the table) and :func:`format_report` (what the command prints).
``add_arguments``/``run`` wire them to ``rankalloc check``.
"""

from __future__ import annotations

import time

HELP = "Check a solver, cost model or method against the library's contracts (rankalloc.testing)"

EPILOG = """\
Runs rankalloc.testing.check_solver (the table of problems with known optima, then the solver contract on
random problems: budgets held, honest INFEASIBLE, objective and costs recomputed from the choices, never
below the exact optimum, valid lower bounds, honest OPTIMAL, deterministic, order-invariant, ranks on the
grid, the declared number of budgets) or rankalloc.testing.check_cost_model (finite, >= 0, monotone in
rank and kept sparsity, dense() consistent, vectorized = scalar, pure) or rankalloc.testing.check_method (on a
tiny random-weight model of --family: accepts the model, valid curves, the stored weights fall by exactly what
the allocation removes, full rank reproduces the dense model, save/load bit-identical, cached decoding matches
the full forward, deterministic). Every run draws the same examples. A failed check prints its reason and a
minimal failing example; it is a verdict, not an error.

examples:
  rankalloc check --solver exact
  rankalloc check --cost kv
  rankalloc check --plugin my_solver.py --solver mine
  rankalloc check --plugin studies/examples/bandwidth_cost.py --cost bandwidth
  rankalloc check --plugin my_solver.py --solver mine --thorough
  rankalloc check --method sslc --family qwen2
  rankalloc check --plugin my_method.py --method mine

exit codes: 0 every check passed, 1 a check failed (or bad input: unknown name, missing plugin), 2 usage error.
"""


def run_check(solver: str | None = None, cost: str | None = None, *, method: str | None = None,
              family: str = "llama", examples: int | None = None, thorough: bool = False, plugins=()):
    """The check table of the registered ``solver``, ``cost`` model or ``method`` (exactly one), after loading
    ``plugins``; a method is checked on a tiny model of ``family``."""
    from rankalloc.allocators.registry import get_cost_model, get_solver, load_plugin

    if sum(x is not None for x in (solver, cost, method)) != 1:
        raise ValueError("check: give exactly one of a solver, a cost model or a method name")
    for plugin in plugins:
        load_plugin(plugin)
    if method is not None:
        from rankalloc.decomposers.registry import get_method

        get_method(method)  # unknown names: ValueError listing the known ones
        try:
            from rankalloc.testing.methods import FAMILIES, check_method
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        if family not in FAMILIES:
            raise ValueError(f"--family {family}: expected one of {', '.join(FAMILIES)}")
        return check_method(method, family=family)
    try:
        from rankalloc.testing import check_cost_model, check_solver
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    cls = None if solver is not None else get_cost_model(cost)  # unknown names: ValueError listing the known ones
    try:
        target = get_solver(solver) if solver is not None else cls()
    except ValueError:
        raise
    except Exception as exc:  # a plugin whose class cannot be built without arguments
        raise ValueError(f"{'solver' if solver is not None else 'cost model'} {solver or cost!r} could not be "
                         f"built without arguments: {type(exc).__name__}: {exc}") from None
    if solver is not None:
        return check_solver(target, examples=examples, thorough=thorough)
    return check_cost_model(target, examples=examples, thorough=thorough)


def format_report(table, what: str, seconds: float, width: int = 96) -> str:
    """The table (check, result, examples, seconds, detail cut to ``width``), each failure in full, a summary."""
    rows = [("check", "result", "examples", "seconds", "detail")]
    for r in table.itertuples(index=False):
        detail = r.detail if len(r.detail) <= width else r.detail[:width - 3] + "..."
        rows.append((r.check, "pass" if r.passed else "FAIL", str(r.examples), f"{r.seconds:.2f}", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                 row[3].rjust(widths[3]), row[4]]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    failed = table[~table.passed]
    for r in failed.itertuples(index=False):
        lines += ["", f"FAIL {r.check}: {r.detail}"]
        if r.example:
            lines.append(f"  minimal example: {r.example}")
    passed = int(table.passed.sum())
    lines += ["", f"{what}: {passed}/{len(table)} checks passed in {seconds:.1f} s"
              + ("" if failed.empty else f"; failed: {', '.join(failed.check)}")]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--solver", metavar="NAME", help="a registered solver (built-in or from --plugin)")
    which.add_argument("--cost", metavar="NAME", help="a registered cost model (built-in or from --plugin)")
    which.add_argument("--method", metavar="NAME", help="a registered decomposition method (built-in or from --plugin)")
    parser.add_argument("--family", default=None, metavar="F",
                        help="with --method: the tiny model's family: llama, qwen2, mistral, gemma2, phi3, gpt2 "
                             "(default llama)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="Python file registering solvers, cost models or methods (repeatable)")
    parser.add_argument("--thorough", action="store_true", help="run more examples (about 5x the default)")
    parser.add_argument("--examples", type=int, default=None, metavar="N",
                        help="random examples per group of checks (default 200; --thorough 1000)")


def run(args) -> int:
    t0 = time.perf_counter()
    if args.family is not None and args.method is None:
        raise ValueError("--family is read only with --method (the tiny model a method is checked on)")
    family = args.family or "llama"
    table = run_check(args.solver, args.cost, method=args.method, family=family, examples=args.examples,
                      thorough=args.thorough, plugins=args.plugin)
    what = (f"solver {args.solver!r}" if args.solver else f"cost model {args.cost!r}" if args.cost
            else f"method {args.method!r} on a tiny {family} model")
    print(format_report(table, what, time.perf_counter() - t0))
    return 0 if bool(table.passed.all()) else 1
