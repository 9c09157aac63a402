"""Per-grid-point summaries of result rows: Markdown tables, CSV, Pareto fronts.

:func:`summarize` groups rows (schema: :mod:`tokenprune.experiments.results`) by grid
point and averages them:

- ``scores``: mean of each metric over the rows that carry it; ``score``: mean of each row's
  own metric (``scores[row["metric"]]``), for datasets that mix metrics;
- ``category_scores``: the same per category;
- ``visual_tokens``, ``full_visual_tokens``: means; ``keep_ratio``: their ratio (sum of
  kept over sum of full);
- ``tokens_per_partition``: mean per partition position, over the rows that have that
  position (LLaVA-NeXT grids differ per image); ``partitions``: names from the row with the
  most partitions;
- ``tokens_per_layout``: the same per partition layout (one LLaVA-NeXT tile grid each, keyed
  by its partition names), with ``layout_counts`` images each: tiles of different grids are
  never averaged together;
- ``prefill_s``, ``decode_tokens_per_s``, ``prefill_flops``: means; ``peak_memory_bytes``: max;
- timing spread over the grid point's samples: ``prefill_s_median``, ``prefill_s_p10`` /
  ``prefill_s_p90``, ``prefill_s_cv`` (standard deviation over mean) and ``timing_noisy``
  (``prefill_s_cv`` above :data:`NOISY_TIMING_CV`: a busy or shared machine; compare such
  timings with care);
- ``errors``: rows with an ``error``; they count in ``samples`` but hold no scores.

Missing or ``null`` fields are skipped; a statistic with no values is ``None`` (shown as
``–``). Of rows repeating a key the newest counts (:func:`~tokenprune.experiments.newest_rows`:
the later ``finished_at``, else the first row, as in :func:`~tokenprune.experiments.merge`). :func:`write_report` writes everything at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .results import newest_rows, read_rows

__all__ = [
    "NOISY_TIMING_CV",
    "GridPointSummary",
    "budget_label",
    "category_table",
    "pareto_front",
    "strategy_labels",
    "summarize",
    "summary_records",
    "to_csv",
    "to_markdown",
    "write_report",
]

_PREFERRED_METRICS = ("vqa_accuracy", "exact_match", "anls")

NOISY_TIMING_CV = 0.5
"""A grid point's timings are flagged noisy when their std/mean over its samples exceeds this."""


@dataclass(frozen=True)
class GridPointSummary:
    """Aggregates of one grid point (see the module docstring for each field)."""

    grid_point: str
    model: str | None
    config: Mapping[str, Any] | None
    label: str
    budget: float | int | None
    samples: int
    errors: int
    score: float | None
    scores: Mapping[str, float]
    category_scores: Mapping[str, Mapping[str, float]]
    visual_tokens: float | None
    full_visual_tokens: float | None
    keep_ratio: float | None
    tokens_per_partition: tuple[float, ...] | None
    partitions: tuple[str, ...] | None
    prefill_s: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: int | None
    prefill_flops: float | None
    category_counts: Mapping[str, int] = field(default_factory=dict)
    settings: Mapping[str, Any] | None = None
    prefill_s_median: float | None = None
    prefill_s_p10: float | None = None
    prefill_s_p90: float | None = None
    prefill_s_cv: float | None = None
    timing_noisy: bool = False
    tokens_per_layout: Mapping[tuple[str, ...], tuple[float, ...]] = field(default_factory=dict)
    layout_counts: Mapping[tuple[str, ...], int] = field(default_factory=dict)

    @property
    def budget_label(self) -> str:
        return budget_label(self.budget)


def budget_label(budget: object) -> str:
    """``0.2`` -> ``"20%"``, ``576`` -> ``"576 tokens"``, ``None`` -> ``"–"``."""
    if budget is None:
        return "–"
    if isinstance(budget, float):
        return f"{budget * 100:g}%"
    if isinstance(budget, int) and not isinstance(budget, bool):
        return f"{budget} tokens"
    return str(budget)


# ---------------------------------------------------------------- labels
def _part(config: Mapping[str, Any] | None, part: str) -> Mapping[str, Any] | None:
    value = (config or {}).get(part)
    if isinstance(value, str):
        return {"name": value}
    return value if isinstance(value, Mapping) else None


def _describe_part(spec: Mapping[str, Any], varying: Sequence[str]) -> str:
    name = str(spec.get("name", "?"))
    options = [
        f"{key}={spec[key]!r}" if isinstance(spec[key], str) else f"{key}={spec[key]}" for key in varying if key in spec
    ]
    return f"{name}({', '.join(options)})" if options else name


