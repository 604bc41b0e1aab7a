"""Quality benchmark: perplexity of method x allocator x curve kind at several removed fractions.

Reproduces the README's quality table on the default SmolLM2-135M + gensim Wikipedia text::

    python -m rankalloc.studies.study_quality --samples 64 --ratios 0.2,0.3,0.4 --out runs/quality

Protocol (printed with the table): calibration ``samples`` x 512 tokens (BOS + 511) from the
calibration articles; perplexity on ``windows`` non-overlapping 512-token windows (BOS + 511) of
the held-out evaluation articles; ratios are fractions of the 210 decoder linear matrices'
parameters REMOVED. Not a timed test: it prints figures (solve/compression/eval time, peak RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import sys
import time
from pathlib import Path

from rankalloc.profiling.files import atomic_write_csv

RECOMMENDED = ("fisher_svd", "fisher", "exact")
"""The library's recommended combination: two-sided Fisher-whitened SVD, allocated by the exact optimum of the
``fisher`` curves, which price exactly that truncation."""

RECOMMENDED_SVD = ("svd", "fisher_svd", "exact")
"""Recommended when plain SVD-LLM factors are wanted: whitened SVD priced by its own loss-unit curve."""

DEFAULT_COMBOS = (
    # (method, curve kind, solver)
    ("svd", "whitened", "uniform"),       # SVD-LLM baseline (kind unused), ranks snapped down to 16
    ("svd", "whitened", "uniform", 1),    # the same rule on grid 1: removes the nominal fraction
    ("svd", "epsilon", "epsilon"),        # PGSVD's uniform-epsilon rule
    ("svd", "energy", "greedy"),          # SoLA-like greedy on normalized energy
    ("svd", "whitened", "exact"),         # exact optimum of the raw whitened error
    ("svd", "fisher_svd", "greedy"),
    ("svd", "fisher_svd", "lagrangian"),
    ("svd", "fisher_svd", "exact"),       # RECOMMENDED_SVD
    ("fisher_svd", "fisher", "exact"),    # RECOMMENDED: two-sided Fisher whitening, its own curve
    ("pgsvd", "fisher_svd", "exact"),
    ("sola", "fisher_svd", "exact"),
    ("flat", "whitened", "iprs"),
)


LABELS = {
    # (method, kind, solver, grid) -> what the row is, in the README's words
    ("svd", "whitened", "uniform", 16): "whitened SVD, uniform ratio (SVD-LLM rule, ranks snapped down to 16)",
    ("svd", "whitened", "uniform", 1): "whitened SVD, uniform ratio on grid 1 (removes the nominal fraction)",
    ("svd", "epsilon", "epsilon", 16): "whitened SVD, one weight-space tolerance ε (PGSVD rule)",
    ("svd", "energy", "greedy", 16): "whitened SVD, greedy on normalized energy (SoLA rule)",
    ("svd", "whitened", "exact", 16): "whitened SVD, exact optimum of the raw whitened error",
    ("svd", "fisher_svd", "greedy", 16): "whitened SVD, greedy on `fisher_svd`",
    ("svd", "fisher_svd", "lagrangian", 16): "whitened SVD, Lagrangian on `fisher_svd`",
    ("svd", "fisher_svd", "exact", 16): "**recommended for plain SVD factors: whitened SVD, exact optimum of "
                                         "`fisher_svd`**",
    ("fisher_svd", "fisher", "exact", 16): "**recommended: two-sided Fisher SVD, exact optimum of `fisher`**",
    ("pgsvd", "fisher_svd", "exact", 16): "PGSVD (SVD start + ALS), exact optimum of `fisher_svd`",
    ("sola", "fisher_svd", "exact", 16): "SoLA split FFN, exact optimum of `fisher_svd`",
    ("sola", "energy", "greedy", 16): "SoLA split FFN, greedy on normalized energy (paper)",
    ("flat", "whitened", "iprs", 16): "FLAT head-wise PCA, IPRS (paper)",
    ("flat", "fisher", "exact", 16): "FLAT head-wise PCA, exact optimum of `fisher`",
    ("flat", "fisher_svd", "exact", 16): "FLAT head-wise PCA, exact optimum of `fisher_svd`",
    ("sslc", "whitened", "uniform", 16): "SSLC sparse + low-rank, uniform ratio",
    ("sslc", "fisher", "exact", 16): "SSLC sparse + low-rank in the K-FAC metric (CSR indices priced), exact optimum "
                                     "of its (rank, sparsity) `fisher` table",
    ("sslc", "energy", "greedy", 16): "SSLC sparse + low-rank, greedy on normalized energy",
}


def readme_table(df, baseline=("svd", "whitened", "uniform", 1)) -> str:
    """The README's quality table from one or more runs' rows: one line per (method, kind, solver, grid),
    one column per ratio with ppl, x ``baseline`` at that ratio and the fraction actually removed, plus
    the line's mean compression time (solve excluded). Cells never run say so."""
    df = df.copy()
    if "grid" not in df.columns:
        df["grid"] = 16
    df["grid"] = df["grid"].fillna(16).astype(int)
    df["seq"] = df["seq"].fillna(0).astype(int) if "seq" in df.columns else 0
    key_cols = ["method", "kind", "solver", "grid", "seq"]
    baseline = (*baseline, 0)
    ratios = sorted(df.ratio.unique())
    base = df[(df[key_cols] == pd_row(baseline, key_cols)).all(axis=1)].groupby("ratio").ppl.last()
    keys = list(dict.fromkeys(tuple(r) for r in df[key_cols].itertuples(index=False)))
    keys.sort(key=lambda k: (list(LABELS).index(k[:4]) if k[:4] in LABELS else len(LABELS), k[4]))
    head = ["method and allocation", "curve kind", "solver"] + [f"ppl at {r:.0%} removed" for r in ratios] + \
        ["compress s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(ratios) + 1)]
    for key in keys:
        sub = df[(df[key_cols] == pd_row(key, key_cols)).all(axis=1)].groupby("ratio").last()
        cells = []
        for r in ratios:
            if r not in sub.index:
                cells.append("not run")
                continue
            p, rm = sub.loc[r, "ppl"], sub.loc[r, "removed_linear"]
            times = f" ×{p / base[r]:.2f}" if r in base.index and key != tuple(baseline) else ""
            cells.append(f"{p:.1f}{times} ({rm:.1%})")
        label = LABELS.get(key[:4], f"{key[0]}, {key[2]} on `{key[1]}` (grid {key[3]})")
        if key[4]:
            label = f"{label.strip('*')}, **sequential calibration** ({key[4]} sequences)"
        lines.append(f"| {label} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {sub.compress_s.mean():.0f} |")
    return "\n".join(lines)


def pd_row(key, cols):
    import pandas as pd

    return pd.Series(dict(zip(cols, key)))


def markdown_table(df) -> str:
    """A GitHub markdown table of ``df`` (floats to 4 significant digits)."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def parse_combo(text: str) -> tuple[str, str, str, int]:
    """``method:kind:solver[:grid]`` -> ``(method, kind, solver, grid)``; the rank grid defaults to 16. An unknown
    method or solver, or a kind the method's curves cannot offer, is refused here, before anything is profiled."""
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.registry import get_method

    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"combo {text!r}: expected method:kind:solver[:grid], e.g. svd:fisher_svd:exact or "
                         f"svd:whitened:uniform:1")
    grid = 16
    if len(parts) == 4:
        if not parts[3].isdigit() or int(parts[3]) < 1:
            raise ValueError(f"combo {text!r}: the grid must be a positive integer, received {parts[3]!r}")
        grid = int(parts[3])
    from rankalloc.profiling.run import profile_kinds

    try:
        method = get_method(parts[0])
        profile_kinds([parts[1]])  # a kind the profile can hold
        method.check_kind(parts[1])
        get_solver(parts[2])
    except ValueError as exc:
        raise ValueError(f"combo {text!r}: {exc}") from None
    return parts[0], parts[1], parts[2], grid


