"""Decomposers: exact parameter counts, running/generating models, the maths of each method, save/load.

A tiny random-weight Llama is profiled once (``profile_model``, whitened + fisher kinds) and every
method compresses fresh copies of it.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from rankalloc.allocators.costs import FlatParams
from rankalloc.allocators.problem import DENSE, AllocationProblem, Choice, Component
from rankalloc.decomposers import (METHODS, MODULE_TYPES, FisherSVDConfig, FlatConfig, LowRankLinear, PGSVDConfig, SoLAConfig,
                                   SVDConfig, compress_, load_compressed, pgsvd, rank_pattern, save_compressed,
                                   whitened_svd)
from rankalloc.decomposers.base import activation_error
from rankalloc.decomposers.fisher_svd import fisher_svd, fisher_weighted_error
from rankalloc.decomposers.flat import FlatAttention, value_bases
from rankalloc.decomposers.pgsvd import truncated_svd
from rankalloc.decomposers.sola import SoLAMLP
from rankalloc.profiling.architectures import prime_count
from rankalloc.testing.methods import weight_units

from decomposer_cases import (ALL_METHODS, FLAT_COSTS, GAMMA, HEAD_DIM, HEADS, KV_HEADS, allocation_of, flat_choices,
                              linear_choices, method_case, sola_choices, varied, vo_component)


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, calibration ids, profile) of a tiny Llama; the model is never modified by tests."""
    from rankalloc.profiling.profile import profile_model

    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    profile = profile_model(model, ids, out=tmp_path_factory.mktemp("profile"), device="cpu",
                            kinds=("whitened", "fisher"), progress=False, store="full")
    return model, ids, profile




# ----------------------------------------------------------------------------- registry and configs
def test_registry_names_every_method():
    """Each of the six methods registered itself from its own module, with a config that builds with defaults and
    the module classes it puts into a model (for save/load)."""
    assert {"svd", "fisher_svd", "pgsvd", "sola", "flat", "sslc"} <= set(METHODS)
    for name, m in METHODS.items():
        assert callable(m.compress) and callable(m.curves) and m.config() is not None, name
        assert m.config.__module__ == f"rankalloc.decomposers.{name}", name  # one file per method
        for cls in m.modules:
            assert MODULE_TYPES[cls.spec_type][0] is cls


@pytest.mark.parametrize("bad", [lambda: SVDConfig(damp=0), lambda: FisherSVDConfig(output_damp=-1),
                                 lambda: PGSVDConfig(max_iter=-1), lambda: PGSVDConfig(init="random"),
                                 lambda: PGSVDConfig(tol=-1.0), lambda: SoLAConfig(gamma=1.0),
                                 lambda: FlatConfig(damp=0.0)])
def test_configs_refuse_bad_values(bad):
    """Every config validates in __post_init__ with ValueError."""
    with pytest.raises(ValueError):
        bad()


def test_unknown_config_is_refused(setup):
    """compress_ refuses a config of no registered method."""
    model, _, profile = setup
    alloc = allocation_of(linear_choices(profile, varied))
    with pytest.raises(ValueError, match="unknown decomposer config"):
        compress_(copy.deepcopy(model), alloc, object(), profile, progress=False)


# ----------------------------------------------------------------------------- LowRankLinear
def test_low_rank_linear_computes_a_b_x_plus_bias_and_rank_zero_outputs_bias():
    """LowRankLinear(x) = A B x + b; rank 0 stores no weights and outputs exactly the bias."""
    g = torch.Generator().manual_seed(1)
    A, B, b = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                                                dtype=torch.float64), torch.randn(7)
    mod = LowRankLinear.from_factors(A, B, b, torch.float64, "cpu")
    x = torch.randn(4, 5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(mod(x), x @ (A @ B).T + b.double())
    assert sum(p.numel() for n, p in mod.named_parameters() if "bias" not in n) == 3 * (7 + 5)
    zero = LowRankLinear.from_factors(torch.zeros(7, 0), torch.zeros(0, 5), b, torch.float32, "cpu")
    assert sum(p.numel() for n, p in zero.named_parameters() if "bias" not in n) == 0
    assert torch.equal(zero(torch.randn(2, 5)), b.expand(2, 7))


# ----------------------------------------------------------------------------- pure maths
def _problem(seed, m=9, n=7, T=30):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, T, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, n, dtype=torch.float64)[:, None]
    return W, X, X @ X.T


