"""Build the compressed model of an allocation and save it (safetensors + a JSON of its structure).

``add_arguments``/``run`` wire :func:`rankalloc.decomposers.problems.load_allocation`,
:func:`rankalloc.decomposers.problems.compress` and ``decomposers.save_compressed`` to ``rankalloc compress``.
"""

from __future__ import annotations

from pathlib import Path

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""``--dtype`` choices: torch dtype names (auto: ``LoadedModel.source_dtype``)."""

HELP = "Build the compressed model of an allocation (from `rankalloc allocate --out`) and save it"

EPILOG = """\
The allocation JSON names a rank per matrix of the profile; --method builds each matrix's factors
(svd: SVD-LLM whitened SVD; fisher_svd: two-sided Fisher whitening, needs a profile with fisher;
pgsvd: SVD + alternating least squares; sola, sslc, flat: allocations made on their own curves).
The model defaults to the one recorded in the profile and must be that model (checked by fingerprint).
The output folder holds model.safetensors and compressed.json (with the checksum of every file). The factors
are computed in float32 and written in the dtype the checkpoint stores its weights in (a bfloat16 model gives a
bfloat16 compressed model, smaller than its source), or in --dtype;
`rankalloc evaluate --compressed DIR` reads it back. --out must be new, empty or an earlier output of
`rankalloc compress` (--overwrite: any folder but a model folder); the new output replaces the earlier
one only once it is complete, and a second run into the same --out is refused while one runs. With --out-of-core the model stays on disk: one decoder layer at a time is read from
the model folder's safetensors, compressed and written as its own shard (model-000NN-of-000MM.safetensors
with model.safetensors.index.json); compressed.json is written last, so an interrupted run leaves none.
Under torchrun (torchrun --nproc-per-node N -m rankalloc compress ...) the decoder layers are split
across the processes and rank 0 writes the model: the same weights as one process.
--sequential N fits each matrix at the inputs of the already-compressed layers (decomposers.sequential), on the
first N of the profile's calibration sequences, rebuilt from --text (default: the corpus or file the profile
recorded; checked by hash); a per-matrix method or flat, the model in memory, one process; fisher_svd needs a
--store full profile.

examples:
  rankalloc profile --out runs/smollm2
  rankalloc allocate --curves runs/smollm2 --kind fisher --solver exact --budget 0.3 --out alloc.json
  rankalloc compress --profile runs/smollm2 --allocation alloc.json --method svd --out runs/svd-30
  rankalloc evaluate --compressed runs/svd-30
  rankalloc compress --profile runs/llama-8b --allocation alloc.json --out runs/llama-8b-svd-30 --out-of-core
  rankalloc compress --profile runs/full --allocation alloc.json --method fisher_svd --sequential 64 --out runs/seq

exit codes: 0 success, 1 error, 2 usage error.
"""


def add_arguments(parser) -> None:
    from rankalloc.studies.options import add_out_of_core_option, add_plugin_option, method_choices

    parser.epilog = EPILOG
    parser.add_argument("--profile", required=True, metavar="DIR", help="profile directory (from `rankalloc profile`)")
    parser.add_argument("--allocation", required=True, metavar="JSON",
                        help="allocation JSON (from `rankalloc allocate --out` or `rankalloc compare --out`)")
    parser.add_argument("--method", default="svd", metavar="NAME", help=f"{method_choices()} (default svd)")
    parser.add_argument("--model", default=None, metavar="M",
                        help="the profiled model (default: the folder or hub id recorded in the profile)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the compressed model to")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it is a non-empty folder that holds no compressed model "
                             "(never a model folder)")
    parser.add_argument("--device", default="cpu", help="where the factors are computed (default cpu)")
    parser.add_argument("--dtype", default="auto", choices=SAVE_DTYPES,
                        help="dtype of the weights written (default auto: the checkpoint's own, such as bfloat16; "
                             "float32 keeps the precision the factors are computed in)")
    parser.add_argument("--sequential", type=int, default=0, metavar="N",
                        help="fit every matrix at the inputs of the already-compressed layers, on the first N "
                             "calibration sequences (per-matrix methods and flat; 0: off, the default)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="with --sequential: the profile's calibration text, a file or a corpus name (wiki, "
                             "news; default: the text the profile recorded)")
    add_out_of_core_option(parser)
    add_plugin_option(parser)


def run(args) -> int:
    from rankalloc.decomposers import save_compressed
    from rankalloc.decomposers.io import check_output
    from rankalloc.decomposers.evaluate import model_params
    from rankalloc.profiling.data import load_model
    from rankalloc.profiling.store import Profile
    from rankalloc.profiling import run as runs
    from rankalloc.decomposers import problems
    from rankalloc.decomposers.registry import get_method
    from rankalloc.profiling import distributed
    from rankalloc.studies.options import load_plugins, named

    load_plugins(args.plugin)
    named("--method", [args.method], get_method)
    prof = Profile.load(args.profile)
    distributed.on_main(lambda: check_output(args.out, overwrite=args.overwrite, protect=_protected(args, prof)),
                        "checking the output folder")  # before any work
    sequential = _check_sequential(args, prof) if args.sequential else None
    if sequential is None and args.text is not None:
        raise ValueError("--text is read only with --sequential N (the calibration text of sequential fitting)")
    if not Path(args.allocation).is_file():
        raise FileNotFoundError(f"--allocation {args.allocation} does not exist; create it with `rankalloc allocate "
                                f"--curves {args.profile} --budget 0.3 --out {args.allocation}`")
    if args.out_of_core:
        return _run_out_of_core(args, prof)
    loaded = load_model(runs.profiled_model(prof, args.model), device=args.device)
    runs.check_same_model(loaded, prof)
    allocation = problems.load_allocation(prof, args.allocation, args.method, loaded.model)
    dense_params = model_params(loaded.model)
    linear = runs.linear_params(prof)
    ids = _calibration_ids(args, prof, loaded) if sequential is not None else None
    model, report = problems.compress(loaded.model, prof, allocation, args.method, inplace=True,
                                      sequential=sequential, ids=ids)
    kept = model_params(model)
    dtype = save_dtype(args, loaded)
    if distributed.is_main():
        save_compressed(model, args.out, report, overwrite=args.overwrite, protect=_protected(args, prof),
                        dtype=dtype)
    _summary(args, report, allocation, dense_params, kept, linear, dtype)
    return 0


def _check_sequential(args, prof):
    """``--sequential``'s config, or a one-line refusal naming the setting, before any work."""
    from rankalloc.decomposers.sequential import SequentialConfig, check_sequential
    from rankalloc.profiling import distributed

    if args.sequential < 0:
        raise ValueError(f"--sequential: expected a number of calibration sequences >= 1, received {args.sequential}")
    if args.out_of_core:
        raise ValueError("--sequential: needs the model in memory (run without --out-of-core)")
    if distributed.world() > 1:
        raise ValueError("--sequential: each layer waits for the one before; run it as one process (not torchrun)")
    check_sequential(args.method, prof, samples=args.sequential)
    return SequentialConfig(samples=args.sequential)


