"""Several processes on CPU (gloo, 2 processes): the same answer as one process, resumable, and clear errors.

The two-process runs are real launches: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
rankalloc ...``, or, where the ranks must run different commands or one must die, each rank started by hand with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). The one-process baselines run
in this process at 1 thread, as each worker does. Failures come from the test hook
``RANKALLOC_TEST_FAIL_AT_LAYER`` (``profiling/distributed.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import save_tiny_model_dir, write_text_file

CALIBRATION = ("--samples", "8", "--seqlen", "64", "--device", "cpu", "--batch-size", "2")
KINDS = ("--kinds", "whitened,fisher")
CURVES = ("whitened", "energy", "relative", "epsilon", "fisher", "fisher_svd")
TIMEOUT = 30


def test_slices_and_assignment_without_a_group(monkeypatch):
    """The pure parts, with the rank and world size patched: every rank gets a contiguous slice of whole batches,
    together all sequences once, balanced to a batch; too few batches is a ValueError saying what to change; LPT
    gives each item one owner and balances equal items round robin; one process is the identity."""
    from rankalloc.profiling import distributed

    assert distributed.batch_slice(7, 2) == slice(0, 7) and distributed.assign([3, 1, 2]) == [0, 0, 0]
    monkeypatch.setattr(distributed, "world", lambda: 3)
    for n, bs in ((10, 2), (9, 3), (3, 1), (17, 4)):
        parts = []
        for r in range(3):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            parts.append(distributed.batch_slice(n, bs))
        assert parts[0].start == 0 and parts[-1].stop == n and all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.start % bs == 0 for p in parts)
        sizes = [-(-(p.stop - p.start) // bs) for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least 6 sequences, a batch size of at most 1, or at most 2 processes"):
        distributed.batch_slice(4, 2)
    assert distributed.assign([1.0] * 6) == [0, 1, 2, 0, 1, 2]
    assert distributed.assign([10, 1, 1, 1, 9, 1]) == [0, 2, 2, 2, 1, 2]


def test_a_failed_barrier_names_the_missing_rank_never_rank_0_on_rank_0(monkeypatch):
    """Rank 0 runs the monitored barrier: a peer that died closes its connection before the timeout, and the message
    still names that peer (the only other rank of two; a rank named by gloo), never rank 0 itself."""
    from rankalloc.profiling import distributed

    monkeypatch.setattr(distributed, "world", lambda: 2)
    closed = distributed._missing_message(0, "forward layer 1", 30, "Connection closed by peer [127.0.0.1]:5")
    assert "rank 1 did not arrive within 30 s" in closed and "rank 0," not in closed.split(":", 2)[2]
    monkeypatch.setattr(distributed, "world", lambda: 4)
    assert "rank 2 did not arrive" in distributed._missing_message(0, "s", 5, "Rank 2 failed to pass monitoredBarrier")
    assert "one of ranks 1-3" in distributed._missing_message(0, "s", 5, "Connection closed by peer")
    assert "lost rank 0" in distributed._missing_message(3, "s", 5, "Connection closed by peer")


def _env(root, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "RANKALLOC_TEST_FAIL_AT_LAYER")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RANKALLOC_CACHE": str(root / "cache"),
            "RANKALLOC_DIST_TIMEOUT": str(TIMEOUT), **extra}


def torchrun(root, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "rankalloc", *args], capture_output=True, text=True, timeout=300,
                          env=_env(root, **env))


def start_by_hand(root, commands, **env) -> list[subprocess.Popen]:
    """Each rank its own ``python -m rankalloc`` command, in torchrun's environment on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, "-m", "rankalloc", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=_env(root, WORLD_SIZE=str(len(commands)), RANK=str(r), LOCAL_RANK=str(r),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env))
            for r, args in enumerate(commands)]


