"""Curves re-measured at the compressed point (sequential record=) and the re-allocation loop (decomposers.reprofile)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_full_profile
from decomposer_cases import allocation_of, linear_choices, quarter
from rankalloc.decomposers import FisherSVDConfig, SVDConfig
from rankalloc.decomposers.reprofile import ReprofileConfig, at_compressed_point, reprofile_loop
from rankalloc.decomposers.sequential import SequentialConfig, _corrected, compress_sequential_
from rankalloc.profiling.fisher import fisher_curve
from rankalloc.profiling.numerics import Damping, damped_cholesky
from rankalloc.profiling.probe import profile_damping


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_full_profile(tmp_path_factory)


def inputs_of(model, name, ids):
    got = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return got[0].float()


@pytest.fixture(scope="module")
def recorded(setup):
    model, ids, prof = setup
    alloc = allocation_of(linear_choices(prof, quarter))
    built = copy.deepcopy(model)
    record = {"fisher": {}}
    compress_sequential_(built, alloc, FisherSVDConfig(), prof, ids, progress=False, record=record)
    return alloc, built, record["fisher"]


def test_every_matrix_is_priced_and_the_first_group_at_the_dense_point(setup, recorded):
    """Every matrix gets a curve; nothing is compressed before layer 0's q/k/v, so theirs are the profile's."""
    model, ids, prof = setup
    alloc, _, curves = recorded
    assert set(curves) == {c.name for c in prof.components}
    dense = prof.curve_set()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        want = dense.errors["fisher"][name][: len(curves[name])]
        np.testing.assert_allclose(curves[name], want, rtol=1e-3, atol=1e-9 * want.max())
    later = "model.layers.1.mlp.down_proj"
    assert not np.allclose(curves[later], dense.errors["fisher"][later][: len(curves[later])], rtol=1e-2)


def test_a_recorded_curve_prices_the_matrix_that_is_built(setup, recorded):
    """For layer 1's down_proj, rebuilt by hand from the dense and compressed inputs: the recorded curve is the
    fisher curve of W_tilde under G_hat, and its value at the chosen rank is the K-FAC error of the built factors
    against W_tilde."""
    model, ids, prof = setup
    alloc, built, curves = recorded
    name = "model.layers.1.mlp.down_proj"
    X, Xh = inputs_of(model, name, ids), inputs_of(built, name, ids)
    G, C = (Xh.T @ Xh).double(), (X.T @ Xh).double()
    G = 0.5 * (G + G.T)
    S, delta = damped_cholesky(G, "test", Damping(SequentialConfig().damp))
    C.diagonal().add_(delta)
    W = model.get_submodule(name).weight.detach().double()
    Wt = _corrected(W, C, S)
    Gg, damping = prof.output_gram(name), profile_damping(prof)
    want = fisher_curve(Wt, G, Gg, ids.numel(), prof.fisher_loss_tokens, name, damping)
    np.testing.assert_allclose(curves[name], want, rtol=2e-3, atol=1e-6 * want.max())
    mod = built.get_submodule(name)
    What = (mod.second.weight @ mod.first.weight).detach().double()
    Sx, _ = damped_cholesky(G, "x", damping)
    Sg, _ = damped_cholesky(Gg, "g", damping)
    err = float(((Sg.T @ (Wt - What) @ Sx) ** 2).sum()) / (2 * ids.numel() * prof.fisher_loss_tokens)
    r = alloc.choices[name].rank
    assert err == pytest.approx(curves[name][r], rel=2e-2)
    assert curves[name][r] > 0


def test_replacing_curves_keeps_dense_at_zero_and_refuses_a_short_curve(setup):
    model, ids, prof = setup
    cs = prof.curve_set()
    name = "model.layers.1.mlp.up_proj"
    new = at_compressed_point(cs, {name: np.linspace(5.0, 0.0, cs.component(name).max_rank + 1)}, "fisher")
    ranks = np.asarray(new.ranks[name])
    assert new.errors["fisher"][name][ranks == 0][0] == 5.0
    assert new.errors["whitened"] is cs.errors["whitened"]
    with pytest.raises(ValueError, match="up_proj.*3 values"):
        at_compressed_point(cs, {name: np.zeros(3)}, "fisher")


def test_each_reallocation_is_the_optimum_of_the_curves_measured_before_it(setup):
    """Step 0 is the dense-curve optimum; every later step is at most as costly on the curves the step before
    measured as that step's own allocation (it is their exact optimum), and stays within the budget."""
    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.problems import problem_for

    model, ids, prof = setup
    run = SimpleNamespace(model=model, loaded=SimpleNamespace(out_of_core=False))
    dense = get_solver("exact").solve(problem_for(prof, "fisher_svd", "fisher", 0.4))
    steps = []
    for step in reprofile_loop(run, prof, "fisher_svd", "fisher", 0.4, sequential=SequentialConfig(), ids=ids,
                               reprofile=ReprofileConfig(iterations=2), progress=False):
        steps.append((step.allocation, step.predicted, step.predicted_here, step.changed, step.fixed))
        assert step.report.params_after <= step.allocation.problem.limits["params"] + 1e-9
    assert 1 <= len(steps) <= 3
    assert steps[0][0].choices == dense.choices and steps[0][1] == pytest.approx(dense.objective)
    for (_, _, here, _, _), (_, pred, _, changed, _) in zip(steps, steps[1:]):
        assert pred <= here * (1 + 1e-9)
        assert changed > 0
    assert steps[-1][4] or len(steps) == 3


