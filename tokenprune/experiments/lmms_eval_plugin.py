"""lmms-eval model classes that run a tokenprune pipeline, found by lmms-eval on its own.

Installing tokenprune declares the entry point ``tokenprune`` in the group
``lmms_eval.models``; lmms-eval reads that group when ``lmms_eval.models`` is imported and
then knows two models::

    lmms-eval --model tokenprune_llava_next \\
        --model_args pretrained=/ckpt/llava-v1.6-vicuna-7b-hf,allocator=hired,selector=cls_final,budget=0.2 \\
        --tasks textvqa_val --batch_size 8

* ``tokenprune_llava_next``: LLaVA-NeXT checkpoints (adapter ``llava_next``).
* ``tokenprune_llava``: LLaVA-1.5 checkpoints (adapter ``llava``) and ShareGPT4V ones
  converted with ``tokenprune convert sharegpt4v`` (pass ``adapter=sharegpt4v``).

``model_args`` (``key=value`` pairs separated by commas):

* ``pretrained``: local checkpoint folder (required; nothing is downloaded).
* ``allocator``, ``selector`` (names or presets, default ``hired`` / ``cls_final``),
  ``budget`` (``0.2``, ``20%`` or a token count such as ``576``; default ``0.2``),
  ``adapter`` (default from the model name).
* strategy options: ``allocator.alpha=0.3``, ``selector.final_layer=-2``,
  ``adapter.newline=row``; a bare ``alpha=0.3`` goes to the one part that takes it.
  Values are read as bool (``true``/``false``), ``None`` (or ``null``), int, float, a tuple (``(5,6,7)``,
  quoted on the shell) or else a string; quote a value to keep it a string.
* ``device`` (default ``cuda:$LOCAL_RANK`` when CUDA is there, else ``cpu``), ``dtype``
  (``auto``, ``float16``, ``bfloat16``, ``float32``), ``batch_size`` (also lmms-eval's
  ``--batch_size``; ``model_args`` wins), ``max_new_tokens`` (used when a task's
  ``generation_kwargs`` do not set it; default 1024 like lmms-eval's ``llava_hf``),
  ``chat_template`` (overrides the processor's), ``stats_path`` (a JSONL file that gets one
  line of token counts per request).

A bad name or option raises tokenprune's :class:`~tokenprune.ConfigError` (with "did you
mean") before any weights are read. ``generate_until`` is supported; ``loglikelihood`` is
not (it raises ``NotImplementedError``).

lmms-eval is imported at module level here; nothing in tokenprune imports this module
eagerly. It must not import ``lmms_eval.models`` at module level: that package loads the
entry points while it initialises, and would find this module half-imported.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

from tokenprune.adapter import VLMAdapter
from tokenprune.errors import ConfigError, IncompatibleError, close_matches
from tokenprune.overrides import apply_overrides
from tokenprune.pipeline import Pipeline
from tokenprune.runtime import chat_prompt, default_device, load_model, parse_dtype, rank_from_env

__all__ = [
    "MODEL_NAMES",
    "TokenpruneLlava",
    "TokenpruneLlavaNext",
    "lmms_eval_models",
    "parse_model_args",
    "parse_value",
]

#: Model name of each plugin class, for the entry point and for error messages.
MODEL_NAMES: dict[str, str] = {
    "tokenprune_llava_next": "TokenpruneLlavaNext",
    "tokenprune_llava": "TokenpruneLlava",
}
# The plugin model to use for each adapter that tokenprune.runtime.load_model detects.
_MODEL_FOR_ADAPTER = {"llava_next": "tokenprune_llava_next", "llava": "tokenprune_llava"}
# generation_kwargs keys of lmms-eval tasks that the plugin reads; others are ignored (logged once).
_GEN_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")


def lmms_eval_models() -> list[Any]:
    """The ``lmms_eval.models`` entry point: one manifest per plugin model.

    lmms-eval calls a callable entry point and registers the ``ModelManifest`` objects it
    returns (pointing at a model class directly would make lmms-eval call the class).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=f"{__name__}.{class_name}")
        for name, class_name in MODEL_NAMES.items()
    ]


# ---------------------------------------------------------------------- model_args parsing
def parse_value(text: str) -> Any:
    """A ``model_args`` value: bool, None, int, float, tuple/list, or else the string.

    ``true``/``false`` (any case) are bools, ``None``/``null`` is None (lower-case ``none``
    stays a string: ``newline=none`` is an option value), ``-2`` an int,
    ``0.3``/``1e-3`` floats, ``(5,6)``/``[5,6]`` Python literals; a value in quotes stays a
    string (without its quotes). lmms-eval's own parser reads ``-2`` as ``-2.0``, which an
    int option rejects, hence this one.
    """
    value = text.strip()
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if value in ("None", "null"):  # not "none": that is a string option value (newline=none)
        return None
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if len(value) >= 2 and value[0] in "([" and value[-1] in ")]":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"model_args value {value!r} looks like a tuple or list but is not a valid literal; "
                "write e.g. (5,6,7) or [5,6,7] (quote it on the shell)"
            ) from None
    return value


