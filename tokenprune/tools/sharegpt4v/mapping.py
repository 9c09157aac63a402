"""Original LLaVA tensor names -> ``LlavaForConditionalGeneration`` names, planned and checked before any data moves."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from .reader import CheckpointError, _Checkpoint, _listing

if TYPE_CHECKING:
    from transformers import LlavaConfig

# Original LLaVA layout.
_SRC_VISION = "model.vision_tower.vision_tower."
_SRC_PROJECTOR = {
    "model.mm_projector.0.": "linear_1.",
    "model.mm_projector.2.": "linear_2.",
}
_SRC_LM_HEAD = "lm_head."
_SRC_LM = "model."
_INV_FREQ = re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_POSITION_IDS = "embeddings.position_ids"
# Parts of a full CLIP checkpoint that a LLaVA vision tower never loads.
_CLIP_NON_VISION = (
    "text_model.",
    "text_projection.",
    "visual_projection.",
    "logit_scale",
)


@dataclass(frozen=True)
class _Target:
    """Names and shapes of the tensors a ``LlavaForConditionalGeneration`` checkpoint holds."""

    shapes: dict[str, tuple[int, ...]]
    lm: dict[str, str]  # name relative to the Llama decoder -> full name
    vision: dict[str, str]  # name relative to the CLIP vision model (no "vision_model.") -> full name
    projector: dict[str, str]  # "linear_1.weight", ... -> full name
    lm_head: dict[str, str]  # "weight" -> full name (empty when tied)
    resized: frozenset[str]  # full names whose first dim is the vocabulary
    vocab_size: int


def _strip(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def _target(config: LlavaConfig) -> _Target:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        for tied in getattr(model, "_tied_weights_keys", None) or {}:
            shapes.pop(tied, None)
    module_names = {id(module): name for name, module in model.named_modules()}

    def part(module: torch.nn.Module, normalise: bool = False) -> dict[str, str]:
        prefix = module_names[id(module)] + "."
        names = {}
        for local in module.state_dict():
            full = prefix + local
            if full in shapes:
                names[_strip(local, "vision_model.") if normalise else local] = full
        return names

    inner = model.model
    lm = part(inner.language_model)
    lm_head = part(model.lm_head)
    resized = frozenset({lm["embed_tokens.weight"], *lm_head.values()})
    return _Target(
        shapes, lm, part(inner.vision_tower, normalise=True), part(inner.multi_modal_projector), lm_head,
        resized, config.text_config.vocab_size,
    )  # fmt: skip


# --------------------------------------------------------------------------- name mapping


@dataclass(frozen=True)
class _Action:
    """What to do with one source tensor."""

    kind: Literal["copy", "resize", "check_inv_freq", "check_position_ids", "skip"]
    target: str | None = None


def _map_source_name(name: str, target: _Target) -> _Action | None:
    if name.startswith(_SRC_VISION):
        local = _strip(_strip(name, _SRC_VISION), "vision_model.")
        return _vision_action(local, target)
    for prefix, local_prefix in _SRC_PROJECTOR.items():
        if name.startswith(prefix):
            full = target.projector.get(local_prefix + name[len(prefix) :])
            return _Action("copy", full) if full else None
    if name.startswith(_SRC_LM_HEAD):
        full = target.lm_head.get(name[len(_SRC_LM_HEAD) :])
        return _Action("resize", full) if full else None
    if name.startswith(_SRC_LM) and not name.startswith(("model.vision_tower.", "model.mm_projector.")):
        local = name[len(_SRC_LM) :]
        if local in target.lm:
            full = target.lm[local]
            return _Action("resize" if full in target.resized else "copy", full)
        if _INV_FREQ.match(local):
            return _Action("check_inv_freq")
    return None


def _vision_action(local: str, target: _Target) -> _Action | None:
    if local in target.vision:
        return _Action("copy", target.vision[local])
    if local == _POSITION_IDS:
        return _Action("check_position_ids")
    return None


def _map_tower_name(name: str, target: _Target) -> _Action | None:
    if name.startswith(_CLIP_NON_VISION):
        return _Action("skip")
    return _vision_action(_strip(name, "vision_model."), target)


def _plan(
    source: _Checkpoint, tower: _Checkpoint | None, target: _Target
) -> tuple[dict[str, _Action], dict[str, _Action]]:
    """Map every source (and tower) tensor; raise one error naming every problem."""
    source_plan: dict[str, _Action] = {}
    tower_plan: dict[str, _Action] = {}
    unexpected: list[str] = []
    filled: dict[str, str] = {}
    duplicates: list[str] = []
    bad_shapes: list[str] = []
    inputs: list[tuple[str, _Checkpoint, dict[str, _Action], Any]] = [
        ("", source, source_plan, _map_source_name)
    ]
    if tower is not None:
        inputs.append((f"{tower.directory}: ", tower, tower_plan, _map_tower_name))
    for label, checkpoint, plan, mapper in inputs:
        for name, info in checkpoint.tensors.items():
            action = mapper(name, target)
            if action is None:
                unexpected.append(label + name)
                continue
            plan[name] = action
            if action.target is None:
                continue
            if action.target in filled:
                duplicates.append(f"{action.target} (from {filled[action.target]} and {label + name})")
                continue
            filled[action.target] = label + name
            expected = target.shapes[action.target]
            shape = info.shape
            fits = (
                len(shape) == len(expected) and shape[1:] == expected[1:] and shape[0] <= expected[0]
                if action.kind == "resize"
                else shape == expected
            )
            if not fits:
                bad_shapes.append(f"{label + name} {list(shape)} -> {action.target} {list(expected)}")
    missing = sorted(set(target.shapes) - set(filled))
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} source tensor(s) with no place in LlavaForConditionalGeneration: {_listing(sorted(unexpected))}"
        )
    if missing:
        problems.append(
            f"{len(missing)} LlavaForConditionalGeneration tensor(s) that no source tensor fills: {_listing(missing)}"
        )
    if duplicates:
        problems.append(f"tensors filled twice: {_listing(duplicates)}")
    if bad_shapes:
        problems.append(f"shape mismatches (source -> target): {_listing(bad_shapes)}")
    if problems:
        raise CheckpointError("the checkpoint does not convert:\n  " + "\n  ".join(problems))
    return source_plan, tower_plan
