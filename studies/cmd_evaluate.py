"""Perplexity of a dense or compressed model on held-out text, with its protocol and the dense baseline.

Library function :func:`evaluate_models` (explicit arguments); ``add_arguments``/``run`` wire it to
``rankalloc evaluate``.
"""

from __future__ import annotations

HELP = "Perplexity of a dense or compressed model on held-out text (protocol and dense baseline printed)"

EPILOG = """\
The text is split into calibration and held-out evaluation articles by a fixed rule; only the
held-out side is scored, in non-overlapping windows of --seqlen tokens (BOS + seqlen-1 text tokens),
at most --windows of them. With --compressed the dense model it was built from (recorded in the
folder, or --model) is scored on the same windows, beside it, and without --text the windows
come from the held-out split of the text it was calibrated on (a corpus, or the file its profile
recorded; a file that has moved or changed since is refused). With --out-of-core both models stay on
disk and are scored with one decoder layer resident at a time (the same figures). Under torchrun
(torchrun --nproc-per-node N -m rankalloc evaluate ...) the windows are split across the processes in
whole batches and the summed losses reduced: the same figures, printed by rank 0.

examples:
  rankalloc evaluate                                   # dense SmolLM2 on gensim Wikipedia
  rankalloc evaluate --compressed runs/svd-30 --windows 60
  rankalloc evaluate --model ./my-llama --text corpus.txt --seqlen 256
  rankalloc evaluate --compressed runs/llama-8b-svd-30 --out-of-core

exit codes: 0 success, 1 error, 2 usage error.
"""


def dense_model_of(compressed) -> str | None:
    """The ``--model`` of the dense model a compressed folder was built from (None: default SmolLM2)."""
    from rankalloc.decomposers.io import read_manifest
    from rankalloc.profiling.data import SMOLLM2_ID

    recorded = read_manifest(compressed).get("profile", {}).get("model_id")
    return None if not recorded or recorded == SMOLLM2_ID else recorded


def calibration_text_of(compressed) -> str | None:
    """The ``--text`` a compressed folder was calibrated on, for scoring its held-out split: a corpus name (None for
    the default ``wiki``) or the text file its profile recorded (:func:`~rankalloc.profiling.run.recorded_text`)."""
    from rankalloc.decomposers.io import read_manifest
    from rankalloc.profiling.run import recorded_text

    return recorded_text(read_manifest(compressed).get("profile", {}), f"--compressed {compressed}",
                         "to score its held-out split (or --text wiki)")


def evaluate_models(model: str | None = None, compressed=None, text=None, *, seqlen: int = 512, windows: int = 60,
                    batch_size: int = 4, device: str = "auto", baseline: bool = True, progress: bool = True,
                    out_of_core: bool = False) -> dict:
    """Perplexity of the dense ``model`` and/or the ``compressed`` folder on the same evaluation windows.

    Returns ``{"dense": PerplexityResult | None, "compressed": PerplexityResult | None, "params": {...}}``.
    With ``compressed``, ``text`` defaults to the text its profile was calibrated on (:func:`calibration_text_of`),
    and the dense model (``model``, default: the one recorded in the folder) provides
    the tokenizer and, when ``baseline``, the dense figure. Raises ``ValueError`` if the two models do
    not share a vocabulary. ``out_of_core``: the dense model as a skeleton read from its folder
    (``load_model(..., out_of_core=True)``), the compressed one with :func:`~rankalloc.decomposers.io.open_compressed`;
    both scored with one decoder layer resident (:func:`~rankalloc.decomposers.evaluate.streamed_perplexity`).
    """
    from rankalloc.decomposers.evaluate import model_params
    from rankalloc.decomposers.io import load_compressed, open_compressed
    from rankalloc.profiling import run as runs
    from rankalloc.decomposers import evaluate as evaluation

    if compressed is not None and model is None:
        model = dense_model_of(compressed)
    recorded_text = compressed is not None and text is None
    if recorded_text:
        text = calibration_text_of(compressed)
    run = runs.prepare(model, text, seqlen=seqlen, eval_seqlen=seqlen, eval_windows=windows, device=device,
                       progress=progress, out_of_core=out_of_core)
    if recorded_text:
        from rankalloc.decomposers.io import read_manifest

        runs.check_recorded_text(run, read_manifest(compressed).get("profile", {}), f"--compressed {compressed}")
    ids = runs.evaluation_ids(run)
    _agree(run, compressed)
    out = {"dense": None, "compressed": None, "params": {}}
    comp = comp_weights = None
    if compressed is not None:
        check_baseline(run.loaded, compressed)
        if out_of_core:
            comp, comp_weights = open_compressed(compressed, out_of_core=True)
        else:
            comp = load_compressed(compressed)
        vd, vc = run.model.config.vocab_size, comp.config.vocab_size
        if vd != vc:
            raise ValueError(f"--compressed {compressed}: vocabulary of {vc} tokens, but the dense model "
                             f"{run.loaded.model_id!r} has {vd}; pass the model it was built from with --model")
    if compressed is None or baseline:
        out["dense"] = evaluation.evaluate(run.model, run, batch_size=batch_size, progress=progress, ids=ids)
        out["params"]["dense"] = model_params(run.model)
    if comp is not None:
        out["params"].setdefault("dense", model_params(run.model))
        if not run.loaded.out_of_core:
            run.loaded.model.to("cpu")
        out["compressed"] = evaluation.evaluate(comp, run, batch_size=batch_size, progress=progress, ids=ids,
                                                weights=comp_weights)
        out["params"]["compressed"] = model_params(comp)
    out["model_id"] = run.loaded.model_id
    return out


