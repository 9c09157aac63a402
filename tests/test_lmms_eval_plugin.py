"""The lmms-eval plugin: discovered through lmms-eval's own entry-point lookup, built from a
``--model_args`` string, answering ``generate_until`` requests on a tiny saved LLaVA-NeXT.

Discovery does not rely on tokenprune's installed metadata: the tests write a fake
installed distribution (a ``*.dist-info`` folder with an ``entry_points.txt``) onto
``sys.path`` and let lmms-eval scan for it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import GenerationResult, Instance
from PIL import Image

from tokenprune import ConfigError, IncompatibleError, TokenpruneError
from tokenprune.experiments.lmms_eval_plugin import (
    _generated_counts,
    parse_model_args,
    parse_value,
)
from tokenprune.tiny import save_tiny, tiny_llava_next

FAKE_DIST = "tokenprune_lmms_plugin_test-0.0.dist-info"
ENTRY_POINTS = "[lmms_eval.models]\ntokenprune = tokenprune.experiments.lmms_eval_plugin:lmms_eval_models\n"
TASK, SPLIT = "tiny_vqa", "test"
# (width, height) of each document's picture, and questions of different lengths so that
# lmms-eval-style length sorting reorders them (longest first: doc 1, doc 2, doc 0).
SIZES = [(100, 60), (50, 120), (80, 80)]
QUESTIONS = ["Colour?", "Describe everything you can see in this picture, in detail.", "How many shapes are there?"]


def write_fake_dist(folder: Path) -> Path:
    dist = folder / FAKE_DIST
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenprune-lmms-plugin-test\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llava_next")
    model, processor = tiny_llava_next(seed=0)
    save_tiny(model, processor, folder)
    return folder


@pytest.fixture(scope="module")
def plugin_class(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The class lmms-eval's own registry resolves for ``tokenprune_llava_next``."""
    site = write_fake_dist(tmp_path_factory.mktemp("site"))
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        sources = [
            ep.dist.name
            for ep in importlib.metadata.entry_points(group="lmms_eval.models")
            if ep.dist is not None and ep.name == "tokenprune"
        ]
        assert "tokenprune-lmms-plugin-test" in sources
        import lmms_eval.models

        models = importlib.reload(lmms_eval.models)  # lmms-eval scans entry points on import
        yield models.get_model("tokenprune_llava_next")
    finally:
        sys.path.remove(str(site))
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def lm(plugin_class: Any, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    stats_path = tmp_path_factory.mktemp("stats") / "tokens.jsonl"
    model_args = (
        f"pretrained={checkpoint},allocator=hired,selector=cls_final,budget=0.2,"
        f"allocator.alpha=0.3,selector.final_layer=-2,adapter.newline=none,dtype=float32,stats_path={stats_path}"
    )
    # lmms-eval's CLI passes --batch_size as a string and --device None
    lm = plugin_class.create_from_arg_string(model_args, {"batch_size": "3", "device": None, "max_batch_size": None})
    lm.task_dict = {TASK: {SPLIT: docs()}}
    return lm


def docs() -> list[dict[str, Any]]:
    colours = ["red", "green", "blue"]
    return [
        {"image": Image.new("RGB", size, colour), "question": question}
        for size, question, colour in zip(SIZES, QUESTIONS, colours)
    ]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"]]


def texts(results: list[GenerationResult]) -> list[str]:
    assert all(isinstance(r, GenerationResult) and isinstance(r.text, str) for r in results), results
    return [r.text for r in results]


def read_stats(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def request(doc_id: int, gen_kwargs: dict[str, Any], visual: Any = doc_to_visual) -> Instance:
    """A request as lmms-eval's ConfigurableTask builds it for a generate_until task."""
    arguments = (QUESTIONS[doc_id], gen_kwargs, visual, doc_id, TASK, SPLIT)
    metadata = {"task": TASK, "doc_id": doc_id, "repeats": 1}
    return Instance(request_type="generate_until", arguments=arguments, idx=0, metadata=metadata)


# ---------------------------------------------------------------------- discovery
def test_lmms_eval_discovers_both_models_through_the_entry_point(plugin_class: Any) -> None:
    import lmms_eval.models
    from lmms_eval.api.model import lmms

    assert plugin_class.__name__ == "TokenpruneLlavaNext"
    assert plugin_class.__module__ == "tokenprune.experiments.lmms_eval_plugin"
    assert issubclass(plugin_class, lmms)
    assert lmms_eval.models.get_model("tokenprune_llava").__name__ == "TokenpruneLlava"
    assert {"tokenprune_llava_next", "tokenprune_llava"} <= set(lmms_eval.models.list_available_models())


def test_discovery_in_a_fresh_interpreter_as_the_cli_does(tmp_path: Path) -> None:
    """``lmms-eval --model tokenprune_llava_next`` imports lmms_eval.models first, which
    loads the entry point while it initialises: the plugin module must import cleanly then."""
    site = write_fake_dist(tmp_path)
    code = (
        "import lmms_eval.models as m; "
        "print(m.get_model('tokenprune_llava_next').__qualname__, m.get_model('tokenprune_llava').__qualname__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["TokenpruneLlavaNext", "TokenpruneLlava"]


# ---------------------------------------------------------------------- model_args
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-2", -2),  # lmms-eval's own parser gives -2.0, which an int option rejects
        ("20", 20),
        ("0.3", 0.3),
        ("1e-3", 0.001),
        ("true", True),
        ("False", False),
        ("None", None),
        ("null", None),
        ("none", "none"),  # a string option value: adapter.newline=none
        ("(5,6,7)", (5, 6, 7)),
        ("[5, 6]", [5, 6]),
        ("'1'", "1"),
        ("20%", "20%"),
        ("row", "row"),
        ("hired@reference", "hired@reference"),
    ],
)
def test_parse_value(text: str, expected: Any) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parse_model_args_keeps_commas_inside_brackets_and_quotes() -> None:
    args = parse_model_args("pretrained=/a/b, selector=hero,selector.low_layers=(5,6),chat_template='x, y',budget=20%")
    assert args == {
        "pretrained": "/a/b",
        "selector": "hero",
        "selector.low_layers": (5, 6),
        "chat_template": "x, y",
        "budget": "20%",
    }
    with pytest.raises(ConfigError, match="not key=value"):
        parse_model_args("pretrained=/a,budget")
    with pytest.raises(ConfigError, match="twice"):
        parse_model_args("budget=0.2,budget=0.3")


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("selector.final_layr=-2", r"no option 'final_layr'\. Did you mean 'final_layer'"),
        ("alpah=0.3", r"Did you mean 'alpha'"),
        ("selectr.final_layer=1", r"Did you mean 'selector\.final_layer'"),
        ("max_new_token=4", r"Did you mean 'max_new_tokens' for 'max_new_token' \(a model_args key"),
        ("allocator=hird", r"Did you mean 'hired'"),
        ("budget=1.5", r"float above 1\.0"),
        ("allocator.alpha=abc", r"alpha='abc' must be float"),
        ("dtype=float8", r"dtype='float8'"),
        ("batch_size=auto", r"batch_size='auto' must be an int >= 1"),
        ("device=gpu0", r"device='gpu0' is not a torch device"),
    ],
)
def test_bad_model_args_raise_before_any_weights_are_read(
    plugin_class: Any, tmp_path: Path, model_args: str, message: str
) -> None:
    missing = tmp_path / "no_checkpoint_here"  # never opened: the pipeline is checked first
    with pytest.raises(TokenpruneError, match=message) as raised:
        plugin_class.create_from_arg_string(f"pretrained={missing},{model_args}", {"batch_size": "1"})
    # an unknown name is a registry error (a LookupError); everything else a ConfigError
    assert isinstance(raised.value, ConfigError) != model_args.startswith("allocator=")


