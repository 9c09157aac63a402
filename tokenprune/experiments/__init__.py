"""Experiment infrastructure for ablation sweeps.

Datasets (:class:`Sample`, JSONL / ``datasets`` / built-in loaders, :func:`shard`),
answer metrics (:func:`score`: VQA accuracy, exact match, ANLS), a crash-safe append-only
results store (:class:`ResultsStore`, :func:`merge`), summaries (:func:`summarize`,
Markdown/CSV) and PNG plots. A sweep runner builds on these::

    from tokenprune.experiments import ResultsStore, grid_point_id, load_samples, score, shard

    samples = shard(load_samples("sample"), rank, world_size)
    with ResultsStore.for_rank("runs/sweep", rank) as store:
        for sample in samples:
            if store.is_done(grid_point, sample.id):
                continue
            ...
            store.append({"grid_point": grid_point, "sample_id": sample.id, ...})

Heavy libraries (PIL, matplotlib, ``datasets``, tqdm) are imported only when used.
"""

from __future__ import annotations

from .datasets import (
    SHORT_ANSWER_PROMPT,
    DatasetError,
    ImageLoader,
    Sample,
    load_hf,
    load_jsonl,
    load_samples,
    rank_from_env,
    shard,
)
from .metrics import (
    METRICS,
    anls,
    exact_match,
    normalize_answer,
    register_metric,
    score,
    score_all,
    vqa_accuracy,
)
from .plots import (
    NothingToPlot,
    plot_accuracy_vs_budget,
    plot_pareto,
    plot_tokens_per_partition,
)
from .progress import progress, progress_enabled
from .results import (
    MergeReport,
    ResultRow,
    ResultsError,
    ResultsStore,
    StoreBusyError,
    TruncatedLineWarning,
    find_shards,
    grid_point_id,
    merge,
    newest_rows,
    read_rows,
    row_key,
    shard_path,
)
from .sample_data import SCENE_IDS, render, sample_image, sample_set, write_sample_set
from .summary import (
    GridPointSummary,
    budget_label,
    category_table,
    pareto_front,
    strategy_labels,
    summarize,
    summary_records,
    to_csv,
    to_markdown,
    write_report,
)

__all__ = [
    "METRICS",
    "SCENE_IDS",
    "SHORT_ANSWER_PROMPT",
    "DatasetError",
    "GridPointSummary",
    "ImageLoader",
    "MergeReport",
    "NothingToPlot",
    "ResultRow",
    "ResultsError",
    "ResultsStore",
    "Sample",
    "StoreBusyError",
    "TruncatedLineWarning",
    "anls",
    "budget_label",
    "category_table",
    "exact_match",
    "find_shards",
    "grid_point_id",
    "load_hf",
    "load_jsonl",
    "load_samples",
    "merge",
    "newest_rows",
    "normalize_answer",
    "pareto_front",
    "plot_accuracy_vs_budget",
    "plot_pareto",
    "plot_tokens_per_partition",
    "progress",
    "progress_enabled",
    "rank_from_env",
    "read_rows",
    "register_metric",
    "render",
    "row_key",
    "sample_image",
    "sample_set",
    "score",
    "score_all",
    "shard",
    "shard_path",
    "strategy_labels",
    "summarize",
    "summary_records",
    "to_csv",
    "to_markdown",
    "vqa_accuracy",
    "write_report",
    "write_sample_set",
]