@pytest.mark.parametrize("rank", [0, 3, 7])
def test_whitened_svd_error_equals_tail_of_whitened_spectrum(rank):
    """||(W - AB) X||^2 + delta ||W - AB||^2 = sum_{i>r} sigma_i(W S)^2 (SVD-LLM's truncation identity)."""
    W, X, G = _problem(rank)
    f = whitened_svd(W, G, rank)
    E = W - f.A @ f.B
    measured = float(((E @ X) ** 2).sum()) + f.delta * float((E ** 2).sum())
    assert measured == pytest.approx(f.error, rel=1e-9, abs=1e-9 * float((W @ X).pow(2).sum()))
    if rank == 7:
        torch.testing.assert_close(f.A @ f.B, W, rtol=1e-9, atol=1e-9)


def test_pure_functions_refuse_bad_ranks_and_grams():
    """A rank beyond min(m, n) or a Gram of the wrong shape raises ValueError naming the matrix."""
    W, _, G = _problem(0)
    with pytest.raises(ValueError, match=r"mat.*rank in \[0, 7\]"):
        whitened_svd(W, G, 8, name="mat")
    with pytest.raises(ValueError, match="mat.*Gram of shape"):
        pgsvd(W, G[:5, :5], 2, name="mat")
    with pytest.raises(ValueError, match="mat.*output-gradient Gram"):
        fisher_svd(W, G, G, 2, name="mat")


@settings(derandomize=True, deadline=None, max_examples=25)
@given(m=st.integers(2, 10), n=st.integers(2, 10), T=st.integers(1, 25), seed=st.integers(0, 10_000),
       init=st.sampled_from(["svd", "whitened"]), frac=st.floats(0, 1))
