"""Profile a model on calibration text: curves for every linear matrix, saved as a resumable directory.

``add_arguments``/``run`` wire :func:`rankalloc.profiling.run.prepare` and
:func:`rankalloc.profiling.run.profile` to ``rankalloc profile``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "Profile a model on calibration text: error curves per linear matrix, saved as a resumable directory"

EPILOG = """\
The profile directory holds the curves (curves.csv), the input statistics the decomposers need,
meta.json (model fingerprint, calibration hash, settings) and checksums.json (every file's sha256,
verified when it is read). Without --out it goes to the cache ($RANKALLOC_CACHE or
~/.cache/rankalloc)/profiles, keyed by model, text, samples, seqlen and seed; running the same command
again reuses it, and asking for a loss-aware kind it lacks adds it there. Reusing a profile needs the
same --model, --text, --samples, --seqlen, --seed, --batch-size, --store, --fisher-samples and
--fisher-labels: another value is an error naming it (--restart discards the profile instead). A run
holds the folder's lock (.rankalloc.lock): a second run into the same --out is refused, naming the
first.

Ctrl-C leaves every finished layer on disk: rerun the same command to resume.

curve kinds (--kinds): whitened (dropped squared singular values of W S), energy, relative,
epsilon (weight space), fisher (K-FAC estimate of the calibration-loss increase; also gives
fisher_svd), probe (measured loss increase; slow).

examples:
  rankalloc profile                                      # SmolLM2-135M on gensim Wikipedia, 128 x 512
  rankalloc profile --model ./my-llama --text corpus.txt --samples 64 --seqlen 256 --out runs/mine
  rankalloc profile --kinds whitened,fisher --device cuda --out runs/smollm2
  rankalloc allocate --curves runs/smollm2 --kind fisher --solver exact --budget 0.3 --out alloc.json

exit codes: 0 success, 1 error, 2 usage error, 130 interrupted (resumable).
"""


def add_arguments(parser) -> None:
    from rankalloc.studies.options import add_model_options

    parser.epilog = EPILOG
    add_model_options(parser, reads_profile=False)
    parser.add_argument("--kinds", default="whitened,energy,relative,epsilon,fisher", metavar="K1,K2",
                        help="curve kinds (default whitened,energy,relative,epsilon,fisher)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="sequences per forward pass (default 8; when resuming, the interrupted run's)")
    parser.add_argument("--fisher-samples", type=int, default=None, metavar="N",
                        help="Fisher output-gradient Grams on the first N calibration sequences only (default all; "
                             "the backward passes dominate profiling time on a CPU)")
    parser.add_argument("--fisher-labels", default=None, choices=("data", "sampled"),
                        help="labels the Fisher backward differentiates: data (the text's next tokens, the empirical "
                             "Fisher; default, or the resumed profile's) or sampled (drawn from the model, one per "
                             "position: a Monte-Carlo estimate of the true Fisher)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="profile directory (default: a cache path keyed by model, text and settings)")
    parser.add_argument("--store", default=None, choices=("compact", "full"),
                        help="compact: float32 input roots and Fisher bases (default; when resuming, the profile's); "
                             "full: every float64 Gram too")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished or different profile in --out instead of resuming")
    parser.add_argument("--overwrite", action="store_true",
                        help="write the profile into --out even if it is a non-empty folder that holds no profile "
                             "(its other files are left alone)")


def describe(prof) -> str:
    """A few lines about a finished profile: where, what model, how many matrices and tokens, which kinds."""
    meta = prof.meta
    secs = sum(float(v) for v in meta.get("timings", {}).values())
    return (f"profile: {prof.path}\n"
            f"  model {meta.get('model_id')} (fingerprint {meta.get('fingerprint')}), "
            f"{len(prof.components)} matrices in {prof.num_layers} layers\n"
            f"  calibration {meta.get('n_samples')} x {meta.get('seqlen')} tokens ({prof.tokens:,} tokens, "
            f"seed {meta.get('seed')}), text {meta.get('source_id')}\n"
            f"  curve kinds: {', '.join(prof.kinds)}; profiling time {secs:.1f} s (device {meta.get('device')})")


def run(args) -> int:
    from rankalloc.profiling import run as runs
    from rankalloc.studies.options import comma_list

    kinds = runs.profile_kinds(comma_list(args.kinds))
    run_ = runs.prepare(args.model, args.text, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                      device=args.device, out_of_core=args.out_of_core)
    out = Path(args.out) if args.out else runs.profile_dir(run_, store=args.store or "compact")
    try:
        prof = runs.profile(run_, kinds, out=out, batch_size=args.batch_size, resume=not args.restart,
                            fisher_samples=args.fisher_samples, store=args.store, overwrite=args.overwrite,
                            fisher_labels=args.fisher_labels)
    except KeyboardInterrupt:
        print(f"rankalloc profile: {interrupted_message(out)}", file=sys.stderr)
        return 130
    print(describe(prof))
    kind = "fisher" if "fisher" in prof.kinds else "whitened"
    print(f"next: rankalloc allocate --curves {prof.path} --kind {kind} --solver exact --budget 0.3 "
          f"--out alloc.json")
    return 0


def interrupted_message(out: Path) -> str:
    """Where an interrupted run stands, and how to resume it."""
    import json

    meta = Path(out) / "meta.json"
    try:
        m = json.loads(meta.read_text())
        done = sorted(int(x) for x in m.get("finished_layers", []))
        total = int(m["config"]["num_layers"])
    except (OSError, ValueError, KeyError):
        return (f"interrupted before any layer was stored in {out}; rerun the same command to start again "
                f"(resume from layer 0)")
    nxt = next((l for l in range(total) if l not in set(done)), total)
    if nxt >= total:
        return (f"interrupted after all {total} layers were profiled (curves or loss-aware kinds unfinished) in "
                f"{out}; rerun the same command to resume from layer {total} (finishing the curves)")
    return (f"interrupted; rerun the same command to resume from layer {nxt} "
            f"({len(done)}/{total} layers stored in {out})")
