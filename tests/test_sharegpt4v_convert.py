"""ShareGPT4V / LLaVA-1.5 original-layout checkpoints -> transformers LlavaForConditionalGeneration.

The source checkpoints are written here from tiny random ``LlavaForConditionalGeneration``
models, renamed by hand to the original LLaVA layout, so the converted model must reproduce
the model we started from exactly (the logits of every token, new vocabulary rows included).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenprune.tools.sharegpt4v import (
    VICUNA_V1_SYSTEM_PROMPT,
    CheckpointError,
    convert_sharegpt4v,
    main,
)
from tokenprune.tools.sharegpt4v.config import _infer_vision_config
from tokenprune.tiny import tiny_llava, tiny_tokenizer

from tokenprune import ConfigError, IncompatibleError

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
Image = pytest.importorskip("PIL.Image")

SEED = 3
SOURCE_ROWS_FRESH = 259  # <unk> <s> </s> + 256 byte symbols: no <pad>, no <image>


# --------------------------------------------------------------------------- source builders


def _fresh_tokenizer() -> Any:
    """A byte-level Llama-like tokenizer WITHOUT <image> and without a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def _reference_fresh() -> Any:
    """The model the fresh-tokenizer source must convert back to: <image>=259, <pad>=260 rows = mean."""
    tiny, _ = tiny_llava(SEED)
    config = tiny.config.to_dict()
    config["image_token_index"] = SOURCE_ROWS_FRESH
    config["text_config"]["pad_token_id"] = SOURCE_ROWS_FRESH + 1
    config["text_config"]["vocab_size"] = SOURCE_ROWS_FRESH + 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config)).eval()
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.lm_head.weight):
            matrix[SOURCE_ROWS_FRESH:] = matrix[:SOURCE_ROWS_FRESH].float().mean(dim=0)
    return model


