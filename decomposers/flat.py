# FLAT-LLM (Tian et al., 2025, "FLAT-LLM: Fine-grained Low-rank Activation Space Transformation"), Sec. 3.2:
# head-wise PCA of the value outputs, absorbed into W_v and W_o.
"""FLAT-LLM: shrink every value head to its top-r principal directions, with no extra matmul.

Notation (paper): for KV head ``g`` the value outputs are ``Y_v^g = W_v^g X + b_v^g`` (``d_h x T``) and
their covariance ``C_g = Y_v^g (Y_v^g)^T = Q_g Lambda_g Q_g^T`` (``profile.value_covariance(layer)[g]``,
summed over tokens). Keeping the top-``r`` eigenvectors ``Q_g^r`` (``d_h x r``):

    W_v^g  <-  (Q_g^r)^T W_v^g,     b_v^g <- (Q_g^r)^T b_v^g       (r x n: the value head dim becomes r)
    W_o^h  <-  W_o^h Q_g^r          for every query head h served by g (h // n_rep == g)

Attention mixes values linearly, so head ``h`` outputs ``W_o^h Q Q^T (sum_t a_t y_t)``: the same as
projecting every value onto span(Q_g^r). The reconstruction error is exact,
``||Y_v^g - Q_g^r (Q_g^r)^T Y_v^g||_F^2 = sum_{i>r} lambda_{g,i}``, the predicted error reported here.

Accounting (``FlatParams``): one ``vo`` component per layer, ``<attention>.vo``; rank r in ``[0, d_h]``
costs ``r (kv_heads n + heads m)``; dense is ``r = d_h``. Other components of a FLAT allocation take the
whole-matrix whitened SVD (SVD-LLM).

The attention module becomes :class:`FlatAttention`: the model's own q/k projections, rotary embedding,
mask and attention kernel, with values of head dim ``r``. It works with ``DynamicCache`` (the cache holds
``r``-dim values). Llama-family (Llama, Mistral, Qwen2, Qwen3) and Gemma-family (Gemma, Gemma2, Gemma3:
query/key norms, sliding-window and full layers, ``query_pre_attn_scalar``, logit soft-capping) attention is
supported; fused-qkv families are refused with the reason (:data:`UNSUPPORTED`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rankalloc.allocators.costs import FlatParams
from rankalloc.allocators.problem import Choice
from rankalloc.decomposers.base import (allocation_items, apply_targets, check_profile_component, get_module,
                                        input_gram, linear_target, replace_module)
from rankalloc.decomposers.modules import LowRankLinear, empty_linear, weight_params
from rankalloc.decomposers.registry import Method, MethodCurves, register_method
from rankalloc.decomposers.report import ComponentReport
from rankalloc.decomposers.host import attention_contract, attention_function
from rankalloc.decomposers.svd import svd_build
from rankalloc.profiling.flat import FLAT_KINDS, eig_desc, value_output_pair, vo_name
from rankalloc.profiling.numerics import PRECISION

VO = ".vo"


@dataclass(frozen=True)
class FlatConfig:
    """FLAT-LLM settings: relative Cholesky damping ``damp`` of the whitened SVD of the non-``vo`` components."""

    damp: float = 1e-6

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"FlatConfig: expected damp > 0, received {self.damp!r}")


def value_bases(C: torch.Tensor, rank: int, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors ``Q`` (``kv x d_h x rank``) of each head's covariance ``C`` (``kv x d_h x d_h``)
    and the dropped eigenvalue sum per head (``kv``), float64, with the profile's sign convention
    (``profiling.flat.eig_desc``), so the dropped sum is exactly the profile's ``vo`` curve value."""
    if C.ndim != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"{name}: expected value covariances of shape (kv_heads, head_dim, head_dim), "
                         f"received {tuple(C.shape)}")
    if not 0 <= rank <= C.shape[1]:
        raise ValueError(f"{name}: expected a value-head rank in [0, {C.shape[1]}], received {rank}")
    Q, dropped = [], []
    for g in range(C.shape[0]):
        lam, Qg = eig_desc(C[g], f"value covariance of {name}, head {g}")
        Q.append(Qg[:, :rank])
        dropped.append(lam[rank:].sum())
    return torch.stack(Q), torch.stack(dropped)


