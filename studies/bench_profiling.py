# Benchmark of the profiling core (SVD-LLM whitening statistics, Wang et al., 2024, Sec. 3.1): time and memory.
"""Wall time, peak memory and the forward / Gram / Cholesky / spectrum split of one full profile.

(a) the default SmolLM2-135M profile, 128 x 512 tokens of the default calibration text, on CPU::

    python -m rankalloc.studies.bench_profiling

(b) LLaMA-2-7B shapes with random weights (hidden 4096, MLP 11008, 32 layers) and random ids,
    128 x 2048, on GPU::

    python -m rankalloc.studies.bench_profiling --shape llama2-7b --random --device cuda --spectrum gram-eigh

A CPU smoke run of (b): ``--shape llama2-7b --random --layers 1 --samples 2 --seqlen 64 --device cpu``.
Not a test: it prints figures for the README and the reports.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
}
DTYPES = ("float32", "bfloat16", "float16")


def random_model(shape: str, layers: int | None, dtype: str, device: str, seed: int = 0):
    """A random-weight LlamaForCausalLM of ``shape``'s sizes, built directly on ``device``."""
    import torch
    import transformers as tf

    sizes = dict(SHAPES[shape])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return model.eval()


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to other load on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench(*, model: str | None = None, shape: str | None = None, random: bool = False, layers: int | None = None,
          samples: int = 128, seqlen: int | None = None, device: str = "auto", batch_size: int | None = None,
          gram_dtype: str = "float64", spectrum: str = "svd", dtype: str = "float32", kinds=None,
          save_grams: bool = True, out: str | None = None, progress: bool = True,
          fisher_samples: int | None = None) -> dict:
    """Run one profile and return its figures (seconds, GiB)."""
    import torch

    from rankalloc.profiling.profile import profile_model, resolve_device
    from rankalloc.profiling.spectra import BASE_KINDS

    dev = resolve_device(device)
    t0 = time.perf_counter()
    if random:
        if shape is None:
            raise ValueError("--random needs --shape (one of %s)" % sorted(SHAPES))
        seqlen = seqlen or (2048 if shape == "llama2-7b" else 512)
        net = random_model(shape, layers, dtype, str(dev))
        ids = torch.randint(3, net.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
        source, tok, model_id, fp = "random ids", None, f"random {shape}", f"random-{shape}-{layers}-{dtype}"
    else:
        from rankalloc.profiling.data import load_model
        from rankalloc.profiling.text import calibration_ids, load_text

        seqlen = seqlen or 512
        loaded = load_model(model, dtype=getattr(torch, dtype), progress=progress)
        net, tok, model_id, fp = loaded.model, loaded.tokenizer, loaded.model_id, loaded.fingerprint
        split = load_text(None, progress=progress)
        ids = calibration_ids(tok, split, n_samples=samples, seqlen=seqlen)
        source = split.source_id
        if layers is not None:
            raise ValueError("--layers applies to --random shapes only")
    load_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bs = batch_size or max(1, 4096 // seqlen if dev.type == "cpu" else 16384 // seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        t1, cpu1 = time.perf_counter(), cpu_seconds()
        prof = profile_model(net, ids, out=out or tmp, device=dev, batch_size=bs, kinds=kinds or BASE_KINDS,
                             gram_dtype=gram_dtype, spectrum=spectrum, save_grams=save_grams, resume=False,
                             fisher_samples=fisher_samples,
                             progress=progress, model_id=model_id, fingerprint=fp)
        wall, cpu = time.perf_counter() - t1, cpu_seconds() - cpu1
        n_comp, timings = len(prof.components), dict(prof.meta["timings"])
    res = {"model": model_id, "text": source, "device": prof.meta["device"], "samples": int(ids.shape[0]),
           "seqlen": int(ids.shape[1]), "tokens": int(ids.numel()), "layers": prof.meta["config"]["num_layers"],
           "components": n_comp, "batch_size": bs, "dtype": dtype, "gram_dtype": gram_dtype, "spectrum": spectrum,
           "fisher_samples": fisher_samples, "load_s": round(load_s, 2), "profile_wall_s": round(wall, 2),
           "profile_cpu_s": round(cpu, 2), "peak_rss_gib": round(peak_rss_gib(), 2)}
    if dev.type == "cuda":
        res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    res["split_s"] = {k: round(v, 2) for k, v in timings.items()}
    res["torch_threads"] = torch.get_num_threads()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or hub id (default SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight model of these shapes")
    ap.add_argument("--random", action="store_true", help="random weights and random ids (needs --shape)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (random shapes)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=None, help="default 512 (2048 for llama2-7b)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default ~4k tokens on CPU)")
    ap.add_argument("--gram-dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--spectrum", choices=("svd", "gram-eigh"), default="svd")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights/activations dtype")
    ap.add_argument("--kinds", default=None, help="comma-separated curve kinds (default the four spectral kinds)")
    ap.add_argument("--no-save-grams", action="store_true", help="skip writing Grams (7B: ~44 GB of float64)")
    ap.add_argument("--fisher-samples", type=int, default=None,
                    help="Fisher output-gradient Grams on the first N calibration sequences only (default all)")
    ap.add_argument("--out", default=None, help="keep the profile here (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice; 1 is fastest on a busy shared machine)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    a = ap.parse_args(argv)
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    res = bench(model=a.model, shape=a.shape, random=a.random, layers=a.layers, samples=a.samples, seqlen=a.seqlen,
                device=a.device, batch_size=a.batch_size, gram_dtype=a.gram_dtype, spectrum=a.spectrum,
                dtype=a.dtype, kinds=tuple(a.kinds.split(",")) if a.kinds else None,
                save_grams=not a.no_save_grams, out=a.out, progress=not a.json, fisher_samples=a.fisher_samples)
    if a.json:
        print(json.dumps(res))
        return 0
    for k, v in res.items():
        if k != "split_s":
            print(f"{k:>16}: {v}")
    print("           split: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["split_s"].items()))
    print(json.dumps(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
