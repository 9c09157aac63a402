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
- :meth:`ResultsStore.done_keys` lists what finished without an ``error``, so a restart
  skips it and re-attempts failed rows (:meth:`ResultsStore.failed_keys`).
- A key written twice (a failed row, then its retry) resolves to the newer row
  (:func:`newest_rows`): the later ``finished_at`` when both rows carry one, else the later
  line of the same file, else the first source.
- One writer per file: opening a store takes an exclusive lock (``.NAME.lock`` beside it,
  released by the kernel when the process dies, even by SIGKILL); a second writer gets
  :class:`StoreBusyError` naming the holder's pid and host.
- Each rank appends to its own ``results.rank{r}.jsonl`` (:func:`shard_path`);
  :func:`merge` writes ``results.jsonl`` with every key exactly once, sorted by key,
  atomically (temporary file + rename). The shards are the truth: a previous
  ``results.jsonl`` contributes only rows of ranks whose shard file is gone.

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
      "finished_at": float | null,   # unix time the row was made; the newer row of a key wins
      "settings": {...} | null,      # run settings beside the pipeline (prompt, generation, ...)
      "error": str | null            # set when the sample failed; scores then empty
    }

:class:`ResultRow` builds such a row with typed fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    "StoreBusyError",
    "TruncatedLineWarning",
    "find_shards",
    "grid_point_id",
    "merge",
    "newest_rows",
    "read_rows",
    "row_key",
    "shard_path",
]

RowKey = tuple[str, str]
_SHARD_NAME = re.compile(r"results\.rank(\d+)\.jsonl")


class ResultsError(TokenpruneError, ValueError):
    """A results file is corrupt (not just truncated by a kill), or a row is malformed."""


class StoreBusyError(TokenpruneError, RuntimeError):
    """Another live process is writing the same results file (two sweeps on one folder)."""


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
    finished_at: float | None = None
    settings: dict[str, Any] | None = None
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