def absorb(Wv: torch.Tensor, bv: torch.Tensor | None, Wo: torch.Tensor, Q: torch.Tensor, heads: int):
    """``(Q_g^T W_v^g, Q_g^T b_v^g, W_o^h Q_g)`` for all heads (float64).

    ``Wv``: ``kv*d_h x n``; ``bv``: ``kv*d_h`` or None; ``Wo``: ``m x heads*d_h``; ``Q``: ``kv x d_h x r``.
    Returns ``Wv'`` (``kv*r x n``), ``bv'`` (``kv*r``) and ``Wo'`` (``m x heads*r``).
    """
    kv, dh, r = Q.shape
    n, m = Wv.shape[1], Wo.shape[0]
    n_rep = heads // kv
    Wv_new = torch.einsum("gdr,gdn->grn", Q, Wv.reshape(kv, dh, n)).reshape(kv * r, n)
    bv_new = None if bv is None else torch.einsum("gdr,gd->gr", Q, bv.reshape(kv, dh)).reshape(kv * r)
    Qh = Q.repeat_interleave(n_rep, dim=0)  # query head h uses KV head h // n_rep
    Wo_new = torch.einsum("mhd,hdr->mhr", Wo.reshape(m, heads, dh), Qh).reshape(m, heads * r)
    return Wv_new, bv_new, Wo_new


def _config_window(attn):
    return {"sliding_window": getattr(attn.config, "sliding_window", None)}


def _own_window(attn):
    return {"sliding_window": attn.sliding_window}


def _window_and_softcap(attn):
    return {"sliding_window": attn.sliding_window, "softcap": attn.attn_logit_softcapping}


FAMILIES = {
    "LlamaAttention": lambda attn: {},
    "GemmaAttention": lambda attn: {},
    "MistralAttention": _config_window,
    "Qwen2Attention": _own_window,
    "Qwen3Attention": _own_window,
    "Gemma3Attention": _own_window,
    "Gemma2Attention": _window_and_softcap,
}
"""Supported attention classes -> the extra keyword arguments each passes to its attention kernel (beside
``dropout`` and ``scaling``). Query/key norms (Qwen3, Gemma3) are taken over when the module has them, and the
scaling is the module's own (Gemma's ``query_pre_attn_scalar``)."""

UNSUPPORTED = {
    "Phi3Attention": "it projects q, k and v with one fused qkv_proj, so V has no weight of its own to shrink",
    "OPTAttention": "its forward is not the Llama-family signature (no rotary embedding, its own cache handling)",
    "GPT2Attention": "it projects q, k and v with one fused Conv1D (c_attn), so V has no weight of its own to shrink",
}
"""Families FLAT refuses, and why (the reason is part of the error)."""


def check_family(attn: nn.Module, name: str) -> None:
    """``ValueError`` naming the family and the reason when ``attn`` is not a FLAT-supported attention."""
    cls = type(attn).__name__
    if isinstance(attn, FlatAttention):
        raise ValueError(f"component {name!r}: the attention is already FLAT-compressed")
    if cls in UNSUPPORTED:
        raise ValueError(f"component {name!r}: FLAT does not support {cls}: {UNSUPPORTED[cls]}")
    if cls not in FAMILIES:
        raise ValueError(f"component {name!r}: FLAT supports the attention classes {sorted(FAMILIES)}, received "
                         f"{cls}; add its kernel arguments to decomposers.flat.FAMILIES once its forward is checked")


class FlatAttention(nn.Module):
    """Llama/Gemma-family self-attention whose value heads have dim ``value_dim`` (q/k keep ``head_dim``).

    It takes over the original module's projections, query/key norms, rotary function, scaling and
    attention kernel (``config._attn_implementation``) and the kernel arguments of its family
    (:data:`FAMILIES`: sliding window, logit soft-capping), and is called exactly as the original is
    (:func:`rankalloc.decomposers.host.attention_contract`), so masks, sliding windows and the KV cache
    behave as in the model. The cache holds ``value_dim``-wide values.
    """

    spec_type = "flat_attention"

    def __init__(self, attn: nn.Module, value_dim: int, name: str = "attention"):
        super().__init__()
        check_family(attn, name)
        self.contract = attention_contract(attn, name)
        cfg = attn.config
        self.config = cfg
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.is_causal = getattr(attn, "is_causal", True)
        self.attention_dropout = getattr(attn, "attention_dropout", 0.0)
        self.num_heads = cfg.num_attention_heads
        self.num_key_value_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.kernel_kwargs = FAMILIES[type(attn).__name__](attn)
        self.sliding_window = self.kernel_kwargs.get("sliding_window")
        self.value_dim = int(value_dim)
        self.base_class = type(attn).__name__
        src = sys.modules[type(attn).__module__]
        self._rotary = src.apply_rotary_pos_emb
        self._eager = src.eager_attention_forward
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                cache_position=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, self.num_key_value_heads, self.value_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        if cache is not None:
            k, v = self.contract.update(cache, k, v, self.layer_idx, sin, cos, cache_position, kwargs)
        if self.value_dim == 0:  # every value is projected out: the heads output zeros
            return self.o_proj(hidden_states.new_zeros(*input_shape, 0)), None
        interface = attention_function(self.config, self._eager)
        out, weights = interface(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **self.kernel_kwargs, **kwargs)
        out = out.reshape(*input_shape, self.num_heads * self.value_dim).contiguous()
        return self.o_proj(out), weights

    @classmethod
    def from_attention(cls, attn: nn.Module, Wv, bv, Wo, value_dim: int, name: str = "attention") -> "FlatAttention":
        """Wrap ``attn`` with new V (``Wv``, ``bv``) and O (``Wo``) weights given in float64."""
        new = cls(attn, value_dim, name)
        w = attn.v_proj.weight
        v = empty_linear(Wv.shape[1], Wv.shape[0], bv is not None, w.dtype, w.device)
        o = empty_linear(Wo.shape[1], Wo.shape[0], attn.o_proj.bias is not None, w.dtype, w.device)
        with torch.no_grad():
            v.weight.copy_(Wv.to(w.device, w.dtype))
            if bv is not None:
                v.bias.copy_(bv.to(w.device, w.dtype))
            o.weight.copy_(Wo.to(w.device, w.dtype))
            if attn.o_proj.bias is not None:
                o.bias.copy_(attn.o_proj.bias)
        new.v_proj, new.o_proj = v, o
        return new

    def spec(self) -> dict:
        return {"value_dim": self.value_dim, "base_class": self.base_class}

    @classmethod
    def from_spec(cls, spec, original: nn.Module) -> "FlatAttention":
        new = cls(original, spec["value_dim"])
        w = original.v_proj.weight
        kv, r, heads = new.num_key_value_heads, new.value_dim, new.num_heads
        new.v_proj = empty_linear(original.v_proj.in_features, kv * r, original.v_proj.bias is not None, w.dtype,
                                  w.device)
        new.o_proj = empty_linear(heads * r, original.o_proj.out_features, original.o_proj.bias is not None, w.dtype,
                                  w.device)
        return new

    def extra_repr(self) -> str:
        return f"value_dim={self.value_dim}, head_dim={self.head_dim}, base={self.base_class}"


