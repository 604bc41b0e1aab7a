# Atomic file writes, checksums of what was written, and output-folder locks (write a temporary sibling, then rename).
"""The file rules every output of rankalloc follows (the profile store, compressed folders, allocation JSONs).

- **Atomic writes.** A file is written to a hidden temporary sibling ``.<name>.tmp<pid>`` and moved into place with
  ``os.replace``, so an interrupted run never leaves a half-written file under the final name; a failed write
  removes its temporary.
- **Checksums.** A folder's ``checksums.json`` maps each file (relative path) to its sha256, its size and its
  expected contents (``{array name: [shape, dtype]}`` for npz and safetensors files); :func:`record` adds an entry
  after each write. :func:`verify` checks a file against its entry the first time a process reads it (the result is
  cached per file identity: path, inode, size and mtime), so reading one tensor of a large file hashes it once, not
  on every read. A mismatch is a ``ValueError`` naming the file.
- **Locks.** :func:`folder_lock` creates ``<folder>/.rankalloc.lock`` exclusively (written first, then hard-linked
  into place, so it is never seen half-written), holding the pid, host, start time and command line. A lock whose
  process is gone (same host, dead pid) is taken over with a note on stderr; a live one is an error naming its
  holder. The lock is reentrant within a process. Acquiring it removes the temporaries a killed writer left
  (``.<name>.tmp<pid>`` files and ``.building-<pid>`` folders of other processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

CHECKSUMS = "checksums.json"
LOCK = ".rankalloc.lock"
TEMPORARY = re.compile(r"\..+\.tmp(\d+)")
BUILDING = re.compile(r"\.building-(\d+)")
"""Names of temporaries: a file being written (``.<name>.tmp<pid>``), a folder being built (``.building-<pid>``)."""
HASH_CHUNK = 1 << 24


# ----------------------------------------------------------------------------- atomic writes
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def atomic_write_csv(path: Path, frame, **kwargs) -> None:
    """``frame.to_csv(path, **kwargs)`` through a temporary sibling, so ``path`` is the old or the new table."""
    with _replacing(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def atomic_savefig(fig, path: Path, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)`` through a temporary sibling (the format from ``path``'s suffix)."""
    path = Path(path)
    with _replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def contents_of(arrays: dict) -> dict:
    """``{name: [shape, dtype]}`` of arrays, the expected contents recorded beside a file's checksum."""
    out = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        out[k] = [list(a.shape), a.dtype.str]
    return out


