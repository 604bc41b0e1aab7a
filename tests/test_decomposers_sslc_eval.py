"""SSLC (sparse + low-rank) decomposer and the evaluation module (perplexity, throughput)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_model
from rankalloc.allocators.costs import Params
from rankalloc.allocators.problem import Choice, Component
from rankalloc.decomposers.base import activation_error, weight_params
from rankalloc.decomposers.modules import stored_params
from rankalloc.decomposers.evaluate import compare_dense, perplexity, throughput
from rankalloc.decomposers.sslc import SparseLowRankLinear, SSLCConfig, sparse_count, sslc, sslc_handler
from rankalloc.profiling.numerics import damped_cholesky, svd


# ----------------------------------------------------------------------------------------------- helpers
WHITEN = SSLCConfig(scaling="whiten")  # the input-metric alternation (BRP); "fisher" has its own tests below


def structured(m: int, n: int, seed: int, true_rank: int = 4, spikes: float = 0.02, outliers: int = 4):
    """``W`` = rank-``true_rank`` part + ``spikes`` fraction of large scattered weights + small noise, and the
    Gram of inputs whose ``outliers`` channels are 10x louder than the rest (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, true_rank, generator=g, dtype=torch.float64) @ torch.randn(true_rank, n, generator=g,
                                                                                    dtype=torch.float64)
    W += 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    idx = torch.randperm(m * n, generator=g)[:int(spikes * m * n)]
    W.view(-1)[idx] += 3.0 * torch.randn(len(idx), generator=g, dtype=torch.float64)
    X = torch.randn(n, 4 * n, generator=g, dtype=torch.float64)
    X[torch.randperm(n, generator=g)[:outliers]] *= 10.0
    return W / math.sqrt(n), X @ X.T


def whitened_lowrank_error(W: torch.Tensor, G: torch.Tensor, rank: int) -> float:
    """``||(W - W_r) X||_F^2`` of the whitened-SVD (SVD-LLM) rank-``rank`` approximation."""
    S, _ = damped_cholesky(G, "test Gram")
    U, _, _ = svd(W.double() @ S, "W S")
    Ur = U[:, :rank]
    return activation_error(W.double() - Ur @ (Ur.T @ W.double()), G)


def equal_param_rank(m: int, n: int, rank: int, k: float) -> int:
    """Pure rank whose ``r'(m+n)`` is at least the SSLC cost ``ceil(kmn) + r(m+n)`` (favours the baseline)."""
    return math.ceil((sparse_count(m, n, k) + rank * (m + n)) / (m + n))


# ----------------------------------------------------------------------------------------------- SSLC
@pytest.mark.parametrize("scaling", ["diag", "whiten"])
@pytest.mark.parametrize("m,n,seed", [(48, 80, 0), (96, 64, 1), (64, 64, 2)])
@pytest.mark.parametrize("rank,k", [(4, 0.03), (6, 0.05)])
def test_sslc_no_worse_than_lowrank_at_equal_params(scaling, m, n, seed, rank, k):
    """On a low-rank + scattered-outlier weight with outlier input channels, SSLC's activation error at
    (r, k) is <= the whitened SVD's at the pure rank r' with r'(m+n) >= ceil(kmn) + r(m+n)."""
    W, G = structured(m, n, seed)
    res = sslc(W, G, rank, k, SSLCConfig(scaling=scaling))
    baseline = whitened_lowrank_error(W, G, equal_param_rank(m, n, rank, k))
    assert res.error <= baseline


def test_sslc_reported_error_is_the_true_activation_error():
    """``result.error`` equals ||(W - UV - S) X||^2 recomputed from the returned factors and sparse part,
    and is the minimum of the per-iteration history."""
    W, G = structured(40, 56, 3)
    res = sslc(W, G, 3, 0.04, SSLCConfig(scaling="whiten", iterations=4))
    assert res.error == pytest.approx(activation_error(W - res.L - res.S, G), rel=1e-9)
    assert res.error == min(res.history) and len(res.history) == 4


