# Several processes (llm-compressor's distributed one-shot on torch.distributed): each rank calibrates on a slice of
# the data, statistics are all-reduced at each layer boundary, the per-matrix solves are bin-packed by cost, and only
# rank 0 writes.
"""Everything about ranks: the process group, the data slice of a rank, reductions, work assignment, gathers, the
agreement check and collectives that fail with the rank's name instead of hanging.

Launch any of ``rankalloc profile``, ``compress`` or ``evaluate`` under ``torchrun`` (``--nproc-per-node N``, or
several nodes through its rendezvous); :func:`init_from_env` joins the process group when ``WORLD_SIZE > 1`` in the
environment (gloo on CPU, NCCL when CUDA is available, with a gloo side group for CPU tensors, Python objects and
the monitored barriers). Without it every function here is the one-process identity: ``rank() == 0``,
``world() == 1``, reductions return their input, so the passes keep one code path and branch on ``world() > 1``
only where they must.

Guards. Every collective is preceded by ``monitored_barrier(wait_all_ranks=True)`` on the gloo group, with the
timeout ``RANKALLOC_DIST_TIMEOUT`` (seconds, default 1800): a rank that died, or that is more than the timeout late,
makes the others raise :class:`RankError` naming it and the step, never a silent hang.

Test hook: ``RANKALLOC_TEST_FAIL_AT_LAYER=L[:raise|exit|hang]`` makes the last rank raise ``ValueError`` (default),
exit at once without cleanup (a crash), or sleep (a stuck rank) at the start of forward layer ``L`` of a profile,
after every rank has finished layer ``L - 1`` (so the store holds layers ``0..L-1``). Only the tests set it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

TIMEOUT_ENV = "RANKALLOC_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
TEST_FAIL_ENV = "RANKALLOC_TEST_FAIL_AT_LAYER"

_STATE: dict = {"side": None, "timeout": None, "ours": False}


class RankError(RuntimeError):
    """A collective failed: a rank died, is stuck past the timeout, or lost its connection."""


# ----------------------------------------------------------------------------- the process group
def requested() -> bool:
    """Whether the environment asks for several processes (``WORLD_SIZE > 1``, as torchrun sets it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, received {os.environ['WORLD_SIZE']!r}") from None


def timeout_seconds() -> float:
    """``RANKALLOC_DIST_TIMEOUT`` in seconds (default 1800)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected seconds > 0, received {raw!r}")
    return value


def init_from_env() -> bool:
    """Join the default process group when ``WORLD_SIZE > 1`` (torchrun's ``env://`` variables); True if joined.

    Backend NCCL when every local rank has a GPU of its own (each on ``cuda:LOCAL_RANK``), else gloo; a gloo side
    group serves CPU tensors, objects and the monitored barriers under NCCL. A group initialised by the caller is
    used as it is.
    """
    if not requested():
        return False
    if dist.is_initialized():
        _side_group()
        return True
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: launch with torchrun "
                         f"(torchrun --nproc-per-node N -m rankalloc ...), which sets them")
    seconds = timeout_seconds()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:  # the store or the rendezvous timed out, an address is unusable
        raise RankError(f"rank {os.environ['RANK']}: could not join the process group at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {seconds:g} s "
                        f"({' '.join(str(exc).split())})") from None
    _STATE["ours"], _STATE["timeout"] = True, seconds
    _side_group()
    return True


def shutdown() -> None:
    """Leave the process group if :func:`init_from_env` joined it, after every rank has arrived: a rank that tore
    its connections down while rank 0 was still writing made gloo abort rank 0 ("terminate called without an active
    exception", seen once in 2-process CI runs)."""
    if _STATE["ours"] and dist.is_initialized():
        barrier("leaving the process group")
        dist.destroy_process_group()
    _STATE.update(side=None, timeout=None, ours=False)


def _side_group():
    """The gloo group for CPU tensors, objects and barriers (the default group when it is gloo)."""
    if _STATE["side"] is None:
        if dist.get_backend() == "gloo":
            _STATE["side"] = dist.group.WORLD
        else:
            _STATE["side"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout()))
    return _STATE["side"]


def _timeout() -> float:
    return _STATE["timeout"] if _STATE["timeout"] is not None else timeout_seconds()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_of(device: torch.device) -> torch.device:
    """A CUDA device without an index means this rank's own GPU (``cuda:LOCAL_RANK``) under several processes."""
    if device.type == "cuda" and device.index is None and world() > 1:
        return torch.device("cuda", local_rank())
    return device


# ----------------------------------------------------------------------------- the data of this rank
def batch_slice(n: int, batch_size: int = 1, what: str = "calibration") -> slice:
    """This rank's contiguous slice of ``n`` sequences: whole batches of ``batch_size``, balanced across ranks.

    Cutting at batch boundaries keeps every batch the one a single process forms, so each batch's forward is the
    same computation (same shapes, same masks) on every launch. Raises ``ValueError`` when a rank would get none.
    """
    w = world()
    batches = -(-n // batch_size)
    if batches < w:
        raise ValueError(f"{what}: {n} sequences make {batches} batch(es) of {batch_size} for {w} processes; every "
                         f"process needs at least one batch: use at least {w * batch_size} sequences, a batch size "
                         f"of at most {max(1, n // w)}, or at most {batches} processes")
    r = rank()
    lo, hi = r * batches // w, (r + 1) * batches // w
    return slice(lo * batch_size, min(hi * batch_size, n))


def assign(costs) -> list[int]:
    """The owner rank of each work item: greedy longest-processing-time bin packing (largest cost first, to the
    least loaded rank, ties to the lower rank and the earlier item). The same on every rank."""
    costs = [float(c) for c in costs]
    owner, load = [0] * len(costs), [0.0] * world()
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(len(load)), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


# ----------------------------------------------------------------------------- guarded collectives
@contextlib.contextmanager
def guarded(step: str):
    """Every rank meets at a monitored barrier before the collectives of ``step``; a rank that is missing past the
    timeout, or any failure of the collectives, raises :class:`RankError` naming the ranks and the step."""
    if world() == 1:
        yield
        return
    seconds = _timeout()
    me = rank()
    try:
        dist.monitored_barrier(group=_side_group(), timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RankError(_missing_message(me, step, seconds, str(exc))) from None
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, RankError):
            raise
        raise RankError(f"rank {me}: {step}: a collective failed ({' '.join(str(exc).split())[:300]}); another "
                        f"process died or lost its connection, see its own error") from None


def _missing_message(me: int, step: str, seconds: float, text: str) -> str:
    import re

    hit = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if hit and "successfully reached" not in text:
        ranks = ", ".join(x.strip() for x in hit.group(1).split(",") if x.strip())
        who = f"rank {ranks} did" if "," not in ranks else f"ranks {ranks} did"
        return (f"rank {me}: {step}: {who} not arrive within {seconds:g} s ({TIMEOUT_ENV}): the process died, "
                f"failed or is stuck; see its own error")
    if me == 0:  # rank 0 runs the barrier: a peer whose connection closed (it died) fails it before the timeout
        named = re.search(r"\b[Rr]ank (\d+)\b", text)
        who = (f"rank {named.group(1)}" if named and named.group(1) != "0" else
               "rank 1" if world() == 2 else f"one of ranks 1-{world() - 1}")
        return (f"rank 0: {step}: {who} did not arrive within {seconds:g} s ({TIMEOUT_ENV}) or its connection "
                f"closed: the process died, failed or is stuck; see its own error")
    return (f"rank {me}: {step}: lost rank 0, which coordinates the ranks, within {seconds:g} s ({TIMEOUT_ENV}): it "
            f"died, failed or is stuck; see its own error")


def barrier(step: str) -> None:
    """Every rank waits for the others (guarded)."""
    with guarded(step):
        pass


def _group_of(t: torch.Tensor):
    return None if t.device.type == "cuda" and dist.get_backend() == "nccl" else _side_group()


def all_reduce_sum_(*tensors: torch.Tensor, step: str) -> torch.Tensor:
    """Each tensor summed over the ranks, in place (float64 statistics; NCCL for CUDA tensors, gloo for CPU ones),
    under one guard; returns the first."""
    if world() > 1:
        with guarded(step):
            for t in tensors:
                dist.all_reduce(t, group=_group_of(t))
    return tensors[0] if tensors else None


def all_reduce_scalars(values, step: str) -> list[float]:
    """The float64 sums over the ranks of a few numbers."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return [float(x) for x in all_reduce_sum_(t, step=step)]


def gather_to_main(obj, step: str) -> list | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None on the others."""
    if world() == 1:
        return [obj]
    out = [None] * world() if is_main() else None
    with guarded(step):
        dist.gather_object(obj, out, dst=0, group=_side_group())
    return out


def all_gather(obj, step: str) -> list:
    """Every rank's ``obj`` on every rank (a list in rank order)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    with guarded(step):
        dist.all_gather_object(out, obj, group=_side_group())
    return out


def broadcast(obj, step: str, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if world() == 1:
        return obj
    box = [obj if rank() == src else None]
    with guarded(step):
        dist.broadcast_object_list(box, src=src, group=_side_group())
    return box[0]


def on_main(fn, step: str):
    """``fn()`` run on rank 0 and its result given to every rank; a ``ValueError`` or ``OSError`` it raises is
    raised on every rank (so every rank exits with rank 0's message, none waits for it)."""
    if world() == 1:
        return fn()
    got, failure = None, None
    if is_main():
        try:
            got = ("ok", fn())
        except (ValueError, OSError) as exc:
            got, failure = ("error", isinstance(exc, ValueError), str(exc)), exc
    got = broadcast(got, step)
    if failure is not None:
        raise failure
    if got[0] == "error":
        raise (ValueError if got[1] else OSError)(f"on rank 0: {got[2]}")
    return got[1]


def agree(label: str, value: dict) -> None:
    """``ValueError`` on every rank unless every rank passes the same ``value`` (model fingerprint, data hash,
    settings): it names the first rank that differs from rank 0 and the fields that differ."""
    if world() == 1:
        return
    values = all_gather(_jsonable(value), f"{label}: checking that every rank runs the same job")
    first = values[0]
    for r, v in enumerate(values[1:], start=1):
        if v != first:
            keys = sorted(set(first) | set(v), key=str)
            diff = [k for k in keys if first.get(k) != v.get(k)]
            detail = "; ".join(f"{k}: rank 0 has {_short(first.get(k))}, rank {r} has {_short(v.get(k))}"
                               for k in diff[:4])
            raise ValueError(f"{label}: the processes disagree: rank {r} differs from rank 0 in {', '.join(diff)} "
                             f"({detail}); every rank must run the same command on the same model, text and "
                             f"settings")


def _jsonable(value: dict) -> dict:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 80 else f"{text[:40]}... (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


# ----------------------------------------------------------------------------- files rank 0 writes
def require_shared(paths, what: str) -> None:
    """On ranks other than 0: ``ValueError`` naming the first of ``paths`` (written by rank 0) that is not visible."""
    if is_main():
        return
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"rank {rank()}: {p} ({what}, written by rank 0) is not visible to this process; with "
                             f"several machines the profile directory must be on a filesystem they all share")


# ----------------------------------------------------------------------------- the test hook
def fail_hook(layer: int) -> None:
    """``RANKALLOC_TEST_FAIL_AT_LAYER`` (see the module docstring); a no-op unless the tests set it."""
    raw = os.environ.get(TEST_FAIL_ENV)
    if not raw:
        return
    at, _, mode = raw.partition(":")
    if int(at) != layer:
        return
    barrier(f"test hook at forward layer {layer}")
    if rank() != world() - 1:
        return
    if mode == "exit":
        os._exit(17)
    if mode == "hang":
        time.sleep(10 ** 6)
    raise ValueError(f"test hook {TEST_FAIL_ENV}={raw}: rank {rank()} fails at forward layer {layer}")