def test_pgsvd_never_increases_error_and_beats_its_start(m, n, T, seed, init, frac):
    """ALS steps are exact partial minimisers: the history of tr(E M E^T) never rises (up to round-off), the
    returned error is its minimum, and it is <= the truncated SVD it starts from (plain or whitened)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, T, generator=g, dtype=torch.float64)
    M = X @ X.T
    rank = int(round(frac * min(m, n)))
    f = pgsvd(W, M, rank, PGSVDConfig(init=init, max_iter=10, tol=0.0))
    h = np.array(f.info["history"])
    scale = float((W @ X).pow(2).sum()) + 1e-300
    assert (np.diff(h) <= 1e-9 * scale).all(), h
    assert f.error == pytest.approx(h.min(), abs=1e-12 * scale)
    assert f.error == pytest.approx(activation_error(W - f.A @ f.B, M), abs=1e-9 * scale)
    if init == "svd":
        A0, B0 = truncated_svd(W, rank)
        start = activation_error(W - A0 @ B0, M)
    else:
        s = whitened_svd(W, M, rank)
        start = activation_error(W - s.A @ s.B, M)
    assert h[0] == pytest.approx(start, abs=1e-9 * scale)
    assert f.error <= start + 1e-9 * scale
    assert f.info["iterations"] <= 10


def test_pgsvd_improves_on_plain_svd_and_stops_early():
    """From the plain SVD, ALS strictly lowers the activation error towards the whitened optimum; with a loose
    tolerance it stops before max_iter."""
    W, X, M = _problem(3, m=12, n=10, T=40)
    plain = pgsvd(W, M, 3, PGSVDConfig(init="svd", max_iter=0))
    refined = pgsvd(W, M, 3, PGSVDConfig(init="svd", max_iter=10, tol=0.0))
    optimum = whitened_svd(W, M, 3, damp=1e-12)
    assert refined.error < 0.9 * plain.error
    assert refined.error >= activation_error(W - optimum.A @ optimum.B, M) * (1 - 1e-9)
    loose = pgsvd(W, M, 3, PGSVDConfig(init="svd", max_iter=50, tol=0.5))
    assert loose.info["iterations"] < 50


def test_fisher_svd_minimises_the_fisher_weighted_error():
    """Two-sided whitening beats one-sided whitening on tr(Gg E Gx E^T), and its prediction is exactly that
    error under the damped Grams (G + damp * mean(diag G) I)."""
    W, X, Gx = _problem(5, m=9, n=7, T=40)
    g = torch.Generator().manual_seed(9)
    Y = torch.randn(9, 40, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 9, dtype=torch.float64)[:, None]
    Gg = Y @ Y.T
    for r in (1, 3, 5):
        f = fisher_svd(W, Gx, Gg, r)
        s = whitened_svd(W, Gx, r)
        ef = fisher_weighted_error(W - f.A @ f.B, Gx, Gg)
        es = fisher_weighted_error(W - s.A @ s.B, Gx, Gg)
        assert ef < es
        damped = [G + 1e-6 * float(G.diagonal().mean()) * torch.eye(len(G), dtype=G.dtype) for G in (Gx, Gg)]
        assert fisher_weighted_error(W - f.A @ f.B, *damped) == pytest.approx(f.error, rel=1e-9)


def test_value_bases_drop_exactly_the_tail_eigenvalues():
    """||Y - Q Q^T Y||^2 equals the dropped eigenvalue sum of Y Y^T, per head."""
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(2, 6, 50, generator=g, dtype=torch.float64)
    C = Y @ Y.transpose(1, 2)
    Q, dropped = value_bases(C, 4)
    R = Y - Q @ (Q.transpose(1, 2) @ Y)
    torch.testing.assert_close(R.pow(2).sum(dim=(1, 2)), dropped, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- every method on a model
@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_realizes_the_allocation_exactly_and_still_generates(setup, method):
    """After compress_, the model's weight count is dense - components' dense + allocation cost (+ SoLA's fixed
    prime weights); the report agrees; the model runs to finite logits and generates."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    config, alloc = method_case(method, m, profile)
    before = weight_units(m)
    report = compress_(m, alloc, config, profile, progress=False)
    dense = sum(alloc.problem.costs["params"].dense(c) for c in alloc.problem.components)
    assert report.params_after == report.expected_params == int(alloc.cost["params"])
    assert weight_units(m) == before - dense + alloc.cost["params"]  # SoLA: prime weights were in "before" too
    assert (report.fixed_params > 0) == (method == "sola")
    assert len(report.components) == len(alloc.problem.curves)
    with torch.no_grad():
        logits = m(ids[:2]).logits
    assert torch.isfinite(logits).all()
    out = m.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_round_trip_is_bit_exact(setup, method, tmp_path):
    """load_compressed(save_compressed(model)) rebuilds the structure from JSON and gives identical logits."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    config, alloc = method_case(method, m, profile)
    report = compress_(m, alloc, config, profile, progress=False)
    save_compressed(m, tmp_path / "c", report)
    loaded = load_compressed(tmp_path / "c")
    assert [type(x).__name__ for x in loaded.modules()] == [type(x).__name__ for x in m.modules()]
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, m(ids[:2]).logits)
    assert loaded.compression_report.params_after == report.params_after
    assert loaded.compression_report.choices == report.choices


@pytest.mark.parametrize("method", ["svd", "fisher_svd", "pgsvd", "sola", "flat"])
def test_dense_choices_leave_the_model_untouched(setup, method):
    """An all-dense allocation changes no module and no output."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    _, alloc = method_case(method, m, profile)
    config = METHODS[method].config()
    dense = allocation_of({c: Choice(DENSE) for c in alloc.problem.components}, alloc.problem.costs)
    report = compress_(m, dense, config, profile, progress=False)
    assert report.params_after == report.params_before
    assert [type(x) for x in m.modules()] == [type(x) for x in model.modules()]
    with torch.no_grad():
        assert torch.equal(m(ids[:2]).logits, model(ids[:2]).logits)