@pytest.mark.parametrize("m,n,rank,k", [(48, 80, 4, 0.03), (30, 17, 0, 0.1), (17, 30, 5, 0.0), (64, 64, 2, 0.003)])
def test_param_count_matches_the_allocation_cost(m, n, rank, k):
    """The module stores ``ceil(kmn) + r(m+n)`` weight entries (excluding the bias) plus CSR indices: an int16
    column per value and m+1 int32 row pointers (none when nothing is kept), 16-bit parameters each. That total is
    the ``Params`` cost of ``Choice(r, k)``, and the factor shapes are (r, n) and (m, r)."""
    W, G = structured(m, n, 0)
    lin = nn.Linear(n, m, bias=True, dtype=torch.float64)
    mod, info = sslc_handler(lin, Choice(rank, k), W, G, SSLCConfig(scaling="whiten", iterations=2))
    cost = Params().cost(Component("w", m, n), np.array([rank]), np.array([k]))[0]
    nnz = sparse_count(m, n, k)
    index = nnz + 2 * (m + 1) if nnz else 0
    assert weight_params(mod) == rank * (m + n) + nnz == rank * (m + n) + info["nnz"]
    assert stored_params(mod) == cost == weight_params(mod) + index == weight_params(mod) + mod.index_params()
    assert tuple(mod.first.weight.shape) == (rank, n) and tuple(mod.second.weight.shape) == (m, rank)
    assert mod.sparse_col.dtype == torch.int16 and mod.sparse_crow.dtype == torch.int32
    flat = mod._rows() * n + mod.sparse_col.long()
    assert flat.unique().numel() == mod.nnz and torch.equal(flat.sort().values, flat)  # distinct, row-major


def test_sslc_is_deterministic():
    """Two runs with the same seed give bit-identical factors and support."""
    W, G = structured(48, 80, 4)
    a, b = sslc(W, G, 4, 0.05, WHITEN), sslc(W, G, 4, 0.05, WHITEN)
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert torch.equal(a.index, b.index) and torch.equal(a.values, b.values)


def test_top_weights_are_kept_in_the_sparse_part():
    """The ceil(keep_top * mn) weights of largest salience (|W_ij| ||X_j||)^2 are in the support of S, with the
    residual as value; with a budget below that, the budget's worth of the most salient weights is kept."""
    m, n = 50, 70
    W, G = structured(m, n, 5)
    d = torch.sqrt(torch.diagonal(G))
    order = torch.argsort(((W.abs() * d) ** 2).flatten(), descending=True)
    res = sslc(W, G, 3, 0.05, SSLCConfig(scaling="whiten", keep_top=0.02))
    top = order[:sparse_count(m, n, 0.02)]
    assert res.fixed == len(top) and bool(torch.isin(top, res.index).all())
    R = (W - res.L).flatten()
    assert torch.allclose(res.values, R[res.index])
    small = sslc(W, G, 3, 0.004, SSLCConfig(scaling="whiten", keep_top=0.02))  # budget 14 < 70 fixed
    assert small.fixed == len(small.index) == sparse_count(m, n, 0.004)
    assert set(small.index.tolist()) == set(order[:small.fixed].tolist())


@pytest.mark.parametrize("bias", [True, False])
def test_module_forward_is_x_times_l_plus_s_plus_bias(bias):
    """``SparseLowRankLinear(x) == x (L + S)^T + b`` for the SSLC result, in the weight's dtype."""
    torch.manual_seed(0)
    W, G = structured(24, 40, 6)
    lin = nn.Linear(40, 24, bias=bias)
    res = sslc(W, G, 3, 0.05, WHITEN)
    mod, info = sslc_handler(lin, Choice(3, 0.05), W.float(), G, SSLCConfig(scaling="whiten"))
    assert info["predicted_error"] == pytest.approx(res.error, rel=1e-4)
    x = torch.randn(5, 7, 40)
    ref = x.double() @ (res.L + res.S).T + (lin.bias.double() if bias else 0.0)
    assert mod.sparse_values.dtype == torch.float32 and mod(x).shape == (5, 7, 24)
    assert torch.allclose(mod(x).double(), ref, atol=1e-4)


