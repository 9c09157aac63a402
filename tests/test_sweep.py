"""`tokenprune sweep`: grids, results that survive a SIGKILL, sharding under accelerate."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tokenprune as tp
from tokenprune.experiments import read_rows
from tokenprune.experiments.sweep import grid_points, load_config, run_sweep

def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


BASE = {"adapter": "llava_next", "allocator": "hired", "selector": "cls_final", "budget": 0.2}


def write_config(folder: Path, grid, *, name: str = "t", tokens: int = 2, output: str = "out") -> Path:
    import yaml

    path = folder / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "model": "builtin",
                "dataset": "sample",
                "output": output,
                "generation": {"max_new_tokens": tokens},
                "base": BASE,
                "grid": grid,
            }
        )
    )
    return path


def test_grid_points_apply_options_parts_and_budgets(tmp_path):
    config = load_config(
        write_config(
            tmp_path,
            [
                {"allocator.alpha": [0.0, 1.0], "budget": [0.1, 0.2]},
                {"selector": ["spatial", {"name": "cls_final", "final_layer": 11}]},
                {"allocator.alpha": [0.0]},  # duplicate of a point above: runs once
            ],
        )
    )
    points = grid_points(config)
    assert len(points) == 6
    first = tp.Pipeline.from_dict(points[0].config)
    assert first.allocator.alpha == 0.0 and first.budget.value == 0.1
    assert points[4].config["selector"] == {"name": "spatial", "mode": "sample"}
    assert points[5].config["selector"]["final_layer"] == 11
    assert points[0].label() == "allocator.alpha=0.0, budget=0.1"
    assert config.output == (tmp_path / "out").resolve()


def test_config_errors_are_clear_and_early(tmp_path):
    with pytest.raises(tp.ConfigError, match="grid key 'alocator.alpha' must be 'budget', a part"):
        load_config(write_config(tmp_path, {"alocator.alpha": [0.5]}))
    with pytest.raises(tp.ConfigError, match=r"grid point \{'allocator.alpha': 2.0\}: hired: .*alpha"):
        grid_points(load_config(write_config(tmp_path, {"allocator.alpha": [0.5, 2.0]})))
    with pytest.raises(tp.ConfigError, match=r"grid point \{'selector.final_layr': 3\}.*Did you mean 'final_layer'"):
        grid_points(load_config(write_config(tmp_path, {"selector.final_layr": [3]})))
    with pytest.raises(tp.ConfigError, match="needs a non-empty list"):
        load_config(write_config(tmp_path, {"budget": 0.2}))
    with pytest.raises(tp.ConfigError, match=r"unknown keys \['grids'\]"):
        load_config({"base": BASE, "grid": {}, "grids": []})
    toml = tmp_path / "s.toml"
    toml.write_text('model = "builtin"\n[base]\nallocator = "equal"\nselector = "cls_final"\nbudget = 0.5\n[grid]\nbudget = [0.5]\n')
    assert len(grid_points(load_config(toml))) == 1


def test_run_writes_rows_summary_and_plots_then_resumes(tmp_path):
    path = write_config(tmp_path, {"budget": [0.1, 0.3]})
    report = run_sweep(path, limit=2, show_progress=False)
    assert (report.grid_points, report.samples, report.ran, report.skipped, report.failed) == (2, 2, 4, 0, 0)
    rows = read_rows(report.written["results"])
    assert len(rows) == 4 and {r["sample_id"] for r in rows} == {"house", "circle_colour"}
    for row in rows:
        assert row["visual_tokens"] <= row["full_visual_tokens"] and row["prefill_s"] > 0
        assert row["config"]["allocator"]["name"] == "hired" and "exact_match" in row["scores"] or "anls" in row["scores"]
    by_budget = {r["config"]["budget"]: r["visual_tokens"] for r in rows if r["sample_id"] == "house"}
    assert by_budget[0.1] < by_budget[0.3]
    for name in ("markdown", "csv", "accuracy_vs_budget", "tokens_per_partition", "pareto"):
        assert report.written[name].is_file(), name
    again = run_sweep(path, limit=2, show_progress=False)
    assert (again.ran, again.skipped) == (0, 4)


def test_beam_search_runs_and_changed_settings_do_not_reuse_rows(tmp_path):
    import yaml

    path = write_config(tmp_path, {"budget": [0.2]})
    first = run_sweep(path, limit=1, show_progress=False, plots=False)
    assert first.ran == 1
    config = yaml.safe_load(path.read_text())
    config["generation"] = {"max_new_tokens": 2, "num_beams": 2}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(tp.ConfigError, match=r"holds results of other settings \(settings.generation.num_beams: unset -> 2\).*--mix-settings"):
        run_sweep(path, limit=1, show_progress=False, plots=False)
    second = run_sweep(path, limit=1, show_progress=False, plots=False, mix_settings=True)
    assert (second.ran, second.skipped, second.failed) == (1, 0, 0)  # a new key: not reused
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert len(rows) == 2 and sum(r["prefill_s"] is None for r in rows) == 1  # no first-token clock in beam search


def test_cli_prints_progress_and_the_summary(tmp_path, capsys):
    from tokenprune.cli import main

    path = write_config(tmp_path, {"budget": [0.2]})
    assert main(["sweep", str(path), "--limit", "1", "--no-plots", "--progress"]) == 0
    captured = capsys.readouterr()
    assert "1 grid points x 1 samples: ran 1" in captured.out and "| strategy |" in captured.out
    assert "sample" in captured.err  # the tqdm bar (rate, ETA) goes to stderr


def test_a_sweep_killed_with_sigkill_and_restarted_has_every_row_exactly_once(tmp_path):
    # 13 samples x 2 budgets = 26 rows of 12 generated tokens each: long enough that the kill
    # (as soon as 3 rows are on disk) lands mid-run even on a fast, idle machine
    path = write_config(tmp_path, {"budget": [0.1, 0.2]}, tokens=12)
    total = 26
    shard_file = tmp_path / "out" / "results.rank0.jsonl"
    env = {**os.environ, "TOKENPRUNE_PROGRESS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenprune", "sweep", str(path), "--no-plots"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if shard_file.exists() and shard_file.read_bytes().count(b"\n") >= 3:
                break
            if process.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        else:
            pytest.fail("the sweep wrote no rows in time")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    before = shard_file.read_bytes().count(b"\n")
    assert 3 <= before < total
    report = run_sweep(path, show_progress=False, plots=False)
    assert report.skipped >= 3 and report.ran + report.skipped == total
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    keys = collections.Counter((r["grid_point"], r["sample_id"]) for r in rows)
    assert len(keys) == total and set(keys.values()) == {1}


def test_sharded_under_accelerate_with_two_processes(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate is not installed in this environment")
    path = write_config(tmp_path, {"budget": [0.2]})
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "tokenprune", "sweep", str(path), "--limit", "5", "--no-plots",
    ]  # fmt: skip
    env = {**os.environ, "TOKENPRUNE_PROGRESS": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    shards = {rank: read_rows(out / f"results.rank{rank}.jsonl") for rank in (0, 1)}
    assert {r["rank"] for r in shards[0]} == {0} and {r["rank"] for r in shards[1]} == {1}
    ids = [{r["sample_id"] for r in rows} for rows in shards.values()]
    assert ids[0].isdisjoint(ids[1]) and len(ids[0]) == 3 and len(ids[1]) == 2
    merged = read_rows(out / "results.jsonl")
    assert len(merged) == 5 and {r["sample_id"] for r in merged} == ids[0] | ids[1]
    assert json.loads((out / "grid.json").read_text())[0]["overrides"] == {"budget": 0.2}


def test_accelerate_cpu_flag_with_several_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(tp.ConfigError, match="starts a single process.*--multi_gpu"):
        run_sweep(write_config(tmp_path, {"budget": [0.2]}), limit=1)
