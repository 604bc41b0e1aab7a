# Atomic file writes and single-tensor reads for the profile store (write a temporary sibling, then rename).
"""Every file of a profile is written to a temporary name in its folder and moved into place with ``os.replace``,
so an interrupted run never leaves a half-written file under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_savez(path: Path, arrays: dict) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, arrays: dict) -> None:
    from safetensors.numpy import save_file

    tmp = _tmp(path)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _load_tensor(path: Path, key: str):
    """One tensor of a safetensors file, read alone (the file holds a whole layer's Grams); None if absent."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor(key) if key in f.keys() else None
