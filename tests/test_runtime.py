"""The runtime layer (dtypes, ranks, devices, prompts, model loading, adapter detection),
lazy per-stage registry loading, the import graph, and ``tokenprune doctor``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import tokenprune as tp
from tokenprune import runtime
from tokenprune.cli import main
from tokenprune.errors import close_matches, did_you_mean
from tokenprune.tiny import save_tiny, tiny_llava


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------------- dtypes, ranks, devices
def test_one_dtype_table_with_aliases() -> None:
    assert runtime.parse_dtype("auto") is None and runtime.parse_dtype(None) is None
    assert runtime.parse_dtype("BF16") is torch.bfloat16 and runtime.parse_dtype(" half ") is torch.float16
    assert runtime.parse_dtype(torch.float32) is torch.float32
    with pytest.raises(tp.ConfigError, match=r"dtype='float8' is not understood; use auto, float32, float16, bfloat16"):
        runtime.parse_dtype("float8")
    with pytest.raises(tp.ConfigError, match="dtype=torch.int8"):
        runtime.parse_dtype(torch.int8)


def test_rank_from_every_launcher_and_bad_values() -> None:
    assert runtime.rank_from_env({}) == (0, 1)
    assert runtime.rank_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert runtime.rank_from_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}) == (2, 3)
    assert runtime.rank_from_env({"PMI_RANK": "0", "PMI_SIZE": "4"}) == (0, 4)
    with pytest.raises(tp.ConfigError, match="must be ints"):
        runtime.rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(tp.ConfigError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        runtime.rank_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_default_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.default_device({"LOCAL_RANK": "1"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.default_device({}) == "cuda"
    assert runtime.default_device({"LOCAL_RANK": "1"}) == "cuda:1"
    with pytest.raises(tp.ConfigError, match="LOCAL_RANK must be an int"):
        runtime.default_device({"LOCAL_RANK": "one"})


def test_did_you_mean_is_one_helper() -> None:
    assert close_matches("hird", ["hired", "hero", "equal"], n=1) == ["hired"]
    assert did_you_mean("cls_finl", ["cls_final", "spatial"]) == " Did you mean 'cls_final'?"
    assert did_you_mean("zzz", ["cls_final"]) == ""
    assert did_you_mean("alocator", ["allocator"], render=lambda c: repr(c + ".alpha")) == " Did you mean 'allocator.alpha'?"


# ---------------------------------------------------------------------- models, prompts, adapters
def test_adapters_come_from_their_declared_model_classes() -> None:
    owners = runtime.adapters_by_model_class()
    assert owners["LlavaForConditionalGeneration"] == "llava"  # sharegpt4v inherits it: a variant, not an owner
    assert owners["LlavaNextForConditionalGeneration"] == "llava_next"


def test_load_model_builtin_and_a_saved_checkpoint(tmp_path) -> None:
    model, processor, adapter = runtime.load_model(runtime.BUILTIN_MODEL, seed=1)
    assert adapter == "llava_next" and type(model).__name__ == "LlavaNextForConditionalGeneration"
    small, small_processor = tiny_llava(seed=3)
    save_tiny(small, small_processor, tmp_path / "ckpt")
    loaded, _, adapter = runtime.load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert adapter == "llava" and next(loaded.parameters()).dtype is torch.bfloat16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}))
    with pytest.raises(tp.ConfigError, match="tokenprune runs .*LlavaForConditionalGeneration"):
        runtime.load_model(tmp_path / "other")


def test_chat_prompt_template_fallback_and_inline_images() -> None:
    _, processor = tiny_llava(seed=0)
    assert runtime.chat_prompt(processor, "Describe.") == "USER: <image>\nDescribe. ASSISTANT:"
    assert runtime.chat_prompt(processor, "<image>\nBoth?", images=1) == "USER: <image>\nBoth? ASSISTANT:"
    template = "{% for m in messages %}{% for c in m['content'] %}{{ c['type'] }};{% endfor %}{% endfor %}"
    assert runtime.chat_prompt(processor, "Two.", images=2, chat_template=template) == "image;image;text;"
    processor.chat_template = None
    assert runtime.chat_prompt(processor, "Two.", images=2) == "USER: <image>\n<image>\nTwo. ASSISTANT:"
    with pytest.raises(tp.ConfigError, match="holds 1 image token"):
        runtime.chat_prompt(processor, "<image> one", images=2)


def test_generate_path_is_detected_from_the_forward_signature() -> None:
    class New:
        def forward(self, input_ids=None, mm_encoder_outputs=None): ...

    class Old:
        def forward(self, input_ids=None, inputs_embeds=None, **kwargs): ...

    assert runtime.generate_path(New) == "mm_encoder_outputs"
    assert runtime.generate_path(Old) == "inputs_embeds"


def test_tap_of_the_default_tower() -> None:
    import transformers

    assert runtime.tap_name(transformers.LlavaNextForConditionalGeneration) == "TransformersVisionTap"


# ---------------------------------------------------------------------- import graph
def test_registries_load_only_the_looked_up_stage_and_builtins_come_first() -> None:
    out = _fresh_python(
        """
        import sys
        import tokenprune as tp
        tp.build_allocator("hired"); tp.list_selectors()
        print("adapters after strategies:", "tokenprune.adapters" in sys.modules)
        from dataclasses import dataclass
        try:
            @tp.register_adapter("llava")
            class Mine(tp.Adapter):
                pass
        except tp.DuplicateNameError as error:
            print("clash:", error)
        """
    )
    assert "adapters after strategies: False" in out
    assert "clash: adapter 'llava' is already registered by tokenprune.adapters.llava" in out
    out = _fresh_python(
        """
        import sys
        import tokenprune as tp
        tp.build_adapter("llava_next")
        print("strategies after adapters:", "tokenprune.strategies" in sys.modules)
        """
    )
    assert "strategies after adapters: False" in out


def test_no_module_imports_a_cli_command_file_and_the_converter_loads_only_for_convert() -> None:
    out = _fresh_python(
        """
        import sys
        import tokenprune.experiments.sweep, tokenprune.experiments.lmms_eval_plugin, tokenprune.runtime
        print("command files:", sorted(m for m in ("tokenprune.run", "tokenprune.cli", "tokenprune.doctor") if m in sys.modules))
        print("tiny:", "tokenprune.tiny" in sys.modules)
        from tokenprune.cli import build_parser
        build_parser()
        print("converter:", sorted(m for m in sys.modules if m.startswith("tokenprune.tools.sharegpt4v.")))
        """
    )
    assert "command files: []" in out and "tiny: False" in out
    assert "converter: ['tokenprune.tools.sharegpt4v.cli']" in out


# ---------------------------------------------------------------------- doctor
def test_doctor_reports_versions_paths_and_taps(capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"transformers    {transformers.__version__}" in text and f"torch           {torch.__version__}" in text
    assert "torchvision shim active: " in text
    assert "llava_next  LlavaNextForConditionalGeneration: mm_encoder_outputs, TransformersVisionTap" in text
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["packages"]["torch"] == torch.__version__ and data["device"]["type"] in ("cpu", "cuda")
    assert data["adapters"]["llava"]["LlavaForConditionalGeneration"] == {
        "available": True, "generate_path": "mm_encoder_outputs", "tap": "TransformersVisionTap",
    }


def test_doctor_says_what_it_could_not_detect(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_tap(model_class: type) -> str:
        raise tp.IncompatibleError("no tap for this tower")

    monkeypatch.setattr(runtime, "tap_name", no_tap)
    monkeypatch.setattr(runtime, "generate_path", lambda model_class: "inputs_embeds")

    @tp.register_adapter("doctor_future_vlm")
    class FutureVLM(tp.Adapter):
        """An adapter for a model class this transformers does not have."""

        model_classes = ("FutureVLMForConditionalGeneration",)

    try:
        assert main(["doctor"]) == 0
    finally:
        tp.ADAPTERS.unregister("doctor_future_vlm")
    text = capsys.readouterr().out
    assert "LlavaNextForConditionalGeneration: inputs_embeds, none (IncompatibleError: no tap for this tower)" in text
    assert "FutureVLMForConditionalGeneration: not in the installed transformers" in text
