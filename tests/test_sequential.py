"""Sequential calibration (decomposers.sequential): each matrix fitted at the inputs of the compressed layers before it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_full_profile
from decomposer_cases import FLAT_COSTS, allocation_of, flat_choices, linear_choices, quarter, sola_choices, varied
from rankalloc.allocators.problem import Choice
from rankalloc.decomposers.base import allocation_items
from rankalloc.decomposers import FisherSVDConfig, SoLAConfig, SVDConfig, compress_
from rankalloc.decomposers.flat import FlatAttention, FlatConfig
from rankalloc.decomposers.modules import LowRankLinear
from rankalloc.decomposers.sequential import SequentialConfig, _corrected, compress_sequential_
from rankalloc.decomposers.sslc import SSLCConfig
from rankalloc.profiling.numerics import Damping, damped_cholesky


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_full_profile(tmp_path_factory)


def final_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def test_correction_is_the_least_squares_fit_to_the_dense_outputs():
    """W_tilde = W C G_hat^-1 minimises ||X W^T - X_hat W_tilde^T|| (lstsq gives the same matrix)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 12, generator=g, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    S, _ = damped_cholesky(Xh.T @ Xh, "test", Damping(1e-12))
    ours = _corrected(W, X.T @ Xh, S)
    best = torch.linalg.lstsq(Xh, X @ W.T).solution.T
    assert torch.allclose(ours, best, atol=1e-8)