def flatten_settings(value: object, prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"generation.num_beams": "2", ...}``, values as canonical JSON."""
    if isinstance(value, Mapping):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten_settings(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(value, sort_keys=True, default=str)} if prefix else {}


def strategy_labels(
    configs: Sequence[Mapping[str, Any] | None],
    models: Sequence[str | None] | None = None,
    settings: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[str]:
    """Short readable labels of configs, budget left out: ``"hired+cls_final"``.

    Options are shown only where configs with the same part name differ in them
    (``"hired(alpha=0.5)+cls_final"``); the adapter only when adapters differ; the model
    (in brackets) only when models differ; run settings (a row's ``settings``: prompt,
    generation, ...) in brackets only where they differ, e.g. ``[generation.num_beams=2]``.
    A missing config is labelled ``"?"``.
    """
    models = list(models) if models is not None else [None] * len(configs)
    pieces: list[list[str]] = [[] for _ in configs]
    for part in ("adapter", "allocator", "selector"):
        specs = [_part(config, part) for config in configs]
        names = {spec.get("name") if spec else None for spec in specs}
        if part == "adapter" and len(names) <= 1:
            continue
        by_name: dict[object, list[Mapping[str, Any]]] = defaultdict(list)
        for spec in specs:
            if spec:
                by_name[spec.get("name")].append(spec)
        varying: dict[object, list[str]] = {}
        for name, group in by_name.items():
            keys = sorted({key for spec in group for key in spec} - {"name"})
            varying[name] = [
                key
                for key in keys
                if len({json.dumps(spec.get(key), sort_keys=True, default=str) for spec in group}) > 1
            ]
        for index, spec in enumerate(specs):
            pieces[index].append(_describe_part(spec, varying[spec.get("name")]) if spec else "none")
    labels = ["+".join(piece) if config is not None else "?" for piece, config in zip(pieces, configs)]
    if len(set(models)) > 1:
        labels = [f"{label} [{model}]" for label, model in zip(labels, models)]
    flat = [flatten_settings(item or {}) for item in (settings or [])]
    varying = sorted(k for k in {k for f in flat for k in f} if len({f.get(k) for f in flat}) > 1)
    if varying:
        labels = [
            f"{label} [{', '.join(f'{k}={f[k]}' if k in f else f'{k} unset' for k in varying)}]"
            for label, f in zip(labels, flat)
        ]
    return labels


# ---------------------------------------------------------------- aggregation
def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(rows: Iterable[Mapping[str, Any]] | str | os.PathLike[str]) -> list[GridPointSummary]:
    """One summary per grid point, sorted by model, strategy label and budget.

    ``rows`` may be a results file path (read with :func:`~tokenprune.experiments.read_rows`).
    """
    if isinstance(rows, (str, os.PathLike)):
        rows = read_rows(rows)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for (grid_point, _), row in newest_rows(rows).items():
        groups.setdefault(grid_point, []).append(row)
    grid_points = list(groups)
    first = [groups[g][0] for g in grid_points]
    configs = [row.get("config") if isinstance(row.get("config"), Mapping) else None for row in first]
    models = [row.get("model") for row in first]
    settings = [row.get("settings") if isinstance(row.get("settings"), Mapping) else None for row in first]
    # Rows without a config are labelled by their grid point id.
    labels = [
        label if config is not None else grid_point
        for label, config, grid_point in zip(strategy_labels(configs, models, settings), configs, grid_points)
    ]
    summaries = [
        _summarize_group(grid_point, group, label)
        for grid_point, group, label in zip(grid_points, (groups[g] for g in grid_points), labels)
    ]
    return sorted(summaries, key=_sort_key)


def _sort_key(summary: GridPointSummary) -> tuple[Any, ...]:
    budget = summary.budget
    kind = 0 if isinstance(budget, float) else 1 if isinstance(budget, int) else 2
    value = float(budget) if isinstance(budget, (int, float)) else 0.0
    return (summary.model or "", summary.label, kind, value, summary.grid_point)


def _summarize_group(grid_point: str, rows: list[Mapping[str, Any]], label: str) -> GridPointSummary:
    config = rows[0].get("config") if isinstance(rows[0].get("config"), Mapping) else None
    budget = config.get("budget") if config else None
    metric_values: dict[str, list[float]] = defaultdict(list)
    category_values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    category_counts: dict[str, int] = defaultdict(int)
    own_scores: list[float | None] = []
    for row in rows:
        scores = row.get("scores") if isinstance(row.get("scores"), Mapping) else {}
        category = row.get("category")
        if isinstance(category, str):
            category_counts[category] += 1
        for metric, value in scores.items():
            number = _number(value)
            if number is None:
                continue
            metric_values[metric].append(number)
            if isinstance(category, str):
                category_values[category][metric].append(number)
        own = row.get("metric")
        if isinstance(own, str):
            number = _number(scores.get(own))
            own_scores.append(number)
            if number is not None and isinstance(category, str):
                category_values[category]["score"].append(number)
    kept = [_number(row.get("visual_tokens")) for row in rows]
    full = [_number(row.get("full_visual_tokens")) for row in rows]
    pairs = [(k, f) for k, f in zip(kept, full) if k is not None and f is not None and f > 0]
    per_partition: dict[int, list[float]] = defaultdict(list)
    names: tuple[str, ...] | None = None
    for row in rows:
        counts = row.get("tokens_per_partition")
        if isinstance(counts, list):
            for index, value in enumerate(counts):
                number = _number(value)
                if number is not None:
                    per_partition[index].append(number)
        row_names = row.get("partitions")
        if isinstance(row_names, list) and (names is None or len(row_names) > len(names)):
            names = tuple(str(name) for name in row_names)
    per_layout: dict[tuple[str, ...], list[list[float]]] = defaultdict(list)
    for row in rows:
        counts, row_names = row.get("tokens_per_partition"), row.get("partitions")
        if isinstance(counts, list) and isinstance(row_names, list) and len(counts) == len(row_names):
            values = [_number(v) for v in counts]
            if all(v is not None for v in values):
                per_layout[tuple(str(n) for n in row_names)].append([float(v) for v in values])  # type: ignore[arg-type]
    peaks = [int(v) for v in (_number(row.get("peak_memory_bytes")) for row in rows) if v is not None]
    timings = [v for v in (_number(row.get("prefill_s")) for row in rows) if v is not None]
    spread = _spread(timings)
    return GridPointSummary(
        grid_point=grid_point,
        model=rows[0].get("model") if isinstance(rows[0].get("model"), str) else None,
        config=config,
        label=label,
        budget=budget if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None,
        samples=len(rows),
        errors=sum(1 for row in rows if row.get("error")),
        score=_mean(own_scores),
        scores={metric: sum(values) / len(values) for metric, values in _ordered(metric_values).items()},
        category_scores={
            category: {metric: sum(v) / len(v) for metric, v in _ordered(values).items()}
            for category, values in sorted(category_values.items())
        },
        category_counts=dict(sorted(category_counts.items())),
        visual_tokens=_mean(kept),
        full_visual_tokens=_mean(full),
        keep_ratio=sum(k for k, _ in pairs) / sum(f for _, f in pairs) if pairs else None,
        tokens_per_partition=tuple(sum(per_partition[i]) / len(per_partition[i]) for i in range(len(per_partition)))
        if per_partition
        else None,
        partitions=names,
        prefill_s=_mean(_number(row.get("prefill_s")) for row in rows),
        decode_tokens_per_s=_mean(_number(row.get("decode_tokens_per_s")) for row in rows),
        peak_memory_bytes=max(peaks) if peaks else None,
        prefill_flops=_mean(_number(row.get("prefill_flops")) for row in rows),
        settings=rows[0].get("settings") if isinstance(rows[0].get("settings"), Mapping) else None,
        **spread,
        tokens_per_layout={
            layout: tuple(sum(column) / len(column) for column in zip(*values))
            for layout, values in sorted(per_layout.items(), key=lambda item: (-len(item[1]), item[0]))
        },
        layout_counts={layout: len(values) for layout, values in per_layout.items()},
    )


def _spread(timings: Sequence[float]) -> dict[str, Any]:
    if not timings:
        return {}
    ordered = sorted(timings)
    cuts = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 9
    mean = statistics.fmean(ordered)
    cv = statistics.pstdev(ordered) / mean if len(ordered) > 1 and mean > 0 else None
    return {
        "prefill_s_median": statistics.median(ordered),
        "prefill_s_p10": cuts[0],
        "prefill_s_p90": cuts[-1],
        "prefill_s_cv": cv,
        "timing_noisy": cv is not None and cv > NOISY_TIMING_CV,
    }


def _ordered(values: Mapping[str, Any]) -> dict[str, Any]:
    order = {name: i for i, name in enumerate(("score", *_PREFERRED_METRICS))}
    return {k: values[k] for k in sorted(values, key=lambda k: (order.get(k, len(order)), k))}


def _metrics_of(summaries: Sequence[GridPointSummary]) -> list[str]:
    names = {metric for s in summaries for metric in s.scores}
    return list(_ordered({name: None for name in names}))


# ---------------------------------------------------------------- Pareto front
def pareto_front(costs: Sequence[float], qualities: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (lower cost and higher quality are better), by cost.

    A point is dominated when another is no worse in both and better in one. Of identical
    points the first (lowest index) is kept.
    """
    if len(costs) != len(qualities):
        raise ConfigError(f"pareto_front: {len(costs)} costs but {len(qualities)} qualities")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -qualities[i], i))
    front: list[int] = []
    best = -math.inf
    for index in order:
        if qualities[index] > best:
            front.append(index)
            best = qualities[index]
    return front


