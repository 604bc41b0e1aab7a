# Which curve kind predicts the loss? Whole allocations applied with whitened truncation (SVD-LLM, Wang et al.,
# 2024, Sec. 3.1), measured on calibration text, ranked against each kind's summed curve (Spearman).
"""Agreement between each curve kind's predicted objective and the measured loss increase.

For allocations ``a_1..a_A`` (several solvers, budgets and objective kinds), kind ``k`` predicts
``P_k(a) = sum_l e^k_l(r_l(a))`` (its curve at the chosen ranks; dense = 0). Each allocation is
applied to ONE copy of the model (every component set to its whitened rank-``r`` truncation
``U_r Sigma_r V_r^T S^{-1}``, factorized once and reused; dense ones restored), and the mean next-token
cross-entropy on the first ``n_probe_samples`` sequences of ``ids`` gives the measured increase
``D(a) = L(a) - L(dense)``. The table reports, per kind, Spearman's rank correlation of ``P_k`` and
``D`` over the allocations: the kind whose ranking of allocations matches the measurement best is
the objective to trust. Only plain low-rank choices of components that are modules of the model
can be applied (no SoLA ``#marginal``, FLAT ``vo`` or sparse + low-rank choices).
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch

from rankalloc.allocators.problem import DENSE, Choice
from rankalloc.profiling.probe import (calibration_loss, component_module, on_device, profile_damping, read_weight,
                                       whitened_factors, write_weight_)


def _choices(allocation) -> dict[str, Choice]:
    if hasattr(allocation, "choices"):
        return dict(allocation.choices)
    out = {}
    for name, v in dict(allocation).items():
        out[name] = v if isinstance(v, Choice) else Choice(DENSE) if v == "dense" else Choice(int(v))
    return out


def _label(key, allocation) -> str:
    if isinstance(key, str):
        return key
    solver = getattr(allocation, "solver", "allocation")
    kind = getattr(getattr(allocation, "problem", None), "objective", "")
    return f"{key}:{solver}:{kind}:{allocation.removed():.3f}" if hasattr(allocation, "removed") else f"{key}:{solver}"


def predicted_objective(curve_set, kind: str, choices: Mapping[str, Choice]) -> float:
    """``sum_l e^kind_l(r_l)`` from full-resolution curves (dense choices count 0)."""
    total = 0.0
    for name, ch in choices.items():
        if ch.is_dense:
            continue
        ranks = np.asarray(curve_set.ranks[name])
        hit = np.flatnonzero(ranks == ch.rank)
        if not len(hit):
            raise ValueError(f"component {name!r}: rank {ch.rank} is not on its {kind!r} curve")
        total += float(curve_set.errors[kind][name][hit[0]])
    return total


def measure_allocations(profile, model: torch.nn.Module, ids: torch.Tensor, kinds: Sequence[str], allocations,
                        n_probe_samples: int = 8, batch_size: int = 4, device=None, progress: bool = True):
    """One row per allocation: label, solver, objective kind, removed, measured loss and increase,
    and ``pred_<kind>`` for each of ``kinds``. ``allocations``: a sequence of
    :class:`~rankalloc.allocators.allocation.Allocation` (or ``name -> rank`` dicts), or a dict label -> those."""
    import pandas as pd
    from tqdm.auto import tqdm

    items = list(allocations.items()) if isinstance(allocations, Mapping) else list(enumerate(allocations))
    if not items:
        raise ValueError("allocations: expected at least one allocation, received none")
    if not 1 <= n_probe_samples <= ids.shape[0]:
        raise ValueError(f"n_probe_samples: expected 1..{ids.shape[0]}, received {n_probe_samples!r}")
    kinds = list(kinds)
    cs = profile.curve_set(kinds)
    known = {c.name: c for c in cs.components}
    chosen = [(_label(k, a), a, _choices(a)) for k, a in items]
    for label, _, ch in chosen:
        for name, c in ch.items():
            if name not in known:
                raise ValueError(f"allocation {label!r}: component {name!r} is not a profiled module; only plain "
                                 f"low-rank choices of model modules can be applied")
            if c.sparsity:
                raise ValueError(f"allocation {label!r}: component {name!r} has a sparse + low-rank choice {c}; "
                                 f"expected plain ranks")
    names = sorted({n for _, _, ch in chosen for n in ch})
    probe = ids[:n_probe_samples]
    damping = profile_damping(profile)
    rows = []
    with on_device(model, device):
        work = copy.deepcopy(model)
        dense_loss = calibration_loss(work, probe, batch_size)
        originals = {n: read_weight(component_module(model, n), n) for n in names}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for label, alloc, ch in tqdm(chosen, desc="measuring allocations", disable=not progress):
            for n in names:
                c = ch.get(n, Choice(DENSE))
                if c.is_dense:
                    W = originals[n]
                else:
                    if n not in factors:
                        factors[n] = whitened_factors(originals[n], profile.input_gram(n), n, damping)
                    A, Z = factors[n]
                    W = A[:, :c.rank] @ Z[:c.rank]
                write_weight_(component_module(work, n), W)
            loss = calibration_loss(work, probe, batch_size)
            problem = getattr(alloc, "problem", None)
            row = {"allocation": label, "solver": getattr(alloc, "solver", ""),
                   "objective": getattr(problem, "objective", ""),
                   "removed": alloc.removed() if hasattr(alloc, "removed") else np.nan,
                   "measured_loss": loss, "measured_increase": loss - dense_loss}
            for k in kinds:
                row[f"pred_{k}"] = predicted_objective(cs, k, ch)
            rows.append(row)
        del work
    df = pd.DataFrame(rows)
    df.attrs["dense_loss"] = dense_loss
    return df


def curve_kind_agreement(profile, model: torch.nn.Module, ids: torch.Tensor, kinds: Sequence[str], allocations,
                         n_probe_samples: int = 8, batch_size: int = 4, device=None, progress: bool = True):
    """Per kind: Spearman (and Kendall) rank correlation of its predicted objective with the measured
    loss increase over ``allocations`` (at least 3). The per-allocation table is in
    ``result.attrs["allocations"]``. A constant prediction gives NaN (reported, not dropped)."""
    import pandas as pd
    from scipy.stats import kendalltau, spearmanr

    n = len(allocations)
    if n < 3:
        raise ValueError(f"allocations: expected at least 3 to rank, received {n}")
    per = measure_allocations(profile, model, ids, kinds, allocations, n_probe_samples, batch_size, device, progress)
    rows = []
    for k in kinds:
        p, d = per[f"pred_{k}"].to_numpy(), per["measured_increase"].to_numpy()
        const = np.ptp(p) == 0 or np.ptp(d) == 0
        rows.append({"kind": k, "spearman": np.nan if const else float(spearmanr(p, d)[0]),
                     "kendall": np.nan if const else float(kendalltau(p, d)[0]), "allocations": len(per)})
    out = pd.DataFrame(rows).set_index("kind")
    out.attrs["allocations"] = per
    out.attrs["dense_loss"] = per.attrs["dense_loss"]
    return out