def _original_name(name: str) -> str:
    """Runtime LlavaForConditionalGeneration name -> original LLaVA layout name (written by hand)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.vision_tower."):
        rest = name.removeprefix("model.vision_tower.").removeprefix("vision_model.")
        return "model.vision_tower.vision_tower.vision_model." + rest
    if name.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + name.removeprefix("model.multi_modal_projector.linear_1.")
    if name.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + name.removeprefix("model.multi_modal_projector.linear_2.")
    assert name == "lm_head.weight", name
    return name


def _original_state(model: Any, rows: int) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            tensor = tensor[:rows]
        state[_original_name(name)] = tensor.detach().clone().contiguous()
    return state


def _original_config(model: Any, rows: int, **overrides: Any) -> dict[str, Any]:
    text = model.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "_name_or_path": "./checkpoints/llava-v1.5-7b",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "vocab_size": rows,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "transformers_version": "4.31.0",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
    config.update(overrides)
    return config


def _write_shards(directory: Path, state: dict[str, torch.Tensor], fmt: str, shards: int = 2) -> None:
    names = sorted(state)
    size = math.ceil(len(names) / shards)
    groups = [names[i : i + size] for i in range(0, len(names), size)]
    weight_map = {}
    for i, group in enumerate(groups):
        if fmt == "bin":
            file = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
            torch.save({n: state[n] for n in group}, directory / file)
        else:
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            safetensors_torch.save_file(
                {n: state[n] for n in group},
                str(directory / file),
                metadata={"format": "pt"},
            )
        weight_map.update(dict.fromkeys(group, file))
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _write_source(
    directory: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: Any,
    fmt: str,
) -> Path:
    directory.mkdir(parents=True)
    _write_shards(directory, state, fmt)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)
    return directory


def _vision_config_file(model: Any, path: Path) -> Path:
    path.write_text(model.config.vision_config.to_json_string())
    return path


def _image(height: int, width: int, seed: int = 0) -> Any:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _load(path: Path) -> tuple[Any, Any]:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


PROMPT_MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}],
    }
]


@pytest.fixture(scope="module")
def reference_fresh() -> Any:
    return _reference_fresh()


@pytest.fixture(scope="module")
def reference_tiny() -> Any:
    return tiny_llava(SEED)[0]


@pytest.fixture
def tiny_source(tmp_path: Path, reference_tiny: Any) -> Any:
    """Writer of the tiny reference as an original-layout source in ``tmp_path / "src"``.

    ``tiny_source(state=None, fmt="bin", **config_overrides)`` -> ``(src, vision_config_json)``;
    ``state`` defaults to the reference's own (261 vocabulary rows), the tokenizer is ``tiny_tokenizer()``.
    """

    def write(state: dict[str, torch.Tensor] | None = None, fmt: str = "bin", **overrides: Any) -> tuple[Path, Path]:
        state = _original_state(reference_tiny, 261) if state is None else state
        config = _original_config(reference_tiny, 261, **overrides)
        src = _write_source(tmp_path / "src", state, config, tiny_tokenizer(), fmt)
        return src, _vision_config_file(reference_tiny, tmp_path / "vision.json")

    return write


@pytest.fixture(scope="module")
def converted_fresh(tmp_path_factory: pytest.TempPathFactory, reference_fresh: Any) -> Path:
    """.bin shards, tokenizer without <image>/<pad>, with the legacy buffers old checkpoints carry."""
    root = tmp_path_factory.mktemp("fresh")
    state = _original_state(reference_fresh, SOURCE_ROWS_FRESH)
    head_dim = reference_fresh.config.text_config.head_dim
    for layer in range(reference_fresh.config.text_config.num_hidden_layers):
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    src = _write_source(
        root / "src",
        state,
        _original_config(reference_fresh, SOURCE_ROWS_FRESH),
        _fresh_tokenizer(),
        "bin",
    )
    # LLaVA's own generation config: sampling settings without do_sample (refused by transformers 5)
    generation = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_length": 4096,
        "temperature": 0.9,
        "top_p": 0.6,
    }
    (src / "generation_config.json").write_text(json.dumps(generation))
    vision = _vision_config_file(reference_fresh, root / "vision.json")
    return convert_sharegpt4v(src, root / "out", vision_config=vision, max_shard_size="40KB")


# --------------------------------------------------------------------------- conversions


def test_bin_source_with_new_tokens_reproduces_the_model(converted_fresh: Path, reference_fresh: Any) -> None:
    model, processor = _load(converted_fresh)
    config = model.config
    assert config.image_token_id == 259 == processor.image_token_id
    assert processor.tokenizer.pad_token == "<pad>" and processor.tokenizer.pad_token_id == 260
    assert config.text_config.vocab_size == 261 == len(processor.tokenizer)
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 49
    generation = json.loads((converted_fresh / "generation_config.json").read_text())
    assert (
        generation["max_length"],
        generation["pad_token_id"],
        generation["eos_token_id"],
    ) == (4096, 260, 2)
    assert "temperature" not in generation and "top_p" not in generation
    # written in shards (max_shard_size 40KB), with an index naming every shard
    index = json.loads((converted_fresh / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not list(converted_fresh.parent.glob(".out.partial-*"))
    # the same weights as the model we started from, new rows = mean of the old ones
    expected = reference_fresh.state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    prompt = processor.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    inputs = processor(images=_image(30, 60), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == 259).sum()) == 49
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_fresh(**inputs).logits)


def test_safetensors_source_with_image_token_keeps_vocabulary(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    src, vision = tiny_source(fmt="safetensors")  # tiny_tokenizer already has <pad> (3) and <image> (4)
    out = convert_sharegpt4v(src, tmp_path / "out", vision_config=vision)
    assert (out / "model.safetensors").is_file()  # below 5GB: one shard, no index
    model, processor = _load(out)
    assert model.config.text_config.vocab_size == 261 == len(processor.tokenizer)
    assert model.config.image_token_id == 4 == processor.image_token_id
    assert processor.tokenizer.pad_token_id == 3
    prompt = processor.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    inputs = processor(images=_image(50, 20, seed=1), text=prompt, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_tiny(**inputs).logits, rtol=0, atol=0)


def test_greedy_generate_through_the_processor(converted_fresh: Path, reference_fresh: Any) -> None:
    model, processor = _load(converted_fresh)
    prompt = processor.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    inputs = processor(images=_image(40, 40, seed=2), text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = reference_fresh.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=260)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(generated, expected)
    assert isinstance(processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :])[0], str)


def test_processor_is_vicuna_v1_with_pad_to_square(converted_fresh: Path) -> None:
    _, processor = _load(converted_fresh)
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.patch_size == 8 and processor.num_additional_image_tokens == 1
    assert processor.vision_feature_select_strategy == "default"
    prompt = processor.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    assert prompt == VICUNA_V1_SYSTEM_PROMPT + " USER: <image>\nWhat is this? ASSISTANT:"
    dialogue = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = processor.apply_chat_template(dialogue, add_generation_prompt=True)
    assert rendered == "Be brief. USER: Hi ASSISTANT: Hello</s>USER: Bye ASSISTANT:"
    # image_aspect_ratio "pad": a 20 x 56 (h x w) black image is centred on a square of the
    # CLIP mean colour (LLaVA's expand2square), so rows 0..17 and 38..55 are that colour.
    images = processor.image_processor(Image.new("RGB", (56, 20)), return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    background = ((mean * 255).floor() / 255 - mean) / std
    black = -mean / std
    torch.testing.assert_close(images[:, 5, 30], background, atol=2e-2, rtol=0)
    torch.testing.assert_close(images[:, 50, 30], background, atol=2e-2, rtol=0)
    torch.testing.assert_close(images[:, 28, 30], black, atol=2e-2, rtol=0)


def test_dtype_casts_floating_tensors(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    src, vision = tiny_source()
    out = convert_sharegpt4v(src, tmp_path / "out", vision_config=vision, dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as file:
        dtypes = {file.get_slice(name).get_dtype() for name in file.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_vision_tower_from_a_separate_clip_checkpoint(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    state = _original_state(reference_tiny, 261)
    tower_prefix = "model.vision_tower.vision_tower.vision_model."
    tower_state = {
        "vision_model." + n.removeprefix(tower_prefix): t
        for n, t in state.items()
        if n.startswith(tower_prefix)
    }
    llm_state = {n: t for n, t in state.items() if not n.startswith(tower_prefix)}
    src, _ = tiny_source(llm_state)

    with pytest.raises(
        CheckpointError,
        match=r"--vision-tower PATH.*clip-vit-large-patch14-336|clip-vit-large-patch14-336.*--vision-tower PATH",
    ):
        convert_sharegpt4v(src, tmp_path / "out")

    # A CLIPModel-style folder: vision weights plus text-tower parts LLaVA never loads.
    tower = tmp_path / "clip"
    tower.mkdir()
    tower_state["text_model.embeddings.token_embedding.weight"] = torch.zeros(5, 4)
    tower_state["logit_scale"] = torch.tensor(2.0)
    tower_state["vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    safetensors_torch.save_file(tower_state, str(tower / "model.safetensors"))
    clip_config = {
        "model_type": "clip",
        "vision_config": reference_tiny.config.vision_config.to_dict(),
    }
    (tower / "config.json").write_text(json.dumps(clip_config))
    out = convert_sharegpt4v(src, tmp_path / "out", vision_tower=tower)
    model, processor = _load(out)
    inputs = processor(images=_image(30, 30), text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_tiny(**inputs).logits, rtol=0, atol=0)


def test_tied_embeddings_without_lm_head(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    state = _original_state(reference_tiny, 261)
    del state["lm_head.weight"]
    src, vision = tiny_source(state, fmt="safetensors", tie_word_embeddings=True)
    out = convert_sharegpt4v(
        src,
        tmp_path / "out",
        vision_config=vision,
    )
    model, _ = _load(out)
    assert model.config.tie_word_embeddings
    embed = reference_tiny.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, embed) and torch.equal(
        model.get_input_embeddings().weight, embed
    )


def test_vision_tower_option_refused_when_src_has_its_own(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    src, _ = tiny_source()
    with pytest.raises(ConfigError, match="already holds vision tower weights"):
        convert_sharegpt4v(src, tmp_path / "out", vision_tower=tmp_path)


# --------------------------------------------------------------------------- errors


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    state = _original_state(reference_tiny, 261)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.mm_projector.1.weight"] = torch.zeros(3)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    src, vision = tiny_source(state, fmt="safetensors")
    with pytest.raises(CheckpointError) as error:
        convert_sharegpt4v(src, tmp_path / "out", vision_config=vision)
    message = str(error.value)
    assert "model.mm_projector.1.weight" in message
    assert "model.layers.0.self_attn.q_proj.bias" in message
    assert "model.language_model.layers.1.mlp.up_proj.weight" in message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_shape_mismatch_is_named(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    state = _original_state(reference_tiny, 261)
    state["model.mm_projector.2.weight"] = torch.zeros(32, 16)
    src, vision = tiny_source(state)
    with pytest.raises(CheckpointError, match=r"model\.mm_projector\.2\.weight \[32, 16\]"):
        convert_sharegpt4v(src, tmp_path / "out", vision_config=vision)


def test_non_tensor_pickle_is_refused(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    src, vision = tiny_source()
    shard = next(src.glob("pytorch_model-00001-*.bin"))
    tensors = torch.load(shard, weights_only=True)
    torch.save({**tensors, "args": argparse.Namespace(lr=0.1)}, shard)  # training args: not a tensor
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        convert_sharegpt4v(
            src,
            tmp_path / "out",
            vision_config=vision,
        )


def test_wrong_inv_freq_is_refused(tmp_path: Path, reference_tiny: Any, tiny_source: Any) -> None:
    state = _original_state(reference_tiny, 261)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / (
        500000.0 ** (torch.arange(0, 8, 2).float() / 8)
    )
    src, vision = tiny_source(state)
    with pytest.raises(CheckpointError, match="rope_theta=10000"):
        convert_sharegpt4v(src, tmp_path / "out", vision_config=vision)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"mm_projector_type": "linear"}, "mlp2x_gelu"),
        ({"image_aspect_ratio": "anyres"}, "LLaVA-NeXT"),
        ({"mm_vision_select_feature": "cls"}, "'patch', 'cls_patch'"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"architectures": ["LlavaMistralForCausalLM"]}, "not a Llama-based"),
        ({"mm_hidden_size": 64}, "mm_hidden_size=64"),
    ],
)
def test_unsupported_llava_variants(
    tmp_path: Path, reference_tiny: Any, tiny_source: Any, override: dict[str, Any], pattern: str
) -> None:
    src, vision = tiny_source(fmt="safetensors", **override)
    with pytest.raises(IncompatibleError, match=pattern):
        convert_sharegpt4v(src, tmp_path / "out", vision_config=vision)


def test_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        convert_sharegpt4v(tmp_path, tmp_path / "full")
    with pytest.raises(ConfigError, match="dtype must be"):
        convert_sharegpt4v(tmp_path, tmp_path / "o", dtype="int8")
    with pytest.raises(ConfigError, match="max_shard_size"):
        convert_sharegpt4v(tmp_path, tmp_path / "o", max_shard_size="lots")
    with pytest.raises(ConfigError, match="src must be an existing"):
        convert_sharegpt4v(tmp_path / "nowhere", tmp_path / "o")
    with pytest.raises(ConfigError, match="config.json does not exist"):
        convert_sharegpt4v(tmp_path / "full", tmp_path / "o")


def test_infer_vision_config_of_clip_vit_l_14_336() -> None:
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.class_embedding": (1024,),
        "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "embeddings.position_embedding.weight": (577, 1024),
    }
    for layer in range(24):
        shapes[f"encoder.layers.{layer}.mlp.fc1.weight"] = (4096, 1024)
    config = _infer_vision_config(shapes)
    got = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    )
    assert got == (1024, 24, 16, 4096)
    assert (config.image_size, config.patch_size, config.hidden_act) == (
        336,
        14,
        "quick_gelu",
    )
    shapes["embeddings.patch_embedding.weight"] = (1280, 3, 14, 14)
    with pytest.raises(CheckpointError, match="attention heads.*--vision-config"):
        _infer_vision_config(shapes)
    shapes["embeddings.position_embedding.weight"] = (500, 1280)
    with pytest.raises(CheckpointError, match="square patch grid"):
        _infer_vision_config(shapes)


# --------------------------------------------------------------------------- command line


def test_cli_end_to_end(tmp_path: Path, reference_tiny: Any, tiny_source: Any, capsys: pytest.CaptureFixture[str]) -> None:
    src, vision = tiny_source()
    argv = [
        "convert",
        "sharegpt4v",
        str(src),
        str(tmp_path / "out"),
        "--vision-config",
        str(vision),
    ]
    assert main([*argv, "--max-shard-size", "30KB", "--dtype", "float32"]) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    model, _ = _load(tmp_path / "out")
    assert model.config.image_token_id == 4
    # the same command again: DST is now full -> exit status 2 and a one-line reason
    assert main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
