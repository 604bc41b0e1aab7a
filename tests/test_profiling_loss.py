"""Loss-aware profiling: K-FAC output Grams and Fisher curves, probe curves, SoLA/FLAT/SSLC curve sets,
and the curve-kind agreement study. Models are tiny random llamas; their token ids are SAMPLED from the
model itself, so the model is the data distribution: the expected loss gradient is zero and the
expected Hessian equals the Fisher, which is the regime the second-order loss estimate is meant for."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ARCHES, tiny_model
from rankalloc.allocators.costs import FlatParams, Params
from rankalloc.allocators.problem import Choice, Curve
from rankalloc.profiling.architectures import find_structure
from rankalloc.profiling.fisher import (fisher_curve, fisher_svd_curve, loss_token_count, output_gradient_grams)
from rankalloc.profiling.flat import (TOKEN_FISHER, ValueLossTap, dropped_eigenvalues, eig_desc, flat_curve_set,
                                      head_bases)
from rankalloc.profiling.numerics import damped_cholesky, psd_power, svd
from rankalloc.profiling.predict import curve_kind_agreement
from rankalloc.profiling.probe import (LayerCache, calibration_loss, monotone_curve, probe_ranks, read_weight,
                                       whitened_factors, write_weight_)
from rankalloc.profiling.profile import profile_model
from rankalloc.profiling.sola import SUFFIX, sola_curve_set
from rankalloc.profiling.sslc_table import sslc_curve_set, sslc_errors

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: a second thread only adds synchronisation, which costs 1000x on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WEIGHT_SCALE = 5.0  # init std 0.02 -> 0.1: a model whose truncations change the loss measurably


def sharpened_llama(seed=0):
    model = tiny_model("llama", seed=seed).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
    return model


@torch.no_grad()
def sample_ids(model, n, seqlen, seed=0):
    """Sequences drawn from the model itself (BOS id 1 first), with its KV cache."""
    from transformers import DynamicCache

    from rankalloc.decomposers.host import with_cache

    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(n, 1, dtype=torch.long)
    cache = DynamicCache()
    for _ in range(seqlen - 1):
        out = model(input_ids=ids[:, -1:], **with_cache(model, cache))
        p = torch.softmax(out.logits[:, -1].double(), -1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def input_grams(model, ids, names):
    grams, hooks = {}, []
    for n in names:
        def hook(mod, args, out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[n] = grams.get(n, 0) + x.T @ x
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return grams


@pytest.fixture(scope="module")
def sampled():
    model = sharpened_llama()
    ids = sample_ids(model, 24, 40, seed=1)
    return model, ids


@pytest.fixture(scope="module")
def profiled(sampled, tmp_path_factory):
    """A finished profile with every base kind plus fisher, fisher_svd and probe."""
    model, ids = sampled
    prof = profile_model(model, ids, out=tmp_path_factory.mktemp("loss_profile"), batch_size=8, progress=False,
                         kinds=("whitened", "energy", "relative", "epsilon", "fisher", "probe"), store="full")
    return model, ids, prof


# ------------------------------------------------------------------------------------------- Fisher


class ToyLM(torch.nn.Module):
    """Embedding -> one linear ``proj`` -> LM head: the output gradient of ``proj`` has a closed form."""

    def __init__(self, vocab=11, d=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d).double()
        self.proj = torch.nn.Linear(d, d).double()
        self.head = torch.nn.Linear(d, vocab).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.head(self.proj(self.embed(input_ids))))


def test_output_grams_equal_explicit_jacobian():
    """For y_s = proj(e_s), logits z_s = H y_s + b: d(sum_t CE_t)/dy_s = H^T (softmax(z_s) - onehot(id_{s+1})) for
    s < T-1 and 0 at the last position, so G_g = sum_s g_s g_s^T in closed form; batching must not rescale it,
    and the weights' requires_grad flags must come back unchanged."""
    model = ToyLM()
    model.head.bias.requires_grad_(False)
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = model(ids).logits[:, :-1]
        err = torch.softmax(z, -1) - torch.nn.functional.one_hot(ids[:, 1:], 11).double()
        g = (err @ model.head.weight).reshape(-1, 5)
    expected = g.T @ g
    for bs in (1, 2, 5):
        got = output_gradient_grams(model, ids, {"proj": model.proj}, batch_size=bs, progress=False)["proj"]
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), bs
    fast = output_gradient_grams(model, ids, {"proj": model.proj}, batch_size=2, progress=False, gram_dtype="float32")
    assert torch.allclose(fast["proj"], expected, rtol=1e-5) and fast["proj"].dtype == torch.float64
    assert model.proj.weight.requires_grad and not model.head.bias.requires_grad
    assert model.proj.weight.grad is None
    assert loss_token_count(ids) == 5 * 6