def test_the_pipeline_is_built_from_model_args(lm: Any) -> None:
    config = lm.pipe.to_dict()
    assert config["adapter"]["name"] == "llava_next" and config["adapter"]["newline"] == "none"
    assert config["allocator"]["name"] == "hired" and config["allocator"]["alpha"] == 0.3
    assert config["selector"]["name"] == "cls_final" and config["selector"]["final_layer"] == -2
    assert config["budget"] == 0.2
    assert lm.batch_size == 3 and str(lm.device) in ("cpu", "cuda:0")


def test_a_llava_checkpoint_under_the_wrong_model_name_points_to_the_right_one(checkpoint: Path) -> None:
    from tokenprune.experiments.lmms_eval_plugin import TokenpruneLlava

    with pytest.raises(IncompatibleError, match="--model tokenprune_llava_next"):
        TokenpruneLlava.create_from_arg_string(f"pretrained={checkpoint},device=cpu")


# ---------------------------------------------------------------------- generate_until
def test_generate_until_answers_in_order_and_applies_the_budget(lm: Any) -> None:
    before = len(lm.stats)
    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    answers = lm.generate_until([request(i, dict(gen_kwargs)) for i in range(3)])
    assert len(texts(answers)) == 3
    records = lm.stats[before:]
    assert [r["doc_id"] for r in records] == [0, 1, 2]
    for (width, height), record in zip(SIZES, records):
        (image,) = record["images"]
        assert image["image_size"] == [height, width]  # the stats belong to this doc's picture
        # a 20% budget of P * N tokens, floored; no newline tokens with newline=none
        assert image["kept_total"] == math.floor(0.2 * image["full_tokens"]) == image["image_tokens"]
        assert image["image_tokens"] <= 0.2 * image["full_tokens"]
        assert image["newline_tokens"] == 0
    written = sorted(read_stats(lm.stats_path)[-3:], key=lambda r: r["doc_id"])
    assert written == records  # written batch by batch, longest context first
    summary = lm.token_summary()
    assert summary["image_tokens"] == sum(r["images"][0]["image_tokens"] for r in lm.stats)