# ---------------------------------------------------------------- rendering
def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("visual_tokens", "tokens kept"),
    ("keep_ratio", "kept %"),
    ("prefill_s", "prefill ms"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("peak_memory_bytes", "peak MiB"),
    ("prefill_flops", "prefill TFLOPs"),
)


def _efficiency_cells(summary: GridPointSummary) -> list[str]:
    return [
        _fmt(summary.visual_tokens),
        _fmt(summary.keep_ratio, 1, 100.0),
        _fmt(summary.prefill_s, 1, 1000.0) + (" ⚠" if summary.timing_noisy else ""),
        _fmt(summary.decode_tokens_per_s),
        _fmt(None if summary.peak_memory_bytes is None else float(summary.peak_memory_bytes), 0, 1 / 2**20),
        _fmt(summary.prefill_flops, 2, 1e-12),
    ]


def _markdown(header: list[str], body: list[list[str]], numeric_from: int) -> str:
    align = ["---" if i < numeric_from else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_markdown(summaries: Sequence[GridPointSummary], metrics: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per grid point, scores in percent, efficiency columns.

    Columns without any value across all rows are left out.
    """
    metrics = list(metrics) if metrics is not None else _metrics_of(summaries)
    with_score = any(s.score is not None for s in summaries)
    with_model = len({s.model for s in summaries}) > 1
    header = ["strategy", "budget", *(["model"] if with_model else []), "n"]
    numeric_from = len(header) - 1
    header += (["score %"] if with_score else []) + [f"{m} %" for m in metrics]
    body: list[list[str]] = []
    for s in summaries:
        row = [s.label, s.budget_label, *([s.model or "–"] if with_model else [])]
        row.append(str(s.samples) + (f" ({s.errors} failed)" if s.errors else ""))
        row += ([_fmt(s.score, 1, 100.0)] if with_score else []) + [_fmt(s.scores.get(m), 1, 100.0) for m in metrics]
        body.append(row)
    efficiency = [_efficiency_cells(s) for s in summaries]
    keep = [i for i in range(len(_COLUMNS)) if any(cells[i] != "–" for cells in efficiency)]
    header += [_COLUMNS[i][1] for i in keep]
    for row, cells in zip(body, efficiency):
        row += [cells[i] for i in keep]
    text = _markdown(header, body, numeric_from)
    if any(s.timing_noisy for s in summaries):
        text += (
            f"\n⚠ noisy timing: prefill time varies by more than {NOISY_TIMING_CV:.0%} (std/mean) across the "
            "samples of this grid point (a busy or shared machine?); compare it with care, or rerun on an idle "
            "machine. The spread (p10, p90, std/mean) is in summary.csv and summary.json.\n"
        )
    return text


def category_table(summaries: Sequence[GridPointSummary], metric: str | None = None) -> str:
    """A Markdown table of one metric per category (percent); default: ``score`` if present."""
    if metric is None:
        metric = "score" if any(s.score is not None for s in summaries) else (_metrics_of(summaries) or ["score"])[0]
    categories = sorted({c for s in summaries for c in s.category_scores})
    if not categories:
        return ""
    header = [
        "strategy",
        "budget",
        *(f"{c} (n={max(s.category_counts.get(c, 0) for s in summaries)})" for c in categories),
    ]
    body = [
        [s.label, s.budget_label, *(_fmt(s.category_scores.get(c, {}).get(metric), 1, 100.0) for c in categories)]
        for s in summaries
    ]
    return f"{metric} % per category\n\n" + _markdown(header, body, 2)


def to_csv(summaries: Sequence[GridPointSummary], path: str | os.PathLike[str] | None = None) -> str:
    """CSV with raw numbers (scores in [0, 1], seconds, bytes); written to ``path`` if given."""
    metrics = _metrics_of(summaries)
    categories = sorted({(c, m) for s in summaries for c, values in s.category_scores.items() for m in values})
    category_names = sorted({c for s in summaries for c in s.category_counts})
    fields = [
        "grid_point", "model", "strategy", "budget", "samples", "errors", "score",
        *metrics,
        "visual_tokens", "full_visual_tokens", "keep_ratio", "tokens_per_partition",
        "prefill_s", "decode_tokens_per_s", "peak_memory_bytes", "prefill_flops",
        "prefill_s_median", "prefill_s_p10", "prefill_s_p90", "prefill_s_cv", "timing_noisy",
        *(f"{c}/{m}" for c, m in categories),
        *(f"{c}/n" for c in category_names),
        "config", "settings",
    ]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for s in summaries:

        def cell(value: object) -> object:
            return "" if value is None else value

        writer.writerow(
            [
                s.grid_point, cell(s.model), s.label, cell(s.budget), s.samples, s.errors, cell(s.score),
                *(cell(s.scores.get(m)) for m in metrics),
                cell(s.visual_tokens), cell(s.full_visual_tokens), cell(s.keep_ratio),
                "" if s.tokens_per_partition is None else " ".join(f"{v:g}" for v in s.tokens_per_partition),
                cell(s.prefill_s), cell(s.decode_tokens_per_s), cell(s.peak_memory_bytes), cell(s.prefill_flops),
                cell(s.prefill_s_median), cell(s.prefill_s_p10), cell(s.prefill_s_p90), cell(s.prefill_s_cv),
                int(s.timing_noisy),
                *(cell(s.category_scores.get(c, {}).get(m)) for c, m in categories),
                *(s.category_counts.get(c, 0) for c in category_names),
                "" if s.config is None else json.dumps(s.config, sort_keys=True),
                "" if s.settings is None else json.dumps(s.settings, sort_keys=True, default=str),
            ]
        )  # fmt: skip
    text = buffer.getvalue()
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def summary_records(summaries: Sequence[GridPointSummary]) -> list[dict[str, Any]]:
    """The summaries as plain JSON data (what ``summary.json`` holds), one dict per grid
    point: every :class:`GridPointSummary` field, ``budget_label``, and the per-category
    table as ``categories: {name: {"n": count, metric: mean, ...}}``; layouts are keyed by
    their partition names joined with ``" | "``."""
    records = []
    for s in summaries:
        record = asdict(s)
        record["budget_label"] = s.budget_label
        record["categories"] = {
            c: {"n": s.category_counts.get(c, 0), **s.category_scores.get(c, {})}
            for c in sorted(set(s.category_counts) | set(s.category_scores))
        }
        for name in ("tokens_per_layout", "layout_counts"):
            record[name] = {" | ".join(layout): value for layout, value in getattr(s, name).items()}
        records.append(json.loads(json.dumps(record, default=str)))
    return records


def write_report(
    rows: Iterable[Mapping[str, Any]] | str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    metric: str | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv``, ``summary.json`` and (with ``plots``) the PNG plots.

    Returns the written paths by name. Plots whose data are absent (e.g. no ``prefill_s``)
    are skipped.
    """
    from . import plots as plotting

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    summaries = summarize(rows)
    if not summaries:
        raise ConfigError("write_report: there are no result rows to summarise")
    written: dict[str, Path] = {}
    markdown = "# Results\n\n" + to_markdown(summaries)
    categories = category_table(summaries, metric)
    if categories:
        markdown += "\n" + categories
    (folder / "summary.md").write_text(markdown, encoding="utf-8")
    written["markdown"] = folder / "summary.md"
    written["csv"] = folder / "summary.csv"
    to_csv(summaries, written["csv"])
    written["json"] = folder / "summary.json"
    written["json"].write_text(json.dumps(summary_records(summaries), indent=2), encoding="utf-8")
    if plots:
        makers = {
            "accuracy_vs_budget": plotting.plot_accuracy_vs_budget,
            "tokens_per_partition": plotting.plot_tokens_per_partition,
            "pareto": plotting.plot_pareto,
        }
        for name, maker in makers.items():
            try:
                written[name] = maker(
                    summaries, folder / f"{name}.png", **({"metric": metric} if name != "tokens_per_partition" else {})
                )
            except plotting.NothingToPlot:
                continue
    return written
