"""Adding a decomposition method takes one file: it registers itself and appears in problem_for, compress_,
``rankalloc compress`` and ``rankalloc compare`` with no other edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import save_tiny_model_dir, write_text_file

TOY = '''\
# A toy method in one file: plain truncated SVD of each matrix (no whitening), to show the plugin contract.
from dataclasses import dataclass

import torch

from rankalloc.decomposers.base import Factors, linear_handler, low_rank_module
from rankalloc.decomposers.modules import LowRankLinear
from rankalloc.decomposers.registry import Method, profile_curves, register_method


@dataclass(frozen=True)
class PlainSVDConfig:
    pass


def build(module, choice, W, G, config, name):
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = int(choice.rank)
    return low_rank_module(module, Factors(U[:, :r] * s[:r], Vh[:r], float((s[r:] ** 2).sum())))


register_method(Method("plain_svd", PlainSVDConfig, linear_handler(build, name="plain_svd"), profile_curves("plain_svd"),
                       "truncated SVD without whitening", modules=(LowRankLinear,), kind="whitened"))
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_method")
    path = root / "plain_svd.py"
    path.write_text(TOY)
    return path


def test_a_method_in_one_file_reaches_the_whole_pipeline(toy, tmp_path):
    """load_plugin(file) -> the method is listed, prices a problem, and compresses to exactly its allocation."""
    from conftest import tiny_model
    from rankalloc.allocators.registry import get_solver, load_plugin
    from rankalloc.decomposers import method_names
    from rankalloc.decomposers.problems import compress, problem_for
    from rankalloc.profiling.profile import profile_model

    load_plugin(toy)
    assert "plain_svd" in method_names()
    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    prof = profile_model(model, ids, out=tmp_path / "p", device="cpu", kinds=("whitened",), progress=False)
    problem = problem_for(prof, "plain_svd", "whitened", 0.3)
    allocation = get_solver("exact").solve(problem)
    compressed, report = compress(model, prof, allocation, "plain_svd", progress=False)
    assert report.method == "plain_svd" and report.params_after == int(allocation.cost["params"])
    assert allocation.removed() >= 0.3 - 1e-9
    assert torch.isfinite(compressed(ids[:1]).logits).all()


def rankalloc(*args, env):
    return subprocess.run([sys.executable, "-m", "rankalloc.studies.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_the_command_line_offers_a_plugin_method(toy, tmp_path):
    """`rankalloc compress --plugin toy.py --method plain_svd` and `rankalloc compare --methods plain_svd` run it."""
    model_dir = save_tiny_model_dir(tmp_path / "model")
    text = write_text_file(tmp_path / "text.txt")
    env = {"RANKALLOC_CACHE": str(tmp_path / "cache")}
    common = ("--model", str(model_dir), "--text", str(text), "--samples", "4", "--seqlen", "32", "--device", "cpu")
    prof = tmp_path / "profile"
    p = rankalloc("profile", *common, "--kinds", "whitened", "--out", str(prof), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    alloc = tmp_path / "alloc.json"
    a = rankalloc("allocate", "--curves", str(prof), "--kind", "whitened", "--budget", "0.3", "--out", str(alloc),
                  "--quiet", env=env)
    assert a.returncode == 0, a.stderr[-2000:]
    c = rankalloc("compress", "--plugin", str(toy), "--profile", str(prof), "--allocation", str(alloc), "--method",
                  "plain_svd", "--out", str(tmp_path / "c"), env=env)
    assert c.returncode == 0, c.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "compressed.json").read_text())["method"] == "plain_svd"
    assert "fisher_svd" in rankalloc("compress", "--help", env=env).stdout  # --method lists the registered methods
    cmp_ = rankalloc("compare", "--plugin", str(toy), *common, "--profile", str(prof), "--methods", "plain_svd",
                     "--kinds", "whitened", "--solvers", "uniform,exact", "--ratios", "0.3", "--windows", "2",
                     "--out", str(tmp_path / "cmp"), env=env)
    assert cmp_.returncode == 0, cmp_.stderr[-2000:]
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.startswith("plain_svd,") for r in rows[1:])
    bad = rankalloc("compress", "--profile", str(prof), "--allocation", str(alloc), "--method", "plain_svd",
                    "--out", str(tmp_path / "d"), env=env)
    assert bad.returncode == 1 and "unknown method 'plain_svd'" in bad.stderr and "fisher_svd" in bad.stderr


def test_a_method_names_both_halves_of_its_sequential_join():
    """``joins`` without ``remeasure`` (or the reverse) is refused when the Method is made, naming the method; with
    both, sequential calibration accepts a method whose components are not single matrices."""
    from dataclasses import dataclass

    from rankalloc.decomposers.registry import Method, profile_curves

    @dataclass(frozen=True)
    class Cfg:
        pass

    def handler(model, allocation, config, profile, progress):
        return []

    curves = lambda *a, **k: None  # noqa: E731  (a non-per-matrix method: curves without the per_matrix mark)
    for half in (dict(joins=lambda name: None), dict(remeasure=lambda model, c, inputs: {})):
        with pytest.raises(ValueError, match="method 'halfway': joins and remeasure go together"):
            Method("halfway", Cfg, handler, curves, "test", **half)
    assert not Method("alone", Cfg, handler, curves, "test").sequential
    assert Method("joined", Cfg, handler, curves, "test", joins=lambda name: None,
                  remeasure=lambda model, c, inputs: {}).sequential
    assert Method("matrices", Cfg, handler, profile_curves("matrices"), "test").sequential


def test_a_method_states_the_profile_store_it_reads():
    """``Method.store`` is 'compact' or 'full' (anything else is refused naming the method); ``profile_store`` is
    'full' for a full-store method, and under sequential calibration for one that reads the Fisher output-gradient
    Grams; the built-in SSLC reads the full store, and fisher_svd only when sequential, which the refusals say."""
    from dataclasses import dataclass

    from rankalloc.decomposers.registry import Method, get_method, profile_curves
    from rankalloc.profiling.run import store_for, store_reasons

    @dataclass(frozen=True)
    class Cfg:
        pass

    def handler(model, allocation, config, profile, progress):
        return []

    with pytest.raises(ValueError, match="method 'odd': store must be 'compact' or 'full'.*'fast'"):
        Method("odd", Cfg, handler, profile_curves("odd"), "test", store="fast")
    plain = Method("plain", Cfg, handler, profile_curves("plain"), "test")
    loss = Method("loss", Cfg, handler, profile_curves("loss"), "test", needs=("fisher",))
    assert [plain.profile_store(s) for s in (False, True)] == ["compact", "compact"]
    assert [loss.profile_store(s) for s in (False, True)] == ["compact", "full"]
    assert get_method("sslc").profile_store() == "full" and get_method("svd").profile_store(True) == "compact"
    assert store_for(["svd", "fisher_svd"]) == ("compact", [])
    assert store_for(["svd", "fisher_svd"], sequential=True) == ("full", ["fisher_svd"])
    assert store_for(["sslc", "flat"]) == ("full", ["sslc"])
    assert store_reasons(["sslc", "fisher_svd"]) == "'sslc', 'fisher_svd' with --sequential"


def test_the_testing_kit_checks_every_method_and_catches_a_broken_one(toy, tmp_path):
    """check_method passes every built-in method on a tiny Llama and Qwen2 (biases) model, and the toy plugin;
    a method that refuses the family fails ``fits`` with its reason and runs nothing else. A method whose handler
    reports a compression it did not build (the matrices stay dense) fails ``budget_held``, counted on the model,
    and ``rankalloc check --method`` exits 1 naming the check."""
    import copy
    from dataclasses import dataclass

    from rankalloc.allocators.registry import load_plugin
    from rankalloc.decomposers import METHODS, SVDConfig, method_names
    from rankalloc.decomposers.registry import Method, profile_curves, register_method
    from rankalloc.studies.cli import main
    from rankalloc.testing.methods import METHOD_CHECKS, check_method

    load_plugin(toy)
    for family in ("llama", "qwen2"):
        for name in method_names():
            table = check_method(name, family=family)
            assert list(table.check) == list(METHOD_CHECKS)
            assert table.passed.all(), (family, name, table[~table.passed].to_string())
    refused = check_method("flat", family="gpt2")
    assert not refused.passed.any() and "fused 'qkv'" in refused.detail.iloc[0]
    assert (refused.detail.iloc[1:] == "not run: fits failed").all()

    svd = METHODS["svd"]

    @dataclass(frozen=True)
    class PretendConfig:
        pass

    def pretend(model, allocation, config, profile, progress):
        # the reports of a compression applied to a copy: the model itself stays dense
        return svd.compress(copy.deepcopy(model), allocation, SVDConfig(), profile, progress)

    register_method(Method("pretend", PretendConfig, pretend, profile_curves("pretend"),
                           "reports a compression it did not build",
                           modules=svd.modules, kind="fisher_svd"), replace=True)
    try:
        table = check_method("pretend")
        row = table.set_index("check").loc["budget_held"]
        assert not row.passed and "the stored weights fell by 0" in row.detail
        assert main(["check", "--method", "pretend"]) == 1
        assert main(["check", "--solver", "exact", "--family", "qwen2"]) == 1  # --family is read with --method only
    finally:
        METHODS.pop("pretend", None)
