"""Pareto fronts of allocators as figures: predicted error vs cost removed, with measured perplexity.

:func:`solver_fronts` sweeps each solver over a list of removed budgets
(``allocators.pareto.pareto_sweep``); :func:`measure` compresses a few front points and measures
their perplexity; :func:`plot_solver_fronts` and :func:`plot_cost_model_fronts` draw the figures
(matplotlib, Agg backend); :func:`fronts_frame` tabulates every point. All take explicit arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from rankalloc.profiling.files import atomic_savefig

KIND_UNITS = {
    "whitened": "dropped squared singular values of W S\n(squared activation error summed over calibration tokens)",
    "energy": "fraction of whitened energy dropped (summed over matrices)",
    "relative": "relative activation error (summed over matrices)",
    "epsilon": "relative weight error ||W - W_r||_F / ||W||_F (summed)",
    "fisher": "predicted calibration-loss increase\n(nats per token, K-FAC estimate, summed)",
    "fisher_svd": "predicted calibration-loss increase of the Fisher SVD\n(nats per token, summed)",
    "probe": "measured calibration-loss increase (nats per token, summed)",
}
"""The unit of each curve kind's objective (the y axis of a front)."""

PANEL_COSTS = ("params", "flops", "kv")
"""The cost models of the three-panel figure."""


def kind_label(kind: str) -> str:
    return f"predicted error: {kind}\n[{KIND_UNITS.get(kind, 'units of the curve kind ' + repr(kind))}]"


def cost_label(resource: str, unit: str) -> str:
    return f"{unit} REMOVED\n(fraction of the dense {resource} of the linear matrices; kept = 1 - x)"


@dataclass(frozen=True, eq=False)
class SolverFronts:
    """The fronts of several solvers under one cost model, with what each point means on the x axis.

    ``fixed``: dense cost outside the curves (SoLA's prime neurons), counted as kept in ``removed``.
    ``notes``: one line per solver or budget that gave no point.
    """

    resource: str
    unit: str
    kind: str
    fronts: Mapping[str, object]            # solver name -> ParetoFront
    dense: float
    fixed: float = 0.0
    notes: tuple[str, ...] = ()

    def removed(self, allocation) -> float:
        """Fraction of the dense cost (curves + fixed part) the allocation removes."""
        total = self.dense + self.fixed
        return 1.0 - (allocation.cost[self.resource] + self.fixed) / total if total > 0 else 0.0


@dataclass(frozen=True)
class Measured:
    """A front point compressed and evaluated."""

    solver: str
    removed: float          # fraction of the swept resource removed (x of the point)
    objective: float
    ppl: float
    removed_linear_params: float


def solver_fronts(prof, curves, kind: str, solvers: Mapping[str, object], ratios: Sequence[float], *,
                  cost: str = "params", grid: int = 16, progress: bool = True) -> SolverFronts:
    """Sweep every solver over ``ratios`` (fractions of the dense ``cost`` removed) on ``curves``.

    ``curves``: a :class:`~rankalloc.decomposers.registry.MethodCurves`. ``prof``: its profile (None for
    curves read from a CSV). Unknown kinds or cost models and unreachable budgets raise ``ValueError``
    (from :func:`~rankalloc.decomposers.problems.problem_for`). A solver raising ``ValueError`` on the
    problem (e.g. IPRS without layer scores) gives no front and a note instead.
    """
    from rankalloc.allocators.pareto import pareto_sweep
    from rankalloc.decomposers.problems import problem_for

    if not ratios:
        raise ValueError("solver_fronts: expected at least one budget, received none")
    problems = [problem_for(prof, curves.method, kind, r, cost=cost, grid=grid, curves=curves) for r in ratios]
    budgets = [p.budgets[0] for p in problems]
    base = problems[0]
    fronts, notes = {}, []
    for name, solver in solvers.items():
        try:
            front = pareto_sweep(solver, base, budgets, progress=progress)
        except ValueError as exc:
            notes.append(f"{cost}: solver {name} gave no front: {' '.join(str(exc).split())}")
            continue
        for a in front.infeasible:
            notes.append(f"{cost}: solver {name} found no allocation at {a.problem.budgets[0].describe()} "
                         f"({a.status})")
        fronts[name] = front
    model = base.costs[cost]
    fixed = curves.fixed_params if cost == "params" else 0
    return SolverFronts(cost, getattr(model, "unit", cost), kind, fronts, base.dense_costs[cost], fixed, tuple(notes))


