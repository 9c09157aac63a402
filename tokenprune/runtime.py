"""What running a model needs, shared by ``tokenprune run``, sweeps and the lmms-eval plugin.

The layer between the core and the experiments/CLI: the one table of dtype names, the rank
and device of this process from the launcher's environment, reading a YAML/TOML config file,
loading a local checkpoint (or the built-in tiny model) with the adapter that serves its
class, chat prompts, and the feature detection ``tokenprune doctor`` reports (which generate
path a model class takes, which attention tap its vision tower gets).

Which adapter serves a model class comes from the adapters' own ``model_classes``: an
adapter claims the classes it declares itself; a subclass that inherits them (``sharegpt4v``
of ``llava``) is a variant chosen by name.

transformers is imported inside functions; importing this module costs torch only.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomllib
import torch

from .errors import ConfigError, IncompatibleError

__all__ = [
    "BUILTIN_MODEL",
    "DTYPES",
    "DTYPE_ALIASES",
    "adapters_by_model_class",
    "chat_prompt",
    "default_device",
    "generate_path",
    "load_model",
    "parse_dtype",
    "rank_from_env",
    "read_config_file",
    "tap_name",
]

#: The model spec that names the built-in tiny LLaVA-NeXT (random weights, for demos and tests).
BUILTIN_MODEL = "builtin"

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""dtype names everywhere (``--dtype``, config ``dtype``, ``model_args``); ``auto`` keeps the checkpoint's."""

#: Other spellings accepted where a dtype is read from text (lmms-eval ``model_args``, configs).
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

# (rank, world size) variables of the launchers, first match wins.
_RANK_VARIABLES = (
    ("RANK", "WORLD_SIZE"),  # torchrun, i.e. accelerate launch --multi_gpu
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # accelerate's multi-CPU mode (mpirun)
    ("PMI_RANK", "PMI_SIZE"),
)


def parse_dtype(value: Any, what: str = "dtype") -> torch.dtype | None:
    """A dtype from a name of :data:`DTYPES` or :data:`DTYPE_ALIASES` (any case), a torch dtype, or None."""
    if value is None or (isinstance(value, torch.dtype) and value in DTYPES.values()):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        name = DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise ConfigError(
        f"{what}={value!r} is not understood; use {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})"
    )


# ---------------------------------------------------------------------- ranks and devices
def rank_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process from the launcher's variables, else ``(0, 1)``.

    Reads ``RANK``/``WORLD_SIZE`` (torchrun, accelerate), then ``OMPI_COMM_WORLD_*`` (mpirun),
    then ``PMI_*``; the first pair with either variable set is used.
    """
    env = os.environ if environ is None else environ
    for rank_name, size_name in _RANK_VARIABLES:
        if rank_name in env or size_name in env:
            try:
                rank, world_size = int(env.get(rank_name, "0")), int(env.get(size_name, "1"))
            except ValueError:
                raise ConfigError(
                    f"{rank_name}/{size_name} must be ints, got {env.get(rank_name)!r}/{env.get(size_name)!r}"
                ) from None
            if world_size < 1 or not 0 <= rank < world_size:
                raise ConfigError(f"{rank_name}={rank} is not in [0, {size_name}={world_size})")
            return rank, world_size
    return 0, 1


def default_device(environ: Mapping[str, str] | None = None) -> str:
    """``cpu`` without CUDA; else ``cuda:$LOCAL_RANK`` under a launcher that sets it, else ``cuda``."""
    if not torch.cuda.is_available():
        return "cpu"
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK")
    if local is None:
        return "cuda"
    try:
        return f"cuda:{int(local)}"
    except ValueError:
        raise ConfigError(f"LOCAL_RANK must be an int, got {local!r}") from None


# ---------------------------------------------------------------------- config files
def read_config_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml``/``.toml`` file (``yaml.safe_load`` only)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    elif path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    else:
        raise ConfigError(f"{path}: a sweep config must be .yaml, .yml or .toml")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return dict(data)


# ---------------------------------------------------------------------- adapters and models
def adapters_by_model_class() -> dict[str, str]:
    """Model class name -> the registered adapter that declares it in its own ``model_classes``."""
    from .registry import ADAPTERS

    owners: dict[str, str] = {}
    for name, entry in sorted(ADAPTERS.entries().items()):
        declared = vars(entry.factory).get("model_classes", ()) if inspect.isclass(entry.factory) else ()
        for model_class in declared:
            owners.setdefault(model_class, name)
    return owners


def load_model(
    spec: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[Any, Any, str]:
    """Model, processor and adapter name for a local checkpoint folder (no download).

    ``spec`` :data:`BUILTIN_MODEL` gives the built-in tiny LLaVA-NeXT with random weights
    (seeded by ``seed``); ``dtype`` ``None`` keeps the checkpoint's own.
    """
    if str(spec) == BUILTIN_MODEL:
        from .tiny import tiny_llava_next

        model, processor = tiny_llava_next(seed=seed)
        return model.to(device=device, dtype=dtype), processor, "llava_next"
    import transformers

    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model {spec!s}: no config.json there; give a local checkpoint folder")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    owners = adapters_by_model_class()
    names = [a for a in architectures if a in owners and hasattr(transformers, a)]
    if not names:
        raise ConfigError(
            f"--model {spec!s} is a {architectures or type(config).__name__}; tokenprune runs "
            f"{', '.join(owners)} checkpoints (convert ShareGPT4V ones with "
            "'tokenprune convert sharegpt4v')"
        )
    model_class = getattr(transformers, names[0])
    model = model_class.from_pretrained(folder, local_files_only=True, dtype=dtype or "auto").to(device).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor, owners[names[0]]


def chat_prompt(processor: Any, question: str, *, images: int = 1, chat_template: str | None = None) -> str:
    """A one-turn chat prompt with one image placeholder per image, then ``question``.

    Uses ``chat_template`` or the processor's own; without either, LLaVA's
    ``USER: <image>\\n... ASSISTANT:``. Placeholders already in ``question`` are kept (they
    must then number ``images``).
    """
    token = processor.image_token
    inline = question.count(token)
    if inline and inline != images:
        raise ConfigError(f"the prompt holds {inline} image token(s) {token!r} but {images} image(s) were given")
    content: list[dict[str, str]] = [] if inline else [{"type": "image"}] * images
    content.append({"type": "text", "text": question})
    template = chat_template or getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    prefix = "" if inline else f"{token}\n" * images
    return f"USER: {prefix}{question} ASSISTANT:"


# ---------------------------------------------------------------------- feature detection
def generate_path(model_class: type) -> str:
    """How pruned image tokens reach ``model_class``'s ``generate``.

    ``"mm_encoder_outputs"`` when its forward takes precomputed encoder outputs (transformers
    >= 5.18), else ``"inputs_embeds"`` (the embedded prompt with the kept tokens in place).
    """
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return "inputs_embeds"
    return "mm_encoder_outputs" if "mm_encoder_outputs" in parameters else "inputs_embeds"


def tap_name(model_class: type) -> str:
    """The attention tap class that the default vision tower of ``model_class`` gets.

    The tower is built from the model's default config on the meta device (no memory, no
    weights). Raises :class:`IncompatibleError` when no tap serves it.
    """
    from transformers import AutoModel

    from .adapters.taps import tap_for

    vision_config = getattr(model_class.config_class(), "vision_config", None)
    if vision_config is None:
        raise IncompatibleError(f"{model_class.__name__}'s config has no vision_config")
    with torch.device("meta"):
        tower = AutoModel.from_config(vision_config)
    return type(tap_for(tower)).__name__
