"""Evaluation samples: the :class:`Sample` record, loaders and sharding.

Three sources, one record type:

- :func:`load_jsonl`: a local JSONL file, one JSON object per line with ``image`` (path
  relative to the file's folder, or absolute), ``question``, ``answers`` (list or one
  string) and optional ``id`` (default: the line number), ``category``, ``metric``. Other
  fields are kept in :attr:`Sample.meta`. Every line is validated up front; an error names
  the file, the line and the field.
- :func:`load_hf`: a Hugging Face ``datasets`` dataset saved with ``save_to_disk``, read
  with ``load_from_disk``; ``columns`` maps our field names to its columns. The image column
  may hold PIL images (an ``Image`` feature), ``{"bytes", "path"}`` dicts or file paths.
  Images are decoded only when a sample's image is loaded.
- :func:`~tokenprune.experiments.sample_set`: the built-in drawn scenes.

:func:`load_samples` picks a loader from a path, ``"sample"`` or a config mapping (what
a sweep config holds). :func:`shard` splits samples across ranks: deterministic, disjoint
and covering.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError, TokenpruneError
from ..runtime import rank_from_env  # re-exported: tokenprune.experiments.rank_from_env
from .metrics import METRICS

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "SHORT_ANSWER_PROMPT",
    "DatasetError",
    "ImageLoader",
    "Sample",
    "load_hf",
    "load_jsonl",
    "load_samples",
    "rank_from_env",
    "shard",
]

ImageLoader = Callable[[], "Image.Image"]

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""The instruction LLaVA's own VQA evaluations append to each question."""


class DatasetError(TokenpruneError, ValueError):
    """A dataset file, row or field is missing or malformed."""


