"""Crash-safe results: keys, append/resume, truncated tails, merge, and a real SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import tokenprune as tp
from tokenprune import ConfigError
from tokenprune.experiments import (
    ResultRow,
    ResultsError,
    ResultsStore,
    TruncatedLineWarning,
    find_shards,
    grid_point_id,
    merge,
    read_rows,
    shard_path,
)


def _row(grid_point: str, sample_id: str, **extra: object) -> dict[str, object]:
    return {"grid_point": grid_point, "sample_id": sample_id, "scores": {"exact_match": 1.0}, **extra}


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- keys
def test_grid_point_id_hashes_canonical_json() -> None:
    # Canonical form: sorted keys, no spaces; then sha256, first 16 hex digits.
    expected = hashlib.sha256(b'{"config":{"a":1,"b":[1,2]},"model":"m"}').hexdigest()[:16]
    assert grid_point_id({"b": [1, 2], "a": 1}, "m") == expected
    assert grid_point_id({"a": 1, "b": [1, 2]}, "m") == expected
    assert grid_point_id({"a": 1, "b": [1, 2]}, "other") != expected
    assert grid_point_id({"budget": 1}, "m") != grid_point_id({"budget": 1.0}, "m")  # tokens vs fraction


def test_grid_point_id_of_a_pipeline_is_that_of_its_dict() -> None:
    pipe = tp.Pipeline(allocator="equal", selector="cls_final", budget=0.2)
    assert grid_point_id(pipe, "llava") == grid_point_id(pipe.to_dict(), "llava")
    again = tp.Pipeline.from_dict(pipe.to_dict())
    assert grid_point_id(again, "llava") == grid_point_id(pipe, "llava")
    other = tp.Pipeline(allocator="equal", selector="cls_final", budget=0.4)
    assert grid_point_id(other, "llava") != grid_point_id(pipe, "llava")


def test_grid_point_id_errors() -> None:
    with pytest.raises(ConfigError, match="plain JSON"):
        grid_point_id({"x": object()}, "m")
    with pytest.raises(ConfigError, match="plain JSON"):
        grid_point_id({"x": float("nan")}, "m")
    with pytest.raises(ConfigError, match="model"):
        grid_point_id({}, "")


# ---------------------------------------------------------------- append and resume
def test_append_read_done_keys_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.jsonl"
    with ResultsStore(path) as store:
        store.append(_row("g1", "a", prediction="ünïcode"))
        store.append(ResultRow(grid_point="g1", sample_id="b", scores={"anls": 0.5}, visual_tokens=3))
        assert store.done_keys() == {("g1", "a"), ("g1", "b")}
        assert store.is_done("g1", "a") and not store.is_done("g2", "a")
    rows = read_rows(path)
    assert [r["sample_id"] for r in rows] == ["a", "b"]
    assert rows[0]["prediction"] == "ünïcode" and rows[1]["visual_tokens"] == 3 and rows[1]["rank"] == 0
    with ResultsStore(path) as resumed:  # a restart sees what is done
        assert resumed.done_keys() == {("g1", "a"), ("g1", "b")}
        resumed.append(_row("g2", "a"))
    assert len(_lines(path)) == 3


def test_append_rejects_bad_rows(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "r.jsonl")
    with pytest.raises(ResultsError, match="grid_point"):
        store.append({"sample_id": "a"})
    with pytest.raises(ResultsError, match="sample_id"):
        store.append({"grid_point": "g", "sample_id": 3})
    with pytest.raises(ResultsError, match="not plain JSON"):
        store.append(_row("g", "a", prefill_s=float("nan")))
    with pytest.raises(ResultsError, match="scores"):
        store.append({"grid_point": "g", "sample_id": "a", "scores": [1.0]})
    store.close()
    with pytest.raises(ResultsError, match="closed"):
        store.append(_row("g", "a"))
    assert (tmp_path / "r.jsonl").read_bytes() == b""  # nothing half-written


def test_truncated_last_line_is_reported_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultsStore(path) as store:
        store.append(_row("g", "a"))
        store.append(_row("g", "b"))
    whole = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(b'{"grid_point": "g", "sample_id": "c", "pred')  # a writer killed mid-row
    with pytest.warns(TruncatedLineWarning, match="truncated last line"):
        assert [r["sample_id"] for r in read_rows(path)] == ["a", "b"]
    with pytest.warns(TruncatedLineWarning, match="cutting it off"):
        store = ResultsStore(path)
    assert path.read_bytes() == whole
    assert store.done_keys() == {("g", "a"), ("g", "b")}
    store.append(_row("g", "c"))
    store.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["sample_id"] for r in read_rows(path)] == ["a", "b", "c"]


def test_truncated_multibyte_character_is_a_truncated_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(_row("g", "a")).encode() + b"\n" + '{"grid_point": "é'.encode()[:-1])
    with pytest.warns(TruncatedLineWarning):
        assert len(read_rows(path)) == 1


def test_complete_row_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row("g", "a")) + "\n" + json.dumps(_row("g", "b")), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["sample_id"] for r in read_rows(path)] == ["a", "b"]
        with ResultsStore(path) as store:
            assert store.done_keys() == {("g", "a"), ("g", "b")}
            store.append(_row("g", "c"))
    assert [r["sample_id"] for r in _lines(path)] == ["a", "b", "c"]


def test_corruption_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row("g", "a")) + "\n{oops\n" + json.dumps(_row("g", "b")) + "\n", encoding="utf-8")
    with pytest.raises(ResultsError, match=r"r\.jsonl:2: corrupt row in the middle"):
        read_rows(path)
    with pytest.raises(ResultsError, match=":2:"):
        ResultsStore(path)
    path.write_text(json.dumps({"no": "key"}) + "\n", encoding="utf-8")
    with pytest.raises(ResultsError, match=":1:"):
        read_rows(path)


def test_missing_file_reads_empty(tmp_path: Path) -> None:
    assert read_rows(tmp_path / "absent.jsonl") == []


# ---------------------------------------------------------------- shards and merge
def test_merge_deduplicates_sorts_and_is_repeatable(tmp_path: Path) -> None:
    for rank, ids in ((0, ["c", "a"]), (1, ["b", "a"]), (10, ["d"])):
        with ResultsStore.for_rank(tmp_path, rank) as store:
            for sample_id in ids:
                store.append(_row("g", sample_id, rank=rank))
    assert find_shards(tmp_path) == [shard_path(tmp_path, r) for r in (0, 1, 10)]
    report = merge(tmp_path)
    assert report.output == tmp_path / "results.jsonl" and report.rows == 4 and report.duplicates == 1
    merged = _lines(report.output)
    assert [(r["sample_id"], r["rank"]) for r in merged] == [("a", 0), ("b", 1), ("c", 0), ("d", 10)]  # first wins
    assert not list(tmp_path.glob(".results.jsonl.tmp-*"))
    with ResultsStore.for_rank(tmp_path, 1) as store:  # more work after a merge
        store.append(_row("g", "e", rank=1))
    again = merge(tmp_path)
    assert again.rows == 5 and again.sources[0] == tmp_path / "results.jsonl"
    assert [r["sample_id"] for r in _lines(again.output)] == ["a", "b", "c", "d", "e"]


def test_merge_explicit_files_and_errors(tmp_path: Path) -> None:
    first, second = tmp_path / "x.jsonl", tmp_path / "y.jsonl"
    with ResultsStore(first) as store:
        store.append(_row("g", "a", prediction="from x"))
    with ResultsStore(second) as store:
        store.append(_row("g", "a", prediction="from y"))
    report = merge([second, first], tmp_path / "out" / "all.jsonl")
    assert [r["prediction"] for r in _lines(report.output)] == ["from y"]
    with pytest.raises(ConfigError, match="missing result file"):
        merge([tmp_path / "nope.jsonl"], tmp_path / "m.jsonl")
    with pytest.raises(ConfigError, match="rank must be"):
        shard_path(tmp_path, -1)


# ---------------------------------------------------------------- a real kill
_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from tokenprune.experiments import ResultsStore, results, shard

    directory, rank, world_size, samples, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "slow"
    if slow:  # write each row in 16-byte pieces so that a kill lands mid-line
        def slow_write(fd, data):
            for start in range(0, len(data), 16):
                os.write(fd, data[start:start + 16])
                time.sleep(0.002)
        results._write_all = slow_write
    sample_ids = [f"s{i:03d}" for i in range(samples)]
    with ResultsStore.for_rank(directory, rank) as store:
        for sample_id in shard(sample_ids, rank, world_size):
            for grid_point in ("gp_a", "gp_b"):
                if store.is_done(grid_point, sample_id):
                    continue
                store.append({"grid_point": grid_point, "sample_id": sample_id, "rank": rank,
                              "prediction": "p" * 150, "scores": {"exact_match": 1.0}})
    print("finished", flush=True)
    """
)