def test_answers_follow_the_requests_whatever_their_order(lm: Any) -> None:
    """Batches (of 2 here) depend only on the contexts, so permuting the requests must
    permute the answers the same way, bit for bit."""
    lm.batch_size_per_device = 2
    try:
        gen_kwargs = {"max_new_tokens": 5, "temperature": 0}
        forward = lm.generate_until([request(i, gen_kwargs) for i in (0, 1, 2)])
        permuted = lm.generate_until([request(i, gen_kwargs) for i in (2, 0, 1)])
    finally:
        lm.batch_size_per_device = 3
    assert len(set(texts(forward))) == 3  # distinct answers, so a mix-up could not go unseen
    assert permuted == [forward[2], forward[0], forward[1]]  # texts and token counts
    assert [r["doc_id"] for r in lm.stats[-3:]] == [2, 0, 1]


def test_until_stop_strings_are_honoured(lm: Any) -> None:
    shared = {"max_new_tokens": 8, "temperature": 0}
    free = texts(lm.generate_until([request(i, dict(shared)) for i in range(3)]))
    longest = max(range(3), key=lambda i: len(free[i]))
    text = free[longest]
    assert len(text) >= 2, free
    stop = text[len(text) // 2]
    expected = [answer[: answer.find(stop)] if stop in answer else answer for answer in free]
    gen_kwargs = {**shared, "until": ["never appears \x00", "", stop]}
    stopped = texts(lm.generate_until([request(i, gen_kwargs) for i in range(3)]))
    assert stopped == expected
    assert len(stopped[longest]) < len(text)
    assert gen_kwargs["until"] == ["never appears \x00", "", stop]  # the task's dict is left alone
    single = texts(lm.generate_until([request(i, {**shared, "until": stop}) for i in range(3)]))
    assert single == expected


def test_a_document_without_an_image_is_answered_from_text(lm: Any) -> None:
    before = len(lm.stats)
    answers = lm.generate_until(
        [request(0, {"max_new_tokens": 3}), request(2, {"max_new_tokens": 3}, visual=lambda doc: [])]
    )
    assert len(texts(answers)) == 2
    assert [len(r["images"]) for r in lm.stats[before:]] == [1, 0]
    # the text-only prefill is the tokenized prompt, with no image token in it
    prompt = lm._prompt(QUESTIONS[2], 0)
    assert answers[1].token_counts.input_tokens == len(lm.tokenizer(prompt)["input_ids"])
    assert answers[1].token_counts.image_tokens == 0


def test_unsupported_request_types_say_so(lm: Any) -> None:
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="video and audio are not supported"):
        lm.generate_until([request(0, {"max_new_tokens": 2}, visual=lambda doc: ["clip.mp4"])])