def finished(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def by_hand(root, commands, **env) -> tuple[list[subprocess.CompletedProcess], float]:
    """:func:`start_by_hand`, waited for: ``(results, seconds)``."""
    t0 = time.perf_counter()
    procs = start_by_hand(root, commands, **env)
    return [finished(p) for p in procs], time.perf_counter() - t0


@contextlib.contextmanager
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_process(*argv) -> int:
    from rankalloc.studies.cli import main

    with one_thread():
        return main(list(argv))


def error_line(proc, rank: int) -> str:
    """The one error line of ``rank`` in a run's stderr."""
    prefix = f"rankalloc profile [rank {rank}]: error: "
    lines = [l for l in proc.stderr.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def assert_same_curves(a, b) -> None:
    fa, fb = pd.read_csv(a / "curves.csv"), pd.read_csv(b / "curves.csv")
    assert list(fa["component"]) == list(fb["component"]) and list(fa["rank"]) == list(fb["rank"])
    for kind in CURVES:
        np.testing.assert_allclose(fb[kind], fa[kind], rtol=1e-6, atol=0, err_msg=kind)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny model folder, a text, a one-process profile (here) and a two-process one (torchrun)."""
    root = tmp_path_factory.mktemp("distributed")
    model, text = save_tiny_model_dir(root / "model"), write_text_file(root / "text.txt")
    job = ("--model", str(model), "--text", str(text), *CALIBRATION, *KINDS)
    assert in_process("profile", *job, "--out", str(root / "p1")) == 0
    two = torchrun(root, "profile", *job, "--out", str(root / "p2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("profile: ") == 1  # rank 0 alone prints
    return {"root": root, "model": model, "text": text, "job": job}


def test_two_processes_give_the_curves_and_the_allocation_of_one(root):
    """Every curve of a 2-process profile within 1e-6 relative of the 1-process one (the batches are the same, only
    the order of the float64 sums differs); the exact allocations of both are identical; no scratch is left."""
    r = root["root"]
    assert_same_curves(r / "p1", r / "p2")
    assert not (r / "p2" / "scratch").exists()
    for p in ("p1", "p2"):
        assert in_process("allocate", "--curves", str(r / p), "--kind", "fisher", "--solver", "exact", "--budget",
                          "0.3", "--out", str(r / f"{p}.json"), "--quiet") == 0
    a, b = (json.loads((r / f"{p}.json").read_text()) for p in ("p1", "p2"))
    assert a["choices"] == b["choices"] and a["cost"] == b["cost"]


def test_an_interrupted_run_resumes_with_one_or_two_processes(root):
    """A rank raising at forward layer 1 stops the 2-process run with layer 0 stored; the store resumes with 1
    process and with 2 to the curves of the uninterrupted run."""
    r = root["root"]
    cut = torchrun(r, "profile", *root["job"], "--out", str(r / "cut"), RANKALLOC_TEST_FAIL_AT_LAYER="1")
    assert cut.returncode != 0
    assert "rankalloc profile [rank 1]: error: test hook" in cut.stderr
    assert json.loads((r / "cut" / "meta.json").read_text())["finished_layers"] == [0]
    shutil.copytree(r / "cut", r / "cut2")
    assert in_process("profile", *root["job"], "--out", str(r / "cut")) == 0
    two = torchrun(r, "profile", *root["job"], "--out", str(r / "cut2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_curves(r / "p2", r / "cut")
    assert_same_curves(r / "p2", r / "cut2")


def test_ranks_that_disagree_fail_naming_the_rank_and_the_setting(root):
    """Rank 1 given another --seed: both ranks exit 1 at once, each with one line naming rank 1 and the seed."""
    r = root["root"]
    base = ["profile", "--model", str(root["model"]), "--text", str(root["text"]), *CALIBRATION, "--kinds",
            "whitened", "--out", str(r / "seeds")]
    (a, b), seconds = by_hand(r, [base + ["--seed", "0"], base + ["--seed", "1"]])
    assert a.returncode == b.returncode == 1, (a.stderr[-2000:], b.stderr[-2000:])
    for rank, proc in enumerate((a, b)):
        line = error_line(proc, rank)
        assert "the processes disagree: rank 1 differs from rank 0 in" in line and "seed: rank 0 has 0, rank 1 has 1" in line
    assert seconds < TIMEOUT + 60
    assert not (r / "seeds" / "layers").exists() or not any((r / "seeds" / "layers").iterdir())


def test_a_rank_that_dies_makes_the_other_fail_naming_it(root):
    """Rank 1 exits abruptly at forward layer 1: rank 0 exits 1 within the timeout with one line naming rank 1 and
    the step; the store keeps layer 0."""
    r = root["root"]
    cmd = ["profile", "--model", str(root["model"]), "--text", str(root["text"]), *CALIBRATION, "--kinds",
           "whitened", "--out", str(r / "dead")]
    (a, b), seconds = by_hand(r, [cmd, cmd], RANKALLOC_TEST_FAIL_AT_LAYER="1:exit")
    assert b.returncode == 17 and a.returncode == 1, a.stderr[-2000:]
    line = error_line(a, 0)
    assert "forward layer 1" in line and f"rank 1 did not arrive within {TIMEOUT} s" in line
    assert seconds < TIMEOUT + 60
    assert json.loads((r / "dead" / "meta.json").read_text())["finished_layers"] == [0]


@pytest.mark.slow
def test_a_stuck_rank_makes_the_other_fail_after_the_timeout(root):
    """Rank 1 stops answering at forward layer 1 (it sleeps): rank 0 exits 1 after RANKALLOC_DIST_TIMEOUT=5 s with
    one line naming rank 1, instead of waiting for it."""
    r = root["root"]
    cmd = ["profile", "--model", str(root["model"]), "--text", str(root["text"]), *CALIBRATION, "--kinds",
           "whitened", "--out", str(r / "stuck")]
    procs = start_by_hand(r, [cmd, cmd], RANKALLOC_DIST_TIMEOUT="5", RANKALLOC_TEST_FAIL_AT_LAYER="1:hang")
    try:
        first = finished(procs[0], timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert first.returncode == 1, first.stderr[-2000:]
    line = error_line(first, 0)
    assert "forward layer 1" in line and "rank 1 did not arrive within 5 s" in line


def test_compress_and_evaluate_under_two_processes_equal_one(root):
    """`rankalloc compress` under 2 processes writes bit-identical tensors; `rankalloc evaluate` prints the same
    protocol and perplexities as 1 process."""
    import torch
    from safetensors.torch import load_file

    r = root["root"]
    alloc = r / "alloc.json"
    assert in_process("allocate", "--curves", str(r / "p1"), "--kind", "fisher", "--solver", "exact", "--budget",
                      "0.3", "--out", str(alloc), "--quiet") == 0
    job = ("compress", "--profile", str(r / "p1"), "--allocation", str(alloc), "--method", "fisher_svd")
    assert in_process(*job, "--out", str(r / "c1")) == 0
    two = torchrun(r, *job, "--out", str(r / "c2"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(r / c / "model.safetensors")) for c in ("c1", "c2"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    ev = ("evaluate", "--compressed", str(r / "c2"), "--text", str(root["text"]), "--seqlen", "64", "--windows", "6",
          "--batch-size", "2", "--device", "cpu")
    two = torchrun(r, *ev)
    assert two.returncode == 0, two.stderr[-3000:]
    with contextlib.redirect_stdout(io.StringIO()) as one:
        assert in_process(*ev) == 0
    lines = [l for l in one.getvalue().splitlines() if l.startswith(("protocol", "dense", "compressed"))]
    assert len(lines) == 3 and lines == [l for l in two.stdout.splitlines() if l.startswith(("protocol", "dense",
                                                                                           "compressed"))]
