"""What LLaVA-1.5, ShareGPT4V and LLaVA-NeXT adapters share: pruning through the model's
own ``generate``, at any batch size, on unmodified transformers 5 models.

Two ways in:

* :meth:`LlavaFamilyAdapter.prepare` (``Pipeline.prepare``): runs the image processor, the
  vision tower once with the attention tap, the allocator and the selector, projects the
  kept features, and returns kwargs for ``model.generate``: ``input_ids`` with exactly
  ``K`` image placeholders per image, ``attention_mask`` and the projected image
  embeddings, as ``mm_encoder_outputs`` or ``inputs_embeds``, whichever the installed
  transformers' ``generate`` accepts (``._generate_inputs``).
* :meth:`LlavaFamilyAdapter.attach` (``Pipeline.attach``): for code that calls the
  processor and ``generate`` itself. Per-instance, signature-preserving wrappers make the
  processor emit ``K`` placeholders and the model's ``get_image_features`` return the
  pruned embeddings; leaving the context restores both exactly. ``K`` must be known before
  the model runs, so attach needs a fixed budget (exact allocator, non-adaptive selector,
  no data-dependent newline tokens); anything else is an error that points to ``prepare``.

transformers is imported lazily: importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenprune.adapter import ImageTokens, OrderedTokens, VLMAdapter
from tokenprune.contracts import BudgetAllocator, Layout, Selector, Signals, to_device
from tokenprune.errors import ConfigError, IncompatibleError, TokenpruneError
from tokenprune.tower import PrunedBatch, kept_features_batch, kept_rows, run_batch

from . import _generate_inputs
from ._generate_inputs import (
    generate_inputs,
    image_features_output,
    processor_count_hooks,
    prompt_hook,
)

if TYPE_CHECKING:
    from tokenprune.pipeline import Pipeline

__all__ = ["PARTITION_ORDER", "ImageTokens", "LlavaFamilyAdapter", "LlavaImageStats"]

_MISSING = object()
#: Relevance scorers loaded from spec strings, shared by every adapter instance.
_SCORERS: dict[str, Any] = {}
#: ids of the processors and models an ``attach`` context currently wraps (one at a time each).
_ATTACHED: set[int] = set()
_ATTACH_LOCK = threading.Lock()
#: Where a vision tower keeps its attention tap (built once: finding the blocks walks the
#: tower). On the tower itself, not in a global table: the tap refers to its tower, so a
#: global table would keep every tower (and its device memory) alive.
_TAP_ATTRIBUTE = "_tokenprune_tap"
#: ``generate_path`` per (model class, detector) (feature detection reads signatures: slow to repeat).
_GENERATE_PATHS: dict[tuple[type, Any], Any] = {}
#: :meth:`LlavaFamilyAdapter.order_keys` of an adapter whose LLM order is partition order.
PARTITION_ORDER: Any = torch.empty(0, dtype=torch.int64)
#: Sort keys of one image stay below this; image ``i``'s keys are offset by ``i`` times it.
_IMAGE_KEY_STRIDE = 1 << 40
#: The old private name of :class:`tokenprune.OrderedTokens`.
_Ordered = OrderedTokens


@dataclass(frozen=True)
class LlavaImageStats:
    """What the LLM sees of one image, next to what the stock model would feed it."""

    image_size: tuple[int, int] | None
    partitions: tuple[str, ...]
    full_tokens: int
    stock_image_tokens: int
    budget: int
    allocated: tuple[int, ...]
    kept: tuple[int, ...]
    newline_tokens: int
    image_tokens: int
    prefill_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size) if self.image_size else None,
            "partitions": list(self.partitions),
            "full_tokens": self.full_tokens,
            "stock_image_tokens": self.stock_image_tokens,
            "budget": self.budget,
            "allocated": list(self.allocated),
            "kept": list(self.kept),
            "kept_total": sum(self.kept),
            "newline_tokens": self.newline_tokens,
            "image_tokens": self.image_tokens,
            "prefill_length": self.prefill_length,
        }


def _class_names(obj: object) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _strip_image_tokens(text: str, image_token: str) -> str:
    return " ".join(text.replace(image_token, " ").split())


class LlavaFamilyAdapter(VLMAdapter):
    """Shared machinery; subclasses describe their processor geometry and token order."""

    # ------------------------------------------------------------------ family hooks
    @abstractmethod
    def _image_inputs(self, processor: Any, images: list[Any]) -> dict[str, Any]:
        """Run the processor's image part: ``pixel_values`` and ``image_sizes`` at least."""

    @abstractmethod
    def _crops_and_layouts(
        self, model: Any, processor: Any, pixel_values: torch.Tensor, image_sizes: Any
    ) -> tuple[list[torch.Tensor], list[Layout], list[Any]]:
        """Per image: its crops ``[P, 3, H, W]``, its Layout, and family geometry (or None)."""

    def project(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """The model's ``multi_modal_projector`` on the ordered kept tokens."""
        projector = getattr(model, "model", model).multi_modal_projector
        with torch.inference_mode():
            return projector(tokens[None])[0]

    @abstractmethod
    def _stock_image_tokens(self, layout: Layout, geometry: Any) -> int:
        """Image tokens the unpruned model would feed the LLM for this image."""

    def _newline_embedding(self, model: Any) -> torch.Tensor | None:
        return None

    def fixed_image_tokens(self, pipeline: Pipeline, layout: Layout, geometry: Any) -> int:
        """``K`` for an image, known before the model runs (attach); raises if data-dependent."""
        self._require_fixed(pipeline)
        return min(pipeline.image_budget(layout), int(layout.capacity.sum()))

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        spec = getattr(self, "relevance_scorer", None)
        if spec is not None and not isinstance(spec, str) and not hasattr(spec, "score"):
            raise ConfigError(
                f"{self.registry_name}: relevance_scorer must be None, a spec string "
                f"('hf:/path', 'open_clip:NAME:/path') or a RelevanceScorer, got {type(spec).__name__}"
            )

    def check_parts(self, allocator: BudgetAllocator, selector: Selector) -> None:
        return None

    def check_model(self, model: Any, processor: Any = None) -> None:
        """Raise :class:`IncompatibleError` when ``model``/``processor`` are not this family."""
        name = self.registry_name or type(self).__name__
        if not any(cls in self.model_classes for cls in _class_names(model)):
            raise IncompatibleError(
                f"adapter {name!r} works with {', '.join(self.model_classes)}; got a "
                f"{type(model).__name__}. Pick the adapter for that model family "
                "(tokenprune list adapters)."
            )
        if processor is not None and not any(cls in self.processor_classes for cls in _class_names(processor)):
            raise IncompatibleError(
                f"adapter {name!r} needs a {' or '.join(self.processor_classes)} for this model; got a "
                f"{type(processor).__name__}"
            )
        config = model.config
        layer = getattr(config, "vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise IncompatibleError(
                f"vision_feature_layer={layer!r} concatenates several blocks; tokenprune supports one "
                "feature layer"
            )
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise IncompatibleError(
                f"vision_feature_select_strategy={strategy!r}: tokenprune prunes patch tokens and "
                "supports 'default' (CLS dropped), the setting of LLaVA-1.5/NeXT and ShareGPT4V"
            )
        if processor is not None:
            processor_strategy = getattr(processor, "vision_feature_select_strategy", None)
            if processor_strategy not in (None, strategy):
                raise IncompatibleError(
                    f"processor vision_feature_select_strategy={processor_strategy!r} but the model's "
                    f"is {strategy!r}: the processor and model are from different checkpoints"
                )
            image_token_id = getattr(processor, "image_token_id", None)
            if image_token_id is not None and image_token_id != config.image_token_id:
                raise IncompatibleError(
                    f"processor image_token_id={image_token_id} but the model's is {config.image_token_id}: "
                    "the processor and model are from different checkpoints"
                )

    def _require_fixed(self, pipeline: Pipeline) -> None:
        reasons = []
        if pipeline.adaptive:
            reasons.append(f"the selector {pipeline.selector.describe()} chooses its own count")
        if not pipeline.allocator.exact:
            reasons.append(f"the allocator {pipeline.allocator.describe()} floors its shares")
        newline = getattr(self, "newline", "none")
        if newline != "none":
            reasons.append(f"newline={newline!r} adds one token per kept canvas row")
        if reasons:
            raise ConfigError(
                "Pipeline.attach needs to know each image's token count before the model runs, "
                f"but {'; '.join(reasons)}. Use Pipeline.prepare(model, processor, images=..., text=...) "
                "and pass its output to model.generate(**inputs)."
            )

    # ------------------------------------------------------------------ the tower
    def _tower(self, model: Any) -> Any:
        tower = getattr(getattr(model, "model", model), "vision_tower", None)
        if tower is None:
            raise IncompatibleError(f"{type(model).__name__} has no vision_tower")
        return tower

    def _tap(self, pipeline: Pipeline, model: Any) -> tuple[Any, Any]:
        from tokenprune.adapters.taps import check_needs, tap_for

        tower = self._tower(model)
        tap = vars(tower).get(_TAP_ATTRIBUTE)
        if tap is None:  # one per tower instance (taps are stateless between captures)
            tap = vars(tower)[_TAP_ATTRIBUTE] = tap_for(tower)
        check_needs(tap, pipeline.allocator.needs, f"allocator {pipeline.part_label('allocator')}")
        check_needs(tap, pipeline.selector.needs, f"selector {pipeline.part_label('selector')}")
        needs = pipeline.needs
        scorer = self._scorer() if needs.relevance else None
        if scorer is not None:
            needs = needs | scorer.needs_for(tap.tower)
        return tap, needs

    def _scorer(self) -> Any:
        spec = getattr(self, "relevance_scorer", None)
        if spec is None:
            raise ConfigError(
                "the pipeline needs prompt relevance (e.g. allocator 'hero' with saliency_weight < 1); "
                "give the adapter a scorer: relevance_scorer='hf:/path/to/clip' (a local CLIPModel "
                "checkpoint), 'open_clip:MODEL_NAME:/path/to/weights', or a RelevanceScorer instance"
            )
        from tokenprune.adapters.relevance import (
            HFClipScorer,
            OpenClipScorer,
            RelevanceScorer,
        )

        if isinstance(spec, RelevanceScorer):
            return spec
        cached = _SCORERS.get(spec) if isinstance(spec, str) else None
        if cached is not None:  # one load per spec, shared by every pipeline (sweeps build many)
            return cached
        if isinstance(spec, str) and spec.startswith("hf:"):
            scorer = HFClipScorer.from_pretrained(spec[3:])
        elif isinstance(spec, str) and spec.startswith("open_clip:") and spec.count(":") >= 2:
            _, name, path = spec.split(":", 2)
            scorer = OpenClipScorer.from_pretrained(name, path)
        else:
            raise ConfigError(
                f"relevance_scorer={spec!r} is not understood; use 'hf:/path/to/clip', "
                "'open_clip:MODEL_NAME:/path/to/weights' or a RelevanceScorer instance"
            )
        _SCORERS[spec] = scorer
        return scorer

    # ------------------------------------------------------------------ pruning
    def order_keys(self, layout: Layout, geometry: Any) -> torch.Tensor | None:
        """int64 ``[P, N]`` host sort keys, unique per image, such that an image's kept
        tokens read in ascending key order are :meth:`order_tokens`' order (for selections
        without merged tokens, no newline tokens); :data:`PARTITION_ORDER` when partition
        order already is (LLaVA-1.5); ``None`` (the default): no batched ordering, each
        image goes through :meth:`order_tokens`."""
        return None

    def prune_pixels(
        self,
        pipeline: Pipeline,
        model: Any,
        processor: Any,
        pixel_values: torch.Tensor,
        image_sizes: Any,
        prompts: Sequence[str | None],
    ) -> list[ImageTokens]:
        """Tower once (with the tap), allocate and select the batch, then order, gather and
        project the kept tokens of every image together (one index, one projector call)."""
        crops, layouts, geometries = self._crops_and_layouts(model, processor, pixel_values, image_sizes)
        if len(prompts) != len(layouts):
            raise ConfigError(
                f"pixel_values hold {len(layouts)} image(s) but {len(prompts)} were given; pass one "
                "image per image token (a list of images, not one stacked batch tensor)"
            )
        tap, needs = self._tap(pipeline, model)
        tower = tap.tower
        parameter = next(tower.parameters())
        batch = (torch.cat(crops) if len(crops) > 1 else crops[0]).to(device=parameter.device, dtype=parameter.dtype)

        def forward() -> None:
            with torch.inference_mode():
                tower(batch)

        annotate = self._relevance_hook(processor, tap, batch, crops, prompts) if needs.relevance else None
        pruned = run_batch(
            pipeline,
            tap,
            forward,
            layouts,
            feature_layer=model.config.vision_feature_layer,
            needs=needs,
            annotate_batch=annotate,
        )
        tokens, counts, newlines = self._ordered_tokens(pruned, geometries)
        embeddings = self.project(model, tokens).split(counts)
        newline = self._newline_embedding(model) if any(n is not None and n.numel() for n in newlines) else None
        images = []
        for index, (layout, result, geometry) in enumerate(zip(pruned.layouts, pruned.results, geometries)):
            image_embeddings, after = embeddings[index], newlines[index]
            newline_tokens = 0
            if after is not None and after.numel():
                image_embeddings = _insert_rows(image_embeddings, after, newline)
                newline_tokens = int(after.numel())
            stats = result.stats
            image_stats = LlavaImageStats(
                image_size=layout.image_size,
                partitions=stats.partitions,
                full_tokens=stats.full_tokens,
                stock_image_tokens=self._stock_image_tokens(layout, geometry),
                budget=stats.budget,
                allocated=stats.allocated,
                kept=stats.kept,
                newline_tokens=newline_tokens,
                image_tokens=int(image_embeddings.shape[0]),
            )
            images.append(ImageTokens(image_embeddings, layout, result.selection, image_stats, geometry))
        return images

    def _ordered_tokens(
        self, pruned: PrunedBatch, geometries: Sequence[Any]
    ) -> tuple[torch.Tensor, list[int], list[torch.Tensor | None]]:
        """Every image's kept tokens in LLM order, concatenated ``[T, D]``; tokens per image;
        per image, where newline rows go (``None``: none)."""
        results = pruned.results
        keys = [self.order_keys(layout, geometry) for layout, geometry in zip(pruned.layouts, geometries)]
        batched = (
            pruned.features is not None
            and getattr(self, "newline", "none") == "none"
            and all(key is not None for key in keys)
            and all(result.selection.features is None for result in results)
        )
        if batched:
            assert pruned.features is not None
            part_index, token_index, part_counts = kept_rows(pruned)
            counts = [sum(result.stats.kept) for result in results]
            if any(key is not PARTITION_ORDER for key in keys):
                # one sort of the whole batch: image-major keys, then the adapter's own order
                table = torch.cat([_partition_keys(layout) if key is PARTITION_ORDER else key for key, layout in zip(keys, pruned.layouts)])  # type: ignore[misc]
                image_of = torch.tensor(
                    [image for image, layout in enumerate(pruned.layouts) for _ in range(layout.num_partitions)]
                )
                table = to_device(table + image_of[:, None] * _IMAGE_KEY_STRIDE, part_index.device)
                order = torch.argsort(table[part_index, token_index])
                part_index, token_index = part_index[order], token_index[order]
            return pruned.features[part_index, token_index], counts, [None] * len(results)
        ordered = [
            self.order_tokens(layout, geometry, result.selection, kept)
            for layout, geometry, result, kept in zip(pruned.layouts, geometries, results, kept_features_batch(pruned))
        ]
        tokens = torch.cat([o.tokens for o in ordered]) if len(ordered) > 1 else ordered[0].tokens
        return tokens, [int(o.tokens.shape[0]) for o in ordered], [o.newline_after for o in ordered]

    def _relevance_hook(
        self, processor: Any, tap: Any, batch: torch.Tensor, crops: list[torch.Tensor], prompts: Sequence[str | None]
    ) -> Any:
        """The batch's prompt relevance from the scorer in ONE call (``score_batch``: one
        text-encoder forward for the prompts it has not cached, one head pass), reusing the
        tower's last-layer CLS when the scorer asked the tap for it."""
        scorer = self._scorer()
        image_mean, image_std = self._pixel_stats(processor)
        counts = [int(crop.shape[0]) for crop in crops]
        last = tap.num_layers - 1

        def annotate(per_image: list[Signals]) -> list[Signals]:
            cls = [signals.cls_embedding.get(last) for signals in per_image]
            tower_cls = None
            if all(c is not None for c in cls):
                tower_cls = torch.cat(cls) if len(cls) > 1 else cls[0]  # type: ignore[arg-type]
            scores = scorer.score_batch(
                batch,
                [prompt or "" for prompt in prompts],
                counts,
                pixel_mean=image_mean,
                pixel_std=image_std,
                tower=tap.tower,
                tower_cls=tower_cls,
            )
            return [
                dataclasses.replace(signals, relevance=relevance.to(torch.float32), prompt=prompt)
                for signals, relevance, prompt in zip(per_image, scores, prompts)
            ]

        return annotate

    @staticmethod
    def _pixel_stats(processor: Any) -> tuple[Any, Any]:
        image_processor = getattr(processor, "image_processor", None)
        return getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)

    # ------------------------------------------------------------------ prepare
    def prepare(
        self,
        pipeline: Pipeline,
        model: Any,
        processor: Any,
        images: Any,
        text: str | Sequence[str],
        question: str | Sequence[str] | None = None,
        **tokenizer_kwargs: Any,
    ) -> dict[str, Any]:
        """kwargs for ``model.generate`` with pruned images; see the module docs.

        ``question`` (one per text, or one for all) is what prompt-relevance strategies score
        each image against; by default the text itself with its image tokens removed (chat
        template included — pass the bare question for CLIP's 77-token window).
        """
        self.check_model(model, processor)
        image_list, texts, counts = images_and_texts(images, text, processor.image_token)
        image_token = processor.image_token
        if question is None:
            questions = [_strip_image_tokens(t, image_token) for t in texts]
        else:
            questions = [question] * len(texts) if isinstance(question, str) else list(question)
            if len(questions) != len(texts):
                raise ConfigError(f"{len(questions)} questions for {len(texts)} texts; give one per text")
        prompts = [q for q, c in zip(questions, counts) for _ in range(c)]
        inputs = self._image_inputs(processor, image_list)
        pruned = self.prune_pixels(
            pipeline, model, processor, inputs["pixel_values"], inputs.get("image_sizes"), prompts
        )
        if type(self).place is LlavaFamilyAdapter.place:  # prompt lengths from the host tokenization
            input_ids, attention_mask, lengths = self._tokenize(model, processor, texts, pruned, **tokenizer_kwargs)
            generate_kwargs = generate_inputs(
                model, input_ids, attention_mask, [image.embeddings for image in pruned], _generate_path(model)
            )
        else:  # a subclass places the tokens its own way
            generate_kwargs = self.place(model, processor, texts, pruned, **tokenizer_kwargs)
            lengths = generate_kwargs["attention_mask"].sum(dim=1).tolist()
        record_with_prefill(pipeline, pruned, counts, lengths)
        return generate_kwargs

    def place(
        self, model: Any, processor: Any, texts: list[str], images: Sequence[ImageTokens], **tokenizer_kwargs: Any
    ) -> dict[str, Any]:
        """``input_ids`` with ``K`` image placeholders per image (left padding) and the
        projected embeddings (``mm_encoder_outputs`` or ``inputs_embeds``: ``._generate_inputs``)."""
        input_ids, attention_mask, _ = self._tokenize(model, processor, texts, images, **tokenizer_kwargs)
        return generate_inputs(model, input_ids, attention_mask, [image.embeddings for image in images], _generate_path(model))

    def _tokenize(
        self, model: Any, processor: Any, texts: list[str], images: Sequence[ImageTokens], **tokenizer_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Host ``input_ids`` and ``attention_mask`` with ``K`` placeholders per image, and
        each prompt's length (from the fast tokenizer's encodings: no tensor read)."""
        image_token = processor.image_token
        counts = [t.count(image_token) for t in texts]
        expanded = _expand_placeholders(processor, texts, [image_token * image.embeddings.shape[0] for image in images])
        tokenizer_kwargs.setdefault("padding", True)
        tokenizer_kwargs.setdefault("padding_side", "left")
        tokenized = processor.tokenizer(expanded, return_tensors="pt", **tokenizer_kwargs)
        input_ids, attention_mask = tokenized["input_ids"], tokenized["attention_mask"]
        placeholders = (input_ids == model.config.image_token_id).sum(dim=1)
        expected = torch.tensor(
            [sum(int(image.embeddings.shape[0]) for image in _images_of(list(images), counts, row)) for row in range(len(texts))]
        )
        if not torch.equal(placeholders, expected):
            if tokenizer_kwargs.get("truncation") not in (None, False, "do_not_truncate"):
                raise ConfigError(
                    f"truncation={tokenizer_kwargs['truncation']!r} (max_length="
                    f"{tokenizer_kwargs.get('max_length')!r}) cut image placeholders: the texts keep "
                    f"{placeholders.tolist()} of {expected.tolist()}; raise max_length or drop truncation"
                )
            raise TokenpruneError(
                f"the tokenizer produced {placeholders.tolist()} image placeholders per text, expected "
                f"{expected.tolist()}: the image token {image_token!r} must be a single special token"
            )
        encodings = getattr(tokenized, "encodings", None)
        if encodings and len(encodings) == len(texts):
            lengths = [sum(encoding.attention_mask) for encoding in encodings]
        else:  # a slow tokenizer: read the (host) mask
            lengths = [int(length) for length in attention_mask.sum(dim=1).tolist()]
        return input_ids, attention_mask, lengths

    # ------------------------------------------------------------------ attach
    @contextmanager
    def attach(self, pipeline: Pipeline, model: Any, processor: Any) -> Iterator[None]:
        """Per-instance wrappers on ``processor`` and ``model``; restored on exit."""
        self.check_model(model, processor)
        self._require_fixed(pipeline)
        self._tap(pipeline, model)  # CLS/tower checks before anything is wrapped
        base = getattr(model, "model", model)
        adapter = self
        recent_prompts: list[str] = []

        def image_tokens(size: Any) -> int:
            layout, geometry = adapter._layout_for_size(model, processor, {}, 0, size)
            return adapter.fixed_image_tokens(pipeline, layout, geometry)

        def remember_prompts(text: list[str]) -> None:
            # the prompts, in image order, for strategies that read prompt relevance
            recent_prompts[:] = [
                _strip_image_tokens(t, processor.image_token)
                for t in text
                for _ in range(t.count(processor.image_token))
            ]

        original_features = base.get_image_features
        signature = inspect.signature(original_features)

        @functools.wraps(original_features)
        def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(pixel_values, *args, **kwargs).arguments
            for name in ("vision_feature_layer", "vision_feature_select_strategy"):
                wanted = bound.get(name)
                configured = getattr(model.config, name, None)
                if wanted is not None and wanted != configured:
                    raise ConfigError(
                        f"get_image_features({name}={wanted!r}) differs from the model config's "
                        f"{configured!r}; tokenprune prunes the configured feature layer"
                    )
            image_sizes = bound.get("image_sizes")
            count = pixel_values.shape[0]
            prompts = recent_prompts if len(recent_prompts) == count else [None] * count
            pruned = adapter.prune_pixels(pipeline, model, processor, pixel_values, image_sizes, prompts)
            pipeline.record_images(pruned)
            return image_features_output(original_features, [p.embeddings for p in pruned])

        processor_hooks = {**processor_count_hooks(processor, image_tokens), **prompt_hook(processor, remember_prompts)}
        wrappers = {(processor, name): hook for name, hook in processor_hooks.items()}
        wrappers[(base, "get_image_features")] = get_image_features
        with wrapped(wrappers, processor, base):
            yield

    @abstractmethod
    def _layout_for_size(
        self, model: Any, processor: Any, image_inputs: dict, image_idx: int, size: Any
    ) -> tuple[Layout, Any]:
        """Layout (and geometry) of one image from the processor's outputs (attach mode)."""