def test_module_roundtrips_through_safetensors(tmp_path):
    """The state dict (factors, sparse values, int16 columns and int32 row pointers) saves and loads with
    safetensors into an
    empty module of the same (m, n, r, nnz), giving the same output."""
    from safetensors.torch import load_file, save_file

    W, G = structured(24, 40, 7)
    mod, _ = sslc_handler(nn.Linear(40, 24), Choice(3, 0.05), W.float(), G, SSLCConfig(scaling="whiten", iterations=2))
    save_file(mod.state_dict(), tmp_path / "m.safetensors")
    new = SparseLowRankLinear(40, 24, 3, mod.nnz, bias=True)
    new.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 40)
    assert new.sparse_col.dtype == torch.int16 and torch.equal(new(x), mod(x))


def test_module_csr_inference_path_matches_the_dense_path():
    """Under no_grad the forward uses a cached CSR copy of S: it equals the differentiable dense path (1e-5), is
    rebuilt after an in-place change of the sparse values, gradients still reach sparse_values with autograd
    on, and column indices that break the CSR structure are refused with the module's shape named."""
    W, G = structured(24, 40, 8)
    mod, _ = sslc_handler(nn.Linear(40, 24), Choice(3, 0.05), W.float(), G, SSLCConfig(scaling="whiten", iterations=2))
    x = torch.randn(2, 5, 40)
    dense = mod(x)  # autograd on: dense scatter path
    with torch.no_grad():
        fast = mod(x)
        assert torch.allclose(fast, dense, atol=1e-5)
        mod.sparse_values.mul_(2.0)
        doubled = mod(x)
    S = mod.sparse_weight().detach()
    assert torch.allclose(doubled - fast, x @ (S / 2).T, atol=1e-5)
    mod(x).sum().backward()
    assert mod.sparse_values.grad is not None and torch.isfinite(mod.sparse_values.grad).all()
    with torch.no_grad():
        mod.sparse_col.copy_(mod.sparse_col.flip(0))
        with pytest.raises(ValueError, match="24x40"):
            mod(x)


def test_rank_above_the_matrix_rank_is_guarded():
    """When r exceeds the rank of W, the BRP pseudo-inverse drops the empty directions: the factors are finite,
    still r wide (exact parameter count), and reproduce W exactly."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(20, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64)
    X = torch.randn(30, 90, generator=g, dtype=torch.float64)
    res = sslc(W, X @ X.T, 5, 0.0, WHITEN)
    assert res.U.shape == (20, 5) and torch.isfinite(res.U).all() and torch.isfinite(res.V).all()
    assert torch.allclose(res.L, W, atol=1e-9)


def test_dead_channels_give_finite_results():
    """Input channels never active (zero Gram row/column) are counted and produce no NaN."""
    W, G = structured(20, 30, 8)
    G[:, :3] = 0
    G[:3, :] = 0
    res = sslc(W, G, 2, 0.05, SSLCConfig(scaling="whiten"))
    assert res.dead == 3 and math.isfinite(res.error)
    assert torch.isfinite(res.U).all() and torch.isfinite(res.V).all() and torch.isfinite(res.values).all()


@pytest.mark.parametrize("kwargs", [dict(iterations=0), dict(keep_top=1.0), dict(keep_top=-0.1), dict(power_iters=-1),
                                    dict(damp=0.0), dict(scaling="full")])
def test_config_rejects_bad_values(kwargs):
    """Invalid settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SSLCConfig(**kwargs)


