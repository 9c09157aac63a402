"""Analytic prefill cost of the language model: FLOPs and KV-cache bytes.

Per decoder layer, a prefill over ``n`` tokens with hidden size ``d`` and MLP width ``m``
costs ``8·n·d² + 4·n²·d + 6·n·d·m`` FLOPs: the q/k/v/o projections (4 matmuls of
``n×d×d``, 2 FLOPs per multiply-add), the attention scores and their weighted sum (2
matmuls of ``n×n×d``), and a gated MLP (3 matmuls of ``n×d×m``). This is the formula HERO
uses for its Table 4; with Vicuna-7B (d = 4096, m = 11008, 32 layers) it gives 38.4
TFLOPs for LLaVA-NeXT's 2,673 input tokens and 7.7 for 583.

The KV cache holds a key and a value vector per token, layer and KV head:
``2 · n · layers · kv_heads · head_dim · bytes_per_value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["LLMShape", "prefill_flops", "kv_cache_bytes", "KNOWN_LLMS"]


@dataclass(frozen=True)
class LLMShape:
    """The dimensions of a decoder-only language model that set its prefill cost."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LLMShape.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )

    @classmethod
    def from_config(cls, config: Any) -> LLMShape:
        """From a transformers text config (or a VLM config with ``text_config``)."""
        config = getattr(config, "text_config", config)
        try:
            return cls(
                hidden_size=int(config.hidden_size),
                intermediate_size=int(config.intermediate_size),
                num_layers=int(config.num_hidden_layers),
                num_attention_heads=int(config.num_attention_heads),
                num_key_value_heads=getattr(config, "num_key_value_heads", None),
            )
        except AttributeError as error:
            raise ConfigError(f"{type(config).__name__} lacks a field the cost model needs: {error}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


#: Language models of the papers' VLMs (LLaVA-1.5 / LLaVA-NeXT with Vicuna).
KNOWN_LLMS: dict[str, LLMShape] = {
    "vicuna-7b": LLMShape(4096, 11008, 32, 32),
    "vicuna-13b": LLMShape(5120, 13824, 40, 40),
}


def _check_tokens(num_tokens: int) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ConfigError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    return num_tokens


def prefill_flops(num_tokens: int, llm: LLMShape | str) -> int:
    """FLOPs of a prefill over ``num_tokens`` tokens (all layers)."""
    shape = KNOWN_LLMS[llm] if isinstance(llm, str) and llm in KNOWN_LLMS else llm
    if not isinstance(shape, LLMShape):
        raise ConfigError(f"unknown LLM {llm!r}; known: {', '.join(KNOWN_LLMS)} or pass an LLMShape")
    n, d, m = _check_tokens(num_tokens), shape.hidden_size, shape.intermediate_size
    return shape.num_layers * (8 * n * d * d + 4 * n * n * d + 6 * n * d * m)


def kv_cache_bytes(num_tokens: int, llm: LLMShape | str, bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache after a prefill of ``num_tokens`` tokens (fp16 by default)."""
    shape = KNOWN_LLMS[llm] if isinstance(llm, str) and llm in KNOWN_LLMS else llm
    if not isinstance(shape, LLMShape):
        raise ConfigError(f"unknown LLM {llm!r}; known: {', '.join(KNOWN_LLMS)} or pass an LLMShape")
    kv_heads = shape.num_key_value_heads or shape.num_attention_heads
    return 2 * _check_tokens(num_tokens) * shape.num_layers * kv_heads * shape.head_dim * bytes_per_value
