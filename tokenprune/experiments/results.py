"""Append-only JSONL results that survive kills, restarts and multi-rank runs.

One row per (grid point, sample). A grid point is one pipeline configuration on one model;
its id is a hash of both (:func:`grid_point_id`), so a row's key
``(grid_point, sample_id)`` is stable across runs and machines.

- :meth:`ResultsStore.append` writes one line, flushes and ``fsync``s it: a row that
  ``append`` returned from is on disk.
- A kill can leave a truncated last line. Reading reports it (a
  :class:`TruncatedLineWarning`) and ignores it; opening a store for appending cuts it off
  first, so new rows never glue onto a broken one. A malformed line that is *not* the last
  one is real corruption and raises :class:`ResultsError`.
- :meth:`ResultsStore.done_keys` lists what is finished, so a restart skips it.
- Each rank appends to its own ``results.rank{r}.jsonl`` (:func:`shard_path`);
  :func:`merge` writes ``results.jsonl`` with every key exactly once (first row wins),
  sorted by key, atomically (temporary file + rename).

Row schema (one JSON object per line; only ``grid_point`` and ``sample_id`` are required,
every other field may be absent or ``null``)::

    {
      "grid_point": str,             # grid_point_id(config, model)
      "model": str,                  # model id, e.g. "llava-hf/llava-v1.6-vicuna-7b-hf"
      "config": {...},               # Pipeline.to_dict(): adapter, allocator, selector, budget
      "sample_id": str,
      "category": str | null,
      "question": str,
      "prediction": str,
      "answers": [str, ...],
      "scores": {"vqa_accuracy": float, "exact_match": float, ...},
      "visual_tokens": int,          # visual tokens given to the LLM (kept, incl. extra tokens)
      "full_visual_tokens": int,     # visual tokens without pruning
      "tokens_per_partition": [int, ...],   # kept per partition, thumbnail first
      "partitions": [str, ...],      # partition names (ImageStats.partitions)
      "prefill_s": float,            # time to first token (vision + prefill), seconds
      "decode_tokens_per_s": float,
      "new_tokens": int,
      "peak_memory_bytes": int | null,
      "prefill_flops": int | null,   # analytic LLM prefill FLOPs (tokenprune.cost)
      "rank": int,
      "error": str | null            # set when the sample failed; scores then empty
    }

:class:`ResultRow` builds such a row with typed fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import ConfigError, TokenpruneError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "MergeReport",
    "ResultRow",
    "ResultsError",
    "ResultsStore",
    "TruncatedLineWarning",
    "find_shards",
    "grid_point_id",
    "merge",
    "read_rows",
    "row_key",
    "shard_path",
]

RowKey = tuple[str, str]
_SHARD_NAME = re.compile(r"results\.rank(\d+)\.jsonl")


class ResultsError(TokenpruneError, ValueError):
    """A results file is corrupt (not just truncated by a kill), or a row is malformed."""


class TruncatedLineWarning(UserWarning):
    """A results file ends in an incomplete line (a writer was killed); the line is ignored."""


# ---------------------------------------------------------------- keys
def _canonical_json(value: object, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{what} must be plain JSON data (dicts, lists, str, finite numbers, bools, None): {error}"
        ) from None


def grid_point_id(config: Mapping[str, Any] | Any, model: str) -> str:
    """Stable 16-hex-digit id of a pipeline config on a model.

    ``config`` is a :class:`~tokenprune.Pipeline` or its ``to_dict()``. The id hashes the
    canonical JSON (sorted keys, no spaces) of ``{"config": ..., "model": ...}``, so key
    order and object identity do not matter; ``0.2`` and ``1`` stay distinct from ``0.20001``
    and ``1.0`` (a float budget is a fraction, an int a token count).
    """
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a Pipeline or a mapping, got {type(config).__name__}")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be a non-empty str (e.g. the checkpoint name), got {model!r}")
    text = _canonical_json({"config": config, "model": model}, "the pipeline config")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def row_key(row: Mapping[str, Any]) -> RowKey:
    """``(grid_point, sample_id)`` of a row; :class:`ResultsError` if either is missing."""
    grid_point, sample_id = row.get("grid_point"), row.get("sample_id")
    if not isinstance(grid_point, str) or not grid_point or not isinstance(sample_id, str) or not sample_id:
        raise ResultsError(
            f"a result row needs non-empty str 'grid_point' and 'sample_id', got "
            f"grid_point={grid_point!r}, sample_id={sample_id!r}"
        )
    return grid_point, sample_id


@dataclass
class ResultRow:
    """A result row with typed fields; :meth:`to_dict` gives what :meth:`ResultsStore.append` takes."""

    grid_point: str
    sample_id: str
    model: str | None = None
    config: dict[str, Any] | None = None
    category: str | None = None
    question: str | None = None
    prediction: str | None = None
    answers: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    visual_tokens: int | None = None
    full_visual_tokens: int | None = None
    tokens_per_partition: list[int] | None = None
    partitions: list[str] | None = None
    prefill_s: float | None = None
    decode_tokens_per_s: float | None = None
    new_tokens: int | None = None
    peak_memory_bytes: int | None = None
    prefill_flops: int | None = None
    rank: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- reading
def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _scan(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """Rows and the byte offset where a truncated tail starts (None when the file is whole)."""
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    offset = 0
    number = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        complete = end != -1
        line = data[offset:end] if complete else data[offset:]
        number += 1
        if line.strip():
            row = _parse(line)
            if row is None or not _has_key(row):
                if not complete:  # only a tail without its newline can be a killed write
                    return rows, offset
                raise ResultsError(
                    f"{path}:{number}: corrupt row in the middle of the file (not a truncated last line): {line[:80]!r}"
                )
            rows.append(row)
        if not complete:
            # A whole row that lost only its newline: keep it, but the tail needs a newline.
            return rows, None
        offset = end + 1
    return rows, None


def _has_key(row: Mapping[str, Any]) -> bool:
    try:
        row_key(row)
    except ResultsError:
        return False
    return True


def _warn_truncated(path: Path, offset: int, size: int, action: str) -> None:
    warnings.warn(
        f"{path}: ignoring a truncated last line ({size - offset} bytes at byte {offset}; a writer "
        f"was probably killed mid-row){action}",
        TruncatedLineWarning,
        stacklevel=3,
    )


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete rows of a results file, in file order (duplicates included).

    A truncated last line is reported with a :class:`TruncatedLineWarning` and skipped; a
    missing file reads as empty.
    """
    file = Path(path)
    if not file.exists():
        return []
    rows, truncated_at = _scan(file)
    if truncated_at is not None:
        _warn_truncated(file, truncated_at, file.stat().st_size, "")
    return rows