def sparse_varied(c):
    return Choice(max(1, c.max_rank // 4), 0.02) if c.kind in ("gate", "down") else varied(c)


def linear_case(choose):
    return lambda prof: allocation_of(linear_choices(prof, choose))


@pytest.mark.parametrize("config,make", [(SVDConfig(), linear_case(varied)), (FisherSVDConfig(), linear_case(varied)),
                                         (SSLCConfig(iterations=2), linear_case(sparse_varied)),
                                         (FlatConfig(), lambda prof: allocation_of(flat_choices(prof), FLAT_COSTS))],
                         ids=["svd", "fisher_svd", "sslc", "flat"])
def test_sequential_keeps_the_ranks_and_the_count_and_cuts_the_output_error(setup, config, make):
    """Same modules and ranks (FLAT: value-head ranks; its vo joins its V's input group) as the plain method, the
    allocation's exact parameter count, and a final hidden state closer to the dense model's on the calibration text
    than the plain decomposer gets."""
    model, ids, prof = setup
    alloc = make(prof)
    plain, seq = copy.deepcopy(model), copy.deepcopy(model)
    r_plain = compress_(plain, alloc, config, prof, progress=False)
    r_seq = compress_sequential_(seq, alloc, config, prof, ids, progress=False)
    assert r_seq.params_after == r_plain.params_after
    for (name, a), (_, b) in zip(plain.named_modules(), seq.named_modules()):
        assert type(a) is type(b), name
        if isinstance(a, LowRankLinear):
            assert a.rank == b.rank, name
        if isinstance(a, FlatAttention):
            assert a.value_dim == b.value_dim, name
    dense = final_hidden(model, ids)
    err_plain = float(((final_hidden(plain, ids) - dense) ** 2).sum())
    err_seq = float(((final_hidden(seq, ids) - dense) ** 2).sum())
    assert err_seq < 0.8 * err_plain, (err_seq, err_plain)


def test_the_first_group_sees_the_dense_inputs_and_matches_the_plain_fit(setup):
    """Nothing is compressed before layer 0's q/k/v, so their factors are the plain method's (same product)."""
    model, ids, prof = setup
    alloc = allocation_of(linear_choices(prof, quarter))
    plain, seq = copy.deepcopy(model), copy.deepcopy(model)
    compress_(plain, alloc, SVDConfig(), prof, progress=False)
    compress_sequential_(seq, alloc, SVDConfig(), prof, ids, progress=False)
    name = "model.layers.0.self_attn.q_proj"

    def product(m):
        mod = m.get_submodule(name)
        return (mod.second.weight @ mod.first.weight).double()

    assert torch.allclose(product(plain), product(seq), rtol=1e-4, atol=1e-5)
    later = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(seq.get_submodule(later).second.weight, plain.get_submodule(later).second.weight)


def test_without_correction_only_the_inputs_are_remeasured(setup):
    """correct=False keeps W and re-whitens by the compressed inputs: a different model from the corrected one."""
    model, ids, prof = setup
    alloc = allocation_of(linear_choices(prof, quarter))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compress_sequential_(a, alloc, SVDConfig(), prof, ids, SequentialConfig(correct=False), progress=False)
    compress_sequential_(b, alloc, SVDConfig(), prof, ids, progress=False)
    dense = final_hidden(model, ids)
    assert float(((final_hidden(b, ids) - dense) ** 2).sum()) < float(((final_hidden(a, ids) - dense) ** 2).sum())


def test_a_large_damping_shrinks_the_correction_back_to_w(setup):
    """W_tilde = W (C + delta I)(G_hat + delta I)^-1 tends to W as damp grows: the same factors as correct=False."""
    model, ids, prof = setup
    alloc = allocation_of(linear_choices(prof, quarter))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compress_sequential_(a, alloc, SVDConfig(), prof, ids, SequentialConfig(correct=False), progress=False)
    compress_sequential_(b, alloc, SVDConfig(), prof, ids, SequentialConfig(damp=1e9), progress=False)
    name = "model.layers.1.mlp.down_proj"
    pa, pb = (m.get_submodule(name) for m in (a, b))
    assert torch.allclose(pa.second.weight @ pa.first.weight, pb.second.weight @ pb.first.weight, rtol=1e-3,
                          atol=1e-5)


def test_a_group_behind_a_rank_zero_matrix_gets_the_plain_fit(setup):
    """v_proj at rank 0 makes o_proj's compressed inputs zero on every token: o_proj then gets the plain fit."""
    model, ids, prof = setup

    def choice(c):
        return Choice(0) if c.kind == "v" else quarter(c)

    alloc = allocation_of(linear_choices(prof, choice))
    plain, seq = copy.deepcopy(model), copy.deepcopy(model)
    compress_(plain, alloc, SVDConfig(), prof, progress=False)
    compress_sequential_(seq, alloc, SVDConfig(), prof, ids, progress=False)
    name = "model.layers.1.self_attn.o_proj"
    a, b = plain.get_submodule(name), seq.get_submodule(name)
    assert torch.allclose(a.second.weight @ a.first.weight, b.second.weight @ b.first.weight, atol=1e-6)


def test_flat_sequential_takes_the_value_bases_at_the_compressed_inputs(setup):
    """Without the correction, layer 1's value heads are cut by the covariance of W_v x_hat, x_hat being V's inputs
    in the compressed model: the reported dropped eigenvalues are that covariance's tail, not the dense profile's."""
    model, ids, prof = setup
    alloc = allocation_of(flat_choices(prof), FLAT_COSTS)
    plain, seq = copy.deepcopy(model), copy.deepcopy(model)
    r_plain = compress_(plain, alloc, FlatConfig(), prof, progress=False)
    r_seq = compress_sequential_(seq, alloc, FlatConfig(), prof, ids, SequentialConfig(correct=False),
                                 progress=False)
    name = "model.layers.1.self_attn.vo"
    got = {}
    v = seq.get_submodule("model.layers.1.self_attn.v_proj")
    handle = v.register_forward_pre_hook(lambda mod, args: got.setdefault("x", args[0].reshape(-1, args[0].shape[-1])))
    try:
        final_hidden(seq, ids)
    finally:
        handle.remove()
    W = model.get_submodule("model.layers.1.self_attn.v_proj").weight.detach().double()
    attn = model.get_submodule("model.layers.1.self_attn")
    Y = (got["x"].double() @ W.T).reshape(-1, W.shape[0] // attn.head_dim, attn.head_dim)
    lam = torch.linalg.eigvalsh(torch.einsum("tgi,tgj->gij", Y, Y))  # ascending
    rank = {c.name: ch for c, ch in allocation_items(alloc)}[name].rank
    tail = float(lam[:, : attn.head_dim - rank].sum())
    seq_err = {c.name: c.predicted_error for c in r_seq.components}[name]
    plain_err = {c.name: c.predicted_error for c in r_plain.components}[name]
    assert seq_err == pytest.approx(tail, rel=1e-3)
    assert abs(plain_err - tail) > 0.01 * tail


def test_refusals_name_the_setting(setup, tmp_path):
    model, ids, prof = setup
    alloc = allocation_of(linear_choices(prof, quarter))
    with pytest.raises(ValueError, match="does not factor one matrix at a time"):
        compress_sequential_(copy.deepcopy(model), allocation_of(sola_choices(prof, model)), SoLAConfig(), prof, ids,
                             progress=False)
    with pytest.raises(ValueError, match="samples: 9 calibration sequences asked, 8 given"):
        compress_sequential_(copy.deepcopy(model), alloc, SVDConfig(), prof, ids, SequentialConfig(samples=9),
                             progress=False)
    from rankalloc.profiling.profile import profile_model

    compact = profile_model(model, ids, out=tmp_path / "compact", device="cpu", kinds=("whitened", "fisher"),
                            progress=False)
    with pytest.raises(ValueError, match="--store full"):
        compress_sequential_(copy.deepcopy(model), alloc, FisherSVDConfig(), compact, ids, progress=False)


@pytest.mark.parametrize("bad", [dict(samples=-1), dict(damp=0.0), dict(correct=1), dict(batch_size=0)])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="SequentialConfig"):
        SequentialConfig(**bad)
