# Low-rank building blocks shared by every decomposer: the factorised linear and weight accessors.
"""Modules a decomposer puts into a model, and how a Linear or GPT-2 Conv1D weight is read.

``LowRankLinear`` stores ``r (m + n)`` weight entries; rank 0 is allowed and outputs the bias. Parameter counting
follows the cost models: stored weight entries, biases excluded.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def empty_linear(in_features: int, out_features: int, bias: bool, dtype=None, device=None) -> nn.Linear:
    """An ``nn.Linear`` with uninitialised storage (no random init: factors are copied in right after)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = int(in_features), int(out_features)
    lin.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
    if bias:
        lin.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
    else:
        lin.register_parameter("bias", None)
    return lin


def balanced_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A D, D^{-1} B)`` with ``D`` the power of two nearest ``sqrt(|B_i| / |A_i|)`` per rank ``i``: the same
    product, each column of ``A`` within a factor 2 of the length of its row of ``B``. Whitened factors put the
    calibration scale in ``A`` (``U Sigma`` grows with the square root of the token count) and its inverse in ``B``;
    balanced, both stay in a half-precision range when they are cast (float16 tops out at 65504). Scaling by powers
    of two is exact in floating point, so balancing commutes with a cast and balancing twice changes nothing."""
    a, b = A.norm(dim=0), B.norm(dim=1)
    live = (a > 0) & (b > 0)
    d = torch.where(live, torch.exp2(torch.round(0.5 * torch.log2(torch.where(live, b / a, 1)))), 1)
    return A * d, B / d[:, None]


class LowRankLinear(nn.Module):
    """``y = A (B x) + b``: ``first`` = ``nn.Linear(n -> r)`` holding ``B`` (``r x n``, no bias), ``second`` =
    ``nn.Linear(r -> m)`` holding ``A`` (``m x r``) and the original bias ``b``.

    It stores ``r(m+n)`` weight entries. Rank 0 is allowed: the output is then ``b`` (or zeros).
    """

    spec_type = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.first = empty_linear(in_features, rank, False, dtype, device)
        self.second = empty_linear(rank, out_features, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, dtype, device) -> "LowRankLinear":
        """Cast float64 factors ``A`` (``m x r``) and ``B`` (``r x n``) to ``dtype`` on ``device``, balanced first
        (:func:`balanced_factors`; exact, so cached factors balanced before their cast come out the same)."""
        (m, r), (r2, n) = A.shape, B.shape
        if r != r2:
            raise ValueError(f"LowRankLinear: factor shapes disagree, A is {m}x{r} and B is {r2}x{n}")
        A, B = balanced_factors(A, B)
        mod = cls(n, m, r, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            mod.first.weight.copy_(B.to(device=device, dtype=dtype))
            mod.second.weight.copy_(A.to(device=device, dtype=dtype))
            if bias is not None:
                mod.second.bias.copy_(bias.detach().to(device=device, dtype=dtype))
        return mod

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: Mapping, original: nn.Module) -> "LowRankLinear":
        p = next(original.parameters())
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=p.dtype, device=p.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.second.bias is not None}")


def weight_params(module: nn.Module) -> int:
    """Stored weight entries of ``module``: all parameters except those named ``bias``."""
    return int(sum(p.numel() for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] != "bias"))


def stored_params(module: nn.Module) -> int:
    """What the ``Params`` cost model charges for ``module``: its weight entries plus, for a module with a sparse
    part, the index storage in 16-bit parameters (``index_params()``, see ``allocators.costs.SPARSE_FORMAT``)."""
    index = getattr(module, "index_params", None)
    return weight_params(module) + (int(index()) if callable(index) else 0)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed (``in x out``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``m x n`` (out x in) weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (a view, model dtype)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    raise TypeError(f"expected nn.Linear or Conv1D, received {type(module).__name__}")
