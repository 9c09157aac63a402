"""lmms-eval end to end: its own CLI evaluates the plugin on a local task with a tiny saved
LLaVA-NeXT, and the files it writes hold the answers, the token counts and the run.

lmms-eval exits 0 even when an evaluation dies (a missing dependency, a model error), so
every check here reads the results files, never the exit code. One ``lmms-eval --config``
process runs three evaluations one after the other (lmms-eval's imports are paid once): the
plugin at budget 1.0 with row newlines, batch 1 and batch 4, and lmms-eval's own
``llava_hf`` on the same checkpoint. (Pruned token counts are checked against the stock
processor in test_lmms_eval_plugin.py; lmms-eval carries them the same way.)

Nothing touches the network: the task (``tests/lmms_eval_task``) reads a JSONL file and
pictures written at test time, the checkpoint is a folder, and the Hugging Face libraries
run offline with their caches in the test's folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval")

from PIL import Image

from tokenprune.tiny import save_tiny, tiny_llava_next

TASK = "tokenprune_tiny_vqa"
TASK_FOLDER = Path(__file__).parent / "lmms_eval_task"
# Six documents: batch 4 makes one full batch and one of two. Different sizes give
# different LLaVA-NeXT grids; different question lengths make lmms-eval-style sorting reorder them.
PICTURES = [((100, 60), "red"), ((50, 120), "green"), ((80, 80), "blue"), ((120, 40), "yellow"), ((64, 64), "white"), ((90, 70), "black")]
QUESTIONS = [f"What colour is this picture?{' Answer in one word.' * (i % 3)}" for i in range(len(PICTURES))]
PLUGIN = "tokenprune_llava_next"
FULL = "budget=1.0,newline=row"
# run name: (lmms-eval model, extra model_args, batch size)
RUNS = {
    "full_b1": (PLUGIN, FULL, 1),
    "full_b4": (PLUGIN, FULL, 4),
    "stock": ("llava_hf", "", 1),
}
PLUGIN_RUNS = [name for name, (model, _, _) in RUNS.items() if model == PLUGIN]


@dataclass(frozen=True)
class Run:
    results: dict[str, Any]
    samples: list[dict[str, Any]]  # by doc_id

    def answers(self) -> list[str]:
        return [sample["filtered_resps"][0] for sample in self.samples]

    def token_counts(self) -> list[dict[str, Any]]:
        return [sample["token_counts"][0] for sample in self.samples]


@dataclass(frozen=True)
class Evaluation:
    runs: dict[str, Run]
    stats: list[dict[str, Any]]  # the plugin's stats_path lines, all runs
    checkpoint: Path


def picture(doc_id: int) -> Image.Image:
    size, colour = PICTURES[doc_id]
    return Image.new("RGB", size, colour)


def write_documents(folder: Path) -> None:
    with (folder / f"{TASK}.jsonl").open("w") as stream:
        for doc_id, ((_, colour), question) in enumerate(zip(PICTURES, QUESTIONS)):
            picture(doc_id).save(folder / f"picture{doc_id}.png")
            stream.write(json.dumps({"image": f"picture{doc_id}.png", "question": question, "answer": colour}) + "\n")


def decord_stand_in(folder: Path) -> Path | None:
    """lmms-eval's ``llava_hf`` imports decord (for videos) at module level; where decord is not
    installed, a stand-in that refuses any video lets the image path run unchanged."""
    if importlib.util.find_spec("decord") is not None:
        return None
    package = folder / "decord"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "def cpu(index=0):\n    raise NotImplementedError('decord stand-in: no videos in this test')\n\n\n"
        "class VideoReader:\n    def __init__(self, *args, **kwargs):\n"
        "        raise NotImplementedError('decord stand-in: no videos in this test')\n"
    )
    return folder


def lmms_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lmms-eval")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from lmms_eval.cli.dispatch import main; sys.exit(main())"]


def read_run(folder: Path, log: str) -> Run:
    found = sorted(folder.rglob("*_results.json"))
    assert len(found) == 1, f"lmms-eval wrote {len(found)} results files in {folder}; its log ends:\n{log[-4000:]}"
    (samples_file,) = folder.rglob(f"*_samples_{TASK}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return Run(json.loads(found[0].read_text()), sorted(samples, key=lambda s: s["doc_id"]))


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    root = tmp_path_factory.mktemp("lmms_eval_cli")
    checkpoint = root / "checkpoint"
    save_tiny(*tiny_llava_next(seed=0), checkpoint)
    tasks = shutil.copytree(TASK_FOLDER, root / "tasks")
    write_documents(tasks)
    stats_path = root / "stats.jsonl"
    configs = []
    for name, (model, extra, batch_size) in RUNS.items():
        args = f"pretrained={checkpoint},dtype=float32"
        if model == PLUGIN:
            args += f",{extra},stats_path={stats_path}"
        else:
            args += ",device_map=cpu"
        configs.append(
            {
                "model": model,
                "model_args": args,
                "tasks": TASK,
                "include_path": str(tasks),
                "batch_size": batch_size,
                "device": "cpu",
                "output_path": str(root / "out" / name),
                "log_samples": True,
            }
        )
    runs_file = root / "runs.yaml"
    runs_file.write_text(json.dumps(configs, indent=1))  # JSON is YAML
    paths = [str(p) for p in (decord_stand_in(root / "stand_ins"), os.environ.get("PYTHONPATH")) if p]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "HF_HOME": str(root / "hf_home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENPRUNE_PROGRESS": "0",
        # one thread: on a busy 2-core machine, idle threads spin and cost 5x the CPU time
        # (every run uses the same setting, so the comparisons are unaffected)
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [*lmms_eval_command(), "--config", str(runs_file)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = done.stdout + done.stderr
    runs = {name: read_run(root / "out" / name, log) for name in RUNS}
    stats = [json.loads(line) for line in stats_path.read_text().splitlines()]
    return Evaluation(runs, stats, checkpoint)


def without_run_id(counts: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in counts.items() if key != "run_id"}


def test_every_run_scored_every_document(evaluation: Evaluation) -> None:
    for name, run in evaluation.runs.items():
        assert run.results["n-samples"][TASK]["effective"] == len(PICTURES), name
        assert "exact_match,none" in run.results["results"][TASK], name
        assert [s["doc_id"] for s in run.samples] == list(range(len(PICTURES))), name
        assert run.results["config"]["model"] == RUNS[name][0]


def test_budget_one_answers_exactly_like_lmms_evals_own_llava_hf(evaluation: Evaluation) -> None:
    full, stock = evaluation.runs["full_b1"], evaluation.runs["stock"]
    assert full.answers() == stock.answers()
    assert len(set(full.answers())) > 1  # answers differ between documents: a mix-up would show
    # llava_hf reports its generated token count: the plugin counts the same tokens
    assert [c["output_tokens"] for c in full.token_counts()] == [c["output_tokens"] for c in stock.token_counts()]


def test_batch_four_answers_and_counts_like_batch_one(evaluation: Evaluation) -> None:
    one, four = evaluation.runs["full_b1"], evaluation.runs["full_b4"]
    assert four.answers() == one.answers()
    assert [without_run_id(c) for c in four.token_counts()] == [without_run_id(c) for c in one.token_counts()]


def test_token_counts_reach_lmms_evals_samples_efficiency_and_usage(evaluation: Evaluation) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(evaluation.checkpoint)
    for doc_id, counts in enumerate(evaluation.runs["full_b1"].token_counts()):
        assert set(counts) == {"input_tokens", "output_tokens", "image_tokens", "stock_image_tokens", "run_id"}
        assert counts["image_tokens"] == counts["stock_image_tokens"]  # budget 1.0 with row newlines is the stock model
        # the prefill is what the stock processor makes of the same prompt and picture
        content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[doc_id]}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        stock = processor(images=[picture(doc_id)], text=[prompt])
        assert counts["input_tokens"] == len(stock["input_ids"][0])
    for name in PLUGIN_RUNS:
        run = evaluation.runs[name]
        counts = run.token_counts()
        efficiency = run.results["efficiency"]["overall"]
        assert efficiency["docs_with_token_counts"] == len(PICTURES)
        assert efficiency["total_input_tokens"] == sum(c["input_tokens"] for c in counts)
        assert efficiency["total_output_tokens"] == sum(c["output_tokens"] for c in counts)
        usage = run.results["usage"]["total"]  # lmms-eval's usage tally: written with or without --log_samples
        assert (usage["input_tokens"], usage["output_tokens"]) == (
            efficiency["total_input_tokens"],
            efficiency["total_output_tokens"],
        )


def test_the_stats_file_holds_each_run_with_its_id_and_resolved_config(evaluation: Evaluation) -> None:
    headers = [line for line in evaluation.stats if "config" in line]
    assert len(headers) == len(PLUGIN_RUNS)
    for name, header in zip(PLUGIN_RUNS, headers):
        run = evaluation.runs[name]
        config = header["config"]
        assert {c["run_id"] for c in run.token_counts()} == {header["run_id"]}
        requests = [line for line in evaluation.stats if line["run_id"] == header["run_id"] and "doc_id" in line]
        assert sorted(r["doc_id"] for r in requests) == list(range(len(PICTURES)))
        assert config["batch_size"] == RUNS[name][2]
        pipeline = config["pipeline"]
        assert (pipeline["budget"], pipeline["adapter"]["newline"]) == (1.0, "row")
        assert pipeline["allocator"]["name"] == "hired" and "alpha" in pipeline["allocator"]  # defaults resolved
    assert len({header["run_id"] for header in headers}) == len(headers)