# ---------------------------------------------------------------------------- helpers


@contextmanager
def wrapped(wrappers: dict[tuple[Any, str], Any], *owners: Any) -> Iterator[None]:
    """Install per-instance ``{(owner, name): wrapper}`` while ``owners`` are attached
    exclusively; on exit (also on an exception) every attribute is as it was."""
    with _exclusive(*owners):
        saved = {key: key[0].__dict__.get(key[1], _MISSING) for key in wrappers}
        for (owner, name), wrapper in wrappers.items():
            setattr(owner, name, wrapper)
        try:
            yield
        finally:
            for (owner, name), previous in saved.items():
                if previous is _MISSING:
                    owner.__dict__.pop(name, None)
                else:
                    setattr(owner, name, previous)


@contextmanager
def _exclusive(*owners: Any) -> Iterator[None]:
    """One ``attach`` at a time per processor and model (any thread): wrappers saved and
    restored by overlapping contexts would leave one installed after every context exits."""
    keys = {id(owner) for owner in owners}
    with _ATTACH_LOCK:
        busy = [type(owner).__name__ for owner in owners if id(owner) in _ATTACHED]
        if busy:
            raise ConfigError(
                f"this {' and '.join(busy)} is already inside a Pipeline.attach context (this thread or "
                "another); attach one pipeline at a time per model and processor, or use "
                "Pipeline.prepare, which wraps nothing"
            )
        _ATTACHED.update(keys)
    try:
        yield
    finally:
        with _ATTACH_LOCK:
            _ATTACHED.difference_update(keys)


