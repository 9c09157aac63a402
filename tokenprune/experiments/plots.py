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

__all__ = ["NothingToPlot", "plot_accuracy_vs_budget", "plot_pareto", "plot_tokens_per_partition", "series_colors"]


class NothingToPlot(ConfigError):
    """The summaries hold none of the values a plot needs."""


def _figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """PNG, or SVG/PDF by the file's suffix (SVG keeps its text as text)."""
    import matplotlib

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(target, format=_FORMATS.get(target.suffix.lower(), "png"))
    return target


def series_colors(count: int) -> list[Any]:
    """``count`` distinct colours: tab10, then tab20, then evenly spaced over a wide colormap."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (count - 1)) for i in range(count)]


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
    series = sorted(_series(summaries).items(), key=lambda item: (item[0][0] or "", item[0][1]))
    for ((model, label), members), color in zip(series, series_colors(len(series))):
        points = sorted(
            (px, q * 100.0)
            for px, q in ((position(s), _quality(s, metric)) for s in members)
            if px is not None and q is not None
        )
        if not points:
            continue
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=color)
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
    max_layouts: int = 4,
) -> Path:
    """Grouped bars of the mean tokens kept per partition, one bar per grid point.

    One panel per partition layout (a LLaVA-NeXT tile grid), the ``max_layouts`` most
    common ones, each labelled with its own partitions and image count: tiles of different
    grids are never drawn as one.
    """
    chosen = [s for s in summaries if s.tokens_per_layout or s.tokens_per_partition]
    if not chosen:
        raise NothingToPlot("no grid point has tokens_per_partition")
    images: dict[tuple[str, ...], int] = defaultdict(int)
    for s in chosen:
        for layout, count in (s.layout_counts or {}).items():
            images[layout] = max(images[layout], count)
    layouts = sorted(images, key=lambda layout: (-images[layout], layout))[:max_layouts]
    panels: list[tuple[str, list[str], list[list[float] | None]]] = [
        (
            f"{_grid_name(layout)}, {images[layout]} image(s)",
            list(layout),
            [list(s.tokens_per_layout[layout]) if layout in s.tokens_per_layout else None for s in chosen],
        )
        for layout in layouts
    ]
    if not panels:  # rows without partition names: by position only
        positions = max(len(s.tokens_per_partition or ()) for s in chosen)
        panels = [("by position", [f"partition {i}" for i in range(positions)], [list(s.tokens_per_partition or ()) for s in chosen])]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    widest = max(len(names) for _, names, _ in panels)
    figure = Figure(figsize=(max(7.0, 1.2 * widest + 3.0), 3.2 * len(panels) + 1.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    colors = series_colors(len(chosen))
    width = 0.8 / len(chosen)
    for number, (axes, (heading, names, values_of)) in enumerate(zip(axes_list, panels)):
        for k, (s, values, color) in enumerate(zip(chosen, values_of, colors)):
            if values:
                axes.bar(
                    [i - 0.4 + width * (k + 0.5) for i in range(len(values))],
                    values,
                    width=width,
                    color=color,
                )
        axes.set_xticks(range(len(names)), names, rotation=20 if len(names) > 5 else 0)
        axes.set_ylabel("tokens kept (mean)")
        axes.set_title(f"{title or 'tokens per partition'}: {heading}" if number == 0 else heading, fontsize="medium")
        axes.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=f"{s.label} @ {s.budget_label}") for s, color in zip(chosen, colors)]
    figure.legend(handles=handles, fontsize="small", loc="outside right upper")
    return _save(figure, path)


def _grid_name(layout: Sequence[str]) -> str:
    """``"2x2 grid"`` from tile names ``"tile r1c1"``; else the tile count."""
    import re

    cells = [re.fullmatch(r"tile r(\d+)c(\d+)", name) for name in layout if name != "thumbnail"]
    if cells and all(cells):
        rows = 1 + max(int(cell.group(1)) for cell in cells)  # type: ignore[union-attr]
        cols = 1 + max(int(cell.group(2)) for cell in cells)  # type: ignore[union-attr]
        return f"{rows}x{cols} grid"
    return f"{len(cells)} tiles"


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
    figure, axes = _figure(10.0, 5.0)
    by_label: dict[str, list[tuple[float, float, GridPointSummary]]] = defaultdict(list)
    for point in points:
        by_label[point[2].label].append(point)
    noisy = False
    for (label, members), color in zip(sorted(by_label.items()), series_colors(len(by_label))):
        if cost == "prefill_s":  # the spread over the samples: p10 to p90
            low = [px - (s.prefill_s_p10 if s.prefill_s_p10 is not None else px / scale) * scale for px, _, s in members]
            high = [(s.prefill_s_p90 if s.prefill_s_p90 is not None else px / scale) * scale - px for px, _, s in members]
            axes.errorbar(
                [p[0] for p in members], [p[1] for p in members], xerr=[[max(v, 0.0) for v in low], [max(v, 0.0) for v in high]],
                fmt="none", ecolor=color, alpha=0.5, capsize=2, zorder=2,
            )  # fmt: skip
        steady = [p for p in members if not (cost == "prefill_s" and p[2].timing_noisy)]
        shaky = [p for p in members if p not in steady]
        noisy = noisy or bool(shaky)
        if steady:
            axes.scatter([p[0] for p in steady], [p[1] for p in steady], color=color, label=label, zorder=3)
        if shaky:
            axes.scatter(
                [p[0] for p in shaky], [p[1] for p in shaky], facecolors="none", edgecolors=[color], zorder=3,
                label=None if steady else label,
            )  # fmt: skip
    _label_points(figure, axes, points)
    front = pareto_front([p[0] for p in points], [p[1] for p in points])
    if len(front) > 1:  # one point is no front: no line, no legend entry
        axes.plot(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            color="black",
            linewidth=1.2,
            linestyle="--",
            label="Pareto front",
            zorder=1,
        )
    if noisy:
        axes.scatter([], [], facecolors="none", edgecolors="grey", label="hollow: noisy timing")
    axes.set_xlabel(unit + (" (bars: p10 to p90 of the samples)" if cost == "prefill_s" else ""))
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title(title or f"{metric} vs {unit}")
    axes.grid(True, alpha=0.3)
    figure.legend(fontsize="small", loc="outside right upper")
    return _save(figure, path)


def _label_points(figure: Figure, axes: Axes, points: Sequence[tuple[float, float, GridPointSummary]]) -> None:
    """Budget labels beside the points: one label per spot (points that coincide share it),
    each moved up until it overlaps no label placed before it."""
    spots: dict[tuple[float, float], list[str]] = defaultdict(list)
    for px, py, s in points:
        names = spots[(round(px, 9), round(py, 9))]
        if s.budget_label not in names:
            names.append(s.budget_label)
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    figure.draw_without_rendering()  # final axes limits and layout before measuring
    placed: list[Any] = []
    for (px, py), names in sorted(spots.items(), key=lambda item: (item[0][1], item[0][0])):
        offset = 4.0
        text = axes.annotate(
            ", ".join(names), (px, py), textcoords="offset points", xytext=(4, offset), fontsize="x-small"
        )
        for _ in range(40):
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            offset += box.height * 72.0 / figure.dpi + 1.0
            text.set_position((4, offset))
        placed.append(text.get_window_extent(renderer))