def test_sslc_rejects_bad_input():
    """A wrong Gram shape, a rank above min(m, n), a sparsity >= 1 or the dense choice raise ValueError."""
    W, G = structured(10, 12, 0)
    with pytest.raises(ValueError, match="Gram"):
        sslc(W, G[:5, :5], 2, 0.1)
    with pytest.raises(ValueError, match="rank"):
        sslc(W, G, 11, 0.1)
    with pytest.raises(ValueError, match="sparse"):
        sslc(W, G, 2, 1.0)
    with pytest.raises(ValueError, match="dense"):
        sslc_handler(nn.Linear(12, 10), Choice(-1), W, G, SSLCConfig(scaling="whiten"))


# ----------------------------------------------------------------------------------------------- evaluation
def _ids(model, windows=5, seqlen=24, seed=0, bos=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (windows, seqlen), generator=g)
    if bos:
        ids[:, 0] = model.config.bos_token_id
    return ids


def test_perplexity_equals_plain_loop_cross_entropy():
    """ppl == exp(mean next-token cross-entropy) from a plain per-window loop, scoring T-1 tokens per window,
    independent of the batch size."""
    model = tiny_model("llama")
    ids = _ids(model)
    losses = []
    with torch.no_grad():
        for w in ids:
            logits = model(w[None]).logits[0, :-1].double()
            losses.append(F.cross_entropy(logits, w[1:], reduction="none"))
    nll = torch.cat(losses).mean().item()
    res = perplexity(model, ids, batch_size=2, progress=False)
    assert res.tokens == 5 * 23 and res.windows == 5 and res.seqlen == 24 and res.bos
    assert res.nonfinite_tokens == 0
    assert res.nll == pytest.approx(nll, rel=1e-6) and res.ppl == pytest.approx(math.exp(nll), rel=1e-6)
    assert perplexity(model, ids, batch_size=5, progress=False).nll == pytest.approx(res.nll, rel=1e-6)
    assert "5 non-overlapping windows of 24 tokens (BOS + 23 text)" in res.protocol and "115 scored" in res.protocol


def test_perplexity_counts_nonfinite_logits_and_never_drops_them():
    """A model emitting NaN logits for one window reports every position of that window as non-finite, and
    its perplexity is NaN rather than the finite figure of the other windows."""
    model = tiny_model("llama")
    ids = _ids(model, windows=4)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 2:  # the second window (batch_size=1)
            return output * float("nan")
        return output

    handle = model.model.norm.register_forward_hook(poison)
    try:
        res = perplexity(model, ids, batch_size=1, progress=False)
    finally:
        handle.remove()
    assert res.nonfinite_tokens == ids.shape[1] - 1
    assert not math.isfinite(res.ppl) and not math.isfinite(res.nll)
    assert res.tokens == 4 * (ids.shape[1] - 1)