def _finished_at(row: Mapping[str, Any]) -> float | None:
    value = row.get("finished_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _is_newer(candidate: Mapping[str, Any], current: Mapping[str, Any], *, same_file: bool) -> bool:
    """Whether ``candidate`` (read after ``current``) supersedes it."""
    new, old = _finished_at(candidate), _finished_at(current)
    if new is not None and old is not None:
        return new >= old
    return same_file  # an append-only file: a later line is a later write


def newest_rows(rows: Iterable[Mapping[str, Any]], *, one_file: bool = False) -> dict[RowKey, Mapping[str, Any]]:
    """The newest row of each key, in first-seen key order.

    Of two rows with the same key the one with the later ``finished_at`` wins (a resumed
    sweep retries a failed row and appends the retry). Without both timestamps the later
    row wins when ``one_file`` (the rows are one append-only file, in order), else the
    first.
    """
    newest: dict[RowKey, Mapping[str, Any]] = {}
    for row in rows:
        key = row_key(row)
        current = newest.get(key)
        if current is None or _is_newer(row, current, same_file=one_file):
            newest[key] = row
    return newest


def _iter_keys(rows: Iterable[Mapping[str, Any]]) -> Iterator[RowKey]:
    for row in rows:
        yield row_key(row)


# ---------------------------------------------------------------- one writer per file
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


class _WriterLock:
    """An exclusive lock on ``.NAME.lock`` beside a results file, holding the writer's pid.

    ``flock`` is released by the kernel when its holder dies (SIGKILL included), so a killed
    sweep never leaves a stuck lock. Where ``flock`` is unavailable the pid in the file is
    checked instead (a lock of a dead pid on this host is stale).
    """

    def __init__(self, target: Path) -> None:
        self.path = target.with_name(f".{target.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = self._holder(fd)
            if not self._lock(fd, holder):
                where = (
                    f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
                    if holder
                    else "another process"
                )
                raise StoreBusyError(
                    f"{self.path.with_name(self.path.name[1:-5])} is being written by another sweep ({where}); "
                    "wait for it to finish, or give this run another output folder"
                )
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _lock(fd: int, holder: Mapping[str, Any]) -> bool:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except (ImportError, OSError):  # no flock here (Windows, some network filesystems): check the pid
            pid = holder.get("pid")
            return not (
                isinstance(pid, int) and holder.get("host") == socket.gethostname() and _process_alive(pid)
            )

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # no holder: a reader of the file sees it free
            except OSError:
                pass
            os.close(self._fd)  # drops the flock
            self._fd = None


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
    One writer per file: the constructor takes an exclusive lock (:class:`StoreBusyError`
    when another live process holds it), :meth:`close` releases it; give each rank its
    own file (:meth:`for_rank`).

    A key whose newest row has an ``error`` is not done (:meth:`failed_keys`): a restart
    re-attempts it and the retry, appended later, supersedes the failed row.

    >>> with ResultsStore.for_rank("runs/sweep1", rank=0) as store:   # doctest: +SKIP
    ...     if (grid_point, sample.id) not in store.done_keys():
    ...         store.append(row)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: set[RowKey] = set()
        self._failed: set[RowKey] = set()
        self._fd: int | None = None
        self._lock = _WriterLock(self.path)
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
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
            for key, row in newest_rows(rows, one_file=True).items():
                self._note(key, row)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _note(self, key: RowKey, row: Mapping[str, Any]) -> None:
        if row.get("error"):
            self._failed.add(key)
            self._done.discard(key)
        else:
            self._done.add(key)
            self._failed.discard(key)

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
        self._note(key, row)

    def done_keys(self) -> frozenset[RowKey]:
        """Keys whose newest row (read at opening or appended since) has no ``error``."""
        return frozenset(self._done)

    def failed_keys(self) -> frozenset[RowKey]:
        """Keys whose newest row has an ``error``: a resumed sweep re-attempts them."""
        return frozenset(self._failed)

    def is_done(self, grid_point: str, sample_id: str, *, include_failed: bool = False) -> bool:
        """Whether the key finished without error (or at all, with ``include_failed``)."""
        key = (grid_point, sample_id)
        return key in self._done or (include_failed and key in self._failed)

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row in the file, in order."""
        return read_rows(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r}, done={len(self._done)}, failed={len(self._failed)})"


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
            merged. The shards are the truth: an existing ``results.jsonl`` there adds only
            rows of ranks whose shard file is gone, so a row deleted from a shard (or
            superseded there by a retry) never comes back from an old merge. Merging again
            after more work is safe.
        output: the merged file (default: ``results.jsonl`` beside the sources).

    Of the rows of one key the newest wins: the later ``finished_at`` when both carry one,
    else the later line of the same file, else the first source (sources in the given
    order). Rows are written sorted by key. The output is written to a temporary file,
    fsynced and renamed over ``output``, so it is either the old or the new file, never
    half of one.
    """
    keep_previous: Callable[[Mapping[str, Any]], bool] | None = None
    if isinstance(sources, (str, os.PathLike)):
        folder = Path(sources)
        if not folder.is_dir():
            raise ConfigError(f"merge: {folder} is not a directory; pass a list of files instead")
        files = find_shards(folder)
        previous = folder / "results.jsonl"
        if previous.exists():
            ranks = {int(_SHARD_NAME.fullmatch(f.name).group(1)) for f in files}  # type: ignore[union-attr]

            def keep_previous(row: Mapping[str, Any]) -> bool:
                rank = row.get("rank", 0)
                return not (isinstance(rank, int) and rank in ranks)

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
    merged: dict[RowKey, Mapping[str, Any]] = {}
    duplicates = 0
    for index, file in enumerate(files):
        rows = read_rows(file)
        if index == 0 and keep_previous is not None:
            rows = [row for row in rows if keep_previous(row)]
        for key, row in newest_rows(rows, one_file=True).items():
            current = merged.get(key)
            if current is not None:
                duplicates += 1
                if not _is_newer(row, current, same_file=False):
                    continue
            merged[key] = row
        duplicates += len(rows) - len({row_key(row) for row in rows})
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