def images_and_texts(images: Any, text: Any, image_token: str) -> tuple[list[Any], list[str], list[int]]:
    """``prepare``'s arguments checked: the flat image list, the texts, and image tokens per text
    (every text holds at least one, and there is one image per image token)."""
    image_list = _as_list(images, "images")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"text must be a string or a list of strings, got {type(text).__name__}")
    counts = [t.count(image_token) for t in texts]
    for index, count in enumerate(counts):
        if count == 0:
            raise ConfigError(
                f"text[{index}] has no image token {image_token!r}; put one where each image goes "
                f"(e.g. via processor.apply_chat_template). Text: {texts[index][:120]!r}"
            )
    if sum(counts) != len(image_list):
        raise ConfigError(
            f"the texts hold {sum(counts)} image token(s) {image_token!r} but {len(image_list)} image(s) "
            "were given; each image needs exactly one image token"
        )
    return image_list, texts, counts


def _as_list(images: Any, what: str) -> list[Any]:
    """Images as a flat list; nested lists (one list per prompt, HF's batching) are flattened."""
    if images is None:
        raise ConfigError(f"{what} is required: give one image or a list of images")
    if isinstance(images, (list, tuple)):
        flat = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        if not flat:
            raise ConfigError(f"{what} is an empty list")
    else:
        flat = [images]
    for index, image in enumerate(flat):
        if getattr(image, "ndim", 0) > 3:
            raise ConfigError(
                f"{what}[{index}] is a {image.ndim}-D array of shape {tuple(image.shape)}, a stacked batch; "
                "pass a list with one image per image token (a PIL image or a [C, H, W] / [H, W, C] array)"
            )
    return flat