def _agree(run, compressed) -> None:
    """Under several processes: every rank scores the same dense model and the same compressed folder."""
    from rankalloc.profiling import distributed

    if distributed.world() > 1:
        import hashlib
        import json

        from rankalloc.decomposers.io import read_manifest

        digest = None if compressed is None else hashlib.sha256(
            json.dumps(read_manifest(compressed), sort_keys=True).encode()).hexdigest()[:16]
        distributed.agree("evaluate", {"model": run.loaded.fingerprint, "compressed manifest": digest})


def check_baseline(loaded, compressed) -> None:
    """``ValueError`` unless ``loaded`` is the dense model the ``compressed`` folder was built from (the fingerprint
    its manifest records from the profile): a baseline of another model would make the ratio meaningless."""
    from rankalloc.decomposers.io import read_manifest

    recorded = read_manifest(compressed).get("profile", {})
    want = recorded.get("fingerprint")
    if want is None:
        raise ValueError(f"--compressed {compressed}: its compressed.json records no model fingerprint, so the dense "
                         f"model it was built from cannot be checked; compress it again")
    if loaded.fingerprint != want:
        raise ValueError(f"--model {loaded.model_id!r} (fingerprint {loaded.fingerprint}) is not the model "
                         f"--compressed {compressed} was built from ({recorded.get('model_id')!r}, fingerprint "
                         f"{want}); pass that model with --model, or leave --model out to use it")


def add_arguments(parser) -> None:
    from rankalloc.studies.options import add_out_of_core_option

    parser.epilog = EPILOG
    parser.add_argument("--model", default=None, metavar="M",
                        help="dense model: a local HF folder or hub id (default SmolLM2-135M-Instruct; with "
                             "--compressed: the model recorded in the folder)")
    parser.add_argument("--compressed", default=None, metavar="DIR",
                        help="a folder written by `rankalloc compress`")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="plain-text file or corpus name (wiki, news); default: with --compressed, the text its "
                             "profile was calibrated on (its held-out split), else gensim Wikipedia")
    parser.add_argument("--seqlen", type=int, default=512, metavar="T", help="tokens per window, BOS included (512)")
    parser.add_argument("--windows", type=int, default=60, metavar="W", help="evaluation windows at most (60)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="windows per forward pass (4)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda ...")
    parser.add_argument("--no-baseline", action="store_true", help="with --compressed: skip the dense model")
    add_out_of_core_option(parser)


def run(args) -> int:
    res = evaluate_models(args.model, args.compressed, args.text, seqlen=args.seqlen, windows=args.windows,
                          batch_size=args.batch_size, device=args.device, baseline=not args.no_baseline,
                          out_of_core=args.out_of_core)
    first = res["dense"] or res["compressed"]
    print(f"protocol: {first.protocol}")
    params = res["params"]
    if res["dense"] is not None:
        print(f"dense       {res['model_id']}: perplexity {res['dense'].ppl:.4f} (NLL {res['dense'].nll:.5f} "
              f"nats/token), {params['dense']:,} parameters")
    if res["compressed"] is not None:
        c = res["compressed"]
        removed = 1 - params["compressed"] / params["dense"]
        line = (f"compressed  {args.compressed}: perplexity {c.ppl:.4f} (NLL {c.nll:.5f} nats/token), "
                f"{params['compressed']:,} parameters ({removed:.2%} of the whole model removed)")
        if res["dense"] is not None:
            line += f", {c.ppl / res['dense'].ppl:.3f}x the dense perplexity"
        print(line)
        if c.nonfinite_tokens:
            print(f"warning: {c.nonfinite_tokens} scored positions had non-finite logits (counted in the mean)")
    return 0