def test_refusals_name_the_setting(setup, tmp_path):
    model, ids, prof = setup
    run = SimpleNamespace(model=model, loaded=SimpleNamespace(out_of_core=False))
    with pytest.raises(ValueError, match="curve kind 'whitened'"):
        next(reprofile_loop(run, prof, "svd", "whitened", 0.3, sequential=SequentialConfig(), ids=ids, progress=False))
    with pytest.raises(ValueError, match="does not factor one matrix at a time"):
        next(reprofile_loop(run, prof, "sola", "fisher_svd", 0.3, sequential=SequentialConfig(), ids=ids,
                            progress=False))
    from rankalloc.profiling.profile import profile_model

    compact = profile_model(model, ids, out=tmp_path / "compact", device="cpu", kinds=("whitened", "fisher"),
                            progress=False)
    with pytest.raises(ValueError, match="--store full"):
        next(reprofile_loop(run, compact, "svd", "fisher_svd", 0.3, sequential=SequentialConfig(), ids=ids,
                            progress=False))
    with pytest.raises(ValueError, match="cannot record curve kinds"):
        compress_sequential_(copy.deepcopy(model), allocation_of(linear_choices(prof, quarter)), SVDConfig(), prof,
                             ids, progress=False, record={"whitened": {}})
    with pytest.raises(ValueError, match="ReprofileConfig"):
        ReprofileConfig(iterations=0)


def test_the_study_prints_and_saves_each_step(tmp_path, capsys):
    """study_reprofile on a tiny saved model: one CSV row per built step, starting at step 0, each with a finite
    perplexity and measured = ln(ppl / dense ppl)."""
    import math

    import pandas as pd

    from conftest import save_tiny_model_dir, write_text_file
    from rankalloc.studies.study_reprofile import main

    rc = main(["--model", str(save_tiny_model_dir(tmp_path / "model")), "--text", str(write_text_file(tmp_path / "t.txt")),
               "--samples", "4", "--seqlen", "32", "--windows", "2", "--ratios", "0.4", "--iterations", "1",
               "--sequential", "4", "--store", "full", "--profile", str(tmp_path / "profile"), "--out",
               str(tmp_path / "out")])
    assert rc == 0
    df = pd.read_csv(tmp_path / "out" / "reprofile.csv")
    assert list(df.step) == list(range(len(df))) and 1 <= len(df) <= 2
    assert all(math.isclose(m, math.log(p / d)) for m, p, d in zip(df.measured, df.ppl, df.dense_ppl))
    assert "step 0:" in capsys.readouterr().out