def test_perplexity_rejects_bad_ids():
    """Ids that are not a 2-D LongTensor within the vocabulary raise ValueError saying what was expected."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(model, _ids(model).float(), progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(model, _ids(model) + model.config.vocab_size, progress=False)


def test_throughput_returns_positive_figures():
    """Prefill and decode speeds and the peak memory figure are positive, and the measure is named."""
    model = tiny_model("llama")
    res = throughput(model, prompt_len=32, gen_tokens=4, repeats=1, progress=False)
    assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0
    assert res.peak_memory_bytes >= 0 and "RSS" in res.memory_measure
    with pytest.raises(ValueError, match="max_position_embeddings"):
        throughput(model, prompt_len=250, gen_tokens=10, progress=False)


def test_compare_dense_table_puts_the_baseline_beside_the_compressed_model():
    """The table has a dense and a compressed row on the same windows; ppl_vs_dense is 1 for dense, and an
    SSLC-compressed projection changes the parameter count and perplexity."""
    dense = tiny_model("llama")
    comp = tiny_model("llama")
    lin = comp.model.layers[0].mlp.down_proj
    W = lin.weight.detach()
    G = torch.eye(W.shape[1], dtype=torch.float64) * 10
    comp.model.layers[0].mlp.down_proj = sslc_handler(lin, Choice(4, 0.05), W, G,
                                                      SSLCConfig(scaling="whiten", iterations=2))[0]
    ids = _ids(dense, windows=3)
    df = compare_dense(dense, comp, ids, progress=False)
    assert list(df.index) == ["dense", "compressed"]
    assert df.loc["dense", "ppl_vs_dense"] == 1.0 and df.loc["compressed", "ppl"] != df.loc["dense", "ppl"]
    assert df.loc["compressed", "params"] < df.loc["dense", "params"]
    assert "3 non-overlapping windows" in df.attrs["protocol"]


# ----------------------------------------------------------------------------------------------- real model
REAL_CASES = ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj", "model.layers.20.self_attn.v_proj")


@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2_sslc_against_whitened_svd_at_equal_params():
    """On real SmolLM2 matrices with Grams of 16 x 256 calibration tokens, 40% of each matrix's parameters
    removed: SSLC with the whitened low-rank step at k = 5% has an activation error <= the whitened SVD at
    the equal-parameter rank r' = ceil((ceil(kmn) + r(m+n)) / (m+n)). The paper's diagonal variant and
    k = 1% are printed beside it (not asserted: see the module docstring for the measured figures)."""
    data = pytest.importorskip("rankalloc.profiling.data")
    text = pytest.importorskip("rankalloc.profiling.text")
    if not list((data.cache_dir() / "models").glob(f"*/{data.MARKER}")):
        pytest.skip(f"the default SmolLM2 is not prepared under {data.cache_dir()} (run "
                    f"rankalloc.profiling.data.default_model_dir() once)")
    lm = data.load_model()
    ids = text.calibration_ids(lm.tokenizer, text.load_text(), n_samples=16, seqlen=256)
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return accumulate

    handles = [lm.model.get_submodule(n).register_forward_hook(hook(n)) for n in REAL_CASES]
    try:
        with torch.no_grad():
            for i in range(0, len(ids), 4):
                lm.model(ids[i:i + 4])
    finally:
        for h in handles:
            h.remove()
    for name in REAL_CASES:
        W = lm.model.get_submodule(name).weight.detach().double()
        G = grams[name]
        m, n = W.shape
        e0 = activation_error(W, G)
        for k in (0.01, 0.05):
            r = (int(0.6 * m * n) - sparse_count(m, n, k)) // (m + n)
            base = whitened_lowrank_error(W, G, equal_param_rank(m, n, r, k))
            diag = sslc(W, G, r, k, SSLCConfig(scaling="diag")).error
            white = sslc(W, G, r, k, SSLCConfig(scaling="whiten")).error
            print(f"{name} r={r} k={k}: relative error whitened SVD {base / e0:.4g}, SSLC diag {diag / e0:.4g} "
                  f"({diag / base:.3f}x), SSLC whiten {white / e0:.4g} ({white / base:.3f}x)")
            if k == 0.05:
                assert white <= base, name


# ----------------------------------------------------------------------------------------------- SSLC, two-sided
def output_gram(m: int, seed: int) -> torch.Tensor:
    """An output-gradient Gram with a few loud output channels (float64, m x m)."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
    Y[torch.randperm(m, generator=g)[:3]] *= 5.0
    return Y @ Y.T


def two_sided_error(E: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, damp: float = 1e-6) -> float:
    """``tr((G_g + d_g I) E (G_x + d_x I) E^T)``: the damped two-sided K-FAC metric, recomputed directly."""
    Gx = Gx + damp * torch.diagonal(Gx).mean() * torch.eye(len(Gx), dtype=Gx.dtype)
    Gg = Gg + damp * torch.diagonal(Gg).mean() * torch.eye(len(Gg), dtype=Gg.dtype)
    return float(((Gg @ E @ Gx) * E).sum())