def flat_fits(model) -> None:
    """``ValueError`` naming the module unless every layer has separate v and o projections in an attention class
    FLAT supports (:func:`check_family`); reads module names and classes only."""
    from rankalloc.profiling.architectures import find_structure

    structure = find_structure(model)
    for layer in range(structure.num_layers):
        v, _ = value_output_pair({c.kind: c for c in structure.layer_components(layer)}, layer)
        name = vo_name(v.name)
        check_family(get_module(model, name[:-len(VO)], "FLAT attention"), name)


def _vo_plan(model, c, ch):
    """Validate one ``vo`` component; return ``(attention name, module, layer)``."""
    attn_name = c.name[:-len(VO)]
    attn = get_module(model, attn_name, "FLAT attention")
    check_family(attn, c.name)
    attention_contract(attn, c.name)
    if not (isinstance(attn.v_proj, nn.Linear) and isinstance(attn.o_proj, nn.Linear)):
        raise ValueError(f"component {c.name!r}: expected nn.Linear v_proj and o_proj, received "
                         f"{type(attn.v_proj).__name__} and {type(attn.o_proj).__name__}")
    dh = attn.head_dim
    m, n = attn.o_proj.weight.shape[0], attn.v_proj.weight.shape[1]
    if (c.m, c.n) != (m, n):
        raise ValueError(f"component {c.name!r}: expected m = O's output dim {m} and n = V's input dim {n}, "
                         f"received {c.m}x{c.n}")
    if ch.sparsity:
        raise ValueError(f"component {c.name!r}: FLAT has no sparse part; expected sparsity 0, received {ch.sparsity:g}")
    if not ch.is_dense and not 0 <= ch.rank <= dh:
        raise ValueError(f"component {c.name!r}: expected a value-head rank in [0, {dh}] (head_dim) or dense, "
                         f"received {ch.rank}")
    layer = c.layer if c.layer >= 0 else attn.layer_idx
    return attn_name, attn, int(layer)