def _insert_rows(embeddings: torch.Tensor, after: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
    """Insert ``row`` after each position in ``after`` (ascending) of ``embeddings``."""
    if row is None:
        raise TokenpruneError("this model has no image_newline embedding for newline tokens")
    total = embeddings.shape[0] + after.numel()
    out = embeddings.new_empty(total, embeddings.shape[1])
    shift = torch.arange(after.numel(), device=after.device)
    newline_slots = after + 1 + shift
    is_newline = torch.zeros(total, dtype=torch.bool, device=embeddings.device)
    is_newline[newline_slots.to(embeddings.device)] = True
    out[is_newline] = row.to(embeddings.device, embeddings.dtype)
    out[~is_newline] = embeddings
    return out


def _expand_placeholders(processor: Any, texts: list[str], replacements: list[str]) -> list[str]:
    """Replace each image token, in order, by its replacement (the processor's own routine)."""
    if hasattr(processor, "get_text_with_replacements"):
        expanded, _ = processor.get_text_with_replacements(list(texts), replacements, [], [])
        return list(expanded)
    token = processor.image_token
    queue = iter(replacements)
    return ["".join(part + (next(queue) if i < t.count(token) else "") for i, part in enumerate(t.split(token))) for t in texts]


def _generate_path(model: Any) -> Any:
    """:func:`generate_path` of ``model``, detected once per model class (unless the
    instance overrides the methods it inspects)."""
    detect = _generate_inputs.generate_path
    if any(name in vars(model) for name in ("forward", "prepare_inputs_for_generation")):
        return detect(model)
    key = (type(model), detect)
    path = _GENERATE_PATHS.get(key)
    if path is None:
        path = _GENERATE_PATHS[key] = detect(model)
    return path


@functools.lru_cache(maxsize=256)
def _partition_key_table(partitions: int, tokens: int) -> torch.Tensor:
    return torch.arange(partitions * tokens, dtype=torch.int64).view(partitions, tokens)


def _partition_keys(layout: Layout) -> torch.Tensor:
    """Sort keys that keep partition order (partition-major, then token index)."""
    return _partition_key_table(layout.num_partitions, layout.tokens_per_partition)


def _images_of(pruned: Sequence[ImageTokens], counts: list[int], row: int) -> list[ImageTokens]:
    start = sum(counts[:row])
    return pruned[start : start + counts[row]]


def record_with_prefill(pipeline: Pipeline, images: Sequence[ImageTokens], counts: list[int], lengths: Sequence[int]) -> None:
    """``pipeline.record_images`` of every prompt's images, each with its prompt's prefill
    length (``counts[row]`` images belong to prompt ``row``)."""
    pipeline.record_images(
        [
            dataclasses.replace(image, stats=_with_prefill(image.stats, int(length)))
            for row, length in enumerate(lengths)
            for image in _images_of(images, counts, row)
        ]
    )


def _with_prefill(stats: LlavaImageStats, prefill: int) -> LlavaImageStats:
    return LlavaImageStats(**{**stats.__dict__, "prefill_length": prefill})