def _answers_tuple(value: object) -> tuple[str, ...] | None:
    """Answers as a non-empty tuple of str, or None when ``value`` is not acceptable."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value:
        answers = []
        for item in value:
            if isinstance(item, Mapping) and isinstance(item.get("answer"), str):
                item = item["answer"]  # VQAv2's {"answer": ..., "answer_id": ...} records
            if not isinstance(item, str):
                return None
            answers.append(item)
        return tuple(answers)
    return None


_ANSWERS_ALLOWED = 'a string, or a non-empty list of strings (or of {"answer": str} records)'


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    Attributes:
        id: unique within its dataset; with the grid point it keys a result row.
        image: a file path, or a zero-argument callable returning a PIL image.
        question: the question text (without any prompt template).
        answers: reference answers. For ``vqa_accuracy`` they are the annotators' answers
            (votes); for ``exact_match`` and ``anls`` they are accepted alternatives.
        category: optional group for per-category summaries.
        metric: optional metric name the sample should be scored with.
        meta: any other fields of the source record (not compared, not hashed).
    """

    id: str
    image: str | os.PathLike[str] | ImageLoader
    question: str
    answers: tuple[str, ...]
    category: str | None = None
    metric: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise DatasetError(f"Sample.id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.image, (str, os.PathLike)) and not callable(self.image):
            raise DatasetError(
                f"sample {self.id!r}: image must be a path or a callable returning a PIL image, "
                f"got {type(self.image).__name__}"
            )
        if not isinstance(self.question, str):
            raise DatasetError(f"sample {self.id!r}: question must be a str, got {type(self.question).__name__}")
        answers = _answers_tuple(self.answers)
        if answers is None:
            raise DatasetError(f"sample {self.id!r}: answers must be {_ANSWERS_ALLOWED}; got {self.answers!r}")
        object.__setattr__(self, "answers", answers)
        if self.category is not None and not isinstance(self.category, str):
            raise DatasetError(f"sample {self.id!r}: category must be a str or None, got {self.category!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise DatasetError(
                f"sample {self.id!r}: unknown metric {self.metric!r}; available: {', '.join(sorted(METRICS))}"
            )

    def load_image(self) -> Image.Image:
        """The image as an RGB PIL image (read from disk or produced by the loader)."""
        from PIL import Image

        if callable(self.image):
            image = self.image()
            if not isinstance(image, Image.Image):
                raise DatasetError(
                    f"sample {self.id!r}: the image loader returned {type(image).__name__}, not a PIL image"
                )
        else:
            try:
                with Image.open(self.image) as opened:
                    image = opened.copy()
            except (OSError, ValueError) as error:
                raise DatasetError(
                    f"sample {self.id!r}: cannot read image {os.fspath(self.image)!r}: {error}"
                ) from None
        return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------- JSONL
_JSONL_FIELDS = ("id", "image", "question", "answers", "category", "metric")


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    metric: str | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Samples from a JSONL file, every line validated before any is returned.

    Args:
        path: the file. Blank lines are skipped.
        image_root: folder that relative image paths start from (default: the file's folder).
        metric: metric for samples whose line names none.
        limit: keep only the first ``limit`` samples.

    Raises:
        DatasetError: naming ``file:line`` and the field, for bad JSON, a missing or
            mistyped field, a missing image file or a duplicate id.
    """
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"{file}: no such JSONL file")
    _check_limit(limit)
    _check_metric(metric)
    root = Path(image_root) if image_root is not None else file.parent
    samples: list[Sample] = []
    first_line_of: dict[str, int] = {}
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            sample = _sample_from_record(record, where, root, default_id=str(number), metric=metric)
            if sample.id in first_line_of:
                raise DatasetError(
                    f"{where}: field 'id': duplicate id {sample.id!r} (first on line {first_line_of[sample.id]})"
                )
            first_line_of[sample.id] = number
            samples.append(sample)
    return samples


def _sample_from_record(
    record: Mapping[str, Any], where: str, root: Path, *, default_id: str, metric: str | None
) -> Sample:
    for name in ("image", "question", "answers"):
        if name not in record:
            raise DatasetError(f"{where}: missing field {name!r} (required: image, question, answers)")
    image = record["image"]
    if not isinstance(image, str) or not image:
        raise DatasetError(f"{where}: field 'image': expected a file path string, got {image!r}")
    image_path = Path(image) if Path(image).is_absolute() else root / image
    if not image_path.is_file():
        raise DatasetError(f"{where}: field 'image': file not found: {image_path}")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: field 'question': expected a non-empty string, got {question!r}")
    answers = _answers_tuple(record["answers"])
    if answers is None:
        raise DatasetError(f"{where}: field 'answers': expected {_ANSWERS_ALLOWED}, got {record['answers']!r}")
    sample_id = record.get("id", default_id)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
        raise DatasetError(f"{where}: field 'id': expected a non-empty string or an int, got {sample_id!r}")
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise DatasetError(f"{where}: field 'category': expected a string or null, got {category!r}")
    sample_metric = record.get("metric", metric)
    if sample_metric is not None and sample_metric not in METRICS:
        raise DatasetError(
            f"{where}: field 'metric': unknown metric {sample_metric!r}; available: {', '.join(sorted(METRICS))}"
        )
    meta = {key: value for key, value in record.items() if key not in _JSONL_FIELDS}
    return Sample(
        id=str(sample_id),
        image=image_path,
        question=question,
        answers=answers,
        category=category,
        metric=sample_metric,
        meta=meta,
    )


# ---------------------------------------------------------------- Hugging Face datasets
_HF_DEFAULT_COLUMNS = {
    "id": "id",
    "image": "image",
    "question": "question",
    "answers": "answers",
    "category": "category",
}
_HF_REQUIRED = ("image", "question", "answers")


class _DatasetImage:
    """Loads (decodes) one row's image on demand; picklable with its dataset."""

    def __init__(self, dataset: Any, index: int, column: str, root: Path) -> None:
        self.dataset, self.index, self.column, self.root = dataset, index, column, root

    def __call__(self) -> Image.Image:
        from PIL import Image

        value = self.dataset[self.index][self.column]
        where = f"row {self.index}, column {self.column!r}"
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, Mapping):
            if value.get("bytes"):
                import io

                return Image.open(io.BytesIO(value["bytes"]))
            value = value.get("path")
        if isinstance(value, str) and value:
            image_path = Path(value) if Path(value).is_absolute() else self.root / value
            if not image_path.is_file():
                raise DatasetError(f"{where}: image file not found: {image_path}")
            with Image.open(image_path) as opened:
                return opened.copy()
        raise DatasetError(f"{where}: expected a PIL image, image bytes or a path, got {type(value).__name__}")

    def __repr__(self) -> str:
        return f"<image of row {self.index}, column {self.column!r}>"


def load_hf(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    metric: str | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Samples from a dataset saved with ``datasets``' ``save_to_disk``.

    Args:
        path: the folder ``save_to_disk`` wrote.
        split: which split of a ``DatasetDict`` (needed when it has more than one).
        columns: our field -> its column, for the fields whose column names differ, e.g.
            ``{"image": "img", "answers": "label", "id": "question_id"}``. Fields: ``id``
            (default: the row index), ``image``, ``question``, ``answers``, ``category``
            (optional), ``metric`` (optional).
        image_root: folder for relative image paths (default: ``path``).
        metric: metric for rows without a metric column.
        limit: keep only the first ``limit`` rows.
    """
    import datasets as hf

    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such dataset folder (expected the output of save_to_disk)")
    _check_limit(limit)
    _check_metric(metric)
    allowed = set(_HF_DEFAULT_COLUMNS) | {"metric"}
    unknown = sorted(set(columns or {}) - allowed)
    if unknown:
        raise ConfigError(f"columns: unknown field(s) {unknown}; fields are {sorted(allowed)}")
    mapping = {**_HF_DEFAULT_COLUMNS, **dict(columns or {})}
    try:
        loaded = hf.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as error:
        raise DatasetError(f"{folder}: not a dataset saved with save_to_disk ({error})") from None
    if isinstance(loaded, hf.DatasetDict):
        splits = sorted(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise DatasetError(f"{folder}: choose a split with split=...; available: {', '.join(splits)}")
        dataset = loaded[split]
    elif split is not None:
        raise DatasetError(f"{folder}: split={split!r} was given but the saved dataset has no splits")
    else:
        dataset = loaded
    present = set(dataset.column_names)
    for name in _HF_REQUIRED:
        if mapping[name] not in present:
            raise DatasetError(
                f"{folder}: no column {mapping[name]!r} for field {name!r}; columns: "
                f"{', '.join(dataset.column_names)} (map it with columns={{{name!r}: 'column'}})"
            )
    for name in ("id", "category", "metric"):
        if name in (columns or {}) and mapping[name] not in present:
            raise DatasetError(
                f"{folder}: no column {mapping[name]!r} for field {name!r}; columns: {', '.join(dataset.column_names)}"
            )
    count = len(dataset) if limit is None else min(limit, len(dataset))
    dataset = dataset.select(range(count)) if count < len(dataset) else dataset
    text_fields = [name for name in ("id", "question", "answers", "category", "metric") if mapping.get(name) in present]
    table = dataset.select_columns([mapping[name] for name in text_fields]).to_dict()
    image_rows = dataset.select_columns([mapping["image"]])
    root = Path(image_root) if image_root is not None else folder
    samples: list[Sample] = []
    first_row_of: dict[str, int] = {}
    for index in range(count):
        where = f"{folder}: row {index}"
        value = {name: table[mapping[name]][index] for name in text_fields}
        sample_id = value.get("id", index)
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
            raise DatasetError(
                f"{where}: field 'id' (column {mapping['id']!r}): expected a string or an int, got {sample_id!r}"
            )
        question = value["question"]
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(
                f"{where}: field 'question' (column {mapping['question']!r}): expected a non-empty string, got {question!r}"
            )
        answers = _answers_tuple(value["answers"])
        if answers is None:
            raise DatasetError(
                f"{where}: field 'answers' (column {mapping['answers']!r}): expected {_ANSWERS_ALLOWED}, got {value['answers']!r}"
            )
        category = value.get("category")
        if category is not None and not isinstance(category, str):
            category = str(category)  # class labels and ints group just as well as text
        sample_metric = value.get("metric") or metric
        if sample_metric is not None and sample_metric not in METRICS:
            raise DatasetError(f"{where}: unknown metric {sample_metric!r}; available: {', '.join(sorted(METRICS))}")
        sample = Sample(
            id=str(sample_id),
            image=_DatasetImage(image_rows, index, mapping["image"], root),
            question=question,
            answers=answers,
            category=category,
            metric=sample_metric,
        )
        if sample.id in first_row_of:
            raise DatasetError(f"{where}: duplicate id {sample.id!r} (first in row {first_row_of[sample.id]})")
        first_row_of[sample.id] = index
        samples.append(sample)
    return samples


# ---------------------------------------------------------------- dispatch and sharding
def load_samples(source: str | os.PathLike[str] | Mapping[str, Any], **options: Any) -> list[Sample]:
    """Samples from a sweep config's ``dataset`` entry.

    ``source`` is ``"sample"`` (the built-in set), a ``.jsonl`` file, a ``save_to_disk``
    folder, or a mapping ``{"kind": "sample" | "jsonl" | "hf", "path": ..., **options}``.
    ``options`` go to the loader (``limit``, ``metric``, ``split``, ``columns``, ...).
    """
    if isinstance(source, Mapping):
        config = dict(source)
        kind = config.pop("kind", None)
        path = config.pop("path", None)
        options = {**config, **options}
        if kind is None:
            if path is None:
                raise ConfigError("a dataset config needs 'kind' ('sample', 'jsonl' or 'hf') or 'path'")
            return load_samples(path, **options)
    else:
        path = source
        text = os.fspath(source)
        kind = "sample" if text in ("sample", "builtin") else None
        if kind is None:
            candidate = Path(text)
            if candidate.suffix == ".jsonl":
                kind = "jsonl"
            elif candidate.is_dir():
                kind = "hf"
            else:
                raise ConfigError(
                    f"dataset {text!r} is not 'sample', a .jsonl file or a folder written by save_to_disk"
                )
    if kind == "sample":
        from .sample_data import sample_set

        limit = options.pop("limit", None)
        if options:
            raise ConfigError(f"the built-in sample set takes only 'limit', got {sorted(options)}")
        _check_limit(limit)
        samples = sample_set()
        return samples if limit is None else samples[:limit]
    if path is None:
        raise ConfigError(f"dataset kind {kind!r} needs a 'path'")
    if kind == "jsonl":
        return load_jsonl(path, **options)
    if kind == "hf":
        return load_hf(path, **options)
    raise ConfigError(f"unknown dataset kind {kind!r}; allowed: 'sample', 'jsonl', 'hf'")


T = TypeVar("T")


def shard(samples: Iterable[T], rank: int, world_size: int) -> list[T]:
    """The items of rank ``rank`` out of ``world_size``: every ``world_size``-th item.

    Deterministic (depends only on order), disjoint across ranks, covering, and balanced
    (shard sizes differ by at most one).
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size - 1}] for world_size {world_size}, got {rank}")
    items: Sequence[T] = samples if isinstance(samples, Sequence) else list(samples)
    return list(items[rank::world_size])


def _check_limit(limit: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be an int >= 0 or None, got {limit!r}")


def _check_metric(metric: object) -> None:
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; available: {', '.join(sorted(METRICS))}")
