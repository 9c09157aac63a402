"""PNG plots of sweep summaries (matplotlib, Agg canvas; no pyplot, no display needed).

- :func:`plot_accuracy_vs_budget`: one line per strategy, accuracy against the budget.
- :func:`plot_tokens_per_partition`: grouped bars, mean tokens kept per partition.
- :func:`plot_pareto`: accuracy against prefill time, points plus their Pareto front.

Each takes the :class:`~tokenprune.experiments.GridPointSummary` list from
:func:`~tokenprune.experiments.summarize`, writes a PNG and returns its path. When the
summaries lack what a plot needs, it raises :class:`NothingToPlot` (a ``ConfigError``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .summary import GridPointSummary, pareto_front

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["NothingToPlot", "plot_accuracy_vs_budget", "plot_pareto", "plot_tokens_per_partition"]


class NothingToPlot(ConfigError):
    """The summaries hold none of the values a plot needs."""


def _figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


def _quality(summary: GridPointSummary, metric: str) -> float | None:
    return summary.score if metric == "score" else summary.scores.get(metric)


def _default_metric(summaries: Sequence[GridPointSummary], metric: str | None) -> str:
    if metric is not None:
        return metric
    if any(s.score is not None for s in summaries):
        return "score"
    for s in summaries:
        if s.scores:
            return next(iter(s.scores))
    raise NothingToPlot("no grid point has any score to plot")


def _series(summaries: Sequence[GridPointSummary]) -> dict[tuple[str | None, str], list[GridPointSummary]]:
    series: dict[tuple[str | None, str], list[GridPointSummary]] = defaultdict(list)
    for summary in summaries:
        series[(summary.model, summary.label)].append(summary)
    return series


def plot_accuracy_vs_budget(
    summaries: Sequence[GridPointSummary],
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    x: str = "auto",
    title: str | None = None,
) -> Path:
    """Accuracy (percent) against budget, one line per strategy (and model).

    ``x``: ``"budget"`` (the nominal budget: percent of the full visual tokens for fraction
    budgets, tokens for int budgets), ``"tokens"`` (mean visual tokens actually kept), or
    ``"auto"``: ``"budget"`` when every grid point has a budget of the same kind, otherwise
    ``"tokens"``.
    """
    if x not in ("auto", "budget", "tokens"):
        raise ConfigError(f"x must be 'auto', 'budget' or 'tokens', got {x!r}")
    metric = _default_metric(summaries, metric)
    kinds = {type(s.budget) for s in summaries}
    if x == "auto":
        x = "budget" if len(kinds) == 1 and type(None) not in kinds else "tokens"
    fraction = kinds == {float}

    def position(s: GridPointSummary) -> float | None:
        if x == "tokens":
            return s.visual_tokens
        if s.budget is None:
            return None
        return float(s.budget) * 100.0 if fraction else float(s.budget)

    figure, axes = _figure()
    drawn = 0
    for (model, label), members in sorted(_series(summaries).items(), key=lambda item: (item[0][0] or "", item[0][1])):
        points = sorted(
            (px, q * 100.0)
            for px, q in ((position(s), _quality(s, metric)) for s in members)
            if px is not None and q is not None
        )
        if not points:
            continue
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        drawn += 1
    if not drawn:
        raise NothingToPlot(f"no grid point has both a budget position and a {metric!r} score")
    if x == "tokens":
        axes.set_xlabel("visual tokens kept (mean per sample)")
    else:
        axes.set_xlabel("budget (% of visual tokens)" if fraction else "budget (visual tokens)")
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title(title or f"{metric} vs budget")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_tokens_per_partition(
    summaries: Sequence[GridPointSummary],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Grouped bars: mean tokens kept per partition (thumbnail, tiles), one bar per grid point."""
    chosen = [s for s in summaries if s.tokens_per_partition]
    if not chosen:
        raise NothingToPlot("no grid point has tokens_per_partition")
    positions = max(len(s.tokens_per_partition or ()) for s in chosen)
    names: list[str] = [f"partition {i}" for i in range(positions)]
    for s in chosen:
        if s.partitions and len(s.partitions) == positions:
            names = list(s.partitions)
            break
    figure, axes = _figure(max(7.0, 1.2 * positions + 3.0), 4.5)
    width = 0.8 / len(chosen)
    for k, s in enumerate(chosen):
        values = list(s.tokens_per_partition or ())
        axes.bar(
            [i - 0.4 + width * (k + 0.5) for i in range(len(values))],
            values,
            width=width,
            label=f"{s.label} @ {s.budget_label}",
        )
    axes.set_xticks(range(positions), names, rotation=20 if positions > 5 else 0)
    axes.set_ylabel("tokens kept (mean per image)")
    axes.set_title(title or "tokens per partition")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_pareto(
    summaries: Sequence[GridPointSummary],
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    cost: str = "prefill_s",
    title: str | None = None,
) -> Path:
    """Accuracy against a cost (default prefill time, in ms), with the Pareto front as a line.

    ``cost`` is a summary field: ``"prefill_s"``, ``"visual_tokens"`` or ``"prefill_flops"``.
    """
    if cost not in ("prefill_s", "visual_tokens", "prefill_flops"):
        raise ConfigError(f"cost must be 'prefill_s', 'visual_tokens' or 'prefill_flops', got {cost!r}")
    metric = _default_metric(summaries, metric)
    scale, unit = {
        "prefill_s": (1000.0, "prefill time (ms)"),
        "visual_tokens": (1.0, "visual tokens kept"),
        "prefill_flops": (1e-12, "prefill TFLOPs"),
    }[cost]
    points: list[tuple[float, float, GridPointSummary]] = []
    for s in summaries:
        value: Any = getattr(s, cost)
        quality = _quality(s, metric)
        if value is not None and quality is not None:
            points.append((float(value) * scale, quality * 100.0, s))
    if not points:
        raise NothingToPlot(f"no grid point has both {cost!r} and a {metric!r} score")
    figure, axes = _figure()
    by_label: dict[str, list[tuple[float, float, GridPointSummary]]] = defaultdict(list)
    for point in points:
        by_label[point[2].label].append(point)
    for label, members in sorted(by_label.items()):
        axes.scatter([p[0] for p in members], [p[1] for p in members], label=label, zorder=3)
        for px, py, s in members:
            axes.annotate(s.budget_label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    front = pareto_front([p[0] for p in points], [p[1] for p in points])
    axes.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        color="black",
        linewidth=1.2,
        linestyle="--",
        label="Pareto front",
        zorder=2,
    )
    axes.set_xlabel(unit)
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title(title or f"{metric} vs {unit}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)