def _rss_watch():
    """A context that records the peak RSS above its start (psutil sampler), or None without psutil."""
    try:
        from rankalloc.decomposers.evaluate import _RSSPeak

        return _RSSPeak(0.01)
    except ImportError:
        return None


def solver_gaps(prof, kind: str, ratios, solvers=("exact", "lagrangian", "greedy", "epsilon", "uniform"),
                grid: int = 16):
    """How each solver does on ONE objective (curve kind ``kind``, method svd) at each ratio: objective,
    certified lower bound where it has one, and the objective relative to the exact optimum. Solving
    only; nothing is compressed."""
    import pandas as pd

    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.problems import method_curves, problem_for

    curves = method_curves(prof, "svd", grid=grid)
    rows = []
    for ratio in ratios:
        problem = problem_for(prof, "svd", kind, ratio, grid=grid, curves=curves)
        found = {name: get_solver(name).solve(problem) for name in solvers}
        best = found["exact"].objective if "exact" in found else float("nan")
        for name, a in found.items():
            rows.append(dict(ratio=ratio, kind=kind, solver=name, status=str(a.status), objective=a.objective,
                             lower_bound=a.lower_bound, vs_exact=a.objective / best,
                             removed_linear=a.removed(), solve_s=a.solve_seconds))
    return pd.DataFrame(rows)


