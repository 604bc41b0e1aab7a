"""Decomposers: turn an allocation into a compressed model (one method per file, one registry).

``compress_(model, allocation, config, profile)`` compresses in place with the method selected by
``type(config)``; ``save_compressed`` / ``load_compressed`` store and rebuild the result;
``rank_pattern`` gives the PEFT-style ranks of an allocation.

Methods (``METHODS``: name -> (config class, handler)):
``svd`` (SVD-LLM), ``fisher_svd`` (two-sided Fisher whitening), ``pgsvd`` (SVD + ALS), ``sola`` (prime
neurons dense + marginal SVD), ``flat`` (FLAT-LLM value-head PCA), and ``sslc`` (sparse + low-rank,
``decomposers/sslc.py``) when that module is present.
"""

if __name__ != "rankalloc.decomposers":  # one copy of every module (and registry), whatever sys.path holds
    raise ImportError(f"import this package as rankalloc.decomposers, not {__name__}: the repository root is the "
                      f"package rankalloc (pip install -e .)")

from rankalloc.decomposers.base import (METHODS, MODULE_TYPES, ComponentReport, CompressionReport, Factors,
                                        LowRankLinear, compress_, linear_handler)
from rankalloc.decomposers.fisher_svd import FisherSVDConfig, compress_fisher_svd, fisher_svd
from rankalloc.decomposers.flat import FlatAttention, FlatConfig, compress_flat
from rankalloc.decomposers.pgsvd import PGSVDConfig, compress_pgsvd, pgsvd
from rankalloc.decomposers.sola import SoLAConfig, SoLAMLP, compress_sola
from rankalloc.decomposers.svd import SVDConfig, compress_svd, whitened_svd

METHODS.update({
    "svd": (SVDConfig, compress_svd),
    "fisher_svd": (FisherSVDConfig, compress_fisher_svd),
    "pgsvd": (PGSVDConfig, compress_pgsvd),
    "sola": (SoLAConfig, compress_sola),
    "flat": (FlatConfig, compress_flat),
})

for _cls in (LowRankLinear, SoLAMLP, FlatAttention):
    MODULE_TYPES[_cls.spec_type] = (_cls, _cls.spec, _cls.from_spec)

# ---- slot: "sslc" (decomposers/sslc.py, written separately) --------------------------------------------
# Registered when the module is present. Its per-matrix builder
# ``sslc_handler(module, choice, W, G, config, name) -> nn.Module`` is wrapped into the model-level
# handler contract by ``linear_handler(..., sparse=True)``; its module type is registered for save/load.
try:
    from rankalloc.decomposers import sslc as _sslc
except ModuleNotFoundError as _exc:
    if _exc.name != "rankalloc.decomposers.sslc":
        raise
    _sslc = None
if _sslc is not None:
    METHODS["sslc"] = (_sslc.SSLCConfig, getattr(_sslc, "compress_sslc", None)
                       or linear_handler(_sslc.sslc_handler, sparse=True, name="sslc"))
    _slr = _sslc.SparseLowRankLinear
    MODULE_TYPES["sslc"] = (
        _slr,
        getattr(_slr, "spec", None) or (lambda mod: {"in_features": mod.in_features, "out_features": mod.out_features,
                                                      "rank": mod.rank, "nnz": mod.nnz,
                                                      "bias": mod.up.bias is not None}),
        getattr(_slr, "from_spec", None) or (lambda spec, original: _slr(
            spec["in_features"], spec["out_features"], spec["rank"], spec["nnz"], spec["bias"],
            dtype=next(original.parameters()).dtype, device=next(original.parameters()).device)),
    )
# ---------------------------------------------------------------------------------------------------------

from rankalloc.decomposers.io import load_compressed, rank_pattern, save_compressed  # noqa: E402

__all__ = [
    "METHODS", "MODULE_TYPES", "compress_", "save_compressed", "load_compressed", "rank_pattern",
    "CompressionReport", "ComponentReport", "LowRankLinear", "Factors", "linear_handler",
    "SVDConfig", "FisherSVDConfig", "PGSVDConfig", "SoLAConfig", "FlatConfig",
    "whitened_svd", "fisher_svd", "pgsvd", "SoLAMLP", "FlatAttention",
]
if _sslc is not None:
    __all__ += ["SSLCConfig"]
    SSLCConfig = _sslc.SSLCConfig