def _iter_keys(rows: Iterable[Mapping[str, Any]]) -> Iterator[RowKey]:
    for row in rows:
        yield row_key(row)


# ---------------------------------------------------------------- writing
def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a regular file may take fewer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ResultsStore:
    """An append-only JSONL results file.

    Opening it (the constructor) repairs a truncated tail left by a killed writer: the
    broken bytes are cut off (with a :class:`TruncatedLineWarning`), a complete last row
    that only lost its newline gets one. Then every :meth:`append` is durable on return.
    One writer per file: give each rank its own file (:meth:`for_rank`).

    >>> with ResultsStore.for_rank("runs/sweep1", rank=0) as store:   # doctest: +SKIP
    ...     if (grid_point, sample.id) not in store.done_keys():
    ...         store.append(row)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: set[RowKey] = set()
        if self.path.exists():
            rows, truncated_at = _scan(self.path)
            size = self.path.stat().st_size
            if truncated_at is not None:
                _warn_truncated(self.path, truncated_at, size, "; cutting it off before appending")
                with self.path.open("r+b") as handle:
                    handle.truncate(truncated_at)
                    handle.flush()
                    os.fsync(handle.fileno())
            elif size and not self._ends_with_newline():
                with self.path.open("ab") as handle:
                    handle.write(b"\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            self._done.update(_iter_keys(rows))
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def for_rank(cls, directory: str | os.PathLike[str], rank: int) -> ResultsStore:
        """The store of one rank: ``directory/results.rank{rank}.jsonl``."""
        return cls(shard_path(directory, rank))

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def append(self, row: Mapping[str, Any] | ResultRow) -> None:
        """Write one row as one line, flushed and fsynced before returning."""
        if self._fd is None:
            raise ResultsError(f"{self.path}: the store is closed")
        if isinstance(row, ResultRow):
            row = row.to_dict()
        if not isinstance(row, Mapping):
            raise ResultsError(f"a result row must be a mapping or a ResultRow, got {type(row).__name__}")
        key = row_key(row)
        scores = row.get("scores")
        if scores is not None and (not isinstance(scores, Mapping) or not all(isinstance(k, str) for k in scores)):
            raise ResultsError(f"row {key}: 'scores' must map metric names to numbers, got {scores!r}")
        try:
            line = json.dumps(dict(row), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            raise ResultsError(
                f"row {key} is not plain JSON data (dicts, lists, str, finite numbers, bools, None): {error}"
            ) from None
        _write_all(self._fd, (line + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self._done.add(key)

    def done_keys(self) -> frozenset[RowKey]:
        """Keys of every row in the file (those read at opening plus those appended since)."""
        return frozenset(self._done)

    def is_done(self, grid_point: str, sample_id: str) -> bool:
        return (grid_point, sample_id) in self._done

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row in the file, in order."""
        return read_rows(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r}, rows={len(self._done)})"


