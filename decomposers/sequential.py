# Sequential calibration with output correction: each matrix is fitted to the inputs the already-compressed layers
# feed it (GPTQ's sequential mode, Frantar et al., 2023, Sec. 4), against the dense model's outputs.
"""Compress decoder layers in order, each against the inputs the compressed model really gives it.

The additive objective prices every matrix at the dense model's inputs ``X``. Once earlier matrices are
compressed, matrix ``W`` (``m x n``) sees other inputs ``X_hat`` (tokens as rows, ``T x n``), and its error is
``||X W^T - X_hat W_hat^T||_F^2``. With ``C = X^T X_hat`` and ``G_hat = X_hat^T X_hat``,

    X W^T - X_hat W_hat^T = (X W^T - X_hat W_tilde^T) + X_hat (W_tilde - W_hat)^T,
    W_tilde = W C G_hat^{-1},

and the first term is orthogonal to the column space of ``X_hat``. So the best ``W_hat`` is the method's own
low-rank fit of the corrected weight ``W_tilde`` under the input Gram ``G_hat``: every per-matrix method
(whitened SVD, two-sided Fisher SVD, PGSVD) runs unchanged on ``(W_tilde, G_hat)``.

The fit is a regression on the calibration tokens, so it is shrunk towards ``W`` (a ridge with prior ``W``):
``W_tilde = W (C + delta I)(G_hat + delta I)^{-1}`` with ``delta = damp * mean diag(G_hat)``. Large ``damp`` gives
``W`` back; directions ``X_hat`` never reaches keep ``W``. When ``X_hat`` is zero on every token (a matrix before
it cut to rank 0), every weight gives the same output there, and the group gets the plain fit at the dense inputs.

Order. Decoder layer ``l`` runs twice per input group (the matrices sharing one input, in forward order): the
dense copy on the dense stream gives ``X``; the partly compressed layer on the compressed stream gives
``X_hat`` and stops there. So ``o_proj`` sees the compressed ``q, k, v`` and ``down_proj`` the compressed
``gate, up``, as well as every earlier layer. The output-gradient Grams of the two-sided method stay the dense
profile's (they need a backward; see ``field.md``). One decoder layer's inputs are held per stream at a time.

A component that is not one matrix joins the input group of the matrix its method names (``Method.joins``). FLAT's
``vo`` joins its V: V's weight is corrected as a member's would be, and the value-head bases come from the value
covariance at the compressed inputs, ``W_tilde_v G_hat W_tilde_v^T`` per head (``Method.remeasure``). Its O is
not refitted (FLAT absorbs the bases into it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rankalloc.decomposers.base import combined_report, compress_, expected_params, no_factor_cache
from rankalloc.decomposers.registry import method_of_config
from rankalloc.profiling.calibration import _Stop, _layer_output, capture_inputs
from rankalloc.profiling.numerics import PRECISION, Damping, check_finite, damped_cholesky
from rankalloc.profiling.probe import read_weight, write_weight_


@dataclass(frozen=True)
class SequentialConfig:
    """``samples``: calibration sequences the compressed-model inputs are measured on (the first N; 0: all).
    ``damp``: the ridge ``delta / mean diag(G_hat)`` that shrinks the correction towards ``W`` (0.1: chosen on
    SmolLM2, see the README). ``correct``: fit ``W_tilde`` (else ``W`` itself, under ``G_hat`` only).
    ``batch_size``: sequences per forward."""

    samples: int = 0
    damp: float = 1e-1
    correct: bool = True
    batch_size: int = 8

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"SequentialConfig: expected samples >= 0 (0: all), received {self.samples!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"SequentialConfig: expected damp > 0, received {self.damp!r}")
        if not isinstance(self.correct, bool):
            raise ValueError(f"SequentialConfig: expected correct True or False, received {self.correct!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SequentialConfig: expected batch_size >= 1, received {self.batch_size!r}")


def check_sequential(method: str, profile=None, run=None, samples: int = 0) -> None:
    """``ValueError`` naming the method or the setting when sequential calibration cannot serve ``method`` with
    ``profile`` (checked before anything is compressed; ``profile=None``: the method alone, before profiling), or
    asks for more ``samples`` (``--sequential``) than the profile was calibrated on."""
    from rankalloc.decomposers.registry import get_method

    m = get_method(method)
    if not m.sequential:
        raise ValueError(f"sequential calibration: method {method!r} does not factor one matrix at a time, nor says "
                         f"how its components join a matrix's inputs (Method.joins); expected a method such as svd, "
                         f"fisher_svd, pgsvd, sslc or flat")
    if profile is not None and "fisher" in m.needs and not profile.has_output_grams():
        raise ValueError(f"sequential calibration with method {method!r} needs the output-gradient Grams, and the "
                         f"profile at {profile.path} keeps only the dense-point Fisher basis; profile with --store full")
    if run is not None and getattr(run.loaded, "out_of_core", False):
        raise ValueError("sequential calibration: needs the model in memory (run without --out-of-core)")
    if profile is not None and samples > int(profile.meta["n_samples"]):
        raise ValueError(f"--sequential: {samples} calibration sequences asked, the profile at {profile.path} has "
                         f"{profile.meta['n_samples']}")


class Remeasured:
    """The dense profile, with the input Grams of some matrices replaced by ones measured at the compressed
    model, and any other statistics a method re-measures (``overrides``: ``{profile method: {key: value}}``, e.g.
    FLAT's ``value_covariance`` of one layer). A stored Fisher basis or input root belongs to the dense inputs, so
    asking for one is an error."""

    def __init__(self, profile, grams: dict, overrides: dict | None = None):
        self._profile, self._grams, self._overrides = profile, grams, overrides or {}

    def input_gram(self, name: str):
        return self._grams[name] if name in self._grams else self._profile.input_gram(name)

    def input_root(self, name: str):
        if name in self._grams:
            raise ValueError(f"{name}: sequential calibration re-measures its inputs, so the profile's stored input "
                             f"root does not apply")
        return self._profile.input_root(name)

    def fisher_basis(self, name: str):
        raise ValueError(f"{name}: sequential calibration with two-sided Fisher SVD needs the output-gradient Grams, "
                         f"and this compact profile keeps only the dense-point Fisher basis; profile with "
                         f"--store full")

    def __getattr__(self, attr):
        if attr.startswith("_") or attr not in self._overrides:
            return getattr(self._profile, attr)
        table, dense = self._overrides[attr], getattr(self._profile, attr)
        return lambda key: table[key] if key in table else dense(key)


def _corrected(W: torch.Tensor, C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``W C (G_hat + delta I)^{-1}`` with ``S S^T = G_hat + delta I`` (pass ``C + delta I`` for the fit shrunk
    towards ``W``)."""
    return torch.cholesky_solve((W @ C).T, S).T


def compress_sequential_(model, allocation, config, profile, ids: torch.Tensor,
                         seq: SequentialConfig = SequentialConfig(), progress: bool = True, record: dict | None = None):
    """:func:`~rankalloc.decomposers.base.compress_` with sequential calibration (module docstring), in place.

    ``ids``: the calibration token ids (``sequences x seqlen``), the ones ``profile`` was measured on; the
    first ``seq.samples`` are used. The method must fit each matrix from its own Grams (svd, fisher_svd, pgsvd,
    sslc: ``Method.fits_each_matrix``), or say how its other components join a matrix's input group (FLAT's ``vo``
    joins its V: ``Method.joins``); its own settings are ``config``. Returns the
    :class:`~rankalloc.decomposers.report.CompressionReport`, with the realized parameter count checked against
    the allocation as ``compress_`` does.

    ``record``: ``{kind: {}}`` for kinds among ``fisher`` and ``fisher_svd``; each ``{}`` is filled with
    ``{matrix: curve}``, the loss-unit curve of every matrix of the allocation (cut or kept dense) at the point it
    is fitted at: the corrected weight ``W_tilde`` under the compressed-model input Gram ``G_hat`` and the dense
    profile's output-gradient Gram (:mod:`~rankalloc.decomposers.reprofile`). A group whose compressed inputs are
    zero is not recorded.
    """
    from rankalloc.decomposers.base import allocation_items
    from rankalloc.decomposers.streamed import sub_allocation
    from rankalloc.profiling.architectures import find_structure

    method = method_of_config(config)
    check_sequential(method.name, profile)
    if not allocation.feasible:
        raise ValueError(f"allocation by {allocation.solver!r} has status {allocation.status}: expected a "
                         f"feasible allocation ({allocation.message})")
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise ValueError(f"sequential calibration: expected token ids of shape (sequences, seqlen), received "
                         f"{tuple(ids.shape)}")
    if seq.samples > ids.shape[0]:
        raise ValueError(f"SequentialConfig.samples: {seq.samples} calibration sequences asked, {ids.shape[0]} given")
    ids = ids[:seq.samples] if seq.samples else ids
    unknown_kinds = sorted(set(record or {}) - set(RECORDABLE))
    if unknown_kinds:
        raise ValueError(f"sequential calibration: cannot record curve kinds {unknown_kinds}; expected some of "
                         f"{list(RECORDABLE)}")
    if record and method.joins is not None:
        raise ValueError(f"sequential calibration: cannot record curves of method {method.name!r}, whose components "
                         f"are not all single matrices")
    expected = expected_params(model, allocation)
    structure = find_structure(model)
    chosen = {c.name: ch for c, ch in allocation_items(allocation)}
    joined = {c.name: (v, c) for c, _ in allocation_items(allocation)
              if method.joins is not None and (v := method.joins(c.name)) is not None}  # component -> (matrix, it)
    unknown = sorted(n for n in set(chosen) - set(structure.modules)
                     if n not in joined or joined[n][0] not in structure.modules)
    if unknown:
        raise ValueError(f"sequential calibration: components {unknown[:3]} are not decoder-layer linear maps of "
                         f"{type(model).__name__}")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    reports = []
    with torch.no_grad(), no_factor_cache():
        cap = capture_inputs(model, structure, ids, seq.batch_size, device)
        dense_h, comp_h = cap.hidden, [h.clone() for h in cap.hidden]
        for layer in tqdm(range(structure.num_layers), desc=f"sequential {method.name}", unit="layer",
                          disable=not progress):
            module, calls = structure.layers[layer], cap.calls[layer]
            prefix = f"{structure.layers_path}.{layer}."
            groups = {g.members[0]: g for g in structure.layer_groups(layer)
                      if any(n in chosen and (record or not chosen[n].is_dense)
                             for n in (*g.members, *(j for j, (v, _) in joined.items() if v in g.members)))}
            if groups:  # the dense layer's inputs to each group, and the order the layer calls the groups in
                reference = copy.deepcopy(module)
                dense_x, dense_next = _inputs(reference, [n[len(prefix):] for n in groups], dense_h, calls, False)
                del reference
                for local in dense_x[0]:  # forward order
                    g = groups[prefix + local]
                    comp_x, _ = _inputs(module, [local], comp_h, calls, True)
                    reports += _fit_group(model, g, local, chosen, dense_x, comp_x, allocation, config, profile, seq,
                                          record, ids.numel(), joined, method)
                    del comp_x
                del dense_x
            else:
                dense_next = _run(module, dense_h, calls)
            comp_h = _run(module, comp_h, calls)
            dense_h = dense_next
        rest = [name for name in chosen if name not in {r.name for r in reports}]  # the dense choices
        if rest:
            reports += compress_(model, sub_allocation(allocation, rest), config, profile, progress=False).components
    return combined_report(method.name, config, allocation, reports, expected, profile, time.perf_counter() - t0)


def _inputs(layer, names, inputs, calls, stop: bool):
    """``(per batch {local name: its input (tokens x n)}, outputs)`` of ``layer`` run on ``inputs``, for the
    modules ``names`` (local to the layer; each dict in the order the layer calls them). ``stop``: end each batch
    at the first of them, without outputs."""
    got, outputs, current = [], [], {}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            current.setdefault(name, x.reshape(-1, x.shape[-1]).detach())
            if stop:
                raise _Stop
        return pre

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for x, (args, kwargs) in zip(inputs, calls):
            current = {}
            try:
                outputs.append(_layer_output(layer(x, *args, **kwargs)))
            except _Stop:
                pass
            missing = [n for n in names if n not in current]
            if missing:
                raise RuntimeError(f"the decoder layer never called {missing}; cannot measure their inputs")
            got.append(current)
    finally:
        for h in handles:
            h.remove()
    return got, outputs


def _run(module, inputs, calls) -> list[torch.Tensor]:
    return [_layer_output(module(x, *args, **kwargs)) for x, (args, kwargs) in zip(inputs, calls)]


RECORDABLE = ("fisher", "fisher_svd")
"""Curve kinds ``compress_sequential_(record=)`` can price at the compressed point."""


def _record(record: dict, profile, name: str, W: torch.Tensor, G: torch.Tensor, n_tokens: int) -> None:
    """The ``record`` kinds' curves of ``name`` at weight ``W`` and input Gram ``G`` (``n_tokens`` positions), with
    the dense profile's output-gradient Gram and damping."""
    from rankalloc.profiling.fisher import fisher_curve, fisher_svd_curve
    from rankalloc.profiling.probe import profile_damping

    Gg, damping = profile.output_gram(name), profile_damping(profile)
    for kind, curves in record.items():
        price = fisher_curve if kind == "fisher" else fisher_svd_curve
        curves[name] = price(W, G, Gg, n_tokens, profile.fisher_loss_tokens, name, damping)


def _fit_group(model, g, local, chosen, dense_x, comp_x, allocation, config, profile, seq, record=None,
               n_tokens: int = 0, joined: dict | None = None, method=None) -> list:
    """Correct (``W_tilde``) and compress the low-rank members of input group ``g`` at the compressed inputs, and
    the components that join one of them (``joined``: component name -> (matrix, component); their statistics
    re-measured by ``method.remeasure`` at the corrected weight); with ``record``, price every member of the allocation at that
    point first (``compress_sequential_``)."""
    from rankalloc.decomposers.streamed import sub_allocation

    device = comp_x[0][local].device
    G = torch.zeros(g.n, g.n, dtype=PRECISION, device=device)
    C = torch.zeros(g.n, g.n, dtype=PRECISION, device=device)
    for xd, xc in zip(dense_x, comp_x):  # each batch's products in float32, summed in float64
        Xd, Xc = xd[local].float(), xc[local].float()
        G += (Xc.T @ Xc).to(PRECISION)
        C += (Xd.T @ Xc).to(PRECISION)
    what = f"compressed-model input Gram of {g.key} (decoder layer {g.layer})"
    G = check_finite(0.5 * (G + G.T), what)
    names = [n for n in g.members if n in chosen and not chosen[n].is_dense]
    joins = {n: vc for n, vc in (joined or {}).items() if vc[0] in g.members and not chosen[n].is_dense}
    if not bool(G.any()):  # upstream cut to rank 0: every weight gives the same output here, so keep the plain fit
        if not names and not joins:
            return []
        return list(compress_(model, sub_allocation(allocation, names + list(joins)), config, profile,
                              progress=False).components)
    same = all(torch.equal(xd[local], xc[local]) for xd, xc in zip(dense_x, comp_x))
    correct = seq.correct and not same  # nothing compressed upstream yet: W_tilde would be W (up to the damping)
    if correct:
        S, delta = damped_cholesky(G, what, Damping(seq.damp))
        C.diagonal().add_(delta)
    for name in [n for n in g.members if n in chosen and (record or n in names)]:
        sub = model.get_submodule(name)
        W = _corrected(read_weight(sub, name), C, S) if correct else read_weight(sub, name)
        if record:
            _record(record, profile, name, W, G, n_tokens)
        if correct and name in names:
            write_weight_(sub, W)
    overrides: dict = {}
    for matrix, component in joins.values():
        sub = model.get_submodule(matrix)
        if correct and matrix not in names:
            write_weight_(sub, _corrected(read_weight(sub, matrix), C, S))
        got = method.remeasure(model, component, [xc[local] for xc in comp_x])
        for attr, table in got.items():
            overrides.setdefault(attr, {}).update(table)
    if not names and not joins:
        return []
    view = Remeasured(profile, {name: G for name in g.members}, overrides)
    return list(compress_(model, sub_allocation(allocation, names + list(joins)), config, view,
                          progress=False).components)