@pytest.mark.parametrize("method", ["svd", "fisher_svd", "pgsvd", "sola", "flat"])
def test_full_rank_choices_keep_the_outputs(setup, method):
    """Full rank (and head_dim for FLAT's vo) reproduces the dense model up to float32 round-off."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    _, alloc = method_case(method, m, profile)
    config = METHODS[method].config()
    full = {c: Choice(HEAD_DIM if c.kind == "vo" else c.max_rank) for c in alloc.problem.components}
    compress_(m, allocation_of(full, alloc.problem.costs), config, profile, progress=False)
    assert any(isinstance(x, (LowRankLinear, FlatAttention, SoLAMLP)) for x in m.modules())
    with torch.no_grad():
        ref, got = model(ids[:2]).logits, m(ids[:2]).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# ----------------------------------------------------------------------------- measured vs predicted errors
def _inputs_of(model, name, ids) -> torch.Tensor:
    """The calibration inputs X (tokens x n, float64) of module ``name``."""
    xs = []
    h = model.get_submodule(name).register_forward_hook(lambda mod, a, out: xs.append(a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()


@pytest.mark.parametrize("name,rank", [("model.layers.0.self_attn.q_proj", 9), ("model.layers.1.mlp.down_proj", 20)])
def test_svd_measured_error_matches_the_profiles_whitened_curve(setup, name, rank):
    """||(W - W_hat) X||^2 on the calibration activations, plus the damping term delta ||W - W_hat||^2, equals the
    profile's whitened curve at the chosen rank (SVD-LLM's identity), to 1e-6 relative."""
    model, ids, profile = setup
    m = copy.deepcopy(model).double()
    comp = next(c for c in profile.components if c.name == name)
    compress_(m, allocation_of({comp: Choice(rank)}), SVDConfig(), profile, progress=False)
    new = m.get_submodule(name)
    assert isinstance(new, LowRankLinear) and new.rank == rank
    W = model.get_submodule(name).weight.double()
    E = (W - new.second.weight @ new.first.weight).detach()
    X = _inputs_of(model, name, ids)
    measured = float((X @ E.T).pow(2).sum())
    predicted = float(profile.curve_set("whitened").errors["whitened"][name][rank])
    delta = profile.damping_delta(name)
    assert measured + delta * float(E.pow(2).sum()) == pytest.approx(predicted, rel=1e-6)
    assert measured == pytest.approx(predicted, rel=1e-3)  # the damping term is small


def test_fisher_svd_matches_the_fisher_curve_and_beats_svd_on_fisher_error(setup):
    """The Fisher-SVD prediction is the profile's K-FAC fisher curve (times 2 N_x N_loss), and its realized
    Fisher-weighted error is below that of the plain whitened SVD at the same rank."""
    model, ids, profile = setup
    name, rank = "model.layers.1.mlp.up_proj", 12
    comp = next(c for c in profile.components if c.name == name)
    Gx, Gg = profile.input_gram(name), profile.output_gram(name)
    W = model.get_submodule(name).weight.double()
    errs = {}
    for cfg in (FisherSVDConfig(), SVDConfig()):
        m = copy.deepcopy(model).double()
        report = compress_(m, allocation_of({comp: Choice(rank)}), cfg, profile, progress=False)
        new = m.get_submodule(name)
        errs[type(cfg).__name__] = fisher_weighted_error(W - new.second.weight @ new.first.weight, Gx, Gg)
        if isinstance(cfg, FisherSVDConfig):
            scale = 2.0 * profile.tokens * ids.shape[0] * (ids.shape[1] - 1)
            curve = profile.curve_set("fisher").errors["fisher"][name][rank]
            assert report.components[0].predicted_error == pytest.approx(curve * scale, rel=1e-9)
    assert errs["FisherSVDConfig"] < errs["SVDConfig"]


def test_pgsvd_model_error_is_at_most_plain_svd(setup):
    """On a real component, PGSVD's activation error never exceeds its plain-SVD start, and its report says so."""
    model, ids, profile = setup
    name = "model.layers.0.mlp.gate_proj"
    comp = next(c for c in profile.components if c.name == name)
    m = copy.deepcopy(model).double()
    report = compress_(m, allocation_of({comp: Choice(10)}), PGSVDConfig(init="svd"), profile, progress=False)
    info = report.components[0].info
    assert report.components[0].predicted_error <= info["start_error"]
    assert (np.diff(info["history"]) <= 1e-9 * info["start_error"]).all()
    G = profile.input_gram(name)
    new = m.get_submodule(name)
    W = model.get_submodule(name).weight.double()
    A0, B0 = truncated_svd(W, 10)
    assert activation_error(W - new.second.weight @ new.first.weight, G) <= activation_error(W - A0 @ B0, G) * (1 + 1e-9)