# ---------------------------------------------------------------- shards and merge
def shard_path(directory: str | os.PathLike[str], rank: int) -> Path:
    """``directory/results.rank{rank}.jsonl``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"rank must be an int >= 0, got {rank!r}")
    return Path(directory) / f"results.rank{rank}.jsonl"


def find_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``results.rank{r}.jsonl`` files in ``directory``, by rank."""
    folder = Path(directory)
    found = []
    for path in folder.glob("results.rank*.jsonl"):
        match = _SHARD_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge` did."""

    output: Path
    rows: int
    duplicates: int
    sources: tuple[Path, ...]


def merge(
    sources: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
) -> MergeReport:
    """Merge result files into one with every key exactly once.

    Args:
        sources: result files, or a directory whose ``results.rank*.jsonl`` shards are
            merged (an existing ``results.jsonl`` there is merged in too, so merging again
            after more work is safe).
        output: the merged file (default: ``results.jsonl`` beside the sources).

    The first row of each key wins (sources in the given order, rows in file order); rows
    are written sorted by key. The output is written to a temporary file, fsynced and
    renamed over ``output``, so it is either the old or the new file, never half of one.
    """
    if isinstance(sources, (str, os.PathLike)):
        folder = Path(sources)
        if not folder.is_dir():
            raise ConfigError(f"merge: {folder} is not a directory; pass a list of files instead")
        files = find_shards(folder)
        previous = folder / "results.jsonl"
        if previous.exists():
            files = [previous, *files]
        target = Path(output) if output is not None else previous
    else:
        files = [Path(s) for s in sources]
        if output is None:
            if not files:
                raise ConfigError("merge: no sources and no output given")
            output = files[0].parent / "results.jsonl"
        target = Path(output)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"merge: missing result file(s): {', '.join(missing)}")
    merged: dict[RowKey, dict[str, Any]] = {}
    duplicates = 0
    for file in files:
        for row in read_rows(file):
            key = row_key(row)
            if key in merged:
                duplicates += 1
                continue
            merged[key] = row
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        _write_rows(handle, (merged[key] for key in sorted(merged)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    _fsync_directory(target.parent)
    return MergeReport(output=target, rows=len(merged), duplicates=duplicates, sources=tuple(files))


def _write_rows(handle: IO[str], rows: Iterable[Mapping[str, Any]]) -> None:
    for row in rows:
        handle.write(json.dumps(dict(row), ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