def test_fisher_sslc_at_k0_is_the_two_sided_fisher_svd():
    """With no sparse part, scaling='fisher' builds exactly the two-sided Fisher SVD (same L, same error); with one
    iteration it still records the L-step and the sparse step of the S = 0 start and the sparse-first L-step."""
    from rankalloc.decomposers.fisher_svd import fisher_svd

    W, Gx = structured(48, 80, 0)
    Gg = output_gram(48, 1)
    f = fisher_svd(W, Gx, Gg, 6)
    res = sslc(W, Gx, 6, 0.0, SSLCConfig(), Gg=Gg)
    assert res.error == pytest.approx(f.error, rel=1e-9) and len(res.values) == 0
    torch.testing.assert_close(res.L, f.A @ f.B, rtol=1e-8, atol=1e-10)
    one = sslc(W, Gx, 6, 0.05, SSLCConfig(iterations=1), Gg=Gg)  # one alternation still takes a sparse step
    assert len(one.history) == 3 and one.error == min(one.history) < f.error


@pytest.mark.parametrize("m,n,seed", [(48, 80, 0), (64, 40, 3)])
def test_fisher_sslc_error_is_true_and_never_worse_than_its_start_or_rank_only(m, n, seed):
    """The returned error is the damped two-sided metric of W - L - S recomputed from the result; it is at most the
    sparse-first fit the loss-unit table prices (sslc_fisher_errors) and the rank-only error at the same rank; the
    result stores exactly ceil(kmn) entries; the sparse part helps on a low-rank + outlier weight."""
    from rankalloc.profiling.sslc_table import sslc_fisher_errors

    W, Gx = structured(m, n, seed)
    Gg = output_gram(m, seed + 1)
    ranks, ks = [0, 4, 8], [0.0, 0.02, 0.05]
    table = sslc_fisher_errors(W, Gx, Gg, ranks, ks)
    helped = 0
    for i, r in enumerate(ranks):
        for j, k in enumerate(ks):
            res = sslc(W, Gx, r, k, SSLCConfig(iterations=4), Gg=Gg)
            assert res.error == pytest.approx(two_sided_error(W - res.L - res.S, Gx, Gg), rel=1e-8)
            assert res.error <= table[i, j] * (1 + 1e-9) and res.error <= table[i, 0] * (1 + 1e-9)
            assert len(res.values) == len(res.index.unique()) == sparse_count(m, n, k)
            helped += k > 0 and res.error < 0.9 * table[i, 0]
    assert helped >= 4


def test_fisher_sslc_needs_the_output_gram_and_refuses_a_compact_profile(tmp_path):
    """scaling='fisher' without an output-gradient Gram is a one-line ValueError naming the matrix; compressing with
    a compact profile (no stored output Grams) is refused before any module is replaced, and so is building the
    method's table on it."""
    import copy

    from decomposer_cases import allocation_of
    from rankalloc.decomposers.base import compress_
    from rankalloc.profiling.profile import profile_model

    W, G = structured(10, 12, 0)
    with pytest.raises(ValueError, match=r"^layer\.q: SSLC with scaling='fisher' needs the output-gradient Gram"):
        sslc(W, G, 2, 0.1, SSLCConfig(), "layer.q")
    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    compact = profile_model(model, ids, out=tmp_path / "p", device="cpu", kinds=("whitened", "fisher"), progress=False)
    alloc = allocation_of({c: Choice(2, 0.02) for c in compact.components})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs the output-gradient Grams.*--store full") as exc:
        compress_(model, alloc, SSLCConfig(), compact, progress=False)
    assert "\n" not in str(exc.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from rankalloc.decomposers.problems import method_curves

    with pytest.raises(ValueError, match="method 'sslc'.*--store full"):  # before any table is built
        method_curves(compact, "sslc", model, progress=False)
    assert not compact.has_extra("sslc")