def pick(points: Sequence, n: int) -> list:
    """Up to ``n`` points spread evenly over ``points`` (ends included)."""
    if n <= 0 or not points:
        return []
    if n >= len(points):
        return list(points)
    if n == 1:
        return [points[len(points) // 2]]
    idx = sorted({int(round(i * (len(points) - 1) / max(n - 1, 1))) for i in range(n)})
    return [points[i] for i in idx]


def measure(run, prof, sf: SolverFronts, method: str, n: int, *, ids=None, batch_size: int = 4,
            progress: bool = True, log: Callable[[str], None] | None = None) -> list[Measured]:
    """Compress and evaluate up to ``n`` points of each solver's front (perplexity on ``run``'s windows)."""
    from tqdm.auto import tqdm

    from rankalloc.decomposers import problems
    from rankalloc.decomposers.base import factorize_once
    from rankalloc.decomposers.evaluate import model_params
    from rankalloc.profiling import run as runs

    if ids is None:
        ids = runs.evaluation_ids(run)
    dense_params = model_params(run.model)
    linear = runs.linear_params(prof)
    todo = [(name, p) for name, front in sf.fronts.items() for p in pick(front.points, n)]
    out = []
    with factorize_once():  # one factorization per matrix serves every point
        for name, p in tqdm(todo, desc="measuring front points", disable=not progress):
            res, kept = problems.compressed_perplexity(run, prof, p.allocation, method, ids=ids,
                                                       batch_size=batch_size)
            out.append(Measured(name, sf.removed(p.allocation), p.objective, res.ppl, (dense_params - kept) / linear))
    return out


def fronts_frame(main: SolverFronts, panels: Sequence[SolverFronts] = (), measured: Sequence[Measured] = ()):
    """One row per front point of ``main`` and of every other panel: cost model, solver, budget, fraction
    removed, cost, objective, status, and (``main`` only) the measured perplexity where measured."""
    import pandas as pd

    by_point = {(m.solver, round(m.removed, 12)): m for m in measured}
    rows = []
    for sf in [main, *(p for p in panels if p is not main)]:
        for name, front in sf.fronts.items():
            for p in front.points:
                x = sf.removed(p.allocation)
                m = by_point.get((name, round(x, 12))) if sf is main else None
                rows.append({"cost_model": sf.resource, "unit": sf.unit, "solver": name, "kind": sf.kind,
                             "budget": p.budget.describe(), "removed": x, "cost": p.cost[sf.resource],
                             "dense_cost": sf.dense + sf.fixed, "objective": p.objective,
                             "status": str(p.allocation.status), "ppl": m.ppl if m else math.nan,
                             "removed_linear_params": m.removed_linear_params if m else math.nan})
    return pd.DataFrame(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _objective_axis(ax, sf: SolverFronts, colors: dict) -> bool:
    """Draw each solver's predicted front; returns whether a log scale fits (all objectives > 0)."""
    positive = True
    for name, front in sf.fronts.items():
        if not front.points:
            continue
        x = [sf.removed(p.allocation) for p in front.points]
        y = front.objectives
        positive &= bool((y > 0).all())
        ax.plot(x, y, marker="o", color=colors[name], label=f"{name} (predicted)")
    if positive and any(f.points for f in sf.fronts.values()):
        ax.set_yscale("log")
    ax.set_xlabel(cost_label(sf.resource, sf.unit))
    ax.grid(True, alpha=0.3)
    return positive


def _colors(names) -> dict:
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def plot_solver_fronts(sf: SolverFronts, path, measured: Sequence[Measured] = (), dense_ppl: float | None = None,
                       title: str = "") -> None:
    """Predicted error vs fraction removed for each solver; measured perplexity on a secondary axis."""
    plt = _pyplot()
    colors = _colors(sf.fronts)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    _objective_axis(ax, sf, colors)
    ax.set_ylabel(kind_label(sf.kind))
    handles, labels = ax.get_legend_handles_labels()
    if measured:
        ax2 = ax.twinx()
        for name in sf.fronts:
            pts = sorted((m for m in measured if m.solver == name), key=lambda m: m.removed)
            if pts:
                ax2.plot([m.removed for m in pts], [m.ppl for m in pts], marker="s", ls="--", color=colors[name],
                         label=f"{name} (measured perplexity)")
        if dense_ppl is not None:
            ax2.axhline(dense_ppl, color="gray", ls=":", label=f"dense perplexity {dense_ppl:.4g}")
        ax2.set_ylabel("measured perplexity (held-out windows; lower is better)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper left")
    ax.set_title(title or f"Pareto fronts: predicted error ({sf.kind}) vs {sf.resource} removed")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def plot_cost_model_fronts(panels: Sequence[SolverFronts], path, title: str = "") -> None:
    """One panel per cost model (e.g. parameters, FLOPs, KV cache): each solver's predicted front."""
    plt = _pyplot()
    names = list(dict.fromkeys(n for sf in panels for n in sf.fronts))
    colors = _colors(names)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for ax, sf in zip(axes[0], panels):
        _objective_axis(ax, sf, colors)
        ax.set_title(f"cost model: {sf.resource} ({sf.unit})", fontsize=10)
        if not sf.fronts:
            ax.text(0.5, 0.5, "no solver gave a front", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel(kind_label(panels[0].kind))
    handles = {}
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(title or f"Predicted error ({panels[0].kind}) vs cost removed, under each cost model")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
