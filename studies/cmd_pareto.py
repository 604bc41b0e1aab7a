"""Pareto fronts of the allocators as PNG figures: predicted error vs cost removed, measured perplexity overlaid.

``add_arguments``/``run`` wire :mod:`rankalloc.studies.fronts` to ``rankalloc pareto``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "Pareto fronts of the allocators as PNG figures (predicted error vs cost removed; perplexity overlaid)"

EPILOG = """\
Each solver is swept over the budgets (--ratios, fractions of the dense cost REMOVED) and its
non-dominated points are drawn: x = fraction of the --cost resource removed, y = the predicted
error in the units of the curve kind. With --measure N, up to N points per solver are compressed
(--method) and their measured perplexity is drawn on a secondary axis beside the dense perplexity.
A second figure has one panel per cost model (--panels, default parameters, FLOPs, KV cache).

Curves come from --profile (a profile directory, or a long curves CSV for predicted fronts only),
or from profiling --model on --text (cached, as `rankalloc profile` does).

files written to OUT: pareto_<kind>_<cost>.png, pareto_cost_models_<kind>.png, pareto.csv

examples:
  rankalloc pareto --profile runs/smollm2 --kind fisher --out runs/pareto
  rankalloc pareto --profile runs/smollm2 --solvers uniform,greedy,exact --measure 3 --windows 20
  rankalloc pareto --profile studies/fixtures/curves_small.csv --solvers uniform,exact
  rankalloc pareto --profile runs/smollm2 --plugin studies/examples/bandwidth_cost.py --cost bandwidth

