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
    from rankalloc.studies.options import add_model_options, add_plugin_option, method_choices, solver_choices

    parser.epilog = EPILOG
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile directory (from `rankalloc profile`) or a long curves CSV")
    add_model_options(parser, evaluation=True)
    parser.add_argument("--solvers", default="uniform,greedy,lagrangian,exact", metavar="S1,S2",
                        help=f"solvers: {solver_choices()} (default uniform,greedy,lagrangian,exact)")
    parser.add_argument("--kind", default=None, metavar="KIND",
                        help="curve kind (default: the only one, else fisher)")
    parser.add_argument("--method", default="svd", metavar="NAME",
                        help=f"decomposition method whose curves are used and which builds measured points: "
                             f"{method_choices()} (default svd)")
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
    parser.add_argument("--out", default="rankalloc-pareto", metavar="DIR",
                        help="output directory: new, empty or an earlier pareto output")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it is a non-empty folder that holds no pareto output")
    add_plugin_option(parser)


def _model_run(args, prof=None):
    from rankalloc.profiling import run as runs

    text = runs.profiled_text(prof, args.text) if prof is not None else args.text
    run_ = runs.prepare(runs.profiled_model(prof, args.model) if prof is not None else args.model, text,
                        samples=args.samples, seqlen=args.seqlen, seed=args.seed, eval_seqlen=args.eval_seqlen,
                        eval_windows=args.windows, device=args.device, out_of_core=args.out_of_core)
    if prof is not None:
        runs.check_same_model(run_.loaded, prof)
        if args.text is None:  # the profile's own text, read back: unchanged since
            runs.check_recorded_text(run_, prof.meta, f"--profile {prof.path}")
    return run_


def _dense_cost(curves, cost: str) -> float:
    """The dense ``cost`` of a method's curve set (its own cost model where it has one)."""
    from rankalloc.decomposers.problems import cost_model

    model = cost_model(curves, cost)
    return float(sum(model.dense(c) for c in curves.curve_set.components))


def load_curves(args, method):
    """``(run or None, profile or None, MethodCurves, grid, source)`` from --profile (a directory or a curves CSV)
    or from profiling --model on --text."""
    from rankalloc.decomposers.problems import method_curves
    from rankalloc.decomposers.registry import MethodCurves, NeedsModel
    from rankalloc.profiling import run as runs
    from rankalloc.studies.cmd_allocate import _csv_grid

    if args.profile is None:
        run_ = _model_run(args)
        runs.check_fit([method.name], run_.model)
        runs.check_priced(run_.model, args.cost)
        prof = runs.profile(run_, runs.profile_kinds([args.kind or "fisher", *method.needs]),
                            store=method.profile_store())
        return run_, prof, method_curves(prof, method.name, run_.model, grid=args.grid or 16), args.grid or 16, \
            str(prof.path)
    path = Path(args.profile)
    if not path.exists():
        raise FileNotFoundError(f"--profile {path} does not exist; create it with `rankalloc profile --out {path}`"
                                f" (add --model/--text for your own model and text)")
    if path.is_file():
        from rankalloc.allocators.curveset import read_curves

        if not method.per_matrix or args.measure:
            raise ValueError(f"--profile {path} is a curves CSV: it serves predicted fronts of per-matrix curves only "
                             f"(no --measure; a method with one component per matrix, such as svd); give a profile "
                             f"directory for more")
        cs = read_curves(path)
        return None, None, MethodCurves(method.name, cs), args.grid or _csv_grid(cs), str(path)
    from rankalloc.profiling.store import Profile

    prof = Profile.load(path)
    runs.check_store(prof, method.profile_store(), [method.name])
    grid = args.grid or 16
    run_ = _model_run(args, prof) if args.measure > 0 else None
    try:
        curves = method_curves(prof, method.name, run_.model if run_ else None, grid=grid)
    except NeedsModel:  # the method's curves are not in the profile yet: computed once with the model, then stored
        run_ = _model_run(args, prof)
        curves = method_curves(prof, method.name, run_.model, grid=grid)
    return run_, prof, curves, grid, str(path)


