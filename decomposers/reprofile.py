# Allocate, compress, re-profile at the compressed point, re-allocate, to a fixed point (issue 16, part 4): the
# allocation-level counterpart of the sequential mode (Frantar et al., 2023, Sec. 4) in decomposers/sequential.py.
"""Re-allocation on curves measured at the compressed point.

The loss-unit curves price each matrix ``W`` at the dense model's inputs. Sequential calibration then fits each
matrix at the inputs of the already-compressed layers: the corrected weight ``W_tilde`` under the compressed-model
input Gram ``G_hat``. So what each rank of a matrix costs in the model that is built is

    e_l(r) = ||S_g^T (W_tilde - [W_tilde]_r) S_hat||_F^2 / (2 N_x N_loss),

the ``fisher`` curve at ``(W_tilde, G_hat)`` (``fisher_svd`` for the one-sided truncation), with the dense
profile's output-gradient Gram ``G_g`` (re-measuring it needs a backward through the compressed model). That point
depends on the allocation upstream, so the loop is

    A_0 = argmin over the dense curves;  A_{k+1} = argmin over the curves measured while building A_k,

until an allocation repeats (a fixed point, or a cycle) or ``iterations`` re-allocations are done. Each step
builds one sequentially calibrated model, and the curves come from the same pass (one extra SVD per matrix).
The dense candidate keeps error 0: at the compressed point it is the full-rank ``W_tilde``; the sequential fit
keeps a matrix chosen dense as ``W``, so that choice is priced slightly too well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from rankalloc.allocators.problem import DENSE


@dataclass(frozen=True)
class ReprofileConfig:
    """``iterations``: re-allocations after the dense-curve optimum (each builds one more model); ``solver``: the
    registered solver used at every step."""

    iterations: int = 2
    solver: str = "exact"

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"ReprofileConfig: expected iterations >= 1, received {self.iterations!r}")
        if not isinstance(self.solver, str) or not self.solver:
            raise ValueError(f"ReprofileConfig: expected a solver name, received {self.solver!r}")


@dataclass(frozen=True, eq=False)
class Step:
    """One built model of the loop. ``allocation``: what was built (solved on the dense curves at step 0, else on
    the curves of the step before); ``predicted``: its objective on the curves it was solved on;
    ``predicted_here``: its objective on the curves measured while building it; ``changed``: matrices whose choice
    differs from the step before; ``fixed``: the allocation solved on this step's curves was built already (this
    one at a fixed point, an earlier one in a cycle), so the loop stops here."""

    iteration: int
    allocation: object
    model: object
    report: object
    predicted: float
    predicted_here: float
    changed: int
    fixed: bool


def at_compressed_point(curve_set, recorded: dict, kind: str):
    """``curve_set`` with the ``kind`` errors of every matrix in ``recorded`` (``{matrix: curve over ranks 0..}``)
    replaced; the dense candidate keeps error 0."""
    errors = dict(curve_set.errors[kind])
    for name, curve in recorded.items():
        if name not in errors:
            raise ValueError(f"re-profiled curve of {name!r}: no such component in {curve_set.name or 'the curves'}")
        ranks = np.asarray(curve_set.ranks[name])
        if ranks[ranks != DENSE].max(initial=0) >= len(curve):
            raise ValueError(f"re-profiled curve of {name!r}: {len(curve)} values for ranks up to "
                             f"{int(ranks[ranks != DENSE].max())}")
        errors[name] = np.where(ranks == DENSE, 0.0, np.asarray(curve)[np.where(ranks == DENSE, 0, ranks)])
    return dataclasses.replace(curve_set, errors={**curve_set.errors, kind: errors})


def _objective(problem, allocation) -> float:
    chosen = allocation.choices
    return float(sum(cv.errors[cv.index_of(chosen[cv.component.name])] for cv in problem.curves))


def reprofile_loop(run, prof, method: str, kind: str, removed: float, *, sequential, config=None,
                   reprofile: ReprofileConfig = ReprofileConfig(), grid: int = 16, ids=None, progress: bool = True):
    """Yield a :class:`Step` per built model (module docstring): ``1 + reprofile.iterations`` at most.

    ``run``: a :class:`~rankalloc.profiling.run.Run` (its calibration sequences, unless ``ids``); ``prof``: a
    full-store profile with the ``kind`` curves; ``method``: a per-matrix method whose curves are rank-only (svd,
    fisher_svd, pgsvd); ``kind``: ``fisher`` or ``fisher_svd``; ``sequential``: the
    :class:`~rankalloc.decomposers.sequential.SequentialConfig` of every build. Each step's model is a fresh copy;
    drop it before asking for the next step.
    """
    import copy

    from rankalloc.allocators.registry import get_solver
    from rankalloc.decomposers.problems import method_curves, problem_for
    from rankalloc.decomposers.registry import get_method
    from rankalloc.decomposers.sequential import RECORDABLE, check_sequential, compress_sequential_

    m = get_method(method)
    if kind not in RECORDABLE:
        raise ValueError(f"re-profiling: curve kind {kind!r} cannot be measured at the compressed point; expected one "
                         f"of {list(RECORDABLE)}")
    check_sequential(method, prof, run)
    mc = method_curves(prof, method, run.model, grid=grid, progress=progress)
    if not m.per_matrix or any(np.any(s) for s in mc.curve_set.sparsity.values()):
        raise ValueError(f"re-profiling: method {method!r} does not allocate rank-only curves over the profile's "
                         f"matrices; expected svd, fisher_svd or pgsvd")
    if not prof.has_output_grams():
        raise ValueError(f"re-profiling with method {method!r} prices each matrix with its output-gradient Gram, and "
                         f"the profile at {prof.path} does not keep them; profile with --store full")
    if ids is None:
        from rankalloc.profiling.run import profile_calibration_ids

        ids = profile_calibration_ids(prof, run.tokenizer, run.text)  # the sequences the profile was measured on
    config = m.config() if config is None else config
    solver = get_solver(reprofile.solver)
    problem = problem_for(prof, method, kind, removed, grid=grid, curves=mc)
    allocation = solver.solve(problem)
    built, previous = [], None
    for it in range(reprofile.iterations + 1):
        built.append(_key(allocation))
        record = {kind: {}}
        model = copy.deepcopy(run.model)
        report = compress_sequential_(model, allocation, config, prof, ids, sequential, progress=progress,
                                      record=record)
        here = problem_for(prof, method, kind, removed, grid=grid,
                           curves=dataclasses.replace(mc, curve_set=at_compressed_point(mc.curve_set, record[kind],
                                                                                          kind)))
        following = solver.solve(here)
        changed = 0 if previous is None else len(set(_key(allocation)) - set(previous))
        fixed = _key(following) in built
        yield Step(it, allocation, model, report, float(allocation.objective), _objective(here, allocation), changed,
                   fixed)
        del model
        if fixed:
            return
        previous, allocation = _key(allocation), following


def _key(allocation) -> tuple:
    return tuple(sorted((n, str(c)) for n, c in allocation.choices.items()))