def compress_flat(model, allocation, config: FlatConfig, profile, progress: bool = True) -> list[ComponentReport]:
    """Model-level handler: FLAT absorption for ``vo`` components, whitened SVD for all others."""
    plain, plans = [], []
    for c, ch in allocation_items(allocation):
        if c.kind == "vo" or c.name.endswith(VO):
            plans.append((c, ch, *_vo_plan(model, c, ch)))
        else:
            plain.append(linear_target(model, c, ch, method="flat"))
    priced = allocation.problem.costs.get("params")
    if plans and priced is not None and not isinstance(priced, FlatParams):
        raise ValueError(f"FLAT allocation: its params resource is priced by {type(priced).__name__}; expected "
                         f"FlatParams(head_dim, heads, kv_heads), which prices the vo components "
                         f"(e.g. {plans[0][0].name!r})")
    for c, ch, attn_name, attn, layer in plans:
        for t in plain:
            if t.name in (f"{attn_name}.v_proj", f"{attn_name}.o_proj"):
                raise ValueError(f"component {t.name!r} and {c.name!r} are both in the allocation; FLAT compresses "
                                 f"V and O together through {c.name!r}")
    for t in plain:
        if not t.choice.is_dense:
            check_profile_component(profile, t.component)
    covariances = {}
    for c, ch, attn_name, attn, layer in plans:
        if ch.is_dense:
            continue
        C = profile.value_covariance(layer)
        want = (attn.v_proj.weight.shape[0] // attn.head_dim, attn.head_dim, attn.head_dim)
        if tuple(C.shape) != want:
            raise ValueError(f"component {c.name!r}: expected the profile's value covariance of layer {layer} to be "
                             f"{want} (kv_heads, head_dim, head_dim), received {tuple(C.shape)}")
        covariances[c.name] = C

    def make_plain(t):
        return svd_build(t.module, t.choice, t.module.weight.detach(), input_gram(profile, t), config, t.name)

    reports = apply_targets(model, plain, make_plain, progress, "flat (whole matrices)")
    for c, ch, attn_name, attn, layer in tqdm(plans, desc="flat (value heads)", disable=not progress or not plans,
                                              leave=False):
        t0 = time.perf_counter()
        before = weight_params(attn.v_proj) + weight_params(attn.o_proj)  # = FlatParams dense cost
        if ch.is_dense:
            reports.append(ComponentReport(c.name, ch, attn_name, before, before, 0.0))
            continue
        Q, dropped = value_bases(covariances[c.name], int(ch.rank), c.name)
        bv = attn.v_proj.bias
        Wv, bv, Wo = absorb(attn.v_proj.weight.detach().to(PRECISION), None if bv is None else bv.detach().to(PRECISION),
                            attn.o_proj.weight.detach().to(PRECISION), Q.to(attn.v_proj.weight.device),
                            attn.config.num_attention_heads)
        new = FlatAttention.from_attention(attn, Wv, bv, Wo, int(ch.rank), c.name)
        replace_module(model, attn_name, new)
        after = weight_params(new.v_proj) + weight_params(new.o_proj)
        reports.append(ComponentReport(c.name, ch, attn_name, before, after, time.perf_counter() - t0, 0,
                                       float(dropped.sum()), {"dropped_per_head": dropped.tolist()}))
    return reports


def vo_joins(name: str) -> str | None:
    """Sequential calibration fits a ``vo`` component with the input group of its V (``<attention>.v_proj``)."""
    return name[:-len(VO)] + ".v_proj" if name.endswith(VO) else None


def remeasure_vo(model, component, inputs) -> dict:
    """The value covariance of ``component``'s layer at the compressed model: ``C_g = sum_t y_t^g (y_t^g)^T`` of
    ``y = W_v x + b_v`` over ``inputs`` (batches of V's compressed-model inputs, ``tokens x n``), with V's weight as
    it is now (the corrected one), as ``{"value_covariance": {layer: C}}`` in float64."""
    attn_name, attn, layer = _vo_plan(model, component, Choice(0))
    W = attn.v_proj.weight.detach().to(PRECISION)
    b = None if attn.v_proj.bias is None else attn.v_proj.bias.detach().to(PRECISION)
    dh = attn.head_dim
    kv = W.shape[0] // dh
    C = torch.zeros(kv, dh, dh, dtype=PRECISION, device=W.device)
    for X in inputs:
        Y = X.to(PRECISION) @ W.T
        if b is not None:
            Y = Y + b
        Y = Y.reshape(-1, kv, dh)
        C += torch.einsum("tgi,tgj->gij", Y, Y)
    return {"value_covariance": {layer: 0.5 * (C + C.transpose(1, 2))}}


def flat_curves(profile, model=None, grid: int = 16, progress: bool = True) -> MethodCurves:
    """One ``vo`` component per layer (value-head rank, priced by :class:`FlatParams`) plus the other matrices; the
    value-head ranks stop at head_dim, so that is the largest grid."""
    from rankalloc.profiling.flat import flat_curve_set

    cfg = profile.meta["config"]
    cs = profile.extra("flat") if profile.has_extra("flat") else flat_curve_set(profile)
    fp = FlatParams(head_dim=cfg["head_dim"], heads=cfg["heads"], kv_heads=cfg["kv_heads"])
    return MethodCurves("flat", cs, costs={"params": fp}, max_grid=int(cfg["head_dim"]))


register_method(Method("flat", FlatConfig, compress_flat, flat_curves,
                       "FLAT-LLM: head-wise PCA of the value outputs absorbed into V and O; whitened SVD elsewhere",
                       modules=(LowRankLinear, FlatAttention), kind="whitened", solver="iprs", resources=("params",),
                       kinds=FLAT_KINDS, fits=flat_fits, joins=vo_joins, remeasure=remeasure_vo))