def run(args) -> int:
    from rankalloc.allocators.registry import get_cost_model
    from rankalloc.decomposers.registry import get_method
    from rankalloc.studies import fronts as fr
    from rankalloc.studies.cmd_allocate import _pick_kind
    from rankalloc.studies.options import build_solvers, comma_list, fractions, load_plugins, named

    from rankalloc.profiling import run as runs
    from rankalloc.profiling.files import check_output_folder

    check_output_folder(Path(args.out), "--out", ours=(Path(args.out) / "pareto.csv").is_file(),
                        overwrite=args.overwrite)
    load_plugins(args.plugin)
    ratios = fractions("--ratios", args.ratios)
    solvers = build_solvers(comma_list(args.solvers), args.time_limit)
    panels = named("--panels", comma_list(args.panels), get_cost_model)
    named("--cost", [args.cost], get_cost_model)
    method = get_method(args.method)
    method.check_cost(args.cost)  # before anything is profiled
    if args.kind is not None:
        method.check_kind(args.kind)
    if args.measure < 0:
        raise ValueError(f"--measure: expected a count >= 0, received {args.measure}")
    for option, value in (("--grid", args.grid), ("--batch-size", args.batch_size)):
        runs.at_least(option, value, 1)  # before anything is profiled; a --grid 0 is not the default grid
    run_, prof, curves, grid, source = load_curves(args, method)
    kind = _pick_kind(curves.curve_set.kinds, args.kind, source)

    main = fr.solver_fronts(prof, curves, kind, solvers, ratios, cost=args.cost, grid=grid)
    notes = list(main.notes)
    sheets = []
    for c in dict.fromkeys([*panels, args.cost]):
        if c == args.cost:
            sheets.append(main)
        elif method.resources is not None and c not in method.resources:
            notes.append(f"panel {c}: method {args.method} is priced in {list(method.resources)} only; skipped")
        elif _dense_cost(curves, c) <= 0:
            notes.append(f"panel {c}: the dense {c} cost of these matrices is 0 (kv prices separate k and v "
                         f"projections); skipped")
        else:
            sf = fr.solver_fronts(prof, curves, kind, solvers, ratios, cost=c, grid=grid)
            notes.extend(sf.notes)
            sheets.append(sf)

    measured, dense_ppl = [], None
    if args.measure > 0:
        from rankalloc.decomposers.evaluate import evaluate
        from rankalloc.profiling.run import evaluation_ids

        ids = evaluation_ids(run_)
        dense = evaluate(run_.model, run_, batch_size=args.batch_size, ids=ids)
        dense_ppl = dense.ppl
        measured = fr.measure(run_, prof, main, args.method, args.measure, ids=ids, batch_size=args.batch_size)
        print(f"perplexity protocol: {dense.protocol}")

    first, second = write_outputs(Path(args.out), args, kind, source, main, sheets, measured, dense_ppl, notes)
    print(f"wrote {first}, {second}, {Path(args.out) / 'pareto.csv'}")
    return 0


def write_outputs(out: Path, args, kind: str, source: str, main, sheets, measured, dense_ppl, notes):
    """The two figures and pareto.csv in ``out``, and the fronts printed; returns the figure paths."""
    from rankalloc.profiling.files import atomic_write_csv
    from rankalloc.studies import fronts as fr

    out.mkdir(parents=True, exist_ok=True)
    first = out / f"pareto_{kind}_{args.cost}.png"
    fr.plot_solver_fronts(main, first, measured, dense_ppl,
                          title=f"{args.method} on {Path(source).name}: predicted error ({kind}) vs {args.cost} removed")
    second = out / f"pareto_cost_models_{kind}.png"
    fr.plot_cost_model_fronts(sheets, second, title=f"{args.method} on {Path(source).name}: predicted error "
                                                     f"({kind}) vs cost removed, per cost model")
    frame = fr.fronts_frame(main, sheets, measured)
    atomic_write_csv(out / "pareto.csv", frame, index=False, float_format="%.10g")

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
    return first, second

