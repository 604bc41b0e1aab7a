# K-FAC (Martens & Grosse, 2015), Sec. 3 (Kronecker factors), applied to truncation as in
# Fisher-weighted / K-FAC-whitened SVD: the loss increase of a rank-r truncation, in nats.
"""Loss-unit curves: the estimated increase of the mean calibration loss when ``W`` is truncated.

Derivation and scale
--------------------
The calibration loss is the mean next-token cross-entropy ``L = (1/N_loss) sum_t l_t`` over the
``N_loss`` predicted tokens. A linear module computes ``y_s = W x_s`` at every position ``s``.
Let ``g_s = d(sum_t l_t)/d y_s``: the output gradient of the SUM of the per-token losses. (The
model's loss is a mean over the batch's ``N_b`` predicted tokens, whose output gradient is
``g_s / N_b``; we backpropagate the sum, so no 1/N_b factor is ever captured.)

1. Second-order Taylor with the gradient term dropped (it vanishes at a trained minimum):
   ``dL ~ 1/2 vec(dW)^T H vec(dW)``, ``H ~ F``, the empirical Fisher of ``L`` (equal to the
   Hessian in expectation when the labels follow the model).
2. Per position the gradient of ``l`` w.r.t. ``W`` is ``g_s x_s^T``; treating positions as samples
   ("K-FAC expand"), ``F = (1/N_loss) sum_s (x_s x_s^T) (x) (g_s g_s^T)``.
3. K-FAC: the mean of Kronecker products ~ the Kronecker product of means over the ``N_x``
   positions, ``F ~ (G_x / N_x) (x) (G_g / N_loss)`` with the SUMMED Grams
   ``G_x = sum_s x_s x_s^T`` (N_x positions, as the profile stores them) and
   ``G_g = sum_s g_s g_s^T`` (positions with no loss have ``g_s = 0``).
4. ``vec(dW)^T (A (x) B) vec(dW) = tr(dW^T B dW A)``, so
   ``dL(dW) ~ ||G_g^{1/2} dW G_x^{1/2}||_F^2 / (2 N_x N_loss)``.
5. Eckart-Young in the two-sided whitened basis: with ``M = G_g^{1/2} W G_x^{1/2}``, the best
   rank-r ``W_r = G_g^{-1/2} [M]_r G_x^{-1/2}`` gives
   ``fisher(r) = sum_{i>r} sigma_i(M)^2 / (2 N_x N_loss)``   (nats per predicted token).

``fisher_svd_curve`` is the same estimate for the one-sided whitened truncation that SVD-LLM
applies (``W S = U Sigma V^T``, ``W_r = U_r Sigma_r V_r^T S^{-1}``, ``S S^T = G_x``): there
``dW S = U_{>r} Sigma_{>r} V_{>r}^T``, so ``fisher_svd(r) = sum_{i>r} sigma_i^2 u_i^T G_g u_i /
(2 N_x N_loss)`` (>= fisher(r); non-increasing because every term is >= 0).
The curves use damped float64 Cholesky factors of the Grams (same singular values as the symmetric
square roots ``numerics.psd_power`` that the fisher_svd decomposer applies, at a fraction of the cost).
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import torch

from rankalloc.profiling.calibration import StreamConfig
from rankalloc.profiling.numerics import (PRECISION, Damping, NumericalError, check_finite, damped_cholesky,
                                          lean_cholesky, lower_t_times_, singular_values, svd, tail_sums, times_lower_)
from rankalloc.profiling.probe import on_device, token_loss_sum


def loss_token_count(ids: torch.Tensor) -> int:
    """Predicted tokens in ``ids`` (W, T): every position but the last of each sequence."""
    return int(ids.shape[0] * (ids.shape[1] - 1))



@contextlib.contextmanager
def frozen_from_embeddings(model):
    """Inside the block the model's weights take no gradients and the graph starts at the input embeddings, so a
    backward gives activation gradients only; the weights' ``requires_grad`` flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    handle = None
    try:
        for p in flags:
            p.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: out.detach().requires_grad_(True))
        yield
    finally:
        if handle is not None:
            handle.remove()
        for p, f in flags.items():
            p.requires_grad_(f)


