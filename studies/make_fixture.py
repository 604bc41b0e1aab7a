# Power-law singular spectra as observed in LLM weights (e.g. SVD-LLM, Wang et al., 2024, Fig. 1); whitened tail energy
"""Write ``studies/fixtures/curves_small.csv``: error curves of a tiny LLaMA-shaped model, no model needed.

Two decoder layers x 7 matrices (hidden 256, MLP 704, 4 heads of 64, 2 KV heads, so k/v are
128 x 256). Each matrix gets a power-law spectrum ``sigma_i = s * i^(-a)`` (decay ``a`` per kind,
scale ``s`` per matrix). Its error at rank ``r`` is the tail energy ``sum_{i>r} sigma_i^2`` (the
whitened truncation error of SVD-LLM), listed at ranks 0, 16, ..., min(m, n). Deterministic.

    python -m rankalloc.studies.make_fixture            # rewrites the fixture
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "curves_small.csv"

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DECAY = {"q": 0.9, "k": 1.0, "v": 0.45, "o": 0.5, "gate": 0.55, "up": 0.5, "down": 0.6}


def fixture_frame(layers: int = 2, hidden: int = 256, mlp: int = 704, kv: int = 128, step: int = 16, seed: int = 0):
    """The long-format table (columns component,m,n,kind,layer,rank,error) for a tiny LLaMA shape."""
    import pandas as pd

    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
              "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for kind, module in MODULES.items():
            m, n = shapes[kind]
            p = min(m, n)
            a = DECAY[kind] * rng.uniform(0.9, 1.1)
            s = rng.lognormal(0.0, 0.5) * (2.0 if layer == 0 else 1.0)
            sigma = s * np.arange(1, p + 1, dtype=np.float64) ** -a
            tail = np.concatenate([np.cumsum((sigma ** 2)[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>r} sigma_i^2
            for r in range(0, p + 1, step):
                rows.append((f"model.layers.{layer}.{module}", m, n, kind, layer, r, float(tail[r])))
    return pd.DataFrame(rows, columns=["component", "m", "n", "kind", "layer", "rank", "error"])


def main(path=FIXTURE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fixture_frame().to_csv(path, index=False, float_format="%.10g")
    return path


if __name__ == "__main__":
    print(f"wrote {main()}")
