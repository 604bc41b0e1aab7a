"""Compare allocators end to end: profile once, allocate at each budget, compress, evaluate, one table.

``add_arguments``/``run`` wire :func:`rankalloc.studies.compare.compare` to ``rankalloc compare``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HELP = "Compare allocators end to end: profile once, allocate at each removed budget, compress, evaluate"

EPILOG = """\
One row per (method, solver, curve kind, budget): the predicted objective (in the units of the curve
kind), the realized fraction of parameters REMOVED from the linear matrices and from the whole model,
perplexity beside the dense perplexity (measured once, same windows), solve and compression seconds.
The table is written to OUT/compare.csv, each allocation to OUT/allocations/*.json (usable with
`rankalloc compress --allocation`), and the settings to OUT/compare.json.

The profile is computed once and cached (or give one with --profile); later runs reuse it.

examples:
  rankalloc compare --ratios 0.2,0.3,0.4 --solvers uniform,greedy,exact --out runs/compare
  rankalloc compare --methods svd,sola --kinds fisher_svd --ratios 0.3
  rankalloc compare --model ./my-llama --text corpus.txt --samples 32 --seqlen 256 --methods svd,pgsvd
  rankalloc compare --profile runs/smollm2 --kinds whitened,fisher --ratios 0.3 --windows 20
  rankalloc compare --plugin studies/examples/bandwidth_cost.py --cost bandwidth --ratios 0.2

exit codes: 0 success, 1 error, 2 usage error.
"""


def add_arguments(parser) -> None:
    from rankalloc.studies.options import add_model_options, add_plugin_option, method_choices, solver_choices

    parser.epilog = EPILOG
    add_model_options(parser, evaluation=True, windows=20, samples=64)  # the quality benchmark's protocol
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="use this profile directory instead of profiling (or the cached profile)")
    parser.add_argument("--ratios", default="0.2,0.3,0.4", metavar="R1,R2",
                        help="budgets: fractions of the dense cost REMOVED (default 0.2,0.3,0.4)")
    parser.add_argument("--solvers", default="uniform,greedy,lagrangian,exact", metavar="S1,S2",
                        help=f"solvers: {solver_choices()} (default uniform,greedy,lagrangian,exact)")
    parser.add_argument("--methods", default="fisher_svd", metavar="M1,M2",
                        help=f"decomposition methods: {method_choices()} (default fisher_svd: with the default kind "
                             f"fisher, the README's recommended combination)")
    parser.add_argument("--kinds", default="fisher", metavar="K1,K2",
                        help="curve kinds the allocators minimise (default fisher; with --methods svd, sola, pgsvd or "
                             "flat use fisher_svd, which prices their one-sided truncation)")
    parser.add_argument("--cost", default="params", metavar="MODEL",
                        help="budgeted resource: params, flops, kv, bytes, or a plugin's (default params)")
    parser.add_argument("--grid", type=int, default=16, metavar="G", help="rank grid (default 16)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="seconds, for solvers that take a time limit (exact)")
    parser.add_argument("--sequential", type=int, default=0, metavar="N",
                        help="fit every matrix at the inputs of the already-compressed layers, on the first N "
                             "calibration sequences (per-matrix methods and flat; fisher_svd reads a full-store profile, "
                             "profiled when no --profile is given; default 0: off)")
    parser.add_argument("--out", default="rankalloc-compare", metavar="DIR",
                        help="output directory (default ./rankalloc-compare); new, empty or an earlier compare output")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it is a non-empty folder that holds no compare output")
    add_plugin_option(parser)


def written_by_compare(out: Path) -> bool:
    """Whether ``out`` is a folder compare wrote: its table or settings, or, from a run that stopped before them,
    only its ``allocations`` folder of allocation JSONs (so the rerun may write there)."""
    from rankalloc.allocators.allocation import is_allocation_file
    from rankalloc.profiling.files import foreign_entries

    if (out / "compare.json").is_file() or (out / "compare.csv").is_file():
        return True
    allocations = out / "allocations"
    return (foreign_entries(out) == ["allocations"] and allocations.is_dir()
            and all(f.is_file() and f.suffix == ".json" and is_allocation_file(f)
                    for f in allocations.iterdir() if f.name in foreign_entries(allocations)))


def run(args) -> int:
    from rankalloc.allocators.registry import get_cost_model, get_solver
    from rankalloc.decomposers.registry import get_method
    from rankalloc.profiling import run as runs
    from rankalloc.profiling.store import Profile
    from rankalloc.studies.compare import compare, format_table
    from rankalloc.studies.options import build_solvers, comma_list, fractions, load_plugins, named

    from rankalloc.profiling.files import atomic_write_csv, atomic_write_json, check_output_folder

    out = Path(args.out)
    check_output_folder(out, "--out", ours=written_by_compare(out), overwrite=args.overwrite)
    load_plugins(args.plugin)
    ratios = fractions("--ratios", args.ratios)
    solvers = named("--solvers", comma_list(args.solvers), get_solver)
    methods = named("--methods", comma_list(args.methods), get_method)
    kinds = comma_list(args.kinds)
    named("--cost", [args.cost], get_cost_model)
    for m in methods:  # a method's resources and kinds are stated: what it cannot price is refused before profiling
        get_method(m).check_cost(args.cost)
        for k in kinds:
            get_method(m).check_kind(k)
    for option, value, least in (("--grid", args.grid, 1), ("--batch-size", args.batch_size, 1),
                                 ("--sequential", args.sequential, 0)):
        runs.at_least(option, value, least)
    if args.sequential > args.samples and not args.profile:  # a given profile's own count is checked in compare
        raise ValueError(f"--sequential: {args.sequential} calibration sequences asked, --samples is {args.samples}")
    build_solvers(solvers, args.time_limit)  # --time-limit, checked before anything is profiled
    need = list(kinds) + [k for m in methods for k in get_method(m).needs]
    pk = runs.profile_kinds(need)
    if args.sequential:
        from rankalloc.decomposers.sequential import check_sequential

        for m in methods:  # before anything is profiled
            check_sequential(m)
    store, why = runs.store_for(methods, bool(args.sequential))
    prof = Profile.load(args.profile) if args.profile else None
    if prof is not None:
        runs.check_store(prof, store, why)
    model = runs.profiled_model(prof, args.model) if prof is not None else args.model
    text = runs.profiled_text(prof, args.text) if prof is not None else args.text
    t0 = time.perf_counter()
    run_ = runs.prepare(model, text, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                        eval_seqlen=args.eval_seqlen, eval_windows=args.windows, device=args.device,
                        out_of_core=args.out_of_core)
    if prof is not None and args.text is None:  # the profile's own text, read back: unchanged since
        runs.check_recorded_text(run_, prof.meta, f"--profile {prof.path}")
    runs.check_fit(methods, run_.model)
    runs.check_priced(run_.model, args.cost)
    t1 = time.perf_counter()
    if prof is None:
        prof = runs.profile(run_, pk, store=store)
    else:
        runs.check_same_model(run_.loaded, prof)
    t2 = time.perf_counter()
    notes = []
    seq = None
    if args.sequential:
        from rankalloc.decomposers.sequential import SequentialConfig

        seq = SequentialConfig(samples=args.sequential)
    frame = compare(run_, prof, ratios, solvers, methods, kinds, cost=args.cost, grid=args.grid,
                    time_limit=args.time_limit, out=out / "allocations", batch_size=args.batch_size,
                    log=notes.append, sequential=seq)
    t3 = time.perf_counter()
    atomic_write_csv(out / "compare.csv", frame, index=False, float_format="%.10g")
    settings = {"model": str(run_.loaded.model_id), "fingerprint": run_.loaded.fingerprint,
                "profile": str(prof.path), "text": run_.text.source_id, "ratios": ratios, "solvers": solvers,
                "methods": methods, "kinds": kinds, "cost": args.cost, "grid": args.grid,
                "sequential": args.sequential,
                "eval_seqlen": run_.eval_seqlen, "windows": run_.eval_windows, "dense_ppl": frame.attrs["dense_ppl"],
                "protocol": frame.attrs["protocol"]}
    atomic_write_json(out / "compare.json", settings)
    print(f"profile: {prof.path}")
    print(f"perplexity protocol: {frame.attrs['protocol']}")
    print(f"dense perplexity {frame.attrs['dense_ppl']:.4f}; budgets and 'removed' are fractions of the dense "
          f"{args.cost} of the linear matrices removed; predicted objective in units of the curve kind")
    print(format_table(frame))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out / 'compare.csv'}, {out / 'compare.json'} and {len(frame[frame.allocation != ''])} "
          f"allocations in {out / 'allocations'}")
    solve, comp = float(frame.solve_s.sum(skipna=True)), float(frame.compress_s.sum(skipna=True))
    print(f"time: prepare {t1 - t0:.1f} s, profile {t2 - t1:.1f} s (cached when reused), {len(frame)} rows "
          f"{t3 - t2:.1f} s (solve {solve:.1f}, compress {comp:.1f}, dense and compressed evaluation "
          f"{t3 - t2 - solve - comp:.1f}), total {t3 - t0:.1f} s")
    return 0