def test_flat_output_error_is_the_dropped_eigenvalue_sum(setup):
    """For one layer, ||Y_v||^2 - ||Q^T Y_v||^2 = ||Y_v - Q Q^T Y_v||^2 on the calibration data equals the
    sum of the dropped eigenvalues of the value covariances (the report's predicted error)."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    report = compress_(m, allocation_of({vo_component(0): Choice(5)}, FLAT_COSTS), FlatConfig(), profile,
                       progress=False)
    Y = _inputs_of_output(model, "model.layers.0.self_attn.v_proj", ids)
    Z = _inputs_of_output(m, "model.layers.0.self_attn.v_proj", ids)
    assert Z.shape[-1] == KV_HEADS * 5
    dropped = float(Y.pow(2).sum() - Z.pow(2).sum())
    predicted = report.components[0].predicted_error
    lam = torch.linalg.eigvalsh(profile.value_covariance(0))
    assert predicted == pytest.approx(float(lam[:, :HEAD_DIM - 5].sum()), rel=1e-9)
    assert dropped == pytest.approx(predicted, rel=1e-4)
    assert predicted > 0.05 * float(Y.pow(2).sum())  # the check is not vacuous


def _inputs_of_output(model, name, ids) -> torch.Tensor:
    ys = []
    h = model.get_submodule(name).register_forward_hook(lambda mod, a, out: ys.append(out.detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return torch.cat([y.reshape(-1, y.shape[-1]) for y in ys]).double()


def test_sola_splits_prime_neurons_exactly(setup):
    """The prime/marginal split alone is exact (all marginal parts dense-in-split at full rank), and the prime
    weights are reported outside the budget: 3 p hidden per compressed layer."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    choices = {c: ch for c, ch in sola_choices(profile, m).items() if c.name.endswith("#marginal")}
    report = compress_(m, allocation_of(choices), SoLAConfig(gamma=GAMMA), profile, progress=False)
    p = prime_count(model.config.intermediate_size, GAMMA)
    assert report.fixed_params == 2 * 3 * p * model.config.hidden_size
    mlp = m.get_submodule("model.layers.0.mlp")
    assert isinstance(mlp, SoLAMLP)
    assert mlp.prime_index.tolist() == profile.prime_neurons(0, GAMMA).tolist()
    assert isinstance(mlp.gate_marginal, LowRankLinear) and mlp.gate_marginal.rank == 20
    assert not isinstance(m.get_submodule("model.layers.1.mlp.down_marginal"), LowRankLinear)  # dense choice
    x = torch.randn(3, model.config.hidden_size)
    dense = model.get_submodule("model.layers.0.mlp")
    split = SoLAMLP.split(dense, profile.prime_neurons(0, GAMMA))
    with torch.no_grad():
        torch.testing.assert_close(split(x), dense(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_it_and_changes_nothing(setup):
    """A module not in the model, a shape that disagrees with the module, a rank beyond head_dim, a sparse choice
    for a dense-only method, a missing SoLA part: ValueError naming the component, model unchanged."""
    model, ids, profile = setup
    m = copy.deepcopy(model)
    q = next(c for c in profile.components if c.name.endswith("0.self_attn.q_proj"))
    cases = [
        (allocation_of({q: Choice(4), Component("model.layers.7.self_attn.q_proj", 64, 64, "q", 7): Choice(4)}),
         SVDConfig(), "model.layers.7.self_attn.q_proj"),
        (allocation_of({Component(q.name, 640, 640, "q", 0): Choice(100)}), SVDConfig(), "640x640"),
        (allocation_of({vo_component(0): Choice(40)}, FLAT_COSTS), FlatConfig(), r"self_attn.vo.*\[0, 16\]"),
        (allocation_of({q: Choice(4, 0.1)}), PGSVDConfig(), "q_proj.*sparse"),
        (allocation_of({c: ch for c, ch in sola_choices(profile, m).items() if "0.mlp.up" not in c.name}),
         SoLAConfig(gamma=GAMMA), "model.layers.0.mlp.up_proj#marginal"),
        (allocation_of(sola_choices(profile, m)), SoLAConfig(gamma=0.3), "marginal shape"),
    ]
    for alloc, config, match in cases:
        with pytest.raises(ValueError, match=match):
            compress_(m, alloc, config, profile, progress=False)
        with torch.no_grad():
            assert torch.equal(m(ids[:1]).logits, model(ids[:1]).logits)
    assert [type(x) for x in m.modules()] == [type(x) for x in model.modules()]


def test_realized_count_mismatch_raises_runtime_error(setup):
    """A handler that realizes a different count than the allocation's cost is caught (RuntimeError)."""
    model, _, profile = setup
    q = next(c for c in profile.components if c.name.endswith("0.self_attn.q_proj"))
    alloc = allocation_of({q: Choice(4)})
    original = METHODS["svd"]

    def wrong(model, allocation, config, profile, progress=True):
        reports = original.compress(model, allocation, config, profile, progress)
        return [type(r)(**{**r.__dict__, "params_after": r.params_after + 1}) for r in reports]

    METHODS["svd"] = dataclasses.replace(original, compress=wrong)
    try:
        with pytest.raises(RuntimeError, match="realized"):
            compress_(copy.deepcopy(model), alloc, SVDConfig(), profile, progress=False)
    finally:
        METHODS["svd"] = original


def test_rank_pattern_lists_low_rank_choices_only(setup):
    """rank_pattern maps each non-dense component to its rank; dense ones are omitted."""
    _, _, profile = setup
    alloc = allocation_of(linear_choices(profile, varied))
    pattern = rank_pattern(alloc)
    for c, ch in alloc.choices.items():
        assert pattern.get(c) == (None if ch.is_dense else ch.rank)
    assert len(pattern) == sum(not ch.is_dense for ch in alloc.choices.values())


# ----------------------------------------------------------------------------- end to end with the real curve sets
@pytest.mark.parametrize("method", ["svd", "sola", "flat"])
def test_profile_curves_solver_compress_pipeline(setup, method):
    """Curve sets from the profiling modules (whitened; SoLA's #marginal set; FLAT's vo set), solved at 30%
    removed by a registered solver, compress to exactly the solver's parameter count."""
    from rankalloc.allocators.greedy import Greedy
    from rankalloc.allocators.iprs import IPRS

    model, ids, profile = setup
    if method == "sola":
        from rankalloc.profiling.sola import sola_curve_set

        sc = sola_curve_set(profile, model, GAMMA)
        cs, cost, config, solver = sc.curve_set, "params", SoLAConfig(gamma=GAMMA), Greedy()
    elif method == "flat":
        from rankalloc.profiling.flat import flat_curve_set

        cs, cost, config, solver = flat_curve_set(profile), FlatParams(HEAD_DIM, HEADS, KV_HEADS), FlatConfig(), IPRS()
    else:
        cs, cost, config, solver = profile.curve_set("whitened"), "params", SVDConfig(), Greedy()
    problem = AllocationProblem.from_profiles(cs, cost, 0.3, kind="whitened", grid=4)
    alloc = solver.solve(problem)
    assert alloc.feasible
    m = copy.deepcopy(model)
    before = weight_units(m)
    report = compress_(m, alloc, config, profile, progress=False)
    assert report.params_after == int(alloc.cost["params"])
    assert weight_units(m) == before - problem.dense_costs["params"] + alloc.cost["params"]
    if method == "sola":
        assert report.fixed_params == sc.fixed_params
    with torch.no_grad():
        assert torch.isfinite(m(ids[:2]).logits).all()


# ----------------------------------------------------------------------------- real weights (the lead decides if CI runs it)
@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2_compresses_exactly_round_trips_and_full_rank_is_lossless(tmp_path):
    """SmolLM2-135M: whitened SVD at every full rank and FLAT at head_dim reproduce the logits (float32 round-off);
    a uniform 20% SVD allocation is realized exactly, stays finite, and saves/loads bit-exactly."""
    from rankalloc.allocators.uniform import Uniform
    from rankalloc.profiling.data import load_model
    from rankalloc.profiling.flat import flat_curve_set
    from rankalloc.profiling.profile import profile_model
    from rankalloc.profiling.text import calibration_ids, default_text

    lm = load_model(progress=False)
    model, split = lm.model, default_text()
    cal = calibration_ids(lm.tokenizer, split, n_samples=8, seqlen=128)
    profile = profile_model(model, cal, out=tmp_path / "profile", device="cpu", progress=False)
    x = cal[:1, :64]
    with torch.no_grad():
        ref = model(x).logits
    cfg = profile.meta["config"]
    flat = allocation_of({c: Choice(cfg["head_dim"]) for c in flat_curve_set(profile).components if c.kind == "vo"},
                         {"params": FlatParams(cfg["head_dim"], cfg["heads"], cfg["kv_heads"])})
    full = allocation_of({c: Choice(c.max_rank) for c in profile.components})
    for config, alloc in ((FlatConfig(), flat), (SVDConfig(), full)):
        m = copy.deepcopy(model)
        compress_(m, alloc, config, profile, progress=False)
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        del m
    problem = AllocationProblem.from_profiles(profile, "params", 0.2, kind="whitened", grid=16)
    alloc = Uniform().solve(problem)
    m = copy.deepcopy(model)
    before = weight_units(m)
    report = compress_(m, alloc, SVDConfig(), profile, progress=False)
    assert weight_units(m) == before - problem.dense_costs["params"] + alloc.cost["params"]
    with torch.no_grad():
        logits = m(x).logits
    assert torch.isfinite(logits).all()
    save_compressed(m, tmp_path / "c", report)
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "c")(x).logits, logits)


