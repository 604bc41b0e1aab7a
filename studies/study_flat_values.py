# Why FLAT's old value-head loss curve overpriced value-head cuts: per layer, the measured loss increase of one
# head-rank truncation of the value projection against the K-FAC split and the per-token Fisher that price it.
"""FLAT value-head pricing on a real model (default SmolLM2-135M + gensim Wikipedia text)::

    python -m rankalloc.studies.study_flat_values --samples 64 --probe-samples 8 --head-rank 16

For every layer ``l`` the value projection's outputs are projected onto the top ``--head-rank`` eigenvectors of
each KV head's value covariance (the basis the FLAT decomposer keeps, read from the profile), ``W_v <- (I - P_r)
W_v``, and the mean next-token loss on the first ``--probe-samples`` calibration sequences is measured against
dense. Beside it, on the same tokens, from one full backward of the dense model (outputs ``y_s`` and loss-sum
gradients ``g_s`` of each value projection):

- ``kfac``: ``tr(P_r C P_r G_g) / (2 N_x N_loss)``, ``C`` the per-head blocks of ``sum_s y_s y_s^T`` and
  ``G_g = sum_s g_s g_s^T`` (FLAT's curve before 2026-12: the Kronecker split of the Fisher);
- ``token``: ``sum_s (g_s^T P_r y_s)^2 / (2 N_loss)`` (the per-token Fisher, FLAT's curve now);
- ``output``: ``sum_t (h_t^T P_r u_t)^2 / (2 N_loss)`` at o_proj's input ``u_t`` (the heads' attention outputs,
  each head's block projected with its KV head's ``P_r``) and its loss-sum gradient ``h_t``. Attention mixes values
  linearly, so the truncation moves ``u_t`` by exactly ``-P_r u_t``; this per-token Fisher has no attention-sink
  value summed over many queries. It tests whether the cross-position terms that ``token`` drops explain its
  overprice in the early layers (2026-12-02: no, layers 1-7 stay at 2.2-20x, as ``token``'s 2.3-27x);
- ``sampled``: ``token`` with the gradients of tokens drawn from the model's softmax (``--draws`` per position,
  averaged) instead of the data's next tokens: the Monte-Carlo true Fisher of ``rankalloc profile --fisher-labels
  sampled``. It prices the early layers' cuts closer to their measured loss (layers 1-6 on the default text:
  1.2-2.7x against ``token``'s 2.3-5.1x) and every layer lower;
- ``sink g`` / ``sink y``: the share of ``tr G_g`` and of ``tr C`` at position 0 (the BOS token, an attention
  sink), which is what makes the split wrong: values and their gradients are far from independent across positions.

Not a test: it prints figures.
"""

from __future__ import annotations

import sys
import time


def value_statistics(model, ids, names, batch_size: int = 4, draws: int = 0, seed: int = 0):
    """``{name: (y, g)}``: per-position outputs and loss-sum output gradients (float64, ``(W, T, out)``) of the
    named modules from a full backward of ``model`` on ``ids`` (weights frozen); ``name + ":o"``: the input of the
    layer's o_proj and its gradient. ``draws > 0``: the loss is of tokens drawn from the model's softmax
    (``draws`` backwards per batch, their rows stacked) instead of the data's next tokens."""
    import torch
    import torch.nn.functional as F

    from rankalloc.profiling.fisher import frozen_from_embeddings
    from rankalloc.profiling.head import sampled_targets
    from rankalloc.profiling.probe import token_loss_sum

    ys, gs, hooks = {n: [] for n in names}, {n: [] for n in names}, []
    for n in names:
        def hook(mod, args, out, n=n):
            ys[n].append(out.detach().double())
            out.register_hook(lambda g, n=n: gs[n].append(g.detach().double()))

        def pre_hook(mod, args, n=n):
            u = args[0]
            ys[n + ":o"].append(u.detach().double())
            u.register_hook(lambda g, n=n: gs[n + ":o"].append(g.detach().double()))
        ys[n + ":o"], gs[n + ":o"] = [], []
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
        hooks.append(model.get_submodule(n.rsplit(".", 1)[0] + ".o_proj").register_forward_pre_hook(pre_hook))
    try:
        with frozen_from_embeddings(model):
            gen = torch.Generator().manual_seed(seed)
            for b in range(0, ids.shape[0], batch_size):
                if not draws:
                    loss, _ = token_loss_sum(model, ids[b:b + batch_size])
                    loss.backward()
                for _ in range(draws):
                    logits = model(input_ids=ids[b:b + batch_size], use_cache=False).logits[:, :-1].float()
                    flat = logits.reshape(-1, logits.shape[-1])
                    F.cross_entropy(flat, sampled_targets(flat, gen), reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: (torch.cat(ys[n]), torch.cat(gs[n])) for n in ys}


