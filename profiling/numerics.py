"""All guarded linear algebra in one place: float64, relative damping, dead channels, retries.

Profiling and every decomposer call these helpers rather than torch.linalg directly. The rules:
- Gram matrices, Cholesky, eigh and SVD run in float64 (``PRECISION``); TF32 is off.
- Damping is relative: ``delta = damp * mean(diag(G))``. A failed factorization is retried with
  ``damp * growth**k``, then raised as ``NumericalError`` naming the matrix.
- Dead channels (zero diagonal: an input never active in calibration) are reported and damped
  like the rest. They never produce NaNs.
- Non-finite inputs raise ``NonFiniteError`` naming the tensor. Nothing is silently dropped.
- Callers cast results back to the model dtype at the very end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISION = torch.float64
DEFAULT_DAMP = 1e-6
DEFAULT_RETRIES = 6
DEFAULT_GROWTH = 10.0

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


class NumericalError(ValueError):
    """A factorization failed even after the damping retries."""


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or Inf."""


@dataclass(frozen=True)
class Damping:
    """Relative damping ``damp * mean(diag)``; retried ``retries`` times, growing by ``growth``."""

    damp: float = DEFAULT_DAMP
    retries: int = DEFAULT_RETRIES
    growth: float = DEFAULT_GROWTH

    def __post_init__(self):
        if not self.damp > 0:
            raise ValueError(f"Damping: expected damp > 0, received {self.damp!r}")
        if self.retries < 0:
            raise ValueError(f"Damping: expected retries >= 0, received {self.retries!r}")
        if not self.growth > 1:
            raise ValueError(f"Damping: expected growth > 1, received {self.growth!r}")


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Raise ``NonFiniteError`` naming ``what`` if ``t`` holds NaN or Inf; return ``t``.

    Large tensors are checked in slices, so no mask of their size is built."""
    flat = t.reshape(-1)
    step = 1 << 24
    for s in range(0, flat.numel(), step):
        if not torch.isfinite(flat[s:s + step]).all():
            bad = sum(int((~torch.isfinite(flat[j:j + step])).sum()) for j in range(0, flat.numel(), step))
            raise NonFiniteError(f"{what}: {bad} non-finite values (NaN/Inf) out of {t.numel()}")
    return t


def _cholesky_into(work: torch.Tensor) -> bool:
    """Factor ``work`` (symmetric, lower triangle read) in its own memory: ``work`` becomes ``L`` with ``L L^T``
    equal to the input. On CPU LAPACK's ``potrf`` runs on the array's memory directly (torch's out= variant makes
    a temporary copy, 1.6 GB at n = 14336). Returns False when the matrix is not positive definite."""
    if work.device.type == "cpu" and work.is_contiguous() and work.dtype == torch.float64:
        from scipy.linalg import lapack

        a = work.numpy()
        _, info = lapack.dpotrf(a.T, lower=0, overwrite_a=1, clean=0)  # upper of the F-order view = our lower
        return info == 0
    info = torch.zeros((), dtype=torch.int32, device=work.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    return info.item() == 0


def dead_channels(G: torch.Tensor) -> torch.Tensor:
    """Indices of channels whose Gram diagonal is zero (never active on the calibration data)."""
    d = torch.diagonal(G)
    return torch.nonzero(d <= 0, as_tuple=False).flatten()


def damped_cholesky(G: torch.Tensor, name: str, damping: Damping = Damping(), *, overwrite: bool = False,
                    reload=None) -> tuple[torch.Tensor, float]:
    """Lower-triangular ``S`` with ``S S^T = G + delta I`` (float64), and the ``delta`` used.

    Only the lower triangle of ``G`` is read (Grams here are exactly symmetric). The first try uses
    ``delta = damp * mean(diag(G))``, and each retry multiplies it by ``growth``. ``overwrite=True`` factors in
    place (no second ``n x n`` copy: at a 14336-wide input that is 1.6 GB saved); a failed try then needs the
    original back, from ``reload()`` (e.g. the Gram stored on disk), else a copy is taken for the retries.
    """
    G = check_finite(G.to(PRECISION), f"{_gram_label(name)} (activations overflowed, or NaN)")
    diag = torch.diagonal(G).clone()
    mean_diag = diag.mean().item()
    if not mean_diag > 0:
        raise NumericalError(_not_positive(G, diag, name))
    damp = damping.damp
    for attempt in range(damping.retries + 1):
        delta = damp * mean_diag
        if overwrite:
            if attempt:
                G = reload().to(PRECISION) if reload is not None else G
            work = G
        else:
            work = G.clone()
        torch.diagonal(work).copy_(diag + delta)
        if _cholesky_into(work) and torch.isfinite(torch.diagonal(work)).all():
            for i in range(work.shape[0] - 1):  # zero the upper triangle row by row (tril_ takes a temporary)
                work[i, i + 1:] = 0
            return work, delta
        if overwrite and reload is None:  # the in-place try destroyed G: keep a copy for the next ones
            raise NumericalError(f"Cholesky of the Gram matrix of {name} ({G.shape[0]}x{G.shape[0]}) failed at "
                                 f"delta {delta:.3g} = {damp:.3g} x mean diagonal, and it was factored in place "
                                 f"with no copy to retry from")
        damp *= damping.growth
    negative = int((diag < 0).sum())
    why = (f" It has {negative} negative diagonal entries (min {diag.min().item():.3g}): it is not a Gram matrix "
           f"(sum_t x x^T has none), so the statistics are damaged." if negative else
           " Increase damping or use more calibration samples.")
    raise NumericalError(
        f"Cholesky of the Gram matrix of {name} ({G.shape[0]}x{G.shape[0]}) failed after {damping.retries} "
        f"damping retries (last delta {delta:.3g} = {damp / damping.growth:.3g} x mean diagonal).{why}")


def _gram_label(name: str) -> str:
    return name if "Gram" in name else f"Gram matrix of {name}"


def _not_positive(G: torch.Tensor, diag: torch.Tensor, name: str) -> str:
    """Why a Gram with a mean diagonal <= 0 cannot be whitened: it is exactly zero (say where zeros come from), or
    it has negative diagonal entries (not a Gram at all)."""
    label = _gram_label(name)
    if (diag < 0).any():
        return (f"{label} has {int((diag < 0).sum())} negative diagonal entries (min {diag.min().item():.3g}): it is "
                f"not a Gram matrix (sum_t x x^T has a non-negative diagonal), so the statistics are damaged")
    if "output-gradient" in name:
        return (f"{label} is exactly zero: the loss gradient at that output is zero on every calibration token, so "
                f"nothing after the matrix uses its output: a weight after it is all zero (this layer's o_proj after "
                f"q/k/v, its down_proj after gate/up); more text would not change that")
    return (f"{label} is exactly zero: its input was zero on every calibration token, which no text can change: what "
            f"produces it outputs zeros, so a weight before it is all zero (a norm's weight before q/k/v or gate/up, "
            f"v_proj before o_proj, gate_proj or up_proj before down_proj)")


def _blas_ready(*ts) -> bool:
    return all(t.device.type == "cpu" and t.dtype == PRECISION and t.is_contiguous() for t in ts)


def times_lower_(A: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``A <- A L`` in place for a lower-triangular ``L`` (BLAS ``trmm``: half a matmul's work, no copy of ``A``)."""
    if _blas_ready(A, L):
        from scipy.linalg import blas

        blas.dtrmm(1.0, L.numpy().T, A.numpy().T, side=0, lower=0, trans_a=0, overwrite_b=1)  # A^T <- L^T A^T
        return A
    return A.copy_(A @ L)


