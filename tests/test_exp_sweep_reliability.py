"""Sweeps a reader can trust: failed rows retried, settings kept apart, limits, per-sample
failures, config errors before the model loads, one writer per folder, bounded rendezvous,
and a progress bar that counts only this run's work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import tokenprune as tp
import tokenprune.tiny
from tokenprune.cli import main
from tokenprune.experiments import ResultsStore, StoreBusyError, merge, read_rows, summarize
from tokenprune.experiments.sweep import RendezvousError, run_sweep

BASE = {"adapter": "llava_next", "allocator": "hired", "selector": "cls_final", "budget": 0.2}


def write_config(folder: Path, **changes: object) -> Path:
    config = {
        "name": "t", "model": "builtin", "dataset": "sample", "output": "out",
        "generation": {"max_new_tokens": 1}, "base": BASE, "grid": {"budget": [0.2]},
    }  # fmt: skip
    config.update(changes)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_dataset(folder: Path, sizes: dict[str, tuple[int, int] | None]) -> Path:
    """A JSONL dataset; a size of None writes a file that is not an image."""
    lines = []
    for name, size in sizes.items():
        image = folder / f"{name}.png"
        if size is None:
            image.write_bytes(b"not a picture")
        else:
            Image.new("RGB", size, (200, 40, 40)).save(image)
        lines.append(json.dumps({"id": name, "image": image.name, "question": "Which colour?", "answers": ["red"]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- 11.2 failed rows
def test_failed_rows_are_retried_on_resume_and_the_retry_wins(tmp_path):
    write_dataset(tmp_path, {"broken": None})
    path = write_config(tmp_path, dataset="data.jsonl")
    first = run_sweep(path, show_progress=False, plots=False)
    assert (first.ran, first.failed) == (0, 1)
    kept = run_sweep(path, show_progress=False, plots=False, retry_failed=False)
    assert (kept.ran, kept.skipped, kept.failed) == (0, 1, 0)
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "broken.png")  # the user fixes the file
    second = run_sweep(path, show_progress=False, plots=False)
    assert (second.ran, second.skipped, second.failed) == (1, 0, 0)
    merged = read_rows(tmp_path / "out" / "results.jsonl")
    assert len(merged) == 1 and merged[0]["error"] is None and merged[0]["prediction"] is not None
    assert [s.errors for s in summarize(tmp_path / "out" / "results.jsonl")] == [0]
    assert [s.errors for s in summarize(tmp_path / "out" / "results.rank0.jsonl")] == [0]  # newest row of the shard


def test_a_row_deleted_from_a_shard_does_not_come_back_from_an_old_merge(tmp_path):
    with ResultsStore.for_rank(tmp_path, 0) as store:
        store.append({"grid_point": "g", "sample_id": "a", "scores": {"exact_match": 1.0}})
        store.append({"grid_point": "g", "sample_id": "b", "scores": {}, "error": "OutOfMemoryError: CUDA"})
    merge(tmp_path)
    assert [s.errors for s in summarize(tmp_path / "results.jsonl")] == [1]
    shard = tmp_path / "results.rank0.jsonl"
    shard.write_text(shard.read_text().splitlines()[0] + "\n")  # the user deletes the error row
    report = merge(tmp_path)
    assert [r["sample_id"] for r in read_rows(report.output)] == ["a"]
    assert [(s.samples, s.errors) for s in summarize(report.output)] == [(1, 0)]


# ---------------------------------------------------------------- 11.3 settings
def test_other_settings_in_one_folder_are_refused_or_labelled(tmp_path):
    path = write_config(tmp_path)
    run_sweep(path, limit=1, show_progress=False, plots=False)
    write_config(tmp_path, prompt="{question} Answer in one word.")
    with pytest.raises(tp.ConfigError, match=r"holds results of other settings \(settings\.prompt: .*--mix-settings"):
        run_sweep(path, limit=1, show_progress=False, plots=False)
    run_sweep(path, limit=1, show_progress=False, plots=False, mix_settings=True)
    labels = [s.label for s in summarize(tmp_path / "out" / "results.jsonl")]
    assert len(labels) == 2 and len(set(labels)) == 2 and all("prompt=" in label for label in labels)
    grid = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert len(grid) == 2 and {entry["settings"]["prompt"] for entry in grid} == {
        "{question} Answer in one word.",
        "{question} " + tp.experiments.SHORT_ANSWER_PROMPT,
    }


# ---------------------------------------------------------------- 11.5 limit
@pytest.mark.parametrize("limit", ["-1", "0"])
def test_a_limit_below_one_is_an_error(tmp_path, capsys, limit):
    assert main(["sweep", str(write_config(tmp_path)), "--limit", limit]) == 2
    assert f"limit must be at least 1 (an int), got {limit}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 11.6 per-sample failures
def test_an_oversized_image_is_a_failed_row_and_resume_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48x48 is fine, 100x100 a "decompression bomb"
    write_dataset(tmp_path, {"small": (30, 30), "huge": (100, 100)})
    path = write_config(tmp_path, dataset="data.jsonl")
    first = run_sweep(path, show_progress=False, plots=False)
    assert (first.ran, first.failed) == (1, 1)
    rows = {r["sample_id"]: r for r in read_rows(tmp_path / "out" / "results.jsonl")}
    assert "decompression bomb" in rows["huge"]["error"] and rows["small"]["error"] is None
    again = run_sweep(path, show_progress=False, plots=False)  # no crash; the failed row is tried again
    assert (again.ran, again.skipped, again.failed) == (0, 1, 1)


# ---------------------------------------------------------------- 11.7 config errors first
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(tokenprune.tiny, "tiny_llava_next", refuse)


CONFIG_ERRORS = {
    "prompt": ({"prompt": "{question} in {lang}"}, "unknown fields ['lang']"),
    "generation_typo": ({"generation": {"max_new_token": 3}}, "Did you mean 'max_new_tokens'"),
    "zero_tokens": ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens must be at least 1"),
    "seed": ({"seed": "abc"}, "seed must be an int, got 'abc'"),
    "dtype": ({"dtype": "float8"}, "dtype='float8' is not understood"),
    "scorer": ({"base": {**BASE, "allocator": "hero"}}, "need prompt relevance; give the adapter a scorer"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_are_one_line_before_the_model_loads(tmp_path, capsys, no_model, case):
    changes, message = CONFIG_ERRORS[case]
    assert main(["sweep", str(write_config(tmp_path, **changes)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_output_and_device_errors_before_the_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "taken").write_text("a file")
    assert main(["sweep", str(write_config(tmp_path, output="taken"))]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["sweep", str(write_config(tmp_path, output="taken/below"))]) == 2
    assert "taken is a file, not a folder" in capsys.readouterr().err
    if not tp.experiments.validate.torch.cuda.is_available():
        assert main(["sweep", str(write_config(tmp_path, device="cuda"))]) == 2
        assert "CUDA is not available on this machine" in capsys.readouterr().err


# ---------------------------------------------------------------- 11.9 one writer, bounded waits
_HOLDER = """
import sys, time
from tokenprune.experiments import ResultsStore
store = ResultsStore.for_rank(sys.argv[1], 0)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_second_sweep_on_a_folder_is_refused_and_a_killed_writers_lock_is_not_stuck(tmp_path):
    path = write_config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(StoreBusyError, match=rf"being written by another sweep \(pid {holder.pid} on "):
            run_sweep(path, limit=1, show_progress=False, plots=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    report = run_sweep(path, limit=1, show_progress=False, plots=False)  # the kill freed the lock
    assert report.ran == 1


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ranks_without_a_peer_get_a_clear_error(tmp_path, monkeypatch, no_model):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    path = write_config(tmp_path, rendezvous_timeout=2)
    with pytest.raises(RendezvousError, match="rank 0 of 2 .* but MASTER_ADDR and MASTER_PORT not set"):
        run_sweep(path, limit=1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(RendezvousError, match="the other ranks did not join .* within 2 s"):
        run_sweep(path, limit=1)


# ---------------------------------------------------------------- 10.6 progress
def test_resumed_progress_bar_counts_only_this_runs_rows(tmp_path, capsys):
    path = write_config(tmp_path, grid={"budget": [0.1, 0.2]})
    assert main(["sweep", str(path), "--limit", "1", "--no-plots", "--no-progress"]) == 0
    write_config(tmp_path, grid={"budget": [0.1, 0.2, 0.3]})
    capsys.readouterr()
    assert main(["sweep", str(path), "--limit", "1", "--no-plots", "--progress"]) == 0
    captured = capsys.readouterr()
    assert "ran 1, skipped 2 already done" in captured.out
    assert "2/3 [" in captured.err and "0/3 [" not in captured.err and "1/3 [" not in captured.err


# ---------------------------------------------------------------- 10.6 docs
def test_docs_name_limit_and_the_example_recommends_a_launch_the_sweep_accepts():
    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "ablations.md").read_text(encoding="utf-8")
    assert "| `--limit N` |" in docs and "--skip-failed" in docs and "--mix-settings" in docs
    launches = [line for line in (root / "examples" / "ablation.yaml").read_text().splitlines() if "accelerate launch" in line]
    assert launches and all("--multi_gpu" in line and "--cpu" not in line for line in launches)