def output_gradient_grams(model: torch.nn.Module, ids: torch.Tensor, modules: Mapping[str, torch.nn.Module],
                          device=None, batch_size: int = 4, progress: bool = True,
                          gram_dtype: str = "float64") -> dict[str, torch.Tensor]:
    """``G_g = sum_s g_s g_s^T`` (float64, m x m) of each module's output gradient on ``ids``.

    ``g_s = d(sum_t l_t)/d y_s`` is the gradient of the SUM of the per-token next-token losses
    (= ``N_b`` times the gradient of a batch's mean loss); see the module docstring. Weights get
    no gradients: they are frozen for the backward passes and restored afterwards.
    ``gram_dtype="float32"`` forms each batch's ``g^T g`` in float32 before adding it to the float64
    accumulator (faster; ~1e-6 relative), as the profile's own ``gram_dtype`` setting does.
    """
    batch_dtype = StreamConfig(gram_dtype=gram_dtype).product_dtype  # ValueError for an unknown gram_dtype
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"expected calibration ids of shape (samples, seqlen >= 2), received {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, received {batch_size!r}")
    from tqdm.auto import tqdm

    grams: dict[str, torch.Tensor] = {}

    def capture(name):
        def on_grad(g):
            g = g.detach().reshape(-1, g.shape[-1]).to(batch_dtype)
            gg = (g.T @ g).to(PRECISION)
            grams[name] = grams[name] + gg if name in grams else gg
        return on_grad

    def forward_hook(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if t.requires_grad:
                t.register_hook(capture(name))
        return hook

    handles = []
    with on_device(model, device) as dev, frozen_from_embeddings(model):
        try:
            handles += [m.register_forward_hook(forward_hook(n)) for n, m in modules.items()]
            for b in tqdm(range(0, ids.shape[0], batch_size), desc="output-gradient Grams", disable=not progress):
                loss_sum, _ = token_loss_sum(model, ids[b:b + batch_size].to(dev))
                if not torch.isfinite(loss_sum):
                    raise ValueError(f"calibration loss is not finite on sequences {b}..{b + batch_size - 1}")
                loss_sum.backward()
        finally:
            for h in handles:
                h.remove()
    missing = [n for n in modules if n not in grams]
    if missing:
        raise ValueError(f"no output gradient reached {missing[:3]}: expected every module to influence the loss")
    return {n: check_finite(grams[n], f"output-gradient Gram of {n}") for n in modules}


def _scale(n_tokens: int, n_loss_tokens: int | None) -> float:
    n_loss = n_tokens if n_loss_tokens is None else n_loss_tokens
    if n_tokens < 1 or n_loss < 1:
        raise ValueError(f"expected positive token counts, received n_tokens={n_tokens!r}, "
                         f"n_loss_tokens={n_loss_tokens!r}")
    return 1.0 / (2.0 * n_tokens * n_loss)


def _check_shapes(W: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, name: str) -> None:
    m, n = W.shape
    if tuple(Gx.shape) != (n, n) or tuple(Gg.shape) != (m, m):
        raise ValueError(f"component {name!r}: expected Grams {n}x{n} (input) and {m}x{m} (output gradient) "
                         f"for a {m}x{n} weight, received {tuple(Gx.shape)} and {tuple(Gg.shape)}")


def _fisher_tail(W: torch.Tensor, Sx: torch.Tensor, Gg: torch.Tensor, name: str, damping: Damping) -> torch.Tensor:
    """``sum_{i>r} sigma_i^2`` of ``S_g^T W S_x`` with Cholesky factors ``S S^T`` of the damped Grams.

    Its singular values equal those of ``G_g^{1/2} W G_x^{1/2}`` (symmetric roots, as the decomposer
    uses): ``M M^T`` is similar to ``W G_x W^T G_g`` for any factors of the two Grams. Cholesky costs
    n^3/3 against ~9n^3 for an eigh root, and ``S_x`` is shared by the matrices reading one input.
    """
    Sg, _ = damped_cholesky(Gg, f"output-gradient Gram of {name}", damping)
    return tail_sums(singular_values(Sg.T @ W @ Sx, f"K-FAC whitened weight of {name}"))


def _fisher_svd_tail(W: torch.Tensor, Sx: torch.Tensor, Gg: torch.Tensor, name: str,
                     damping: Damping, method: str = "svd") -> torch.Tensor:
    """``sum_{i>r} sigma_i^2 u_i^T (G_g + delta I) u_i`` with ``W S_x = U Sigma V^T`` (the one-sided truncation).

    ``sigma_i^2 u_i^T G u_i = b_i^T G b_i`` with ``b_i = W S_x v_i`` (or ``sigma_i u_i``), taken by blocks of
    columns; ``G_g`` is read, never copied, and ``u^T (G_g + delta I) u = u^T G_g u + delta``."""
    A = W @ Sx
    sigma, Q, side = small_side(A, f"whitened weight of {name}", method)
    Gg = check_finite(Gg.to(PRECISION), f"output-gradient Gram of {name}")
    delta = damping.damp * torch.diagonal(Gg).mean()  # the relative damping psd_power applies
    k = len(sigma)
    terms = torch.empty(k, dtype=PRECISION, device=A.device)
    for j in range(0, k, 512):
        B = Q[:, j:j + 512] * sigma[j:j + 512] if side == "left" else A @ Q[:, j:j + 512]  # sigma_i u_i
        terms[j:j + 512] = (B * (Gg @ B)).sum(0) + delta * sigma[j:j + 512] ** 2  # G_g is symmetric
    terms = terms.clamp_min(0.0)
    tail = torch.flip(torch.cumsum(torch.flip(terms, [0]), 0), [0])
    return torch.cat([tail, torch.zeros(1, dtype=PRECISION, device=tail.device)])


def fisher_curve(W: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, n_tokens: int,
                 n_loss_tokens: int | None = None, name: str = "W", damping: Damping = Damping()) -> np.ndarray:
    """K-FAC loss increase of the best two-sided-whitened rank-r truncation, r = 0..min(m, n).

    ``fisher(r) = sum_{i>r} sigma_i(G_g^{1/2} W G_x^{1/2})^2 / (2 n_tokens n_loss_tokens)`` in nats
    per predicted token; ``n_tokens`` = positions summed in ``Gx``, ``n_loss_tokens`` = predicted
    tokens summed in ``Gg`` (default ``n_tokens``).
    """
    W = W.to(PRECISION)
    _check_shapes(W, Gx, Gg, name)
    Sx, _ = damped_cholesky(Gx, f"input Gram of {name}", damping)
    return (_fisher_tail(W, Sx, Gg, name, damping) * _scale(n_tokens, n_loss_tokens)).numpy()


def fisher_svd_curve(W: torch.Tensor, Gx: torch.Tensor, Gg: torch.Tensor, n_tokens: int,
                     n_loss_tokens: int | None = None, name: str = "W", damping: Damping = Damping()) -> np.ndarray:
    """K-FAC loss increase of the one-sided whitened (SVD-LLM) truncation, r = 0..min(m, n).

    ``sum_{i>r} sigma_i^2 u_i^T G_g u_i / (2 n_tokens n_loss_tokens)`` with ``W S = U Sigma V^T``.
    """
    W = W.to(PRECISION)
    _check_shapes(W, Gx, Gg, name)
    Sx, _ = damped_cholesky(Gx, f"input Gram of {name}", damping)
    return (_fisher_svd_tail(W, Sx, Gg, name, damping) * _scale(n_tokens, n_loss_tokens)).numpy()


def break_even(m: int, n: int) -> int:
    """The largest rank worth storing a basis for: at ``r >= mn / (m + n)`` the dense matrix is cheaper."""
    return max(0, min(min(m, n), (m * n) // (m + n)))


def small_side(A: torch.Tensor, name: str, method: str = "svd"):
    """``(sigma, vectors, side)`` of ``A`` (m x n): its singular values (descending) and the singular vectors of its
    smaller side, ``side`` "left" (``U``, m x k, when m < n) or "right" (``V``, n x k).

    ``method="svd"``: LAPACK's thin SVD. ``"gram-eigh"``: ``eigh`` of the smaller Gram (``A A^T`` or ``A^T A``), about
    ten times cheaper at LLaMA shapes; each ``sigma_i^2`` then carries an absolute error of about
    ``1e-16 n sigma_1^2`` (see :mod:`~rankalloc.profiling.spectra`)."""
    side = "left" if A.shape[0] < A.shape[1] else "right"
    if method == "svd":
        U, sigma, Vh = svd(A, name)
        return sigma, (U if side == "left" else Vh.T), side
    G = A @ A.T if side == "left" else A.T @ A
    try:
        lam, Q = torch.linalg.eigh(G)
    except RuntimeError as exc:
        raise NumericalError(f"eigh of the Gram of {name} ({tuple(A.shape)}) did not converge: {exc}") from None
    return torch.flip(lam, [0]).clamp_min(0).sqrt(), torch.flip(Q, [1]), side


def fisher_component(W: torch.Tensor, Sx: torch.Tensor, Gg: torch.Tensor, scale: float, name: str,
                     damping: Damping = Damping(), basis: bool = True, method: str = "svd") -> dict:
    """Both loss-unit curves of one matrix and, with ``basis``, what its two-sided Fisher truncation needs later.

    ``Sx``: the Cholesky factor of the damped input Gram; ``Gg``: the output-gradient Gram, consumed (factored in
    place into ``S_g``, ``S_g S_g^T = G_g + delta_g I``). Returns ``{"fisher": curve, "fisher_svd": curve,
    "basis": {...}}``; the basis is the smaller side of ``M = S_g^T W S_x = U Sigma V^T`` up to the break-even rank
    ``r*``:

    - ``right`` (``n <= m``): ``V_{:, :r*}`` (``n x r*``); the rank-r truncation is ``W S_x V_r V_r^T S_x^{-1}``;
    - ``left``: ``A = S_g^{-T} U_{:, :r*}`` (``m x r*``) and ``B = U_{:, :r*}^T S_g^T`` (``r* x m``); the truncation is
      ``A_r B_r W``.

    Both are the optimum of ``tr(G_g E G_x E^T)`` (Eckart-Young in the whitened basis, projected back).
    ``fisher_svd`` prices the one-sided truncation of ``A = W S_x = P Lambda Q^T``:
    ``lambda_i^2 p_i^T (G_g + delta_g I) p_i = ||S_g^T A q_i||^2 = ||M q_i||^2``, so it needs no product with
    ``G_g`` itself. Working memory: ``G_g`` plus two ``m x n`` float64 matrices (``W S_x``, then ``M`` in its
    place, computed by in-place triangular products).
    """
    m, n = W.shape
    W64 = W.to(PRECISION)
    shared = W64.data_ptr() == W.data_ptr()
    A = times_lower_(W64.clone() if shared else W64, Sx)  # W S_x, in a private copy made once
    lam, Q, side = small_side(A, f"whitened weight of {name}", method)
    Gg = check_finite(Gg.to(PRECISION), f"output-gradient Gram of {name}")
    Sg, _ = lean_cholesky(Gg, f"output-gradient Gram of {name}", damping)
    M = lower_t_times_(Sg, A)  # S_g^T W S_x, in the memory of W S_x
    k = len(lam)
    terms = torch.empty(k, dtype=PRECISION, device=M.device)
    for j in range(0, k, 512):
        blk = (M @ Q[:, j:j + 512]) if side == "right" else lower_t_times_(Sg, Q[:, j:j + 512] * lam[j:j + 512])
        terms[j:j + 512] = (blk * blk).sum(0)
    del Q
    out = {"fisher_svd": (_tail_of(terms) * scale).numpy()}
    if not basis and method == "svd":
        out["fisher"] = (tail_sums(singular_values(M, f"K-FAC whitened weight of {name}")) * scale).numpy()
        return out
    sigma, V, side = small_side(M, f"K-FAC whitened weight of {name}", method)
    del M
    out["fisher"] = (tail_sums(sigma) * scale).numpy()
    if basis:
        r = break_even(m, n)
        if side == "right":
            out["basis"] = {"right": V[:, :r].contiguous()}
        else:
            Ur = V[:, :r]
            out["basis"] = {"left_a": torch.linalg.solve_triangular(Sg.T, Ur, upper=True),  # S_g^{-T} U_r
                            "left_b": (Ur.T @ Sg.T).contiguous()}
    return out


def _tail_of(terms: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_{i>r} terms_i`` for r = 0..len(terms), exact 0 at the end."""
    tail = torch.flip(torch.cumsum(torch.flip(terms.clamp_min(0.0), [0]), 0), [0])
    return torch.cat([tail, torch.zeros(1, dtype=PRECISION, device=tail.device)])
