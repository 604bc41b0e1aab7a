"""Profiling core: streaming statistics, whitened spectra and curves, the profile store, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_model, tiny_tokenizer
from rankalloc.profiling.architectures import find_structure, weight_of
from rankalloc.profiling.calibration import LayerStats, accumulate_gram, finish_gram, gram_block
from rankalloc.profiling.numerics import Damping, NonFiniteError, NumericalError, damped_cholesky, svd
from rankalloc.profiling.profile import profile_model
from rankalloc.profiling.spectra import SpectrumConfig
from rankalloc.profiling.store import Profile


def rand_ids(n=8, t=32, vocab=384, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def run(model, ids, out, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("store", "full")  # these tests check float64 Grams exactly; the compact store has its own tests
    return profile_model(model, ids, out=out, **kw)


@torch.no_grad()
def full_forward_activations(model, ids, batch_size, names, outputs=False):
    """Inputs (or outputs) of the named modules from a plain full-model forward, batch by batch."""
    struct = find_structure(model)
    acts = {n: [] for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, out, n=n):
            acts[n].append((out if outputs else args[0]).reshape(-1, (out if outputs else args[0]).shape[-1]))
        hooks.append(struct.modules[n].register_forward_hook(hook))
    hidden = []
    try:
        for i in range(0, ids.shape[0], batch_size):
            o = model(input_ids=ids[i:i + batch_size], use_cache=False, output_hidden_states=True)
            hidden.append(o.hidden_states)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).double() for n, v in acts.items()}, hidden


@pytest.mark.parametrize("n,block", [(7, 3), (300, 256), (576, gram_block(576)), (1536, gram_block(1536))])
def test_blocked_gram_equals_full_gram(n, block):
    """Accumulating only the lower block triangle and mirroring it gives sum_b X_b^T X_b to round-off,
    exactly symmetric, in float64 and from float32 batches."""
    gen = torch.Generator().manual_seed(n)
    Xs = [torch.randn(200, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    G = torch.zeros(n, n, dtype=torch.float64)
    for X in Xs:
        accumulate_gram(G, X, block)
    full = sum(X.T @ X for X in Xs)
    got = finish_gram(G)
    assert torch.equal(got, got.T) and float((got - full).abs().max()) <= 1e-13 * float(full.abs().max())
    G32 = torch.zeros(n, n, dtype=torch.float64)
    for X in Xs:
        accumulate_gram(G32, X.float(), block)
    assert float((finish_gram(G32) - full).abs().max()) <= 1e-5 * float(full.abs().max())


@pytest.fixture(scope="module")
def exact_profile(tmp_path_factory):
    """A random llama with tokens >> n (1024 tokens, n <= 160) and negligible damping."""
    model = tiny_model("llama", seed=3)
    ids = rand_ids(32, 32, seed=1)
    prof = run(model, ids, tmp_path_factory.mktemp("exact"), damping=Damping(damp=1e-13))
    return model, ids, prof


def test_predicted_whitened_error_equals_measured_truncation_error(exact_profile):
    """For W_r = (U_r Sigma_r V_r^T) S^{-1} (triangular solve), ||(W - W_r) X||_F^2 on the calibration
    activations equals the stored whitened(r) = sum_{i>r} sigma_i(W S)^2 to 1e-6 relative."""
    model, ids, prof = exact_profile
    names = [c.name for c in prof.components]
    X, _ = full_forward_activations(model, ids, 4, names)
    cs = prof.curve_set()
    for c in prof.components:
        W = weight_of(find_structure(model).modules[c.name]).detach().double()
        S, _ = damped_cholesky(prof.input_gram(c.name), c.name, Damping(damp=1e-13))
        U, s, Vh = svd(W @ S, c.name)
        for r in (0, 1, c.max_rank // 4, c.max_rank // 2):
            A = (U[:, :r] * s[:r]) @ Vh[:r]  # W_r S
            W_r = torch.linalg.solve_triangular(S.T, A.T, upper=True).T
            measured = float(((X[c.name] @ (W - W_r).T) ** 2).sum())
            predicted = cs.errors["whitened"][c.name][r]
            assert abs(predicted - measured) <= 1e-6 * predicted, (c.name, r, predicted, measured)


def test_curve_kinds_are_consistent(exact_profile):
    """energy = whitened/whitened(0), relative = sqrt(energy), epsilon(r) = ||W - W_r||_F/||W||_F for the
    plain truncated SVD; every curve has min(m,n)+1 points, is non-increasing and ends at 0."""
    model, _, prof = exact_profile
    cs = prof.curve_set()
    struct = find_structure(model)
    for c in prof.components:
        w = cs.errors["whitened"][c.name]
        assert len(w) == c.max_rank + 1 and list(cs.ranks[c.name]) == list(range(c.max_rank + 1))
        np.testing.assert_allclose(cs.errors["energy"][c.name], w / w[0], rtol=1e-15)
        np.testing.assert_allclose(cs.errors["relative"][c.name], np.sqrt(w / w[0]), rtol=1e-15)
        for kind in ("whitened", "energy", "relative", "epsilon"):
            e = cs.errors[kind][c.name]
            assert np.all(np.diff(e) <= 0) and e[-1] == 0
        W = weight_of(struct.modules[c.name]).detach().double()
        U, s, Vh = svd(W, c.name)
        r = c.max_rank // 3
        direct = torch.linalg.norm(W - (U[:, :r] * s[:r]) @ Vh[:r]) / torch.linalg.norm(W)
        assert cs.errors["epsilon"][c.name][r] == pytest.approx(float(direct), rel=1e-10)
        np.testing.assert_allclose(prof.spectrum(c.name) ** 2, -np.diff(w), rtol=1e-9, atol=1e-12 * w[0])


def test_dropped_value_eigenvalues_equal_value_reconstruction_error(exact_profile):
    """Per layer, the sum over KV heads of the dropped eigenvalues of C_h = sum_t y y^T equals
    ||Y - Y Q Q^T||_F^2 for Q the top-r eigenvectors of each head (FLAT-LLM's exact identity)."""
    model, ids, prof = exact_profile
    kv, hd = prof.meta["config"]["kv_heads"], prof.meta["config"]["head_dim"]
    vnames = [c.name for c in prof.components if c.kind == "v"]
    Y, _ = full_forward_activations(model, ids, 4, vnames, outputs=True)
    for layer, name in enumerate(vnames):
        C = prof.value_covariance(layer)
        assert C.shape == (kv, hd, hd) and C.dtype == torch.float64
        Yh = Y[name].reshape(-1, kv, hd)
        np.testing.assert_allclose(C.numpy(), torch.einsum("thi,thj->hij", Yh, Yh).numpy(), rtol=1e-10)
        lam, Q = torch.linalg.eigh(C)
        for r in (0, 3, hd // 2, hd):
            dropped = float(lam[:, :hd - r].sum())
            err = sum(float(((Yh[:, h] - Yh[:, h] @ Q[h, :, hd - r:] @ Q[h, :, hd - r:].T) ** 2).sum())
                      for h in range(kv))
            assert err == pytest.approx(dropped, rel=1e-9, abs=1e-12 * float(lam.sum()))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt", "gpt2", "phi3"])
def test_streaming_equals_full_forward(arch, tmp_path):
    """Grams, neuron norms and layer scores from the layer-by-layer stream equal those from a plain
    full-model forward with hooks (1e-10 relative). Gemma-2 uses an 8-token sliding window, so layers
    get different masks: each layer must be replayed with its own call arguments."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tiny_config(arch, num_hidden_layers=3)
    if arch == "gemma2":
        cfg.sliding_window = 8
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = rand_ids(6, 24)
    prof = run(model, ids, tmp_path)
    assert not any(m._forward_hooks for m in model.modules())  # our hooks and recorders are gone
    assert not any("forward" in layer.__dict__ for layer in find_structure(model).layers)
    names = [c.name for c in prof.components]
    X, hidden = full_forward_activations(model, ids, 4, names)
    for c in prof.components:
        G = X[c.name].T @ X[c.name]
        got = prof.input_gram(c.name)
        assert got.dtype == torch.float64 and got.shape == (c.n, c.n)
        assert float((got - G).abs().max()) <= 1e-10 * float(G.abs().max()), c.name
        if c.kind == "down":
            np.testing.assert_allclose(prof.neuron_norms(c.layer), torch.linalg.norm(X[c.name], dim=0).numpy(),
                                       rtol=1e-10)
    assert prof.tokens == ids.numel()
    for layer in range(2):  # the last HF hidden state is after the final norm; compare the others
        xs = torch.cat([h[layer].reshape(-1, h[layer].shape[-1]) for h in hidden]).double()
        ys = torch.cat([h[layer + 1].reshape(-1, h[layer + 1].shape[-1]) for h in hidden]).double()
        t = float(torch.arccos(torch.nn.functional.cosine_similarity(xs, ys, dim=-1).mean()) / np.pi)
        assert prof.layer_scores[layer] == pytest.approx(t, rel=1e-9)
    groups = set(prof.meta["gram_keys"].values())
    assert len(groups) < len(names) or arch in ("gpt2", "phi3")  # shared Grams stored once (fused: none)


def test_shared_gram_stored_once(exact_profile):
    """q/k/v resolve to one stored Gram and gate/up to another; the file holds one array per group."""
    _, _, prof = exact_profile
    from safetensors.numpy import load_file

    keys = prof.meta["gram_keys"]
    assert keys["model.layers.0.self_attn.q_proj"] == keys["model.layers.0.self_attn.v_proj"]
    assert keys["model.layers.0.mlp.gate_proj"] == keys["model.layers.0.mlp.up_proj"]
    assert sorted(load_file(str(prof.path / "grams" / "layer_000.safetensors"))) == sorted(
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
         "model.layers.0.mlp.down_proj"])
    assert torch.equal(prof.input_gram("model.layers.0.self_attn.k_proj"),
                       prof.input_gram("model.layers.0.self_attn.q_proj"))


def _all_arrays(path: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(path.rglob("*")):
        if f.suffix == ".npz":
            with np.load(f) as z:
                out.update({f"{f.relative_to(path)}/{k}": z[k] for k in z.files})
        elif f.suffix == ".safetensors":
            out.update({f"{f.relative_to(path)}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_resume_after_interrupt_is_identical(tmp_path):
    """A run interrupted inside layer 1 keeps layer 0, and resuming gives every array, the curves file and
    the meta (timings aside) bit-identical to an uninterrupted run."""
    model = tiny_model("llama", seed=5, num_hidden_layers=3)
    ids = rand_ids(8, 32, seed=2)
    full = run(model, ids, tmp_path / "full")

    calls = {"n": 0}

    def boom(mod, args, out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    h = model.model.layers[1].mlp.up_proj.register_forward_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        run(model, ids, tmp_path / "resumed")
    h.remove()
    partial = Profile.load(tmp_path / "resumed")
    assert partial.finished_layers == [0] and not partial.complete
    with pytest.raises(FileNotFoundError, match="unfinished"):
        partial.curve_set()
    assert not any(m._forward_hooks for m in model.modules())
    resumed = run(model, ids, tmp_path / "resumed")
    a, b = _all_arrays(full.path), _all_arrays(resumed.path)
    assert sorted(a) == sorted(b) and len(a) > 50
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert (full.path / "curves.csv").read_bytes() == (resumed.path / "curves.csv").read_bytes()
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (full.path, resumed.path))
    ma.pop("timings"), mb.pop("timings")
    assert ma == mb


def test_cache_key_mismatch_is_refused(tmp_path):
    """Another model (fingerprint) or other calibration ids into the same directory raise ValueError
    naming the differing field; resume=False overwrites; the same run resumes as a no-op."""
    ids = rand_ids(4, 16)
    first = run(tiny_model("llama", seed=0), ids, tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        run(tiny_model("llama", seed=1), ids, tmp_path)
    with pytest.raises(ValueError, match="calibration_hash"):
        run(tiny_model("llama", seed=0), rand_ids(4, 16, seed=9), tmp_path)
    with pytest.raises(ValueError, match="settings"):
        run(tiny_model("llama", seed=0), ids, tmp_path, gram_dtype="float32")
    again = run(tiny_model("llama", seed=0), ids, tmp_path)
    assert again.meta["fingerprint"] == first.meta["fingerprint"]
    other = run(tiny_model("llama", seed=1), ids, tmp_path, resume=False)
    assert other.meta["fingerprint"] != first.meta["fingerprint"] and other.complete


def test_profile_loads_without_model_or_torch(exact_profile):
    """Profile.load, curve_set and to_frame work in a process where importing torch fails."""
    _, _, prof = exact_profile
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from rankalloc.profiling.store import Profile\n"
        f"p = Profile.load({str(prof.path)!r})\n"
        "cs = p.curve_set(); df = p.to_frame()\n"
        "print(len(cs.components), len(df), sorted(cs.kinds), len(p.layer_scores))\n"
        "try:\n    p.input_gram(cs.components[0].name)\nexcept ImportError:\n    print('no torch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = sum(c.max_rank + 1 for c in prof.components)
    assert out.stdout.split("\n")[0] == f"14 {rows} ['energy', 'epsilon', 'relative', 'whitened'] 2"
    assert "no torch" in out.stdout
    df = prof.to_frame()
    assert {"component", "m", "n", "kind", "layer", "rank", "whitened", "epsilon"} <= set(df.columns)
    with pytest.raises(FileNotFoundError, match="rankalloc profile"):
        Profile.load(prof.path / "nowhere")


def test_store_writers_roundtrip(tmp_path):
    """write_kind adds a curve kind read back exactly; write_output_grams and write_extra round-trip;
    malformed inputs raise ValueError naming the component."""
    from rankalloc.allocators.curveset import CurveSet

    prof = run(tiny_model("llama"), rand_ids(4, 16), tmp_path, kinds=("whitened",))
    assert prof.kinds == ("whitened", "energy", "relative", "epsilon")  # spectral kinds always come together
    fake = {c.name: np.linspace(c.max_rank, 0, c.max_rank + 1) ** 2 for c in prof.components}
    prof.write_kind("fisher", fake)
    cs = Profile.load(tmp_path).curve_set(kinds="fisher")
    for c in prof.components:
        assert np.array_equal(cs.errors["fisher"][c.name], fake[c.name])
    assert "fisher" in Profile.load(tmp_path).kinds
    c0 = prof.components[0]
    with pytest.raises(ValueError, match=c0.name):
        prof.write_kind("probe", {**fake, c0.name: fake[c0.name][:-1]})
    with pytest.raises(ValueError, match="non-increasing"):
        prof.write_kind("probe", {**fake, c0.name: fake[c0.name][::-1]})
    with pytest.raises(ValueError, match="missing"):
        prof.write_kind("probe", {c0.name: fake[c0.name]})
    A = torch.randn(c0.m, c0.m, dtype=torch.float64)
    G = A @ A.T
    with pytest.raises(ValueError, match="not symmetric"):
        prof.write_output_grams({c0.name: A})
    prof.write_output_grams({c0.name: G})
    assert torch.equal(prof.output_gram(c0.name), G)
    with pytest.raises(ValueError, match=prof.components[1].name):
        prof.output_gram(prof.components[1].name)
    with pytest.raises(ValueError, match="shape"):
        prof.write_output_grams({c0.name: G[:2]})
    sub = CurveSet(prof.components[:2], {c.name: np.arange(c.max_rank + 1) for c in prof.components[:2]},
                   {"sola": {c.name: fake[c.name] for c in prof.components[:2]}})
    prof.write_extra("sola", sub)
    back = prof.extra("sola")
    assert [c.name for c in back.components] == [c.name for c in prof.components[:2]]
    assert np.array_equal(back.errors["sola"][c0.name], fake[c0.name])
    with pytest.raises(ValueError, match="no extra curve set"):
        prof.extra("flat")


def test_prime_neurons_are_the_top_norms(exact_profile):
    """prime_neurons(l, gamma) returns the sorted indices of the ceil(gamma*d) largest neuron norms."""
    _, _, prof = exact_profile
    a = prof.neuron_norms(1)
    idx = prof.prime_neurons(1, gamma=0.15)
    assert len(idx) == int(np.ceil(0.15 * len(a))) and np.all(np.diff(idx) > 0)
    assert a[idx].min() >= np.delete(a, idx).max()


def test_float32_grams_and_gram_eigh_spectrum_agree(exact_profile, tmp_path):
    """gram_dtype='float32' gives Grams within 1e-5 relative of float64; spectrum='gram-eigh' gives
    whitened curves within 1e-10 of whitened(0) of the svdvals route."""
    model, ids, ref = exact_profile
    prof = run(model, ids, tmp_path, gram_dtype="float32", spectrum="gram-eigh", damping=Damping(damp=1e-13))
    cs, cs_ref = prof.curve_set(), ref.curve_set()
    for c in prof.components:
        G, G0 = prof.input_gram(c.name), ref.input_gram(c.name)
        assert float((G - G0).abs().max()) <= 1e-5 * float(G0.abs().max())
    prof2 = run(model, ids, tmp_path / "eigh", spectrum="gram-eigh", damping=Damping(damp=1e-13))
    for c in prof.components:
        w, w0 = prof2.curve_set().errors["whitened"][c.name], cs_ref.errors["whitened"][c.name]
        assert np.abs(w - w0).max() <= 1e-10 * w0[0]
        assert cs.errors["whitened"][c.name][0] == pytest.approx(w0[0], rel=1e-5)


def test_dead_input_channels_are_damped(tmp_path):
    """Input channels never active (zero Gram diagonal) are damped: curves stay finite and monotone."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:5] = 0
    prof = run(model, rand_ids(4, 16), tmp_path)
    G = prof.input_gram("model.layers.0.self_attn.q_proj")
    assert (torch.diagonal(G)[:5] == 0).all()
    e = prof.curve_set().errors["whitened"]["model.layers.0.self_attn.q_proj"]
    assert np.isfinite(e).all() and e[0] > 0


def test_non_finite_weight_is_named(tmp_path):
    """A NaN in one weight raises NonFiniteError naming that matrix before any work is done."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj"):
        run(model, rand_ids(4, 16), tmp_path)
    assert not (tmp_path / "meta.json").exists()


def test_non_finite_activation_is_named(tmp_path):
    """Inf activations inside layer 1 raise NonFiniteError naming the module and the layer."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.gate_proj.*decoder layer 1"):
        run(model, rand_ids(4, 16), tmp_path)
    assert Profile.load(tmp_path).finished_layers == [0]


def test_zero_and_indefinite_grams_raise_numerical_error_naming_the_matrix(tmp_path):
    """An input that is never active (zero Gram) and a Gram whose Cholesky fails after all damping retries
    raise NumericalError naming the matrix."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.zero_()
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        run(model, rand_ids(4, 16), tmp_path)
    from rankalloc.profiling.calibration import StreamConfig
    from rankalloc.profiling.stream import Pass, layer_results
    from rankalloc.profiling.weights import Weights

    fresh = tiny_model("llama")
    struct = find_structure(fresh)
    grams = {g.key: torch.eye(g.n, dtype=torch.float64) for g in struct.layer_groups(0)}
    bad = "model.layers.0.mlp.gate_proj"
    grams[bad][0, 0] = -20.0  # indefinite beyond what 1 retry of damping repairs
    stats = LayerStats(0, grams, None, 1.0, 1)
    p = Pass(Weights(fresh), struct, None, None, StreamConfig(), SpectrumConfig(damping=Damping(retries=1)),
             torch.device("cpu"), "full", False)
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.mlp\.gate_proj.*up_proj.*failed after 1"):
        layer_results(p, stats)


def test_bad_calibration_inputs(tmp_path):
    """Malformed ids, ids outside the vocabulary, text without a tokenizer, unknown kinds and a missing
    loss-aware module are refused with ValueError saying what was expected."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="2-D"):
        run(model, torch.arange(10), tmp_path)
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        run(model, torch.full((2, 8), 999), tmp_path)
    with pytest.raises(ValueError, match="n_samples=16"):
        run(model, rand_ids(4, 8), tmp_path, n_samples=16)
    with pytest.raises(ValueError, match="tokenizer"):
        run(model, ["some text"], tmp_path)
    with pytest.raises(ValueError, match="unknown curve kinds"):
        run(model, rand_ids(4, 8), tmp_path, kinds=("whitened", "magic"))


def test_missing_loss_module_is_a_clear_error(tmp_path, monkeypatch):
    """A loss-aware kind whose module is not installed raises ValueError naming the module."""
    from rankalloc.profiling.profile import LOSS_KINDS

    monkeypatch.setitem(LOSS_KINDS, "probe", ("rankalloc.profiling._not_there", "add_probe_curves"))
    with pytest.raises(ValueError, match="_not_there"):
        run(tiny_model("llama"), rand_ids(4, 8), tmp_path, kinds=("whitened", "probe"))


def test_too_short_text_is_refused(tmp_path):
    """Text too short for n_samples x seqlen is refused by the calibration path with the token counts."""
    pytest.importorskip("rankalloc.profiling.text")
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="tokens"):
        run(tiny_model("llama"), ["A short article.", "Another short article."], tmp_path, tokenizer=tok,
            n_samples=64, seqlen=128)