def prices(y, g, Q, r: int, n_loss: int) -> dict:
    """The K-FAC split and the per-token Fisher of dropping all but the top ``r`` directions of each head."""
    import torch

    kv, d, _ = Q.shape
    y2, g2 = y.reshape(-1, kv * d), g.reshape(-1, kv * d)
    P = torch.block_diag(*[torch.eye(d, dtype=torch.float64) - Q[h][:, :r] @ Q[h][:, :r].T for h in range(kv)])
    C = torch.block_diag(*[y2[:, h * d:(h + 1) * d].T @ y2[:, h * d:(h + 1) * d] for h in range(kv)])
    G = g2.T @ g2
    kfac = float(torch.trace(P @ C @ P @ G)) / (2.0 * y2.shape[0] * n_loss)
    token = float((((y2 @ P) * g2).sum(1) ** 2).sum()) / (2.0 * n_loss)
    sink_g = float((g[:, 0] ** 2).sum() / (g ** 2).sum())
    sink_y = float((y[:, 0] ** 2).sum() / (y ** 2).sum())
    return {"kfac": kfac, "token": token, "sink g": sink_g, "sink y": sink_y, "P": P}


def output_price(u, h, P, kv: int, n_loss: int) -> float:
    """``sum_t (h_t^T P u_t)^2 / (2 N_loss)`` at o_proj's input ``u_t`` (the heads' attention outputs) and its
    loss-sum gradient ``h_t``: FLAT's truncation moves u_t by exactly ``-P u_t`` (attention mixes values linearly)."""
    import torch

    heads_dim = u.shape[-1]
    d = P.shape[0] // kv
    heads = heads_dim // d
    Ph = torch.block_diag(*[P[(hh // (heads // kv)) * d:(hh // (heads // kv) + 1) * d,
                              (hh // (heads // kv)) * d:(hh // (heads // kv) + 1) * d] for hh in range(heads)])
    u2, h2 = u.reshape(-1, heads_dim), h.reshape(-1, heads_dim)
    return float((((u2 @ Ph) * h2).sum(1) ** 2).sum()) / (2.0 * n_loss)


def main(argv=None) -> int:
    from rankalloc.studies.study_quality import probe_parser, probe_setup

    ap = probe_parser(__doc__, probe_samples=8)
    ap.add_argument("--head-rank", type=int, default=16, help="head rank r kept in each KV head")
    ap.add_argument("--draws", type=int, default=2, help="sampled-label backwards per batch (the sampled column)")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from rankalloc.profiling.flat import head_bases
    from rankalloc.profiling.probe import calibration_loss

    t0 = time.perf_counter()
    run, prof, ids = probe_setup(args)
    d = int(prof.meta["config"]["head_dim"])
    if not 0 <= args.head_rank < d:
        raise SystemExit(f"--head-rank: expected 0 <= r < head_dim = {d}, received {args.head_rank}")
    model = run.model.eval()
    values = [c for c in prof.components if c.kind == "v"]
    stats = value_statistics(model, ids, [c.name for c in values])
    drawn = value_statistics(model, ids, [c.name for c in values], draws=args.draws)
    n_loss = ids[:, 1:].numel()
    dense = calibration_loss(model, ids)
    rows = []
    for c in tqdm(values, desc="truncating each value projection", unit="layer"):
        Q = head_bases(prof, c.layer)
        kv = Q.shape[0]
        module = model.get_submodule(c.name)
        W = module.weight.data
        if W.shape[0] != kv * d:
            raise SystemExit(f"{c.name}: expected a value projection with {kv * d} outputs, received {W.shape[0]}")
        keep = torch.block_diag(*[Q[h][:, :args.head_rank] @ Q[h][:, :args.head_rank].T for h in range(kv)])
        saved = W.clone()
        try:
            W.copy_((keep @ saved.double()).to(W.dtype))
            measured = calibration_loss(model, ids) - dense
        finally:
            W.copy_(saved)
        y, g = stats.pop(c.name)
        p = prices(y, g, Q, args.head_rank, n_loss)
        u, h = stats.pop(c.name + ":o")
        p["output"] = output_price(u, h, p.pop("P"), kv, n_loss)
        ys, gs = drawn.pop(c.name)
        drawn.pop(c.name + ":o")
        p["sampled"] = prices(ys, gs, Q, args.head_rank, n_loss)["token"] / args.draws
        rows.append({"layer": c.layer, "measured": measured, **p,
                     "kfac / measured": p["kfac"] / measured if measured > 0 else float("nan"),
                     "token / measured": p["token"] / measured if measured > 0 else float("nan"),
                     "output / measured": p["output"] / measured if measured > 0 else float("nan"),
                     "sampled / measured": p["sampled"] / measured if measured > 0 else float("nan")})
    table = pd.DataFrame(rows).set_index("layer")
    print(f"\nhead rank {args.head_rank} of {d} kept in every KV head of one layer's value projection at a time; "
          f"loss in nats per predicted token on {ids.shape[0]} x {ids.shape[1]} calibration tokens "
          f"(dense {dense:.4f})")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from rankalloc.studies.options import script

    sys.exit(script(main, "study_flat_values"))