def gap_table(gaps) -> str:
    """Markdown: one line per solver, one column per (kind, ratio), cells objective / exact optimum."""
    cols = list(dict.fromkeys(zip(gaps.kind, gaps.ratio)))
    head = "| solver | " + " | ".join(f"`{k}` {r:.0%}" for k, r in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for solver in dict.fromkeys(gaps.solver):
        sub = gaps[gaps.solver == solver].set_index(["kind", "ratio"]).vs_exact
        lines.append(f"| {solver} | " + " | ".join(f"×{sub[c]:.4f}" if c in sub.index else "–" for c in cols) + " |")
    return "\n".join(lines)


def _quality_row(run, prof, curves, method, kind, solver, grid, ratio, dense, speed, total_linear, total_model,
                 sequential=None, progress: bool = False):
    """Solve, compress (timed, with the process peak RSS) and evaluate one combo at one ratio (``sequential``: a
    ``SequentialConfig``, or None for the plain decomposer; ``progress``: the sequential build's bar, minutes long)."""
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.evaluate import evaluate, model_params
    from rankalloc.decomposers.evaluate import throughput as measure_speed
    from rankalloc.decomposers.problems import compress, problem_for

    watch = _rss_watch()
    t0 = time.perf_counter()
    with watch if watch is not None else contextlib.nullcontext():
        problem = problem_for(prof, method=method, kind=kind, removed=ratio, grid=grid, curves=curves)
        allocation = get_solver(solver).solve(problem)
        model, report = compress(run, prof, allocation, method=method, sequential=sequential,
                                 progress=progress and sequential is not None)
    t1 = time.perf_counter()
    res = evaluate(model, run, progress=False)
    kept_linear = total_linear - report.params_before + report.params_after  # untouched matrices kept
    row = dict(method=method, kind=kind, solver=solver, grid=grid, seq=sequential.samples if sequential else 0,
               ratio=ratio, status=str(allocation.status),
               sparse_matrices=sum(ch.sparsity > 0 for ch in allocation.choices.values()),
               objective=allocation.objective, lower_bound=allocation.lower_bound,
               removed_linear=1 - kept_linear / total_linear, removed_model=1 - model_params(model) / total_model,
               ppl=res.ppl, dense_ppl=dense.ppl, increase_nats=math.log(res.ppl / dense.ppl),
               ppl_vs_uniform=float("nan"), nonfinite=res.nonfinite_tokens,
               solve_s=allocation.solve_seconds, compress_s=t1 - t0 - allocation.solve_seconds, eval_s=res.seconds,
               compress_rss_mib=watch.peak / 2**20 if watch is not None else float("nan"))
    if speed is not None:
        sp = measure_speed(model, prompt_len=run.eval_seqlen, progress=False)
        row.update(prefill_tok_s=sp.prefill_tokens_per_s, decode_tok_s=sp.decode_tokens_per_s,
                   dense_prefill_tok_s=speed.prefill_tokens_per_s, dense_decode_tok_s=speed.decode_tokens_per_s)
    return row, model, allocation


def run_quality(run, prof, ratios, combos, *, out: Path | None = None, progress: bool = True,
                throughput: bool = False, sequential=None):
    """Rows of (method, kind, solver, grid, ratio, objective, removed, ppl, ...) as a DataFrame.

    ``combos``: ``(method, kind, solver[, grid])`` tuples. Per row: solve and compression time, and the
    peak RSS of the whole process while solving and compressing (``compress_rss_mib``: the dense model,
    its deep copy and the method's working set; run one combo per fresh process to compare methods). ``throughput``: prefill/decode tokens per second of the dense
    model and of every compressed one (:func:`decomposers.evaluate.throughput`, eval_seqlen-token prompt, 32
    generated tokens, batch 1). ``sequential``: a ``SequentialConfig`` applied to every combo (column ``seq``: the
    calibration sequences it used, 0 for the plain decomposer).
    """
    import pandas as pd

    from rankalloc.decomposers.base import factorize_once
    from rankalloc.decomposers.evaluate import evaluate, model_params
    from rankalloc.decomposers.evaluate import throughput as measure_speed
    from rankalloc.profiling.run import linear_params

    dense = evaluate(run.model, run, progress=progress)
    speed = measure_speed(run.model, prompt_len=run.eval_seqlen, progress=False) if throughput else None
    if speed is not None:
        print(f"dense throughput: prefill {speed.prefill_tokens_per_s:.0f} tok/s, decode "
              f"{speed.decode_tokens_per_s:.1f} tok/s", flush=True)
    total_linear = linear_params(prof)
    total_model = model_params(run.model)
    print(f"dense perplexity {dense.ppl:.3f}  ({dense.protocol})", flush=True)
    rows, curves = [], {}
    with factorize_once():  # one factorization per matrix serves every combo and ratio of a method
        _quality_rows(run, prof, ratios, combos, curves, rows, dense, speed, total_linear, total_model, out,
                      progress, sequential)
    df = pd.DataFrame(rows)
    for ratio in ratios:
        base = df[(df.ratio == ratio) & (df.solver == "uniform") & (df.method == "svd") & (df.grid == 16)]
        if len(base):
            df.loc[df.ratio == ratio, "ppl_vs_uniform"] = df.loc[df.ratio == ratio, "ppl"] / float(base.ppl.iloc[0])
    return df, dense


def _quality_rows(run, prof, ratios, combos, curves, rows, dense, speed, total_linear, total_model, out,
                  progress, sequential=None) -> None:
    import pandas as pd

    from rankalloc.decomposers.problems import method_curves

    for ratio in ratios:
        for combo in combos:
            method, kind, solver = combo[:3]
            grid = combo[3] if len(combo) > 3 else 16
            key = (method, grid)
            if key not in curves:  # SoLA / SSLC / FLAT curve sets are built (and stored) on first use, untimed
                curves[key] = method_curves(prof, method, run.model, grid=grid, progress=progress)
            row, model, allocation = _quality_row(run, prof, curves[key], method, kind, solver, grid, ratio, dense,
                                                  speed, total_linear, total_model, sequential, progress)
            rows.append(row)
            print(f"{ratio:.0%} {method + ('+seq' if sequential else ''):10s} {kind:11s} {solver:10s} ppl "
                  f"{row['ppl']:9.2f}  removed(linear) "
                  f"{row['removed_linear']:.4f}  objective {allocation.objective:.4g} [{allocation.status}]",
                  flush=True)
            del model
            if out is not None:
                atomic_write_csv(out / "quality.csv", pd.DataFrame(rows), index=False)


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The options every study shares: model, text, calibration size, ratios and profile directory."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local HF folder or hub id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default=None, help="plain-text file (default: gensim Wikipedia excerpt)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ratios", default="0.2,0.3,0.4", help="fractions of linear-layer parameters REMOVED")
    ap.add_argument("--profile", default=None, help="profile directory (default: cached path for the settings)")
    ap.add_argument("--store", default=None, choices=("compact", "full"),
                    help="profile store for a new profile (default compact; study_quality picks full when a combo's "
                         "method needs it, as sslc and sequential fisher_svd do)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into --out even if it is a non-empty folder that holds none of this study's outputs")
    return ap


def study_output(path, overwrite: bool, *outputs: str) -> Path:
    """A study's ``--out`` folder, made when new. A file, or a non-empty folder that holds none of ``outputs``
    (this study's file names), is refused in one line unless ``overwrite``, before anything is loaded."""
    from rankalloc.profiling.files import check_output_folder

    out = Path(path)
    check_output_folder(out, "--out", ours=any((out / name).is_file() for name in outputs), overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def study_store(store: str | None, methods, sequential: bool = False) -> str | None:
    """The profile store of a study's ``--store`` for ``methods``: as given, or ``"full"`` when one of them needs
    it (:func:`~rankalloc.profiling.run.store_for`), None otherwise (an existing profile's, else compact). A
    ``--store compact`` that cannot serve them is refused before anything is profiled."""
    from rankalloc.profiling.run import store_for, store_reasons

    needed, why = store_for(methods, sequential)
    if needed == "full" and store == "compact":
        raise ValueError(f"--store compact: method {store_reasons(why)} needs the full store")
    return store or (needed if needed == "full" else None)


def probe_parser(doc: str, probe_samples: int) -> argparse.ArgumentParser:
    """:func:`study_parser` plus ``--probe-samples``: the options of a study that measures calibration loss."""
    ap = study_parser(doc)
    ap.add_argument("--probe-samples", type=int, default=probe_samples,
                    help="calibration sequences the loss is measured on")
    return ap


def probe_setup(args):
    """``(run, profile, ids)`` of a :func:`probe_parser` study: the prepared model and text, its whitened + fisher
    profile, and the first ``--probe-samples`` calibration sequences."""
    from rankalloc.profiling.run import calibration_ids, prepare, profile

    run = prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen)
    prof = profile(run, kinds=("whitened", "fisher"), out=args.profile, store=args.store)
    return run, prof, calibration_ids(run)[:args.probe_samples]


def main(argv=None) -> int:
    ap = study_parser(__doc__)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--combo", action="append", default=None, metavar="METHOD:KIND:SOLVER",
                    help="repeatable; default: the README's set")
    ap.add_argument("--kinds", default="whitened,energy,relative,epsilon,fisher",
                    help="curve kinds the profile must hold (missing ones are computed)")
    ap.add_argument("--throughput", action="store_true",
                    help="also measure prefill/decode tokens per second of the dense and every compressed model")
    ap.add_argument("--sequential", type=int, default=0, metavar="N",
                    help="fit every matrix at the inputs of the already-compressed layers, measured on the first N "
                         "calibration sequences (decomposers.sequential; per-matrix methods and flat; 0: off)")
    ap.add_argument("--sequential-damp", type=float, default=None, metavar="D",
                    help="with --sequential: the ridge of the correction (SequentialConfig.damp, default 0.1)")
    ap.add_argument("--no-correction", action="store_true",
                    help="with --sequential: re-measure the inputs only, without fitting the dense outputs")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--gaps", default=None, metavar="KIND1,KIND2",
                    help="only print how every solver does on these curve kinds (objective vs the exact optimum, "
                         "no compression), and exit")
    ap.add_argument("--table", nargs="+", default=None, metavar="QUALITY_CSV",
                    help="only print the README table from the quality.csv files of earlier runs, and exit")
    args = ap.parse_args(argv)
    if args.table:
        import pandas as pd

        df = pd.concat([pd.read_csv(f) for f in args.table], ignore_index=True)
        print(f"dense perplexity {df.dense_ppl.iloc[0]:.2f}; ×: perplexity over the grid-1 uniform row's at that ratio; "
              f"(%): linear parameters actually removed")
        print(readme_table(df))
        return 0

    import rankalloc  # noqa: F401
    from rankalloc.profiling.run import check_fit, prepare, profile

    ratios = [float(r) for r in args.ratios.split(",")]
    combos = [parse_combo(c) for c in args.combo] if args.combo else list(DEFAULT_COMBOS)
    methods = sorted({c[0] for c in combos})
    if args.sequential:
        from rankalloc.decomposers.sequential import check_sequential

        for method in methods:  # before anything is profiled
            check_sequential(method)
    store = study_store(args.store, methods, bool(args.sequential))
    out = study_output(args.out, args.overwrite, "quality.csv", "solvers.csv")
    t0 = time.perf_counter()
    run = prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen, eval_windows=args.windows)
    gap_kinds = args.gaps.split(",") if args.gaps else [RECOMMENDED[1]]
    check_fit(methods, run.model)
    kinds = (*args.kinds.split(","), *gap_kinds, *(c[1] for c in combos))  # every combo's kind is profiled
    prof = profile(run, kinds=tuple(dict.fromkeys(kinds)), out=args.profile, store=store)
    print(f"profile {prof.path} ready after {time.perf_counter() - t0:.0f} s", flush=True)
    import pandas as pd

    gaps = pd.concat([solver_gaps(prof, k, ratios) for k in gap_kinds], ignore_index=True)
    atomic_write_csv(out / "solvers.csv", gaps, index=False)
    print(f"solvers on the objectives {gap_kinds} (method svd, grid 16; vs_exact = objective / exact optimum):")
    print(markdown_table(gaps[["kind", "ratio", "solver", "status", "objective", "lower_bound", "vs_exact",
                               "removed_linear", "solve_s"]]), flush=True)
    print()
    print(gap_table(gaps), flush=True)
    if args.gaps:
        return 0
    seq = None
    if args.sequential:
        from rankalloc.decomposers.sequential import SequentialConfig

        extra = {} if args.sequential_damp is None else {"damp": args.sequential_damp}
        seq = SequentialConfig(samples=args.sequential, correct=not args.no_correction, **extra)
    df, dense = run_quality(run, prof, ratios, combos, out=out, throughput=args.throughput, sequential=seq)
    atomic_write_csv(out / "quality.csv", df, index=False)
    print(f"\nProtocol: {dense.protocol}; calibration {args.samples} x {args.seqlen} tokens; ratio = fraction of "
          f"decoder linear-layer parameters removed.")
    cols = ["ratio", "method", "kind", "solver", "grid", "seq", "ppl", "ppl_vs_uniform", "removed_linear", "objective",
            "status", "solve_s", "compress_s", "compress_rss_mib"]
    cols += [c for c in ("prefill_tok_s", "decode_tok_s") if c in df.columns]
    print(markdown_table(df[cols]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "study_quality"))