def test_replaced_forwards_restores_on_error():
    """replaced_forwards: inside, every layer runs the given forward; after the block, even when it raised,
    a layer without an instance forward uses its class forward again and one with its own keeps it."""
    from rankalloc.profiling.calibration import replaced_forwards

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    own = lambda x: x * 0  # noqa: E731
    b.forward = own
    x = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with replaced_forwards([a, b], lambda i: (lambda x: x + i)):
            assert torch.equal(a(x), x) and torch.equal(b(x), x + 1)
            raise RuntimeError("boom")
    assert "forward" not in a.__dict__ and torch.allclose(a(x), torch.nn.functional.linear(x, a.weight, a.bias))
    assert b.__dict__["forward"] is own


def test_psd_roots_are_inverse_square_roots_of_the_damped_gram():
    """psd_roots(G) = ((G + dI)^1/2, (G + dI)^-1/2) from one eigh, d = 1e-6 mean diag: the first squares to the
    damped Gram, the two multiply to I, both are symmetric, and a rank-deficient Gram (a dead channel) stays
    finite; psd_power returns the same matrices and refuses other powers."""
    from rankalloc.profiling.numerics import psd_power, psd_roots

    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 6, generator=g, dtype=torch.float64)
    X[:, 2] = 0.0
    G = X.T @ X
    Gd = G + 1e-6 * G.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    half, ihalf = psd_roots(G, "G")
    assert torch.allclose(half @ half, Gd, rtol=1e-9, atol=1e-9 * float(Gd.abs().max()))
    assert torch.allclose(half @ ihalf, torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(half, half.T) and torch.isfinite(ihalf).all()
    assert torch.equal(psd_power(G, "G", 0.5), half) and torch.equal(psd_power(G, "G", -0.5), ihalf)
    with pytest.raises(ValueError, match="power 0.5 or -0.5"):
        psd_power(G, "G", 2.0)


@pytest.mark.parametrize("store", ["compact", "full"])
def test_profiling_leaves_the_weights_untouched(tmp_path, store):
    """The in-place triangular products and Cholesky factorizations work on private copies: a float64 model (whose
    weights need no dtype conversion) has bit-identical weights after a profile with Fisher kinds."""
    model = tiny_model("llama").double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(model, rand_ids(4, 16), tmp_path, kinds=("whitened", "fisher"), store=store)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