def atomic_savez(path: Path, arrays: dict) -> dict:
    """Write ``arrays`` as an npz file atomically; returns their :func:`contents_of`."""
    with _replacing(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return contents_of(arrays)


def atomic_save_tensors(path: Path, arrays: dict) -> dict:
    """Write ``arrays`` as a safetensors file atomically; returns their :func:`contents_of`."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with _replacing(path) as tmp:
        save_file(arrays, str(tmp))
    return contents_of(arrays)


def _load_tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _load_tensor(path: Path, key: str):
    """One tensor of a safetensors file, read alone (the file holds a whole layer's Grams); None if absent."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor(key) if key in f.keys() else None


# ----------------------------------------------------------------------------- checksums
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path, contents: dict | None = None) -> dict:
    """``{"sha256", "bytes"[, "contents"]}`` of a file as it is now."""
    rec = {"sha256": sha256_of(path), "bytes": os.path.getsize(path)}
    if contents is not None:
        rec["contents"] = contents
    _VERIFIED[_identity(Path(path))] = rec["sha256"]  # what we just wrote needs no second hash in this process
    return rec


@contextlib.contextmanager
def _manifest_update(root: Path):
    """Serialize read-modify-write of ``root/checksums.json`` between processes (an flock on a sidecar file)."""
    import fcntl

    with open(root / f".{CHECKSUMS}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {what}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}); "
                         f"{what}") from None


def read_json(path, what: str = "the file is damaged or was edited by hand"):
    """A JSON file; a decode or parse error is a ``ValueError`` naming the file and the position."""
    return _read_json(Path(path), what)


def record(root: Path, path: Path, contents: dict | None = None) -> None:
    """Add (or replace) the entry of ``path`` (inside ``root``) in ``root/checksums.json``."""
    root, path = Path(root), Path(path)
    rel = path.relative_to(root).as_posix()
    rec = file_record(path, contents)
    with _manifest_update(root):
        data = checksums(root) or {"format": 1, "files": {}}
        data["files"][rel] = rec
        atomic_write_json(root / CHECKSUMS, data)
        _MANIFESTS.pop(str(root), None)


def forget(root: Path, rels) -> None:
    """Drop the entries ``rels`` (relative paths) from ``root/checksums.json``."""
    root = Path(root)
    if not (root / CHECKSUMS).exists():
        return
    with _manifest_update(root):
        data = checksums(root)
        for rel in rels:
            data["files"].pop(rel, None)
        atomic_write_json(root / CHECKSUMS, data)
        _MANIFESTS.pop(str(root), None)


_MANIFESTS: dict[str, tuple] = {}
_VERIFIED: dict[tuple, str] = {}


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def checksums(root: Path) -> dict | None:
    """``root/checksums.json`` (None when absent), re-read only when the file changes."""
    f = Path(root) / CHECKSUMS
    try:
        key = _identity(f)
    except FileNotFoundError:
        return None
    hit = _MANIFESTS.get(str(root))
    if hit is not None and hit[0] == key:
        return hit[1]
    data = _read_json(f, "delete the folder and write it again")
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError(f"{f}: expected a checksum manifest (a JSON object with 'files'); it is damaged")
    _MANIFESTS[str(root)] = (key, data)
    return data


def verify_file(path: Path, rec: dict | None, where: str, remedy: str) -> None:
    """``path`` against its record ``rec`` (from ``where``), hashed once per file identity per process."""
    path = Path(path)
    if rec is None:
        raise ValueError(f"{path}: not recorded in {where} (written by another program, or by a run killed while "
                         f"writing it); {remedy}")
    try:
        key = _identity(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing, though {where} records it; {remedy}") from None
    if _VERIFIED.get(key) == rec.get("sha256"):
        return
    if key[2] != rec.get("bytes"):
        raise ValueError(f"{path}: {key[2]:,} bytes, but {where} recorded {rec.get('bytes'):,} when it was written "
                         f"(truncated, or replaced by another file); {remedy}")
    if sha256_of(path) != rec.get("sha256"):
        raise ValueError(f"{path}: damaged: its sha256 differs from the one {where} recorded when it was written; "
                         f"{remedy}")
    _VERIFIED[key] = rec["sha256"]


def verify(root: Path, path: Path, remedy: str) -> dict:
    """Check ``path`` (inside ``root``) against ``root/checksums.json``; returns its entry."""
    root, path = Path(root), Path(path)
    data = checksums(root)
    if data is None:
        raise ValueError(f"{root}: no {CHECKSUMS} (written by a rankalloc without checksums, or damaged); {remedy}")
    rec = data["files"].get(path.relative_to(root).as_posix())
    verify_file(path, rec, root / CHECKSUMS, remedy)
    return rec


def check_contents(path: Path, rec: dict, arrays: dict, remedy: str) -> None:
    """The arrays read from ``path`` have the names, shapes and dtypes its record lists."""
    want = rec.get("contents")
    if want is None:
        return
    got = contents_of(arrays)
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [k for k in set(want) & set(got) if want[k] != got[k]]
        raise ValueError(f"{path}: holds other arrays than were written (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, other shape or dtype {shapes[:3]}); {remedy}")


# ----------------------------------------------------------------------------- output folders and locks
class LockedError(ValueError):
    """An output folder is in use by another live run."""


_HELD: dict[str, int] = {}


def _holder(lock: Path) -> dict | None:
    """The lock's record; ``{}`` when unreadable, None when it vanished."""
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(holder: dict) -> bool:
    """Whether the holder's process may still run (a process on another host is assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _acquire(folder: Path) -> None:
    lock = folder / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(["rankalloc", *sys.argv[1:]])}
    tmp = _tmp(lock)
    tmp.write_text(json.dumps(mine))
    try:
        for _ in range(5):
            try:
                os.link(tmp, lock)  # exclusive: fails if a lock exists, and it appears whole
                return
            except FileExistsError:
                pass
            holder = _holder(lock)
            if holder is None:
                continue
            if _alive(holder):
                raise LockedError(f"{folder} is in use by another rankalloc run: {describe_holder(holder)}; wait "
                                  f"for it to finish, or, if that run is gone, delete {lock}")
            stale = lock.with_name(f"{LOCK}.stale{os.getpid()}")
            try:
                os.rename(lock, stale)
            except FileNotFoundError:
                continue
            if _holder(stale) != holder:  # another run took the lock over in between: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(stale, lock)
                stale.unlink()
                continue
            stale.unlink()
            print(f"rankalloc: note: {folder}: took over the lock of a run that is no longer running "
                  f"({describe_holder(holder) if holder else 'unreadable lock file'})", file=sys.stderr)
        raise LockedError(f"{folder}: could not take its lock {lock} (other runs keep taking it)")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_temporaries(folder: Path, depth: int = 2) -> list[Path]:
    """Remove what killed writers left in ``folder`` and its subfolders (to ``depth``): temporaries of other
    processes (``.<name>.tmp<pid>``, ``.building-<pid>``). Call it holding the folder's lock."""
    removed, me = [], str(os.getpid())
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        t, b = TEMPORARY.fullmatch(entry.name), BUILDING.fullmatch(entry.name)
        if t and t.group(1) != me and entry.is_file() and "rankalloc.lock" not in entry.name:
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif b and b.group(1) != me and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif depth > 1 and entry.is_dir() and not entry.is_symlink() and entry.name != "scratch":
            removed += remove_temporaries(entry, depth - 1)
    return removed


@contextlib.contextmanager
def folder_lock(folder):
    """Hold ``<folder>/.rankalloc.lock`` (see the module docstring); reentrant within a process."""
    folder = Path(folder)
    key = str(folder.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    _acquire(folder)
    _HELD[key] = 1
    try:
        remove_temporaries(folder)
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            (folder / LOCK).unlink()


def _ours_hidden(name: str) -> bool:
    return ("rankalloc.lock" in name or name == f".{CHECKSUMS}.lock" or bool(TEMPORARY.fullmatch(name))
            or bool(BUILDING.fullmatch(name)))


def foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` other than rankalloc's hidden locks and temporaries."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if not _ours_hidden(e.name))


def check_output_folder(folder, option: str, ours: bool, overwrite: bool) -> None:
    """Refuse to write into ``folder`` when it is a file, or a non-empty folder rankalloc did not write (``ours``
    False), unless ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder}: is a file, not a folder")
    holder = _holder(folder / LOCK)
    if holder is not None and _alive(holder) and not _HELD.get(str(folder.resolve())):  # fail before any work
        raise LockedError(f"{folder} is in use by another rankalloc run: {describe_holder(holder)}; wait for it to "
                          f"finish, or, if that run is gone, delete {folder / LOCK}")
    if ours or overwrite:
        return
    entries = foreign_entries(folder)
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"{option} {folder}: a non-empty folder that rankalloc did not write (it holds {shown}); "
                         f"give a new or empty folder, or add --overwrite to write into it")
