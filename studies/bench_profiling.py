# Benchmark of the profiling passes (SVD-LLM whitening statistics, Wang et al., 2024, Sec. 3.1; K-FAC Grams by a
# layer-streamed backward): wall time against the compute floor, peak memory against one resident block.
"""Wall time, peak memory, the split between the passes, and the compute floor of one profile.

(a) the default SmolLM2-135M profile, 128 x 512 tokens of the default calibration text, on CPU::

    python -m rankalloc.studies.bench_profiling --kinds whitened,energy,relative,epsilon,fisher

(b) an out-of-core run on random weights of the LLaMA-3-8B shape (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
    vocabulary 128256, untied head) with ``L`` decoder layers, written to disk as a checkpoint first (in a child
    process) and read back one part at a time::

    python -m rankalloc.studies.bench_profiling --shape llama3-8b --layers 4 --random --samples 4 --seqlen 128 \\
        --kinds whitened,fisher --json OUT.json

(c) several processes (:mod:`rankalloc.profiling.distributed`): ``--nproc N`` runs the same profile under
    ``torchrun --standalone --nproc-per-node N`` (each process ``--threads 1`` unless given), then in one process
    with N threads, and prints both wall times and the speed-up; or run the bench under torchrun yourself (rank 0
    prints and writes the JSON)::

    python -m rankalloc.studies.bench_profiling --model DIR --text FILE --samples 16 --seqlen 128 --nproc 2
    torchrun --nproc-per-node 4 -m rankalloc.studies.bench_profiling --samples 64 --kinds whitened,fisher

The floor is the FLOPs of a forward for the input Grams, then a forward and a backward (activation gradients) for
the output gradients, head included, plus the Gram products, each counted at the matmul rate measured here on
matrices of the model's widths (float32 for the passes, float64 for the Grams). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
}
DTYPES = ("float32", "bfloat16", "float16")


def shape_config(shape: str, layers: int | None = None):
    import transformers as tf

    sizes = dict(SHAPES[shape])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    return tf.LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2)


def write_checkpoint(folder: str, shape: str, layers: int | None, dtype: str, seed: int = 0) -> None:
    """A random-weight checkpoint of ``shape`` (run in a child process, so its memory is not the bench's)."""
    import torch

    from rankalloc.profiling.weights import write_random_checkpoint

    write_random_checkpoint(shape_config(shape, layers), folder, getattr(torch, dtype), seed)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PhasePeaks:
    """Samples this process's RSS every 20 ms and keeps the peak of each profiling phase (``stream.PHASE``)."""

    def __init__(self):
        import threading

        import psutil

        from rankalloc.profiling import stream

        self.peaks: dict[str, int] = {}
        self._proc, self._phase, self._stop = psutil.Process(), stream.PHASE, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            rss, phase = self._proc.memory_info().rss, self._phase[0]
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            time.sleep(0.02)

    def stop(self) -> dict:
        self._stop = True
        self._thread.join()
        return dict(sorted(self.peaks.items(), key=lambda kv: -kv[1])[:8])


def matmul_rate(dtype, n: int, k: int, repeats: int = 3) -> float:
    """FLOP/s of an ``n x k`` by ``k x k`` matmul in ``dtype`` on this machine (best of ``repeats``)."""
    import torch

    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, k, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * k * k / best


def compute_floor(config, components, tokens: int, fisher_tokens: int, seqlen: int, fisher: bool,
                  rate32: float, rate64: float) -> dict:
    """Seconds of the unavoidable arithmetic (see the module docstring) at the measured rates."""
    hidden, vocab = config.hidden_size, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    linear = sum(c.m * c.n for c in components)
    attention = 4.0 * seqlen * head_dim * heads * layers  # QK^T and AV per token, every position
    forward = tokens * (2.0 * linear + attention)
    input_grams = tokens * sum(n * n for n in {(c.layer, c.n): c.n for c in components}.values())
    out = {"forward_flops": forward, "input_gram_flops": input_grams}
    seconds = forward / rate32 + input_grams / rate64
    if fisher:
        fwd = fisher_tokens * (2.0 * linear + attention + 2.0 * hidden * vocab)  # head included
        out.update(fisher_forward_backward_flops=2 * fwd, output_gram_flops=2.0 * fisher_tokens *
                   sum(c.m * c.m for c in components))
        seconds += 2 * fwd / rate32 + out["output_gram_flops"] / rate64
    out["floor_s"] = seconds
    return out


def store_bytes(path: Path, layers: int) -> dict:
    """Disk use of the profile's files by folder, and the per-layer figure of the layer folders."""
    by = {}
    for f in path.rglob("*"):
        if f.is_file():
            key = f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else "top"
            by[key] = by.get(key, 0) + f.stat().st_size
    per_layer = sum(by.get(k, 0) for k in ("layers", "roots", "fisher", "extra_fisher", "grams", "output_grams"))
    return {"by_folder": by, "per_layer_bytes": per_layer / max(layers, 1), "total_bytes": sum(by.values())}


def _load(a, tmp: str):
    """``(model, weights, tokenizer or None, model id, fingerprint, load seconds)``."""
    import torch

    from rankalloc.profiling import distributed

    t0 = time.perf_counter()
    if a.random:
        if a.shape is None:
            raise ValueError(f"--random needs --shape (one of {sorted(SHAPES)})")
        ckpt = Path(tmp) / "checkpoint"
        cmd = [sys.executable, "-m", "rankalloc.studies.bench_profiling", "--write-checkpoint", str(ckpt),
               "--shape", a.shape, "--checkpoint-dtype", a.checkpoint_dtype]
        cmd += ["--layers", str(a.layers)] if a.layers is not None else []
        if distributed.is_main():
            subprocess.run(cmd, check=True)
        distributed.barrier("writing the random checkpoint")
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        from rankalloc.profiling.weights import load_out_of_core

        model, weights = load_out_of_core(ckpt, getattr(torch, a.dtype))
        return model, weights, None, f"random {a.shape}", f"random-{a.shape}-{a.layers}", time.perf_counter() - t0, \
            write_s
    from rankalloc.profiling.data import load_model

    if a.layers is not None:
        raise ValueError("--layers applies to --random shapes only")
    loaded = load_model(a.model, dtype=getattr(torch, a.dtype), progress=not a.json, out_of_core=a.out_of_core)
    weights = loaded.weights
    return loaded.model, weights, loaded.tokenizer, loaded.model_id, loaded.fingerprint, \
        time.perf_counter() - t0, 0.0


def bench(a) -> dict:
    """Run one profile and return its figures."""
    import torch

    from rankalloc.profiling import distributed
    from rankalloc.profiling.architectures import find_structure
    from rankalloc.profiling.profile import largest_block_bytes, profile_model, resolve_device
    from rankalloc.profiling.spectra import BASE_KINDS

    dev = resolve_device(a.device)
    kinds = tuple(a.kinds.split(",")) if a.kinds else BASE_KINDS
    with _shared_tmp(a.scratch) as tmp:
        model, weights, tok, model_id, fp, load_s, write_s = _load(a, tmp)
        seqlen = a.seqlen or 512
        if a.random:
            ids = torch.randint(3, model.config.vocab_size, (a.samples, seqlen), generator=torch.Generator().manual_seed(0))
            source = "random ids"
        else:
            from rankalloc.profiling.text import calibration_ids, load_text

            split = load_text(a.text, progress=not a.json)
            ids, source = calibration_ids(tok, split, n_samples=a.samples, seqlen=seqlen), split.source_id
        structure = find_structure(model)
        bs = a.batch_size or default_batch(a.samples, seqlen, distributed.world())
        out = a.out or str(Path(tmp) / "profile")
        t1 = time.perf_counter()
        phases = PhasePeaks()
        prof = profile_model(model, ids, out=out, device=dev, batch_size=bs, kinds=kinds, gram_dtype=a.gram_dtype,
                             spectrum=a.spectrum, store=a.store, resume=False, fisher_samples=a.fisher_samples,
                             progress=not a.json, model_id=model_id, fingerprint=fp, weights=weights,
                             extras=() if a.random else ("sola", "flat"))
        wall = time.perf_counter() - t1
        peak, by_phase = peak_rss_bytes(), phases.stop()
        disk = store_bytes(prof.path, prof.num_layers)
        timings = dict(prof.meta["timings"])
    elem = torch.empty(0, dtype=getattr(torch, a.dtype)).element_size()
    fisher = "fisher" in kinds
    fisher_tokens = (a.fisher_samples or ids.shape[0]) * seqlen
    floor = compute_floor(model.config, structure.components, ids.numel(), fisher_tokens, seqlen, fisher,
                          matmul_rate(torch.float32, 2048, min(2048, model.config.hidden_size)),
                          matmul_rate(torch.float64, 2048, min(2048, model.config.hidden_size)))
    res = {"model": model_id, "text": source, "device": str(dev), "out_of_core": bool(weights and weights.out_of_core),
           "samples": int(ids.shape[0]), "seqlen": seqlen, "tokens": int(ids.numel()), "kinds": list(kinds),
           "layers": structure.num_layers, "components": len(structure.components), "batch_size": bs,
           "dtype": a.dtype, "store": a.store, "fisher_samples": a.fisher_samples,
           "peak_rss_bytes": peak, "largest_block_bytes": largest_block_bytes(model, structure),
           "hidden_bytes": int(ids.numel() * model.config.hidden_size * elem),
           "model_bytes": int(sum(p.numel() for p in model.parameters()) * elem),
           "wall_s": round(wall, 2), "load_s": round(load_s, 2), "checkpoint_write_s": round(write_s, 2),
           "split_s": {k: round(v, 2) for k, v in sorted(timings.items())},
           "floor_s": round(floor["floor_s"], 2), "wall_over_floor": round(wall / floor["floor_s"], 3),
           "floor_flops": {k: v for k, v in floor.items() if k != "floor_s"},
           "store_disk": disk, "peak_rss_by_phase": by_phase, "torch_threads": torch.get_num_threads(),
           "processes": distributed.world()}
    res["memory_target_bytes"] = int(1.5 * (res["largest_block_bytes"] + res["hidden_bytes"]) + 2 ** 30)
    return res


def default_batch(samples: int, seqlen: int, processes: int = 1) -> int:
    """About 4k tokens per batch, and at least one batch per process."""
    return max(1, min(4096 // seqlen, -(-samples // processes)))


@contextlib.contextmanager
def _shared_tmp(scratch):
    """A temporary folder every rank uses (rank 0 makes it and removes it after the others are done)."""
    from rankalloc.profiling import distributed

    if distributed.world() == 1:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(dir=scratch) if distributed.is_main() else contextlib.nullcontext() as tmp:
        tmp = distributed.broadcast(tmp, "sharing the scratch folder")
        yield tmp
        distributed.barrier("the profile finished")


def _without(argv: list[str], options: dict[str, bool]) -> list[str]:
    """``argv`` less the ``options`` (name -> takes a value), in both ``--opt value`` and ``--opt=value`` forms."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in options:
            skip = options[name] and "=" not in tok
            continue
        out.append(tok)
    return out


def several(a, argv: list[str]) -> int:
    """``--nproc N``: the same bench under torchrun with N processes, then in one process with N threads; prints both
    wall times and the speed-up (and writes them with both figure sets to ``--json``)."""
    rest = _without(argv, {"--nproc": True, "--json": True, "--threads": True})
    if a.batch_size is None:  # both runs stream the same batches
        rest += ["--batch-size", str(default_batch(a.samples, a.seqlen or 512, a.nproc))]
    threads = a.threads or 1
    bench_cmd = ["-m", "rankalloc.studies.bench_profiling", *rest, "--threads"]
    launches = ((f"{a.nproc} processes x {threads} thread(s)", threads,
                 ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc), *bench_cmd,
                  str(threads)]),
                (f"1 process x {a.nproc * threads} threads", a.nproc * threads, [*bench_cmd, str(a.nproc * threads)]))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, omp, cmd) in enumerate(launches):
            out = Path(tmp) / f"{k}.json"
            print(f"running {label}: python {' '.join(cmd)}", flush=True)
            subprocess.run([sys.executable, *cmd, "--json", str(out)], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": str(omp)})
            runs[label] = json.loads(out.read_text())
    (many, res_many), (one, res_one) = runs.items()
    speedup = res_one["wall_s"] / res_many["wall_s"]
    for label, res in runs.items():
        print(f"{label:>32}: wall {res['wall_s']:.2f} s (split: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in res["split_s"].items()) + ")")
    print(f"{'speed-up':>32}: {speedup:.2f}x ({one} / {many})")
    if a.json:
        from rankalloc.profiling.files import atomic_write_json

        atomic_write_json(Path(a.json), {"runs": runs, "speedup": round(speedup, 3)})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or hub id (default SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default=None, help="calibration text (default gensim Wikipedia)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight model of these shapes")
    ap.add_argument("--random", action="store_true", help="random weights written as a checkpoint (needs --shape)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the random shape")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=None, help="default 512")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default ~4k tokens)")
    ap.add_argument("--gram-dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--spectrum", choices=("svd", "gram-eigh", "auto"), default="auto")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="working dtype of weights and activations")
    ap.add_argument("--checkpoint-dtype", choices=DTYPES, default="bfloat16", help="dtype of the random checkpoint")
    ap.add_argument("--kinds", default=None, help="comma-separated curve kinds (default the four spectral kinds)")
    ap.add_argument("--store", choices=("compact", "full"), default="compact")
    ap.add_argument("--out-of-core", action="store_true", help="read the model one part at a time (random: always)")
    ap.add_argument("--fisher-samples", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep the profile here (default: a temporary directory)")
    ap.add_argument("--scratch", default=None, help="folder for the temporary checkpoint and profile")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (with --nproc: per process, "
                                                             "default 1)")
    ap.add_argument("--nproc", type=int, default=None, metavar="N",
                    help="run under torchrun with N processes, then in one process with N threads; print both")
    ap.add_argument("--json", default=None, metavar="OUT.json", help="write the figures as JSON here")
    ap.add_argument("--write-checkpoint", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    if a.write_checkpoint:
        write_checkpoint(a.write_checkpoint, a.shape, a.layers, a.checkpoint_dtype)
        return 0
    if a.nproc is not None and a.nproc > 1:
        return several(a, argv)
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    from rankalloc.profiling import distributed

    distributed.init_from_env()  # under torchrun: the profile split across its processes
    res, main_rank = bench(a), distributed.is_main()
    distributed.shutdown()
    if not main_rank:
        return 0
    text = json.dumps(res, indent=1)
    if a.json:
        from rankalloc.profiling.files import atomic_write_bytes

        atomic_write_bytes(Path(a.json), (text + "\n").encode())
    for k, v in res.items():
        if k not in ("split_s", "floor_flops", "store_disk", "peak_rss_by_phase"):
            print(f"{k:>20}: {v}")
    print("               split: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["split_s"].items()))
    print("    peak RSS by phase: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in res["peak_rss_by_phase"].items()))
    print(f"          store disk: {res['store_disk']['per_layer_bytes'] / 2**20:.1f} MiB per layer, "
          f"{res['store_disk']['total_bytes'] / 2**20:.1f} MiB in all {res['store_disk']['by_folder']}")
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "bench_profiling"))