exit codes: 0 success, 1 error, 2 usage error.
"""


def add_arguments(parser) -> None:
    from rankalloc.studies.options import add_model_options, add_plugin_option

    parser.epilog = EPILOG
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile directory (from `rankalloc profile`) or a long curves CSV")
    add_model_options(parser, evaluation=True)
    parser.add_argument("--solvers", default="uniform,greedy,lagrangian,exact", metavar="S1,S2",
                        help="solvers (default uniform,greedy,lagrangian,exact)")
    parser.add_argument("--kind", default=None, metavar="KIND",
                        help="curve kind (default: the only one, else fisher)")
    parser.add_argument("--method", default="svd", metavar="NAME",
                        help="decomposition method whose curves are used and which builds measured points "
                             "(default svd)")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6", metavar="R1,R2",
                        help="budgets: fractions of the dense cost REMOVED (default 0.1,...,0.6)")
    parser.add_argument("--cost", default="params", metavar="MODEL",
                        help="cost model of the first figure's x axis (default params)")
    parser.add_argument("--panels", default="params,flops,kv", metavar="C1,C2",
                        help="cost models of the panel figure (default params,flops,kv; --cost is added)")
    parser.add_argument("--grid", type=int, default=None, metavar="G",
                        help="rank grid (default 16; for a CSV the largest grid holding every row)")
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="compress and evaluate up to N front points per solver (default 0: predicted only)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="seconds, for solvers that take a time limit (exact)")
    parser.add_argument("--out", default="rankalloc-pareto", metavar="DIR", help="output directory")
    add_plugin_option(parser)


def _solvers(names, time_limit):
    from rankalloc.allocators.registry import SOLVERS, get_solver, solver_options

    unknown = [s for s in names if s not in SOLVERS]
    if unknown or not names:
        raise ValueError(f"--solvers: unknown solver(s) {unknown}; expected some of {', '.join(SOLVERS)}")
    out = {}
    for s in names:
        opts = {"time_limit": float(time_limit)} if time_limit is not None and "time_limit" in solver_options(s) else {}
        out[s] = get_solver(s, **opts)
    return out


def run(args) -> int:
    from rankalloc.allocators.costs import COST_MODELS
    from rankalloc.studies import fronts as fr
    from rankalloc.studies import pipeline as pl
    from rankalloc.studies.cmd_allocate import _csv_grid, _pick_kind
    from rankalloc.studies.options import comma_list, fractions, load_plugins

    load_plugins(args.plugin)
    ratios = fractions("--ratios", args.ratios)
    solvers = _solvers(comma_list(args.solvers), args.time_limit)
    panels = comma_list(args.panels)
    for c in [args.cost, *panels]:
        if c not in COST_MODELS:
            raise ValueError(f"unknown cost model {c!r}; expected one of {', '.join(COST_MODELS)} "
                             f"(or load a plugin defining it with --plugin)")
    if args.method not in pl.METHOD_NAMES:
        raise ValueError(f"--method: unknown method {args.method!r}; expected one of {list(pl.METHOD_NAMES)}")
    if args.measure < 0:
        raise ValueError(f"--measure: expected a count >= 0, received {args.measure}")

    run_, prof = None, None
    if args.profile is not None:
        path = Path(args.profile)
        if not path.exists():
            raise FileNotFoundError(f"--profile {path} does not exist; create it with `rankalloc profile --out {path}`"
                                    f" (add --model/--text for your own model and text)")
        if path.is_file():
            from rankalloc.allocators.curveset import read_curves

            if args.method not in ("svd", "fisher_svd", "pgsvd") or args.measure:
                raise ValueError(f"--profile {path} is a curves CSV: it serves predicted fronts of per-matrix "
                                 f"curves only (no --measure, --method svd); give a profile directory for more")
            cs = read_curves(path)
            curves = pl.MethodCurves("svd", cs)
            grid = args.grid or _csv_grid(cs)
            source = str(path)
        else:
            from rankalloc.profiling.store import Profile

            prof = Profile.load(path)
            grid = args.grid or 16
            needs_model = args.measure > 0 or (args.method in ("sola", "sslc")
                                               and not (path / "extra" / f"{args.method}.csv").exists())
            if needs_model:
                run_ = pl.prepare(pl.profiled_model(prof, args.model), args.text, samples=args.samples,
                                  seqlen=args.seqlen, seed=args.seed, eval_seqlen=args.eval_seqlen,
                                  eval_windows=args.windows, device=args.device)
                pl.check_same_model(run_.loaded, prof)
            curves = pl.method_curves(prof, args.method, run_.model if run_ else None, grid=grid)
            source = str(path)
    else:
        run_ = pl.prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                          eval_seqlen=args.eval_seqlen, eval_windows=args.windows, device=args.device)
        need = [args.kind or "fisher"] + (["fisher"] if args.method == "fisher_svd" else [])
        prof = pl.profile(run_, pl.profile_kinds(need))
        grid = args.grid or 16
        curves = pl.method_curves(prof, args.method, run_.model, grid=grid)
        source = str(prof.path)
    kind = _pick_kind(curves.curve_set.kinds, args.kind, source)

    main = fr.solver_fronts(prof, curves, kind, solvers, ratios, cost=args.cost, grid=grid)
    notes = list(main.notes)
    sheets = []
    for c in dict.fromkeys([*panels, args.cost]):
        if c == args.cost:
            sheets.append(main)
        elif curves.resources is not None and c not in curves.resources:
            notes.append(f"panel {c}: method {args.method} is priced in {list(curves.resources)} only; skipped")
        else:
            sf = fr.solver_fronts(prof, curves, kind, solvers, ratios, cost=c, grid=grid)
            notes.extend(sf.notes)
            sheets.append(sf)

    measured, dense_ppl = [], None
    if args.measure > 0:
        ids = pl.evaluation_ids(run_)
        dense = pl.evaluate(run_.model, run_, batch_size=args.batch_size, ids=ids)
        dense_ppl = dense.ppl
        measured = fr.measure(run_, prof, main, args.method, args.measure, ids=ids, batch_size=args.batch_size)
        print(f"perplexity protocol: {dense.protocol}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = out / f"pareto_{kind}_{args.cost}.png"
    fr.plot_solver_fronts(main, first, measured, dense_ppl,
                          title=f"{args.method} on {Path(source).name}: predicted error ({kind}) vs {args.cost} removed")
    second = out / f"pareto_cost_models_{kind}.png"
    fr.plot_cost_model_fronts(sheets, second, title=f"{args.method} on {Path(source).name}: predicted error "
                                                     f"({kind}) vs cost removed, per cost model")
    frame = fr.fronts_frame(main, sheets, measured)
    frame.to_csv(out / "pareto.csv", index=False, float_format="%.10g")

    for name, front in main.fronts.items():
        pts = ", ".join(f"{main.removed(p.allocation):.1%}: {p.objective:.4g}" for p in reversed(front.points))
        print(f"{name:<11} {args.cost} removed: predicted {kind}  {pts}")
    for m in measured:
        print(f"measured    {m.solver} at {m.removed:.2%} {args.cost} removed: perplexity {m.ppl:.4f} "
              f"({m.removed_linear_params:.2%} of linear parameters removed)")
    if dense_ppl is not None:
        print(f"dense perplexity {dense_ppl:.4f}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {first}, {second}, {out / 'pareto.csv'}")
    return 0