def test_fisher_curve_predicts_measured_truncation_loss(sampled):
    """On model-sampled text, the K-FAC estimate sum_{i>r} sigma_i(G_g^1/2 W G_x^1/2)^2 / (2 N_x N_loss) of
    truncating ONE matrix to rank r (two-sided whitened) matches the measured calibration-loss increase:
    Spearman > 0.8 over 14 matrices x 2 ranks, and the median ratio measured/predicted in [0.8, 2]
    (a wrong 1/2, or a per-batch 1/N left in the gradients, falls outside)."""
    from scipy.stats import spearmanr

    model, ids = sampled
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    mods = {n: model.get_submodule(n) for n in names}
    Gx = input_grams(model, ids, names)
    Gg = output_gradient_grams(model, ids, mods, batch_size=12, progress=False)
    N, NL = ids.numel(), loss_token_count(ids)
    L0 = calibration_loss(model, ids, 12)
    pred, meas = [], []
    for n in names:
        W = read_weight(mods[n], n)
        curve = fisher_curve(W, Gx[n], Gg[n], N, NL, n)
        A, B = psd_power(Gg[n], n, 0.5), psd_power(Gx[n], n, 0.5)
        Ai, Bi = psd_power(Gg[n], n, -0.5), psd_power(Gx[n], n, -0.5)
        U, s, Vh = svd(A @ W @ B, n)
        for r in (len(s) // 4, len(s) // 2):
            write_weight_(mods[n], Ai @ (U[:, :r] * s[:r]) @ Vh[:r] @ Bi)
            meas.append(calibration_loss(model, ids, 12) - L0)
            write_weight_(mods[n], W)
            pred.append(curve[r])
    pred, meas = np.array(pred), np.array(meas)
    assert spearmanr(pred, meas)[0] > 0.8
    assert 0.8 < np.median(meas / pred) < 2.0


def test_fisher_kinds_in_profile(profiled):
    """profile_model(kinds=(..., "fisher")) stores symmetric PSD output Grams and writes "fisher" and "fisher_svd":
    min(m,n)+1 values, non-increasing, 0 at full rank, and the one-sided SVD-LLM truncation never beats the
    optimal two-sided one (fisher_svd >= fisher)."""
    model, ids, prof = profiled
    assert {"fisher", "fisher_svd", "probe"} <= set(prof.kinds)
    cs = prof.curve_set(["fisher", "fisher_svd"])
    for c in prof.components:
        f, fs = cs.errors["fisher"][c.name], cs.errors["fisher_svd"][c.name]
        assert len(f) == c.max_rank + 1 and f[-1] == 0 and fs[-1] == 0 and f[0] > 0
        assert (np.diff(f) <= 1e-15).all() and (np.diff(fs) <= 1e-15).all()
        assert (fs >= f - 1e-9 * f[0]).all(), c.name
        G = prof.output_gram(c.name)
        assert G.shape == (c.m, c.m) and torch.allclose(G, G.T)
        assert torch.linalg.eigvalsh(G).min() > -1e-9 * G.diagonal().max()


def test_fisher_curve_cholesky_route_equals_symmetric_roots():
    """fisher_curve (Cholesky factors S_g^T W S_x) gives the singular values of G_g^1/2 W G_x^1/2 (the damped
    symmetric roots the fisher_svd decomposer uses) to 1e-9 relative, on ill-conditioned Grams."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(9, 6, generator=g, dtype=torch.float64)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64) * torch.tensor([1e3, 1, 1, 1e-2, 1, 5.0],
                                                                             dtype=torch.float64)
    Y = torch.randn(40, 9, generator=g, dtype=torch.float64)
    Gx, Gg = X.T @ X, Y.T @ Y
    curve = fisher_curve(W, Gx, Gg, 50, 40)
    s = torch.linalg.svdvals(psd_power(Gg, "g", 0.5) @ W @ psd_power(Gx, "x", 0.5))
    want = torch.cat([torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0]), torch.zeros(1, dtype=s.dtype)])
    np.testing.assert_allclose(curve, (want / (2 * 50 * 40)).numpy(), rtol=1e-9, atol=1e-12 * float(want[0]))


STREAM_FAMILIES = {"llama": {}, "gemma3": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4),
                   "gpt2": {}, "phi3": {}}


@pytest.mark.parametrize("arch", sorted(STREAM_FAMILIES))
def test_layer_streamed_backward_equals_the_full_backward(arch, tmp_path):
    """The output-gradient Grams of the layer-streamed backward (one layer resident, the head in chunks) equal those
    of a full-model backward to 1e-10 relative in float64, on Llama, Gemma3 (sliding and full layers), GPT-2
    (Conv1D) and Phi-3 (fused qkv and gate_up); also when the Grams are accumulated in several groups."""
    model = tiny_model(arch, **STREAM_FAMILIES[arch]).double()
    ids = torch.randint(3, 300, (6, 20), generator=torch.Generator().manual_seed(0))
    st = find_structure(model)
    want = output_gradient_grams(model, ids, st.modules, batch_size=4, progress=False)
    for budget, sub in ((None, "one"), (1.0, "many")):  # 1 byte: every Gram in a group of its own
        prof = profile_model(model, ids, out=tmp_path / sub, batch_size=4, progress=False,
                             kinds=("whitened", "fisher"), store="full", gram_budget=budget, extras=())
        for name, G in want.items():
            got = prof.output_gram(name)
            assert float((got - G).abs().max()) <= 1e-10 * float(G.abs().max()), (sub, name)
        assert not (prof.path / "scratch").exists()  # the stored layer inputs are removed at the end


def test_float32_gram_dtype_reaches_the_streamed_output_grams(tmp_path):
    """gram_dtype='float32' also forms the layer-streamed backward's per-batch g^T g in float32: the output Grams
    differ from the float64 ones (the setting is used) by at most 1e-5 of the largest entry, and stay symmetric."""
    model = tiny_model("llama").double()
    ids = torch.randint(3, 300, (6, 20), generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=4, progress=False, kinds=("whitened", "fisher"), store="full", extras=())
    ref = profile_model(model, ids, out=tmp_path / "f64", **kw)
    fast = profile_model(model, ids, out=tmp_path / "f32", gram_dtype="float32", **kw)
    differs = 0
    for c in ref.components:
        G0, G = ref.output_gram(c.name), fast.output_gram(c.name)
        assert G.dtype == torch.float64 and torch.equal(G, G.T), c.name
        err = float((G - G0).abs().max())
        assert err <= 1e-5 * float(G0.abs().max()), c.name
        differs += err > 0
    assert differs == len(ref.components)


def test_fisher_added_to_a_finished_profile_equals_profiling_it_at_once(sampled, tmp_path):
    """A profile finished with the spectral kinds, asked again with fisher, runs only the forward (no statistics)
    and the streamed backward; its curves equal a profile made with fisher from the start."""
    model, ids = sampled
    ids = ids[:8]
    at_once = profile_model(model, ids, out=tmp_path / "a", batch_size=4, progress=False,
                            kinds=("whitened", "fisher"))
    first = profile_model(model, ids, out=tmp_path / "b", batch_size=4, progress=False, kinds=("whitened",))
    assert "fisher" not in first.kinds
    later = profile_model(model, ids, out=tmp_path / "b", batch_size=4, progress=False, kinds=("whitened", "fisher"))
    for kind in ("whitened", "fisher", "fisher_svd"):
        a, b = at_once.curve_set([kind]), later.curve_set([kind])
        for c in at_once.components:
            np.testing.assert_allclose(b.errors[kind][c.name], a.errors[kind][c.name], rtol=1e-12, atol=0)


def test_fisher_on_a_calibration_subset(sampled, tmp_path):
    """profile_model(fisher_samples=k), k not a multiple of the batch size: the output Grams are those of the first
    k sequences, the meta records k (settings) and k (T - 1) predicted tokens, and the curves use that count:
    fisher_svd(r) equals fisher_svd_curve(W, Gx, Gg_k, N_x, k (T - 1)). A subset size outside 1..n is refused."""
    model, ids = sampled
    ids = ids[:8]
    prof = profile_model(model, ids, out=tmp_path / "p", batch_size=4, progress=False,
                         kinds=("whitened", "fisher"), fisher_samples=3, store="full")
    T = ids.shape[1]
    assert prof.meta["settings"]["fisher_samples"] == 3 and prof.fisher_loss_tokens == 3 * (T - 1)
    name = "model.layers.1.mlp.down_proj"
    mods = {name: model.get_submodule(name)}
    want = output_gradient_grams(model, ids[:3], mods, batch_size=4, progress=False)[name]
    assert torch.allclose(prof.output_gram(name), want, rtol=1e-10, atol=1e-12)
    curve = fisher_svd_curve(read_weight(mods[name], name), prof.input_gram(name), want, prof.tokens, 3 * (T - 1),
                             name)
    np.testing.assert_allclose(prof.curve_set(["fisher_svd"]).errors["fisher_svd"][name], curve, rtol=1e-9)
    with pytest.raises(ValueError, match=r"fisher_samples: expected an integer in 1\.\.8"):
        profile_model(model, ids, out=tmp_path / "q", batch_size=4, progress=False, kinds=("whitened", "fisher"),
                      fisher_samples=9)


def test_fisher_svd_curve_equals_kfac_of_svd_truncation():
    """fisher_svd(r) = ||G_g^1/2 (W - W_r) S||^2 / (2 N N_loss) for the SVD-LLM truncation W_r = U_r S_r V_r^T S^-1."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(30, 7, generator=g, dtype=torch.float64)
    Gx, Gg = X.T @ X, Y.T @ Y
    curve = fisher_svd_curve(W, Gx, Gg, 40, 30)
    A, Z = whitened_factors(W, Gx, "W")
    S, _ = damped_cholesky(Gx, "W")
    for r in range(6):
        D = (W - A[:, :r] @ Z[:r]) @ S
        Ggd = Gg + 1e-6 * Gg.diagonal().mean() * torch.eye(7, dtype=torch.float64)  # damped as fisher_curve's
        assert math.isclose(curve[r], float(torch.trace(D.T @ Ggd @ D)) / (2 * 40 * 30), rel_tol=1e-9, abs_tol=1e-15)


# ------------------------------------------------------------------------------------------- probe


def test_monotone_curve_rules():
    """Running minimum from rank 0 upward, clip at 0, exact at monotone measurements, 0 at full rank, linear between."""
    e = monotone_curve(np.array([0, 4, 8]), np.array([3.0, 1.0, 2.0]), 12)
    assert e[0] == 3.0 and e[4] == 1.0 and e[8] == 1.0 and e[12] == 0.0 and e[2] == 2.0 and e[10] == 0.5
    assert (monotone_curve(np.array([0, 5]), np.array([-1.0, -2.0]), 10) == 0).all()
    assert list(probe_ranks(64, 6, 16)) == [0, 16, 32, 48]
    with pytest.raises(ValueError, match="include 0"):
        monotone_curve(np.array([2, 4]), np.array([1.0, 0.5]), 8)


def test_layer_cache_rerun_equals_full_forward(sampled):
    """The probe's partial rerun (layers before l stubbed with cached outputs) gives the same loss as a full
    forward, for a truncated matrix in layer 1 and in layer 0."""
    model, ids = sampled
    from rankalloc.profiling.architectures import find_structure

    probe = ids[:6]
    cache = LayerCache(model, find_structure(model).layers, probe, batch_size=4)
    assert math.isclose(cache.dense_loss, calibration_loss(model, probe, 4), rel_tol=1e-12)
    for name, layer in (("model.layers.1.mlp.up_proj", 1), ("model.layers.0.self_attn.v_proj", 0)):
        mod = model.get_submodule(name)
        W = read_weight(mod, name)
        write_weight_(mod, 0.5 * W)
        try:
            assert math.isclose(cache.loss(layer), calibration_loss(model, probe, 4), rel_tol=1e-12)
        finally:
            write_weight_(mod, W)
    assert "forward" not in model.model.layers[0].__dict__


@pytest.mark.parametrize("arch", ARCHES)
def test_rerun_and_output_grams_on_every_family(arch):
    """For every supported family (fused qkv, Conv1D, tuple-returning layers, sliding-window masks): the probe's
    partial rerun equals a full forward with a changed layer-1 weight, and every component gets a finite output
    Gram with a non-negative diagonal."""
    from rankalloc.profiling.architectures import find_structure

    model = tiny_model(arch).double()
    ids = torch.randint(3, 384, (4, 16), generator=torch.Generator().manual_seed(0))
    st = find_structure(model)
    cache = LayerCache(model, st.layers, ids, 2)
    c = next(c for c in st.components if c.layer == 1)
    W = read_weight(st.modules[c.name], c.name)
    write_weight_(st.modules[c.name], 0.3 * W)
    assert math.isclose(cache.loss(1), calibration_loss(model, ids, 2), rel_tol=1e-12)
    assert not math.isclose(cache.loss(1), cache.dense_loss, rel_tol=1e-9)
    write_weight_(st.modules[c.name], W)
    G = output_gradient_grams(model, ids, st.modules, batch_size=2, progress=False)
    assert set(G) == {c.name for c in st.components}
    for c in st.components:
        assert G[c.name].shape == (c.m, c.m) and torch.isfinite(G[c.name]).all() and G[c.name].diagonal().min() >= 0


def test_probe_curves_are_monotone_measured_and_agree_with_fisher(profiled):
    """Probe curves: min(m,n)+1 values, non-increasing, >= 0, 0 at full rank; truncating to rank 0 raises the
    loss of the model on its own samples for every matrix; rank-0 probe and Fisher estimates rank the 14
    matrices alike (Spearman > 0.7)."""
    from scipy.stats import spearmanr

    model, ids, prof = profiled
    cs = prof.curve_set(["probe", "fisher"])
    p0, f0 = [], []
    for c in prof.components:
        e = cs.errors["probe"][c.name]
        assert len(e) == c.max_rank + 1 and e[-1] == 0 and (e >= 0).all() and (np.diff(e) <= 0).all()
        assert e[0] > 0, c.name
        p0.append(e[c.max_rank // 4])
        f0.append(cs.errors["fisher"][c.name][c.max_rank // 4])
    assert spearmanr(p0, f0)[0] > 0.7


# ------------------------------------------------------------------------------------------- SoLA


def test_sola_split_accounting_and_curves(profiled):
    """SoLA: dense cost of the marginal components + fixed prime params == original FFN params; attention keeps
    its curves; gate/up marginal rows use G_x, down marginal columns G_h[M, M]: its whitened(0) is
    ||W[:, M] S_M||^2; with gamma=0 the marginal curves equal the profile's own curves."""
    model, ids, prof = profiled
    ffn = [c for c in prof.components if c.kind in ("gate", "up", "down")]
    for gamma in (0.15, 0.0):
        out = sola_curve_set(prof, model, gamma)
        cs = out.curve_set
        dense = sum(Params().dense(c) for c in cs.components if c.name.endswith(SUFFIX))
        assert dense + out.fixed_params == sum(c.m * c.n for c in ffn)
        assert {c.name for c in cs.components if not c.name.endswith(SUFFIX)} == \
            {c.name for c in prof.components if c.kind in ("q", "k", "v", "o")}
        assert {"whitened", "energy", "fisher", "fisher_svd"} <= set(cs.kinds)
        for kind in cs.kinds:
            cs.curves(kind, grid=1)  # validates non-increasing, finite, >= 0
    out = sola_curve_set(prof, model, 0.15)
    base = prof.curve_set(["whitened"])
    down = "model.layers.1.mlp.down_proj"
    M = np.setdiff1d(np.arange(160), out.prime[1])
    assert len(out.prime[1]) == math.ceil(0.15 * 160)
    S, _ = damped_cholesky(prof.input_gram(down)[M][:, M], "down")
    Wm = read_weight(model.get_submodule(down), down)[:, M]
    assert math.isclose(out.curve_set.errors["whitened"][down + SUFFIX][0], float(((Wm @ S) ** 2).sum()), rel_tol=1e-9)
    zero = sola_curve_set(prof, model, 0.0).curve_set
    for c in ffn:
        np.testing.assert_allclose(zero.errors["whitened"][c.name + SUFFIX], base.errors["whitened"][c.name],
                                   rtol=1e-7, atol=1e-9 * base.errors["whitened"][c.name][0])


# ------------------------------------------------------------------------------------------- FLAT


def test_dropped_eigenvalues_equal_projection_error():
    """For random per-head value outputs Y_h, sum_h sum_{i>r} lambda_i(Y_h^T Y_h) == sum_h ||Y_h - Q_r Q_r^T Y_h||^2
    (1e-9 relative) at every r, with Q the sorted eigenvectors (orthonormal, deterministic signs)."""
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(3, 50, 8, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    C = Y.transpose(1, 2) @ Y
    d = dropped_eigenvalues(C)
    for r in range(9):
        err = 0.0
        for h in range(3):
            lam, Q = eig_desc(C[h], "C")
            assert (lam[:-1] >= lam[1:]).all() and torch.allclose(Q.T @ Q, torch.eye(8, dtype=torch.float64))
            P = Q[:, :r] @ Q[:, :r].T
            err += float(((Y[h] - Y[h] @ P) ** 2).sum())
        assert math.isclose(d[r], err, rel_tol=1e-9, abs_tol=1e-9 * d[0])
    lam2, Q2 = eig_desc(C[0], "C")
    assert torch.equal(eig_desc(C[0].clone(), "C")[1], Q2)


def test_flat_curve_set_components_and_pricing(profiled):
    """flat_curve_set: per layer one vo component (m = o's out, n = v's in, ranks 0..head_dim, curve = dropped
    eigenvalues of the stored value covariance) plus q,k,gate,up,down; FlatParams prices vo at r = head_dim as the
    dense V + O parameters and r * (kv_heads n + heads m) below; head_bases diagonalise the covariance."""
    model, ids, prof = profiled
    cs = flat_curve_set(prof)
    cfg = prof.meta["config"]
    hd, heads, kv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
    cost = FlatParams(hd, heads, kv)
    kinds = {c.kind for c in cs.components}
    assert kinds == {"q", "k", "gate", "up", "down", "vo"} and {"fisher", "fisher_svd"} <= set(cs.kinds)
    for layer in range(2):
        vo = cs.component(f"model.layers.{layer}.self_attn.vo")
        v = prof.component(f"model.layers.{layer}.self_attn.v_proj")
        o = prof.component(f"model.layers.{layer}.self_attn.o_proj")
        assert (vo.m, vo.n) == (o.m, v.n)
        assert cost.dense(vo) == v.m * v.n + o.m * o.n
        priced = cost.cost(vo, np.array([hd, 3, -1]), np.zeros(3)).tolist()
        assert priced == [cost.dense(vo), 3 * (kv * v.n + heads * o.m), cost.dense(vo)]
        C = prof.value_covariance(layer)
        e = cs.errors["whitened"][vo.name]
        assert len(e) == hd + 1 and e[-1] < 1e-9 * e[0]
        assert math.isclose(e[0], float(sum(torch.trace(C[h]) for h in range(kv))), rel_tol=1e-9)
        Q = head_bases(prof, layer)
        D = Q[0].T @ C[0] @ Q[0]
        assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-9 * float(D.abs().max()))
        for kind in cs.kinds:
            Curve(vo, np.arange(hd + 1), cs.errors[kind][vo.name])
        # fisher_svd prices what the FLAT decomposer builds: the vo curve, plus one-sided curves elsewhere
        np.testing.assert_array_equal(cs.errors["fisher_svd"][vo.name], cs.errors["fisher"][vo.name])
        for name in (f"model.layers.{layer}.mlp.up_proj", f"model.layers.{layer}.self_attn.q_proj"):
            np.testing.assert_array_equal(cs.errors["fisher_svd"][name], prof.curve_set().errors["fisher_svd"][name])


def _value_outputs_and_gradients(model, ids, names, batch_size=8):
    """Per-position outputs y_s and loss-sum gradients g_s of the named modules (a full backward, float64)."""
    ys, gs, hooks = {n: [] for n in names}, {n: [] for n in names}, []
    for n in names:
        def hook(mod, args, out, n=n):
            ys[n].append(out.detach())
            out.register_hook(lambda g, n=n: gs[n].append(g.detach()))
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True)))
    try:
        for b in range(0, ids.shape[0], batch_size):
            logits = model(input_ids=ids[b:b + batch_size], use_cache=False).logits[:, :-1]
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              ids[b:b + batch_size, 1:].reshape(-1), reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return ({n: torch.cat(ys[n]).reshape(-1, ys[n][0].shape[-1]) for n in names},
            {n: torch.cat(gs[n]).reshape(-1, gs[n][0].shape[-1]) for n in names})


def test_value_loss_tap_is_the_per_token_fisher_not_its_kronecker_split():
    """ValueLossTap's curve is sum_s (g_s^T P_r y_s)^2 / (2 N_loss) with P_r = blockdiag(I - Q_r Q_r^T), batch by batch.
    With an attention-sink position (a large gradient, a zero value) the K-FAC split tr(P C P G_g) / (2 N_x N_loss),
    FLAT's old vo curve, charges every value direction with the sink's gradient; the per-token curve does not."""
    g = torch.Generator().manual_seed(3)
    kv, d, T = 2, 4, 50
    y = torch.randn(T, kv * d, generator=g, dtype=torch.float64)
    grad = 0.1 * torch.randn(T, kv * d, generator=g, dtype=torch.float64)
    y[0], grad[0] = 0.0, 30.0  # the sink: no value, most of the gradient
    C = torch.stack([y[:, h * d:(h + 1) * d].T @ y[:, h * d:(h + 1) * d] for h in range(kv)])
    Q = torch.stack([eig_desc(C[h], "C")[1] for h in range(kv)])
    tap = ValueLossTap(Q)
    tap(y[:20], grad[:20])
    tap(y[20:].reshape(3, 10, kv * d), grad[20:].reshape(3, 10, kv * d))
    n_loss = T - 1
    curve = tap.curve(n_loss)
    want, kfac = [], []
    for r in range(d + 1):
        P = torch.block_diag(*[torch.eye(d, dtype=torch.float64) - Q[h][:, :r] @ Q[h][:, :r].T for h in range(kv)])
        dy = y @ P
        want.append(float(((dy * grad).sum(1) ** 2).sum()) / (2 * n_loss))
        kfac.append(float(torch.trace(dy.T @ dy @ grad.T @ grad)) / (2 * T * n_loss))
    want = np.maximum.accumulate(np.array(want)[::-1])[::-1]  # made non-increasing from the top
    np.testing.assert_allclose(curve, want, rtol=1e-10, atol=1e-14)
    assert curve[d] == 0.0 and (np.diff(curve) <= 0).all()
    assert kfac[1] > 20 * curve[1]  # the mispricing: the Kronecker split is driven by the sink's gradient


def test_flat_vo_fisher_curve_equals_explicit_per_token_formula(profiled):
    """The stored FLAT vo loss curve (layer-streamed backward, in batches) equals sum_s (g_s^T P_r y_s)^2 / (2 N_loss)
    from a full backward, in the basis the decomposer keeps (head_bases); it is 0 at r = head_dim, and the FLAT
    fisher and fisher_svd kinds both price vo with it."""
    model, ids, prof = profiled
    cs = flat_curve_set(prof)
    cfg = prof.meta["config"]
    kv, d = cfg["kv_heads"], cfg["head_dim"]
    names = [f"model.layers.{l}.self_attn.v_proj" for l in range(2)]
    ys, gs = _value_outputs_and_gradients(model, ids, names)
    n_loss = loss_token_count(ids)
    assert prof.fisher_loss_tokens == n_loss
    for layer, n in enumerate(names):
        Q = head_bases(prof, layer)
        vo = n.rsplit(".", 1)[0] + ".vo"
        stored = prof.fisher_extra(TOKEN_FISHER, vo, layer)
        want = []
        for r in range(d + 1):
            P = torch.block_diag(*[torch.eye(d, dtype=torch.float64) - Q[h][:, :r] @ Q[h][:, :r].T
                                   for h in range(kv)])
            want.append(float(((ys[n] @ P * gs[n]).sum(1) ** 2).sum()) / (2 * n_loss))
        want = np.maximum.accumulate(np.array(want)[::-1])[::-1]
        np.testing.assert_allclose(stored, want, rtol=1e-7, atol=1e-12 * want[0])
        np.testing.assert_array_equal(cs.errors["fisher"][vo], stored)
        np.testing.assert_array_equal(cs.errors["fisher_svd"][vo], stored)


def test_sampled_label_fisher_is_recorded_reproducible_and_differs(sampled, tmp_path):
    """fisher_labels="sampled": the profile's settings say so (a data-label profile's do not), the same seed gives
    the same Fisher curves, they differ from the data-label ones, and an unknown label is refused."""
    model, ids = sampled
    kw = dict(batch_size=8, progress=False, kinds=("whitened", "fisher"), extras=())
    data = profile_model(model, ids[:8], out=tmp_path / "data", **kw)
    one = profile_model(model, ids[:8], out=tmp_path / "one", fisher_labels="sampled", **kw)
    two = profile_model(model, ids[:8], out=tmp_path / "two", fisher_labels="sampled", **kw)
    assert one.meta["settings"]["fisher_labels"] == "sampled" and "fisher_labels" not in data.meta["settings"]
    name = one.components[0].name
    a, b, d = (p.curve_set(("fisher",)).errors["fisher"][name] for p in (one, two, data))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - d).max() > 1e-3 * np.abs(d).max()
    with pytest.raises(ValueError, match="fisher_labels: expected one of"):
        profile_model(model, ids[:8], out=tmp_path / "bad", fisher_labels="model", **kw)


def test_flat_curves_without_the_vo_loss_curve(profiled, tmp_path):
    """A profile with no stored vo loss curve (made before it existed, or without the 'flat' extra) offers FLAT's
    other kinds by default and refuses the loss kinds when they are asked for, naming the fix."""
    model, ids, _ = profiled
    prof = profile_model(model, ids[:8], out=tmp_path / "p", batch_size=8, progress=False,
                         kinds=("whitened", "fisher"), extras=())
    kinds = set(flat_curve_set(prof).kinds)
    assert "whitened" in kinds and not kinds & {"fisher", "fisher_svd"}
    with pytest.raises(ValueError, match="no FLAT value-head loss curve.*--restart"):
        flat_curve_set(prof, kinds=("whitened", "fisher"))


# ------------------------------------------------------------------------------------------- SSLC


def test_sslc_errors_equal_explicit_half_alternations():
    """sslc_errors(r, k) = running minima of min(low-rank-first, sparse-first), each computed explicitly:
    ||(W - L_r - S_k) S||^2 with S_k the ceil(k m n) entries of R = W - L_r of largest R_ij^2 G_jj, and
    sum_{i>r} sigma_i((W - S'_k) S)^2 with S'_k the entries of W of largest W_ij^2 G_jj."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(9, 6, generator=g, dtype=torch.float64)
    X = torch.randn(30, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    G = X.T @ X
    ranks, ks = [0, 2, 4], [0.0, 0.1, 0.3]
    E, total = sslc_errors(W, G, ranks, ks)
    S, _ = damped_cholesky(G, "W")
    A, Z = whitened_factors(W, G, "W")
    assert math.isclose(total, float(((W @ S) ** 2).sum()), rel_tol=1e-12)

    def top(M, k):
        keep = torch.argsort((M ** 2 * torch.diagonal(G)).reshape(-1), descending=True)[:math.ceil(k * 54)]
        out = torch.zeros(54, dtype=torch.float64)
        out[keep] = M.reshape(-1)[keep]
        return out.reshape(9, 6)

    raw = np.empty_like(E)
    for i, r in enumerate(ranks):
        R = W - A[:, :r] @ Z[:r]
        for j, k in enumerate(ks):
            low_first = float((((R - top(R, k)) @ S) ** 2).sum())
            sv = torch.linalg.svdvals((W - top(W, k)) @ S)
            raw[i, j] = min(low_first, float((sv[r:] ** 2).sum()))
    expected = np.minimum.accumulate(np.minimum.accumulate(raw, 0), 1)
    np.testing.assert_allclose(E, expected, rtol=1e-9, atol=1e-12 * total)


def test_sslc_curve_set_monotone_and_sparsity_helps(profiled):
    """The SSLC table validates as curves (non-increasing in rank and sparsity), its k=0 column equals the
    profile's whitened curve, and keeping 5% sparse entries lowers the error at every rank below full."""
    model, ids, prof = profiled
    cs = sslc_curve_set(prof, model, ranks=[0, 8, 16, 32, 48], sparsities=(0.0, 0.01, 0.02, 0.05), progress=False,
                        kinds=("whitened", "energy"))
    base = prof.curve_set(["whitened"])
    for cv in cs.curves("whitened", grid=8):
        c = cv.component
        for r in (r for r in (0, 8, 16, 32) if r < c.max_rank):
            e0 = cv.errors[cv.index_of(Choice(r, 0.0))]
            assert math.isclose(e0, base.errors["whitened"][c.name][r], rel_tol=1e-7), (c.name, r)
            assert cv.errors[cv.index_of(Choice(r, 0.05))] < e0
    cs.curves("energy", grid=8)


def test_sslc_fisher_table_prices_what_the_decomposer_builds(profiled):
    """The loss-unit SSLC table (the default on a profile with output-gradient Grams): its k=0 cells are the
    profile's ``fisher`` curve, it validates as curves, every cell it keeps is strictly below the cheaper ones, and
    the two-sided SSLC decomposer's error at each kept (r, k), in nats, is at most the cell and the rank-only error
    at r. Sparse cells survive (the sparse part pays somewhere)."""
    from rankalloc.decomposers.sslc import SSLCConfig, sslc
    from rankalloc.profiling.fisher import _scale
    from rankalloc.profiling.probe import component_module, read_weight

    model, ids, prof = profiled
    ranks, ks = [0, 8, 16, 32], (0.0, 0.01, 0.04)
    cs = sslc_curve_set(prof, model, ranks=ranks, sparsities=ks, progress=False)
    assert set(cs.errors) == {"fisher"}
    fisher = prof.curve_set(["fisher"]).errors["fisher"]
    scale = _scale(prof.tokens, prof.fisher_loss_tokens)
    curves = {cv.component.name: cv for cv in cs.curves("fisher", grid=8)}
    sparse_cells = 0
    for c in prof.components[:7]:  # one layer: q, k, v, o, gate, up, down
        cv = curves[c.name]
        W = read_weight(component_module(model, c.name), c.name)
        r_, k_, e_ = np.asarray(cv.ranks), np.asarray(cv.sparsity), np.asarray(cv.errors)
        for j in range(len(cv)):
            r, k = int(r_[j]), float(k_[j])
            if r < 0:
                continue
            e0 = cv.errors[cv.index_of(Choice(r, 0.0))]
            if k == 0:
                assert math.isclose(e0, fisher[c.name][r], rel_tol=1e-7), (c.name, r)
                continue
            sparse_cells += 1
            cheaper = (r_ >= 0) & (r_ <= r) & (k_ <= k) & (np.arange(len(cv)) != j)
            assert (e_[cheaper] > e_[j]).all(), (c.name, r, k)
            got = sslc(W, prof.input_gram(c.name), r, k, SSLCConfig(iterations=3), c.name,
                       prof.output_gram(c.name)).error * scale
            assert got <= e_[j] * (1 + 1e-6) and got <= e0 * (1 + 1e-6), (c.name, r, k, got, e_[j], e0)
    assert sparse_cells > 0


# ------------------------------------------------------------------------------------------- predict


def test_curve_kind_agreement_on_nested_allocations(profiled):
    """Nested allocations (every rank lower than in the next) must be measured in the same order as every kind
    predicts them: Spearman 1 for all kinds, measured increases strictly decreasing in kept rank. A sparse
    choice is refused naming the component."""
    model, ids, prof = profiled
    comps = prof.components
    allocs = {f"keep{f}": {c.name: int(f * c.max_rank) for c in comps} for f in (0.25, 0.5, 0.75)}
    allocs["dense-ish"] = {c.name: "dense" if c.kind in ("q", "k") else int(0.9 * c.max_rank) for c in comps}
    out = curve_kind_agreement(prof, model, ids, ["whitened", "fisher", "probe"], allocs, n_probe_samples=8,
                               progress=False)
    per = out.attrs["allocations"]
    assert list(per["allocation"]) == list(allocs)
    assert (np.diff(per["measured_increase"].to_numpy()) < 0).all()
    assert (out["spearman"] == 1.0).all()
    bad = {comps[0].name: Choice(8, 0.05)}
    with pytest.raises(ValueError, match=comps[0].name.replace(".", r"\.")):
        curve_kind_agreement(prof, model, ids, ["whitened"], [bad, bad, bad], progress=False)


# ------------------------------------------------------------------------------------------- stored extras


def test_extras_round_trip_into_problems(profiled):
    """SoLA, FLAT and SSLC curve sets stored with write_extra come back identical and build allocation problems
    whose dense cost accounts for every profiled matrix exactly: FLAT (FlatParams) prices q,k,gate,up,down plus
    the merged vo at the dense V + O parameters; SoLA's dense cost plus its fixed prime parameters is the model's."""
    from rankalloc.allocators.problem import AllocationProblem
    from rankalloc.profiling.flat import add_flat_curves
    from rankalloc.profiling.sola import add_sola_curves
    from rankalloc.profiling.sslc_table import add_sslc_curves

    model, ids, prof = profiled
    total = sum(c.m * c.n for c in prof.components)
    cfg = prof.meta["config"]
    flat = add_flat_curves(prof)
    back = prof.extra("flat")
    for c in flat.components:
        np.testing.assert_array_equal(back.errors["whitened"][c.name], flat.errors["whitened"][c.name])
    problem = AllocationProblem.from_profiles(back, cost={"params": FlatParams(cfg["head_dim"], cfg["heads"],
                                                                               cfg["kv_heads"])}, budget=0.3,
                                              kind="whitened", grid=4)
    assert problem.dense_costs["params"] == total
    sola = add_sola_curves(prof, model, 0.15, progress=False)
    problem = AllocationProblem.from_profiles(prof.extra("sola"), budget=0.3, kind="energy", grid=4)
    assert problem.dense_costs["params"] + sola.fixed_params == total
    add_sslc_curves(prof, model, ranks=[0, 16, 32], sparsities=(0.0, 0.02), progress=False, kinds=("whitened",))
    sslc = prof.extra("sslc")
    problem = AllocationProblem.from_profiles(sslc, budget=0.3, kind="whitened", grid=16)
    assert problem.dense_costs["params"] == total
    assert sorted(set(np.concatenate([np.asarray(v) for v in sslc.sparsity.values()]))) == [0.0, 0.02]


def test_sslc_curves_replace_a_stored_input_metric_table(profiled):
    """A stored SSLC table of an earlier version (input metric only, no ``fisher`` kind) is not used for the loss-unit
    method: without the model it is a NeedsModel error saying so; with it the table is rebuilt and stored."""
    from rankalloc.decomposers.registry import NeedsModel
    from rankalloc.decomposers.sslc import sslc_curves
    from rankalloc.profiling.sslc_table import add_sslc_curves

    model, ids, prof = profiled
    add_sslc_curves(prof, model, ranks=[0, 16], sparsities=(0.0, 0.02), progress=False, kinds=("whitened",))
    with pytest.raises(NeedsModel, match="without the loss-unit kind"):
        sslc_curves(prof, None)
    mc = sslc_curves(prof, model, grid=16, progress=False)
    assert list(mc.curve_set.kinds) == ["fisher"] and list(prof.extra("sslc").kinds) == ["fisher"]


def test_sslc_curves_rebuild_a_table_on_other_kept_fractions(profiled):
    """A stored loss-unit SSLC table built on other kept fractions than DEFAULT_SPARSITIES (an earlier grid) is not
    used: without the model it is a NeedsModel error naming both grids; with it the table is rebuilt on the
    current fractions and then reused as stored."""
    from rankalloc.decomposers.registry import NeedsModel
    from rankalloc.decomposers.sslc import sslc_curves
    from rankalloc.profiling.sslc_table import DEFAULT_SPARSITIES, add_sslc_curves, table_fractions

    model, ids, prof = profiled
    add_sslc_curves(prof, model, ranks=[0, 16], sparsities=(0.0, 0.01), progress=False, kinds=("fisher",))
    with pytest.raises(NeedsModel, match=r"kept fractions \[0.0, 0.01\], not"):
        sslc_curves(prof, None)
    sslc_curves(prof, model, grid=16, progress=False)
    rebuilt = prof.extra("sslc")
    assert max(table_fractions(rebuilt)) == max(DEFAULT_SPARSITIES)
    assert set(table_fractions(rebuilt)) <= set(DEFAULT_SPARSITIES)
    again = sslc_curves(prof, None)  # now current: served from the profile without the model
    assert table_fractions(again.curve_set) == table_fractions(rebuilt)


def test_sslc_curves_compare_the_recorded_grid_exactly(profiled):
    """The table records the kept fractions it was built on, so a grid that shares the largest fraction but lacks
    others (0 and 4% only), which the cells alone cannot tell from the current grid, is still refused; a table
    stored without a recorded grid (an earlier version) falls back to reading its cells."""
    from rankalloc.decomposers.registry import NeedsModel
    from rankalloc.decomposers.sslc import sslc_curves
    from rankalloc.profiling.sslc_table import (DEFAULT_SPARSITIES, add_sslc_curves, built_fractions, same_fractions,
                                                table_fractions)

    model, ids, prof = profiled
    coarse = (0.0, max(DEFAULT_SPARSITIES))
    cs = add_sslc_curves(prof, model, ranks=[0, 16], sparsities=coarse, progress=False, kinds=("fisher",))
    assert built_fractions(prof) == coarse
    assert same_fractions(cs, DEFAULT_SPARSITIES)  # what the cells alone would say
    with pytest.raises(NeedsModel, match=r"kept fractions \[0.0, 0.04\], not"):
        sslc_curves(prof, None)
    prof.write_extra("sslc", cs)  # the same table with no grid in its record
    assert built_fractions(prof) is None
    assert table_fractions(sslc_curves(prof, None).curve_set) == coarse