# ---------------------------------------------------------------------- token counts and runs
def test_answers_carry_the_real_prefill_and_generated_token_counts(lm: Any) -> None:
    """lmms-eval gets GenerationResults: ``input_tokens`` is what the LLM was fed, i.e. the
    stock processor's prompt length with the stock image tokens swapped for the kept ones."""
    before = len(lm.stats)
    gen_kwargs = {"max_new_tokens": 5, "temperature": 0}
    results = lm.generate_until([request(i, dict(gen_kwargs)) for i in range(3)])
    for doc_id, (result, record) in enumerate(zip(results, lm.stats[before:])):
        (image,) = record["images"]
        stock = lm.processor(images=[docs()[doc_id]["image"]], text=[lm._prompt(QUESTIONS[doc_id], 1)])
        stock_prefill = len(stock["input_ids"][0])
        counts = result.token_counts
        assert counts.input_tokens == stock_prefill - image["stock_image_tokens"] + image["image_tokens"]
        assert counts.input_tokens < stock_prefill  # a 20% budget prunes
        assert 1 <= counts.output_tokens <= 5
        assert counts.to_dict() == {
            "input_tokens": record["input_tokens"],
            "output_tokens": record["output_tokens"],
            "image_tokens": image["image_tokens"],
            "stock_image_tokens": image["stock_image_tokens"],
            "run_id": lm.run_id,
        }
        assert record["input_tokens"] == counts.input_tokens and record["run_id"] == lm.run_id


def test_generated_counts_stop_at_the_first_end_of_sequence_token() -> None:
    import torch

    eos, pad = 2, 2  # generate pads finished rows, here with the eos id itself
    new_tokens = torch.tensor([[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad], [7, 8, 9, 1, eos]])
    assert _generated_counts(new_tokens, [eos]) == [3, 5, 1, 5]
    assert _generated_counts(new_tokens, [9, eos]) == [3, 5, 1, 3]
    assert _generated_counts(new_tokens, []) == [5, 5, 5, 5]


def test_stats_path_starts_each_run_with_its_id_and_resolved_config(
    plugin_class: Any, checkpoint: Path, tmp_path: Path
) -> None:
    stats_path = tmp_path / "tokens.jsonl"
    runs = []
    for budget in (0.5, 0.25):  # two runs appending to one file
        lm = plugin_class.create_from_arg_string(
            f"pretrained={checkpoint},budget={budget},alpha=0.3,dtype=float32,stats_path={stats_path}",
            {"batch_size": "2", "device": None},
        )
        lm.task_dict = {TASK: {SPLIT: docs()}}
        lm.generate_until([request(i, {"max_new_tokens": 2}) for i in range(3)])
        runs.append(lm)
    assert runs[0].run_id != runs[1].run_id
    lines = read_stats(stats_path)
    assert [line["run_id"] for line in lines] == [runs[0].run_id] * 4 + [runs[1].run_id] * 4
    for lm, (header, *requests) in zip(runs, (lines[:4], lines[4:])):
        config = header["config"]
        assert set(header) == {"run_id", "config"}
        # the resolved settings: defaults filled in, not only what model_args said
        assert config["pipeline"] == lm.pipe.to_dict()
        assert config["pipeline"]["allocator"]["alpha"] == 0.3 and "overflow" in config["pipeline"]["allocator"]
        assert config["pipeline"]["budget"] == lm.pipe.budget.to_config()
        assert (config["model"], config["checkpoint_class"]) == ("tokenprune_llava_next", "LlavaNextForConditionalGeneration")
        assert (config["pretrained"], config["dtype"], config["batch_size"]) == (str(checkpoint), "float32", 2)
        assert sorted(r["doc_id"] for r in requests) == [0, 1, 2] and all("input_tokens" in r for r in requests)
    assert runs[0].pipe.to_dict() != runs[1].pipe.to_dict()


def test_lmms_eval_models_lists_the_plugin_models(tmp_path: Path) -> None:
    """``lmms-eval models`` prints lmms-eval's built-in listing, which entry points do not
    reach on their own; the entry point adds its models to it."""
    site = write_fake_dist(tmp_path)
    code = "import sys; from lmms_eval.cli.dispatch import main; sys.argv = ['lmms-eval', 'models']; main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    assert rows.get("tokenprune_llava_next") == ["simple"] and rows.get("tokenprune_llava") == ["simple"], done.stdout


def test_the_installed_filelock_is_one_lmms_eval_can_patch() -> None:
    """lmms-eval (0.7.1 and later) patches ``filelock._api.FileLockMeta`` as every evaluation
    starts; filelock 4 removed that module, and every evaluation then dies there while
    lmms-eval exits 0. The ``lmms`` extra pins ``filelock<4``."""
    api = importlib.import_module("filelock._api")
    assert callable(api.FileLockMeta.__call__)