def _start(script: Path, directory: Path, rank: int, world_size: int, samples: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), str(directory), str(rank), str(world_size), str(samples), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    """Wait for a worker; returns its stderr."""
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "finished" in out, err
    return err


def test_sigkill_mid_row_then_restart_and_merge(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    directory, samples, world_size = tmp_path / "run", 40, 2
    victim = _start(script, directory, 0, world_size, samples, "slow")
    healthy = _start(script, directory, 1, world_size, samples, "fast")
    shard0 = shard_path(directory, 0)
    deadline = time.monotonic() + 45
    killed_mid_line = False
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            data = shard0.read_bytes() if shard0.exists() else b""
            if data.count(b"\n") >= 6 and not data.endswith(b"\n"):
                os.kill(victim.pid, signal.SIGKILL)
                killed_mid_line = True
                break
            time.sleep(0.0005)
    finally:
        if victim.poll() is None and not killed_mid_line:
            victim.kill()
        victim.wait(timeout=30)
    assert killed_mid_line, "the slow writer was never caught mid-row"
    assert victim.returncode == -signal.SIGKILL
    _finish(healthy)

    data = shard0.read_bytes()
    assert not data.endswith(b"\n")  # the kill left half a row
    with pytest.warns(TruncatedLineWarning):
        survivors = read_rows(shard0)
    expected_rank0 = {(g, f"s{i:03d}") for i in range(0, samples, world_size) for g in ("gp_a", "gp_b")}
    assert 6 <= len(survivors) < len(expected_rank0)

    restart_log = _finish(_start(script, directory, 0, world_size, samples, "fast"))
    assert "TruncatedLineWarning" in restart_log and "cutting it off" in restart_log  # reported, then repaired
    report = merge(directory)
    merged = _lines(report.output)
    keys = [(r["grid_point"], r["sample_id"]) for r in merged]
    everything = {(g, f"s{i:03d}") for i in range(samples) for g in ("gp_a", "gp_b")}
    assert len(keys) == len(set(keys)) == len(everything) and set(keys) == everything
    assert report.duplicates == 0
    assert {r["rank"] for r in merged if r["sample_id"] == "s000"} == {0}
    # The survivors were not redone: their rows are still first in the rank-0 file.
    assert [(r["grid_point"], r["sample_id"]) for r in read_rows(shard0)][: len(survivors)] == [
        (r["grid_point"], r["sample_id"]) for r in survivors
    ]


# ---------------------------------------------------------------- progress
def test_progress_is_quiet_unless_a_terminal_or_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from tokenprune.experiments import progress, progress_enabled

    monkeypatch.delenv("TOKENPRUNE_PROGRESS", raising=False)
    stream = io.StringIO()  # not a TTY
    assert list(progress(range(5), stream=stream)) == [0, 1, 2, 3, 4] and stream.getvalue() == ""
    assert list(progress(range(3), stream=stream, force=True, description="sweep", total=10, initial=7)) == [0, 1, 2]
    assert "sweep" in stream.getvalue() and "10/10" in stream.getvalue()  # 7 done before plus 3
    monkeypatch.setenv("TOKENPRUNE_PROGRESS", "1")
    assert progress_enabled(stream=io.StringIO())
    assert not progress_enabled(False)
    monkeypatch.setenv("TOKENPRUNE_PROGRESS", "0")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not progress_enabled(stream=Terminal())
    monkeypatch.delenv("TOKENPRUNE_PROGRESS")
    assert progress_enabled(stream=Terminal()) and not progress_enabled(stream=Terminal(), rank=1)