def lower_t_times_(L: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``A <- L^T A`` in place for a lower-triangular ``L`` (BLAS ``trmm``)."""
    if _blas_ready(A, L):
        from scipy.linalg import blas

        blas.dtrmm(1.0, L.numpy().T, A.numpy().T, side=1, lower=0, trans_a=1, overwrite_b=1)  # A^T <- A^T L
        return A
    return A.copy_(L.T @ A)


LEAN_BYTES = 2 ** 28
"""Above this size (256 MB of float64) a Gram is factored in place by :func:`lean_cholesky`."""


def lean_cholesky(G: torch.Tensor, name: str, damping: Damping = Damping()) -> tuple[torch.Tensor, float]:
    """:func:`damped_cholesky` of a Gram that may be consumed: a large one is factored in its own memory, and a
    float32 copy of its lower triangle (a quarter of its size) serves the retries, which already damp more than
    that copy's rounding."""
    if G.numel() * 8 <= LEAN_BYTES or G.dtype != PRECISION:
        return damped_cholesky(G, name, damping)
    n = G.shape[0]
    backup = pack_lower(G, torch.float32)
    return damped_cholesky(G, name, damping, overwrite=True, reload=lambda: unpack_lower(backup, n))


def pack_lower(S: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The lower triangle of a square ``S``, row by row, as a flat ``n (n + 1) / 2`` tensor in ``dtype``.

    Row by row, so no index tensor of the triangle's size is built (at n = 14336 that would be 1.6 GB)."""
    n = S.shape[0]
    out = torch.empty(n * (n + 1) // 2, dtype=dtype, device=S.device)
    pos = 0
    for i in range(n):
        out[pos:pos + i + 1] = S[i, :i + 1]
        pos += i + 1
    return out


def unpack_lower(v: torch.Tensor, n: int) -> torch.Tensor:
    """The float64 lower-triangular ``n x n`` matrix that :func:`pack_lower` flattened."""
    if v.numel() != n * (n + 1) // 2:
        raise ValueError(f"packed triangle of {v.numel()} values does not fit a {n}x{n} matrix")
    S = torch.zeros(n, n, dtype=PRECISION, device=v.device)
    pos = 0
    for i in range(n):
        S[i, :i + 1] = v[pos:pos + i + 1]
        pos += i + 1
    return S


def psd_roots(G: torch.Tensor, name: str, damping: Damping = Damping()) -> tuple[torch.Tensor, torch.Tensor]:
    """``((G + delta I)^{1/2}, (G + delta I)^{-1/2})`` for a symmetric PSD ``G`` from one float64 eigh.

    Eigenvalues are clamped at ``delta`` after damping, so negative round-off never gives NaNs.
    """
    G = check_finite(G.to(PRECISION), f"{_gram_label(name)} (activations overflowed, or NaN)")
    G = 0.5 * (G + G.T)
    mean_diag = torch.diagonal(G).mean().item()
    if not mean_diag > 0:
        raise NumericalError(_not_positive(G, torch.diagonal(G), name))
    damp = damping.damp
    for _ in range(damping.retries + 1):
        delta = damp * mean_diag
        try:
            lam, Q = torch.linalg.eigh(G + delta * torch.eye(G.shape[0], dtype=PRECISION, device=G.device))
        except RuntimeError:
            damp *= damping.growth
            continue
        root = lam.clamp_min(delta).sqrt()
        half, ihalf = (Q * root) @ Q.T, (Q / root) @ Q.T
        if torch.isfinite(half).all() and torch.isfinite(ihalf).all():
            return half, ihalf
        damp *= damping.growth
    raise NumericalError(f"eigh of the Gram matrix of {name} failed after {damping.retries} damping retries; "
                         f"increase damping or use more calibration samples")


def psd_power(G: torch.Tensor, name: str, power: float, damping: Damping = Damping()) -> torch.Tensor:
    """``(G + delta I)^power`` for a symmetric PSD ``G`` (power 1/2 or -1/2), via :func:`psd_roots`."""
    if power not in (0.5, -0.5):
        raise ValueError(f"psd_power: expected power 0.5 or -0.5, received {power!r}")
    half, ihalf = psd_roots(G, name, damping)
    return half if power == 0.5 else ihalf


def singular_values(A: torch.Tensor, name: str) -> torch.Tensor:
    """Singular values of ``A`` in float64, descending, via LAPACK/cuSOLVER SVD."""
    A = check_finite(A.to(PRECISION), name)
    try:
        return torch.linalg.svdvals(A)
    except RuntimeError as exc:  # non-convergence
        raise NumericalError(f"SVD of {name} ({tuple(A.shape)}) did not converge: {exc}") from None


def svd(A: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(s) Vh`` in float64 with deterministic signs (see ``fix_signs``)."""
    A = check_finite(A.to(PRECISION), name)
    try:
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    except RuntimeError as exc:
        raise NumericalError(f"SVD of {name} ({tuple(A.shape)}) did not converge: {exc}") from None
    U, Vh = fix_signs(U, Vh)
    return U, s, Vh


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular vector pairs so the largest-magnitude entry of each column of ``U`` is positive."""
    idx = torch.argmax(U.abs(), dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def tail_sums(sigma: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_{i>r} sigma_i^2`` for r = 0..len(sigma) (float64, exact zero at full rank)."""
    s2 = sigma.to(PRECISION) ** 2
    rev = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    return torch.cat([rev, torch.zeros(1, dtype=PRECISION, device=sigma.device)])