def _calibration_ids(args, prof, loaded):
    """The profile's calibration ids, rebuilt from ``--text`` (default: the text the profile recorded) and checked
    by hash."""
    from rankalloc.profiling.run import profile_calibration_ids
    from rankalloc.profiling.text import load_text

    from rankalloc.profiling.run import recorded_text

    text = args.text if args.text is not None else recorded_text(prof.meta, f"--profile {prof.path}",
                                                                   "to rebuild its calibration sequences")
    return profile_calibration_ids(prof, loaded.tokenizer, load_text(text))


def _protected(args, prof) -> tuple:
    """Folders the output must never be: the profile and the dense model's folder."""
    from rankalloc.profiling import run as runs

    model = runs.profiled_model(prof, args.model)
    return (prof.path,) + ((Path(model).expanduser(),) if model is not None else ())


def save_dtype(args, loaded):
    """The torch dtype of ``--dtype`` (auto: the checkpoint's, ``loaded.source_dtype``)."""
    import torch

    return loaded.source_dtype if args.dtype == "auto" else getattr(torch, args.dtype)


def _summary(args, report, allocation, dense_params: int, kept: int, linear: int, dtype) -> None:
    print(report.summary())
    print(f"realized parameters removed: {(dense_params - kept) / linear:.2%} of the linear matrices "
          f"({dense_params - kept:,} of {linear:,}); {1 - kept / dense_params:.2%} of the whole model "
          f"({kept:,} of {dense_params:,} kept)")
    print(f"allocation: {allocation.solver} ({allocation.status}), objective {allocation.objective:.6g} "
          f"({allocation.problem.objective})")
    print(f"wrote {args.out} ({str(dtype).removeprefix('torch.')} weights)")


def _run_out_of_core(args, prof) -> int:
    """``--out-of-core``: the model as a skeleton, compressed and written one decoder layer at a time."""
    from rankalloc.decomposers import problems
    from rankalloc.decomposers.evaluate import model_params
    from rankalloc.decomposers.registry import NeedsModel
    from rankalloc.decomposers.streamed import compress_to_folder
    from rankalloc.profiling import run as runs
    from rankalloc.profiling.data import load_model

    loaded = load_model(runs.profiled_model(prof, args.model), out_of_core=True)
    runs.check_same_model(loaded, prof)
    try:
        allocation = problems.load_allocation(prof, args.allocation, args.method, None)
    except NeedsModel as exc:
        raise ValueError(f"--out-of-core: {' '.join(str(exc).split())}; computing them needs the model in memory "
                         f"(run once without --out-of-core, e.g. `rankalloc compare --methods {args.method}`, to "
                         f"store them in the profile)") from None
    dense_params = model_params(loaded.model)
    linear = runs.linear_params(prof)
    dtype = save_dtype(args, loaded)
    report = compress_to_folder(loaded, prof, allocation, args.method, args.out, device=args.device,
                                overwrite=args.overwrite, protect=_protected(args, prof), dtype=dtype)
    kept = model_params(loaded.model)
    _summary(args, report, allocation, dense_params, kept, linear, dtype)
    return 0
