# SoLA (Huang et al., 2025, "SoLA: Leveraging Soft Activation Sparsity and Low-Rank Decomposition"), Sec. 3.2:
# prime neurons stay dense, marginal neurons are factorised.
"""SoLA: split each FFN into prime and marginal neurons and factorise only the marginal part.

Notation (paper, gated FFN of width ``d``): ``h = sigma(x W_gate) * (x W_up)`` and ``y = h W_down``
(row vectors; in ``nn.Linear`` terms ``W_gate`` is the transpose of ``gate_proj.weight``). The
activation norm of neuron ``i`` is ``a_i = ||h_{:, i}||_2`` over the calibration tokens. The prime set
``P`` (the top ``ceil(gamma d)`` neurons by ``a_i``, ``profile.prime_neurons(layer, gamma)``) and the
marginal set ``M`` (the rest) split the FFN exactly:

    y = [sigma(x W_gate^P) * (x W_up^P)] W_down^P  +  [sigma(x W_gate^M) * (x W_up^M)] W_down^M

where ``W_gate^P`` are the columns of ``W_gate`` in ``P`` and ``W_down^P`` the rows of ``W_down`` in ``P``.
The prime part stays dense. Each marginal sub-matrix is replaced by its whitened rank-``r`` SVD
(SVD-LLM): ``W_gate^M ~ A_g B_g``, ``W_up^M ~ A_u B_u``, ``W_down^M ~ A_d B_d``, so the marginal path is

    [sigma(x (A_g B_g)) * (x (A_u B_u))] (A_d B_d)

(each product applied as two thin matmuls). The whitening Gram of gate/up is the FFN input Gram; that of
down is the marginal block ``G_down[M, M]`` of down_proj's input Gram. Attention matrices (and any
whole FFN matrix named without ``#marginal``) take the whole-matrix whitened SVD.

Naming and accounting: the marginal sub-matrices are the components ``<mlp>.gate_proj#marginal``,
``<mlp>.up_proj#marginal`` and ``<mlp>.down_proj#marginal`` (shapes ``(d-p) x hidden``, ``(d-p) x hidden``,
``hidden x (d-p)``, ``p = |P|``), all three per compressed layer. The allocation's budget prices only
them; the prime weights are reported as ``fixed_params`` (outside the budget) on each part's report.
``prime_index`` is bookkeeping, not priced: a gated FFN's output does not depend on the order of its neurons, so
the forward never reads it (it lets a reader map the split back onto the original neurons).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rankalloc.decomposers.base import (allocation_items, apply_targets, check_choice, check_profile_component,
                                        get_module, input_gram, linear_target, replace_module)
from rankalloc.decomposers.modules import LowRankLinear, empty_linear, weight_params
from rankalloc.decomposers.registry import Method, MethodCurves, NeedsModel, register_method
from rankalloc.decomposers.report import ComponentReport
from rankalloc.decomposers.host import check_single_input
from rankalloc.profiling.sola import FFN_KINDS, GATED_PARTS, SOLA_KINDS, check_gated_ffn
from rankalloc.decomposers.svd import svd_build, whitened_svd
from rankalloc.profiling.architectures import prime_count
from rankalloc.profiling.numerics import PRECISION, check_finite

MARGINAL = "#marginal"
PARTS = GATED_PARTS


def marginal_name(name: str) -> str:
    """``model.layers.3.mlp.gate_proj`` -> ``model.layers.3.mlp.gate_proj#marginal``."""
    return name + MARGINAL