@pytest.mark.parametrize("method", ["svd", "fisher_svd", "flat", "sola"])
def test_factorize_once_serves_every_rank_from_one_factorization(setup, method, monkeypatch):
    """Inside factorize_once, two allocations of different ranks build exactly the modules fresh factorizations
    build, and each matrix's SVD runs once (compare and pareto compress many allocations of one model)."""
    import importlib

    from rankalloc.decomposers.base import factorize_once

    fs_mod = importlib.import_module("rankalloc.decomposers.fisher_svd")  # the package exports a function of that name
    svd_mod = importlib.import_module("rankalloc.decomposers.svd")

    model, ids, profile = setup
    calls = []
    for mod, fn in ((svd_mod, "whitened_svd"), (fs_mod, "fisher_svd")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))

    def case(frac):
        if method == "flat":
            return FlatConfig(), allocation_of(flat_choices(profile, ranks=(6, 11)) | {
                c: Choice(max(1, int(c.max_rank * frac))) for c in profile.components if c.kind not in ("v", "o")},
                FLAT_COSTS)
        if method == "sola":
            return SoLAConfig(gamma=GAMMA), allocation_of(sola_choices(profile, model))
        return method_case(method, model, profile)[0], allocation_of(
            linear_choices(profile, lambda c: Choice(max(1, int(c.max_rank * frac)))))

    fresh, cached = [], []
    for frac in (0.25, 0.4):
        config, alloc = case(frac)
        m = copy.deepcopy(model)
        compress_(m, alloc, config, profile, progress=False)
        fresh.append(m)
    n_fresh = len(calls)
    calls.clear()
    with factorize_once():
        for frac in (0.25, 0.4):
            config, alloc = case(frac)
            m = copy.deepcopy(model)
            compress_(m, alloc, config, profile, progress=False)
            cached.append(m)
    for a, b in zip(fresh, cached):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert 0 < len(calls) <= n_fresh // 2 + 1  # once per matrix instead of once per matrix and allocation
