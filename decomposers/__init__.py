"""Decomposers: turn an allocation into a compressed model (one method per file, registered in that file).

``compress_(model, allocation, config, profile)`` compresses in place with the method selected by
``type(config)``; ``save_compressed`` / ``load_compressed`` store and rebuild the result;
``rank_pattern`` gives the PEFT-style ranks of an allocation. The registered methods
(:mod:`rankalloc.decomposers.registry`) are ``svd`` (SVD-LLM), ``fisher_svd`` (two-sided Fisher whitening),
``pgsvd`` (SVD + ALS), ``sola`` (prime neurons dense + marginal SVD), ``flat`` (FLAT-LLM value-head PCA) and
``sslc`` (sparse + low-rank); a module of this package that registers a method is found without any list.
"""

if __name__ != "rankalloc.decomposers":  # one copy of every module (and registry), whatever sys.path holds
    raise ImportError(f"import this package as rankalloc.decomposers, not {__name__}: the repository root is the "
                      f"package rankalloc (pip install -e .)")

from rankalloc.decomposers.registry import (METHODS, MODULE_TYPES, Method, MethodCurves, get_method,  # noqa: E402
                                            load_builtins, method_names, register_method)

load_builtins()

from rankalloc.decomposers.base import Factors, compress_, linear_handler  # noqa: E402
from rankalloc.decomposers.fisher_svd import FisherSVDConfig, fisher_svd  # noqa: E402
from rankalloc.decomposers.flat import FlatAttention, FlatConfig  # noqa: E402
from rankalloc.decomposers.io import load_compressed, rank_pattern, save_compressed  # noqa: E402
from rankalloc.decomposers.modules import LowRankLinear  # noqa: E402
from rankalloc.decomposers.pgsvd import PGSVDConfig, pgsvd  # noqa: E402
from rankalloc.decomposers.report import ComponentReport, CompressionReport  # noqa: E402
from rankalloc.decomposers.sequential import SequentialConfig, compress_sequential_  # noqa: E402
from rankalloc.decomposers.sola import SoLAConfig, SoLAMLP  # noqa: E402
from rankalloc.decomposers.sslc import SparseLowRankLinear, SSLCConfig  # noqa: E402
from rankalloc.decomposers.svd import SVDConfig, whitened_svd  # noqa: E402

__all__ = [
    "METHODS", "MODULE_TYPES", "Method", "MethodCurves", "get_method", "method_names", "register_method",
    "compress_", "save_compressed", "load_compressed", "rank_pattern", "CompressionReport", "ComponentReport",
    "LowRankLinear", "SparseLowRankLinear", "Factors", "linear_handler", "SVDConfig", "FisherSVDConfig",
    "PGSVDConfig", "SoLAConfig", "FlatConfig", "SSLCConfig", "whitened_svd", "fisher_svd", "pgsvd", "SoLAMLP",
    "FlatAttention", "SequentialConfig", "compress_sequential_",
]