def _split_items(text: str) -> list[str]:
    """Split on commas outside quotes and brackets."""
    items, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(f"model_args {text!r}: unbalanced {'quote' if quote else 'brackets'}")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_model_args(arg_string: str) -> dict[str, Any]:
    """``"pretrained=/ckpt,budget=0.2,selector.final_layer=-2"`` as a dict of parsed values."""
    args: dict[str, Any] = {}
    for item in _split_items(arg_string.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"model_args item {item!r} is not key=value")
        if key in args:
            raise ConfigError(f"model_args gives {key!r} twice")
        args[key] = parse_value(value)
    return args




def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an int >= 1")
    return value


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (the stop string itself removed)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _stop_strings(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        return list(until)
    raise ConfigError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")


# ---------------------------------------------------------------------- the model classes
class _TokenprunePlugin(lmms):
    """Shared body; subclasses name their default adapter."""

    #: lmms-eval model name of the class.
    model_name: ClassVar[str] = ""
    #: Adapter used when ``adapter=`` is not given.
    default_adapter: ClassVar[str] = ""

    def __init__(
        self,
        pretrained: str | os.PathLike[str] | None = None,
        allocator: Any = "hired",
        selector: Any = "cls_final",
        budget: Any = 0.2,
        adapter: Any = None,
        device: str | None = None,
        dtype: Any = "auto",
        batch_size: Any = 1,
        max_new_tokens: Any = 1024,
        chat_template: str | None = None,
        stats_path: str | os.PathLike[str] | None = None,
        max_batch_size: Any = None,
        **options: Any,
    ) -> None:
        """Build the pipeline (all names and options checked), then load the checkpoint.

        ``max_batch_size`` is accepted because lmms-eval passes its ``--max_batch_size``
        to every model; it only matters for ``batch_size=auto``, which is not supported.
        """
        super().__init__()
        if pretrained is None:
            raise ConfigError(f"{self.model_name}: model_args needs pretrained=PATH (a local checkpoint folder)")
        self.batch_size_per_device = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        torch_dtype = parse_dtype(dtype)
        bare = [key for key in options if "." not in key]
        adapter_name = adapter if adapter is not None else self.default_adapter
        parts = {"adapter": adapter_name, "allocator": allocator, "selector": selector, "budget": budget}
        try:  # the one override grammar, shared with Pipeline.from_dict and sweep grids
            self.pipe = Pipeline.from_dict(apply_overrides(parts, options))
        except ConfigError as error:
            hints = [
                f"{close[0]!r} for {key!r}"
                for key in bare
                if (close := close_matches(key, _OWN_ARGS, n=1, cutoff=0.75))
            ]
            if not hints:
                raise
            raise ConfigError(
                f"{error} Did you mean {', '.join(hints)} (a model_args key of {self.model_name})?"
            ) from error
        if not isinstance(self.pipe.adapter, VLMAdapter):
            raise ConfigError(
                f"{self.model_name} needs a VLM adapter (llava_next, llava, sharegpt4v); got "
                f"{self.pipe.part_label('adapter')}"
            )
        self.chat_template = chat_template
        self.stats: list[dict[str, Any]] = []
        self._rank, self._world_size = rank_from_env()
        self.stats_path = self._rank_path(stats_path)
        try:
            self._device = torch.device(device or default_device())
        except (RuntimeError, TypeError):
            raise ConfigError(f"device={device!r} is not a torch device; use cuda, cuda:1, cpu ...") from None
        self._ignored_gen_keys: set[str] = set()

        self._model, self._processor, detected = load_model(
            Path(str(pretrained)).expanduser(), device=str(self._device), dtype=torch_dtype
        )
        self._check_model(detected)
        logger.info(f"{self.model_name}: {pretrained}\n{self.pipe.describe()}")

    def _check_model(self, detected: str) -> None:
        assert isinstance(self.pipe.adapter, VLMAdapter)  # checked before the model loaded
        try:
            self.pipe.adapter.check_model(self._model, self._processor)
        except IncompatibleError as error:
            other = _MODEL_FOR_ADAPTER.get(detected)
            if other is None or other == self.model_name:
                raise
            raise IncompatibleError(
                f"{str(error).rstrip('.')}. This checkpoint is a {type(self._model).__name__}: run it with "
                f"--model {other}"
            ) from error

    def _rank_path(self, path: str | os.PathLike[str] | None) -> Path | None:
        if path is None:
            return None
        target = Path(path).expanduser()
        if self._world_size > 1:  # one file per rank: ranks never write the same file
            target = target.with_name(f"{target.stem}.rank{self._rank}{target.suffix}")
        return target

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str | Mapping[str, Any], additional_config: Mapping[str, Any] | None = None
    ) -> Any:
        """lmms-eval's constructor path: ``--model_args`` plus ``--batch_size``/``--device``.

        The string is parsed with :func:`parse_model_args`; keys in it win over lmms-eval's
        ``additional_config`` (whose ``batch_size`` is always set, to 1 by default).
        """
        args = dict(arg_string) if isinstance(arg_string, Mapping) else parse_model_args(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None:
                args.setdefault(key, value)
        return cls(**args)

    # ------------------------------------------------------------------ lmms-eval properties
    @property
    def model(self) -> Any:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self._processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{self.model_name} answers generate_until tasks only; loglikelihood (multiple choice "
            "scored by likelihood) is not supported. Use the generation variant of the task."
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{self.model_name} does not support multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; batches group requests with equal ``generation_kwargs``.

        Within a group, longer contexts go first (lmms-eval's usual order: the worst padding
        and any out-of-memory error come at once). Each request's image token counts are
        appended to :attr:`stats` in request order, and to ``stats_path`` after each batch
        (in batch order; every line names its task, split and doc_id).
        """
        from tokenprune.experiments.progress import progress

        answers: list[str | None] = [None] * len(requests)
        records: list[dict[str, Any] | None] = [None] * len(requests)
        batches = list(self._batches([request.args for request in requests]))
        for batch in progress(batches, description=f"{self.model_name} responding", unit="batch", rank=self._rank):
            chunk = [requests[i].args for i in batch]
            chunk_answers, chunk_records = self._answer(chunk)
            for index, answer, record in zip(batch, chunk_answers, chunk_records):
                answers[index], records[index] = answer, record
            self._write_stats(chunk_records)
        self.stats.extend(r for r in records if r is not None)
        summary = self.token_summary()
        if summary["images"]:
            logger.info(
                f"{self.model_name}: {summary['images']} images so far, {summary['image_tokens']} image "
                f"tokens to the LLM instead of {summary['stock_image_tokens']} "
                f"({100 * summary['kept_ratio']:.1f}%)"
            )
        return [a if a is not None else "" for a in answers]

    def _write_stats(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records to ``stats_path`` batch by batch, so a crash loses none."""
        if self.stats_path is None or not records:
            return
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        with self.stats_path.open("a", encoding="utf-8") as stream:
            stream.writelines(json.dumps(record) + "\n" for record in records)

    def _batches(self, args: Sequence[tuple[Any, ...]]) -> list[list[int]]:
        """Request indices in batches: grouped by gen_kwargs, longest context first."""
        groups: dict[str, list[int]] = {}
        for index, arg in enumerate(args):
            key = json.dumps(arg[1], sort_keys=True, default=repr)
            groups.setdefault(key, []).append(index)
        lengths = [len(self.tokenizer(arg[0], add_special_tokens=False)["input_ids"]) for arg in args]
        size = self.batch_size_per_device
        batches = []
        for members in groups.values():
            ordered = sorted(members, key=lambda i: (-lengths[i], args[i][0], i))
            batches.extend(ordered[start : start + size] for start in range(0, len(ordered), size))
        return batches

    def _visuals(self, arg: tuple[Any, ...]) -> list[Any]:
        from PIL import Image

        _, _, doc_to_visual, doc_id, task, split = arg
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images = []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(
                    f"{self.model_name} takes images; task {task!r} doc {doc_id} gave a "
                    f"{type(visual).__name__} (video and audio are not supported)"
                )
            images.append(visual if visual.mode == "RGB" else visual.convert("RGB"))
        return images

    def _prompt(self, context: str, images: int) -> str:
        """The chat-formatted prompt with one image placeholder per image."""
        return chat_prompt(self._processor, context, images=images, chat_template=self.chat_template)

    def _generate_kwargs(self, gen_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """lmms-eval ``generation_kwargs`` as ``model.generate`` kwargs.

        The temperature decides sampling (``> 0`` samples), as in lmms-eval's ``llava_hf``;
        ``do_sample`` is read only through it. Keys for other models are ignored.
        """
        ignored = set(gen_kwargs) - set(_GEN_KEYS) - self._ignored_gen_keys
        if ignored:
            logger.warning(f"{self.model_name}: ignoring generation_kwargs {sorted(ignored)}")
            self._ignored_gen_keys |= ignored
        temperature = gen_kwargs.get("temperature") or 0
        out: dict[str, Any] = {
            "max_new_tokens": _positive_int("max_new_tokens", gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            out["temperature"] = float(temperature)
            if gen_kwargs.get("top_p") is not None:
                out["top_p"] = float(gen_kwargs["top_p"])
        num_beams = gen_kwargs.get("num_beams")
        if num_beams is not None and int(num_beams) != 1:
            out["num_beams"] = int(num_beams)
        if getattr(self._model.generation_config, "pad_token_id", None) is None:
            pad = self.tokenizer.pad_token_id
            out["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        return out

    def _answer(self, chunk: Sequence[tuple[Any, ...]]) -> tuple[list[str], list[dict[str, Any]]]:
        """Answers and stats records of one batch (all with the same gen_kwargs)."""
        gen_kwargs = dict(chunk[0][1] or {})  # a copy: tasks share the dict between requests
        stops = _stop_strings(gen_kwargs.get("until"))
        generate_kwargs = self._generate_kwargs(gen_kwargs)
        visuals = [self._visuals(arg) for arg in chunk]
        prompts = [self._prompt(arg[0], len(images)) for arg, images in zip(chunk, visuals)]
        answers: list[str] = [""] * len(chunk)
        image_stats: list[list[dict[str, Any]]] = [[] for _ in chunk]
        with_images = [i for i, images in enumerate(visuals) if images]
        text_only = [i for i, images in enumerate(visuals) if not images]
        if with_images:
            inputs = self.pipe.prepare(
                self._model,
                self._processor,
                images=[image for i in with_images for image in visuals[i]],
                text=[prompts[i] for i in with_images],
                question=[str(chunk[i][0]) for i in with_images],  # relevance: the task's context, not the template
            )
            stats = iter(self.pipe.last_stats)
            for i in with_images:
                image_stats[i] = [next(stats).as_dict() for _ in visuals[i]]
            for i, text in zip(with_images, self._generate(inputs, generate_kwargs)):
                answers[i] = text
        if text_only:
            tokenized = self.tokenizer(
                [prompts[i] for i in text_only], return_tensors="pt", padding=True, padding_side="left"
            )
            inputs = {key: value.to(self._device) for key, value in tokenized.items()}
            for i, text in zip(text_only, self._generate(inputs, generate_kwargs)):
                answers[i] = text
        answers = [_cut_at_stops(text, stops) for text in answers]
        records = [
            {"task": arg[4], "split": arg[5], "doc_id": arg[3], "images": stats}
            for arg, stats in zip(chunk, image_stats)
        ]
        return answers, records

    def _generate(self, inputs: Mapping[str, Any], generate_kwargs: Mapping[str, Any]) -> list[str]:
        with torch.inference_mode():
            output = self._model.generate(**inputs, **generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------ reporting
    def token_summary(self) -> dict[str, Any]:
        """Totals over :attr:`stats`.

        ``image_tokens`` went to the LLM; ``stock_image_tokens`` is what the unpruned model
        would have fed it (LLaVA-NeXT's unpadding and newlines included); ``full_tokens`` is
        the sum of ``P * N``, the count a fractional budget is a share of. ``kept_ratio`` is
        ``image_tokens / stock_image_tokens``.
        """
        images = [image for record in self.stats for image in record["images"]]
        kept = sum(image["image_tokens"] for image in images)
        stock = sum(image["stock_image_tokens"] for image in images)
        return {
            "requests": len(self.stats),
            "images": len(images),
            "image_tokens": kept,
            "stock_image_tokens": stock,
            "full_tokens": sum(image["full_tokens"] for image in images),
            "kept_ratio": kept / stock if stock else 0.0,
        }


class TokenpruneLlavaNext(_TokenprunePlugin):
    """lmms-eval model ``tokenprune_llava_next``: a LLaVA-NeXT checkpoint behind a tokenprune pipeline."""

    model_name = "tokenprune_llava_next"
    default_adapter = "llava_next"


class TokenpruneLlava(_TokenprunePlugin):
    """lmms-eval model ``tokenprune_llava``: LLaVA-1.5 (``adapter=llava``) or ShareGPT4V (``adapter=sharegpt4v``)."""

    model_name = "tokenprune_llava"
    default_adapter = "llava"


_OWN_ARGS = (
    "pretrained",
    "allocator",
    "selector",
    "budget",
    "adapter",
    "device",
    "dtype",
    "batch_size",
    "max_new_tokens",
    "chat_template",
    "stats_path",
    "max_batch_size",
)