@dataclass(frozen=True)
class SoLAConfig:
    """SoLA settings: the prime fraction ``gamma`` of FFN neurons kept dense, and the relative Cholesky
    damping ``damp`` of every whitened SVD."""

    gamma: float = 0.15
    damp: float = 1e-6

    def __post_init__(self):
        if not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma < 1.0):
            raise ValueError(f"SoLAConfig: expected gamma in [0, 1), received {self.gamma!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"SoLAConfig: expected damp > 0, received {self.damp!r}")


class SoLAMLP(nn.Module):
    """A gated FFN split into a dense prime path and a (factorised) marginal path; see the module docstring.

    ``gate_prime``/``up_prime``/``down_prime`` hold the prime sub-matrices (down's bias lives here);
    ``gate_marginal``/``up_marginal``/``down_marginal`` the marginal ones (``nn.Linear`` or
    :class:`LowRankLinear`). ``prime_index`` (a buffer) records which original neurons are prime.
    """

    spec_type = "sola_mlp"

    def __init__(self, hidden: int, intermediate: int, n_prime: int, act_fn: nn.Module, gate_bias: bool = False,
                 up_bias: bool = False, down_bias: bool = False, dtype=None, device=None):
        super().__init__()
        p, q = int(n_prime), int(intermediate) - int(n_prime)
        self.hidden_size, self.intermediate_size, self.n_prime = int(hidden), int(intermediate), p
        self.gate_prime = empty_linear(hidden, p, gate_bias, dtype, device)
        self.up_prime = empty_linear(hidden, p, up_bias, dtype, device)
        self.down_prime = empty_linear(p, hidden, down_bias, dtype, device)
        self.gate_marginal = empty_linear(hidden, q, gate_bias, dtype, device)
        self.up_marginal = empty_linear(hidden, q, up_bias, dtype, device)
        self.down_marginal = empty_linear(q, hidden, False, dtype, device)
        self.act_fn = act_fn
        self.register_buffer("prime_index", torch.zeros(p, dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prime = self.down_prime(self.act_fn(self.gate_prime(x)) * self.up_prime(x))
        marginal = self.down_marginal(self.act_fn(self.gate_marginal(x)) * self.up_marginal(x))
        return prime + marginal

    @classmethod
    def split(cls, mlp: nn.Module, prime: np.ndarray) -> "SoLAMLP":
        """The exact prime/marginal split of a gated ``mlp`` (gate_proj, up_proj, down_proj, act_fn)."""
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        d, hidden = gate.weight.shape
        P = torch.as_tensor(np.asarray(prime, dtype=np.int64), device=gate.weight.device)
        M = marginal_index(d, prime).to(P.device)
        new = cls(hidden, d, len(P), mlp.act_fn, gate.bias is not None, up.bias is not None, down.bias is not None,
                  dtype=gate.weight.dtype, device=gate.weight.device)
        with torch.no_grad():
            for src, dst_p, dst_m in ((gate, new.gate_prime, new.gate_marginal), (up, new.up_prime, new.up_marginal)):
                dst_p.weight.copy_(src.weight[P])
                dst_m.weight.copy_(src.weight[M])
                if src.bias is not None:
                    dst_p.bias.copy_(src.bias[P])
                    dst_m.bias.copy_(src.bias[M])
            new.down_prime.weight.copy_(down.weight[:, P])
            new.down_marginal.weight.copy_(down.weight[:, M])
            if down.bias is not None:
                new.down_prime.bias.copy_(down.bias)
            new.prime_index.copy_(P)
        return new

    def spec(self) -> dict:
        return {"hidden": self.hidden_size, "intermediate": self.intermediate_size, "n_prime": self.n_prime,
                "gate_bias": self.gate_prime.bias is not None, "up_bias": self.up_prime.bias is not None,
                "down_bias": self.down_prime.bias is not None}

    @classmethod
    def from_spec(cls, spec, original: nn.Module) -> "SoLAMLP":
        w = original.gate_proj.weight
        return cls(spec["hidden"], spec["intermediate"], spec["n_prime"], original.act_fn, spec["gate_bias"],
                   spec["up_bias"], spec["down_bias"], dtype=w.dtype, device=w.device)


def marginal_index(d: int, prime) -> torch.Tensor:
    """Sorted indices of the marginal neurons: ``[0, d)`` minus ``prime``."""
    mask = torch.ones(d, dtype=torch.bool)
    mask[torch.as_tensor(np.asarray(prime, dtype=np.int64))] = False
    return torch.nonzero(mask).flatten()


def _layer_of(component, mlp_name: str) -> int:
    if component.layer >= 0:
        return int(component.layer)
    found = re.findall(r"\.(\d+)\.", "." + mlp_name + ".")
    if not found:
        raise ValueError(f"component {component.name!r}: no layer index (set Component.layer)")
    return int(found[-1])


def _prime(profile, layer: int, gamma: float, d: int, mlp_name: str) -> np.ndarray:
    prime = np.asarray(profile.prime_neurons(layer, gamma), dtype=np.int64).reshape(-1)
    expected = prime_count(d, gamma)
    if len(prime) != expected or len(np.unique(prime)) != len(prime) or (prime < 0).any() or (prime >= d).any():
        raise ValueError(f"{mlp_name}: expected {expected} distinct prime neurons in [0, {d}) for gamma={gamma}, "
                         f"received {len(prime)} from the profile")
    return np.sort(prime)


def gated_mlp(model, mlp_name: str) -> nn.Module:
    """The FFN module ``mlp_name``, or ``ValueError`` unless it has Linear gate_proj, up_proj, down_proj and act_fn."""
    mlp = get_module(model, mlp_name, "SoLA FFN")
    if not all(isinstance(getattr(mlp, p, None), nn.Linear) for p in PARTS) or not hasattr(mlp, "act_fn"):
        raise ValueError(f"{mlp_name}: expected a gated FFN with Linear gate_proj, up_proj, down_proj and act_fn, "
                         f"received {type(mlp).__name__}")
    return mlp


def sola_fits(model) -> None:
    """``ValueError`` naming the module unless every layer's FFN is a gated one SoLA can split
    (:func:`~rankalloc.profiling.sola.check_gated_ffn`, :func:`gated_mlp`); reads module names and classes only."""
    from rankalloc.profiling.architectures import find_structure

    structure = find_structure(model)
    check_gated_ffn(structure.components)
    for name in dict.fromkeys(c.name.rsplit(".", 1)[0] for c in structure.components if c.kind in FFN_KINDS):
        gated_mlp(model, name)


def _plans(model, allocation, config: SoLAConfig, profile):
    """Validate the whole allocation first: ``(plain targets, [(mlp name, mlp, prime, {part: (c, ch)})])``."""
    plain, groups = [], {}
    for c, ch in allocation_items(allocation):
        if not c.name.endswith(MARGINAL):
            plain.append(linear_target(model, c, ch, method="sola"))
            continue
        mlp_name, _, proj = c.name[:-len(MARGINAL)].rpartition(".")
        if proj not in PARTS:
            raise ValueError(f"component {c.name!r}: expected a marginal part of one of {PARTS}, received {proj!r}")
        check_choice(c, ch, method="sola")
        groups.setdefault(mlp_name, {})[proj] = (c, ch)
    plans = []
    for mlp_name, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ValueError(f"{mlp_name}: SoLA needs all three marginal components; missing "
                             f"{[marginal_name(f'{mlp_name}.{p}') for p in missing]}")
        mlp = gated_mlp(model, mlp_name)
        check_single_input(mlp, mlp_name, "SoLAMLP")
        for t in plain:
            if t.name.startswith(mlp_name + "."):
                raise ValueError(f"component {t.name!r} and its marginal part are both in the allocation; "
                                 f"expected one of them")
        d, hidden = mlp.gate_proj.weight.shape
        prime = _prime(profile, _layer_of(parts["gate_proj"][0], mlp_name), config.gamma, d, mlp_name)
        q = d - len(prime)
        for proj, (c, ch) in parts.items():
            want = (hidden, q) if proj == "down_proj" else (q, hidden)
            if (c.m, c.n) != want:
                raise ValueError(f"component {c.name!r}: expected the marginal shape {want[0]}x{want[1]} "
                                 f"({q} marginal neurons at gamma={config.gamma}), received {c.m}x{c.n}")
        plans.append((mlp_name, mlp, prime, parts))
    for t in plain:
        if not t.choice.is_dense:
            check_profile_component(profile, t.component)
    return plain, plans


def _split(model, profile, config: SoLAConfig, mlp_name: str, mlp, prime, parts) -> list[ComponentReport]:
    """Split one FFN into prime and marginal paths and factorise its marginal parts; one report per part."""
    if all(ch.is_dense for _, ch in parts.values()):  # unchanged FFN: count it as split, touch nothing
        return [ComponentReport(c.name, ch, mlp_name, c.m * c.n, c.m * c.n, 0.0,
                                len(prime) * (c.n if proj != "down_proj" else c.m)) for proj, (c, ch) in parts.items()]
    G = {"gate_proj": profile.input_gram(f"{mlp_name}.gate_proj"),
         "down_proj": profile.input_gram(f"{mlp_name}.down_proj")}
    new = SoLAMLP.split(mlp, prime)
    M = marginal_index(new.intermediate_size, prime)
    replace_module(model, mlp_name, new)
    reports = []
    for proj, (c, ch) in parts.items():
        t0 = time.perf_counter()
        short = proj.split("_")[0]
        sub_name = f"{mlp_name}.{short}_marginal"
        sub = getattr(new, f"{short}_marginal")
        fixed = weight_params(getattr(new, f"{short}_prime"))
        if ch.is_dense:
            reports.append(ComponentReport(c.name, ch, sub_name, c.m * c.n, weight_params(sub), 0.0, fixed))
            continue
        Gfull = G["down_proj" if proj == "down_proj" else "gate_proj"].to(PRECISION)
        Gm = check_finite(Gfull[M][:, M] if proj == "down_proj" else Gfull, f"input Gram of {c.name}")
        f = whitened_svd(sub.weight.detach(), Gm, int(ch.rank), config.damp, c.name)
        low = LowRankLinear.from_factors(f.A, f.B, sub.bias, sub.weight.dtype, sub.weight.device)
        replace_module(model, sub_name, low)
        reports.append(ComponentReport(c.name, ch, sub_name, c.m * c.n, weight_params(low), time.perf_counter() - t0,
                                       fixed, f.error, {"delta": f.delta}))
    return reports


def compress_sola(model, allocation, config: SoLAConfig, profile, progress: bool = True) -> list[ComponentReport]:
    """Model-level handler: SoLA splits for ``#marginal`` components, whitened SVD for all others."""
    plain, plans = _plans(model, allocation, config, profile)

    def make_plain(t):
        return svd_build(t.module, t.choice, t.module.weight.detach(), input_gram(profile, t), config, t.name)

    reports = apply_targets(model, plain, make_plain, progress, "sola (whole matrices)")
    for plan in tqdm(plans, desc="sola (split FFNs)", disable=not progress or not plans, leave=False):
        reports += _split(model, profile, config, *plan)
    return reports


def sola_curves(profile, model=None, grid: int = 16, progress: bool = True) -> MethodCurves:
    """Attention matrices plus the marginal-neuron sub-matrices (prime fraction 0.15, the :class:`SoLAConfig` default):
    the profile's extra ``sola`` set, or computed with ``model`` (and stored)."""
    from rankalloc.profiling.sola import add_sola_curves

    if profile.has_extra("sola"):
        cs = profile.extra("sola")
    elif model is None:
        raise NeedsModel(f"method 'sola': the profile at {profile.path} has no SoLA curves; pass the model to compute "
                         f"them once (problem_for(..., model=run.model), or rankalloc.profiling.sola.add_sola_curves)")
    else:
        cs = add_sola_curves(profile, model, SoLAConfig().gamma, progress=progress).curve_set
    fixed = sum(c.m * c.n for c in profile.components) - sum(c.m * c.n for c in cs.components)
    return MethodCurves("sola", cs, fixed_params=int(fixed))


register_method(Method("sola", SoLAConfig, compress_sola, sola_curves,
                       "SoLA: prime FFN neurons kept dense, the marginal ones and attention by whitened SVD",
                       modules=(LowRankLinear, SoLAMLP), kind="fisher_svd", solver="exact", resources=("params",),
                       kinds=SOLA_KINDS, fits=sola_fits))
