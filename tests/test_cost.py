"""The analytic cost model reproduces HERO's Table 4 (LLaVA-NeXT-7B on MME)."""

from __future__ import annotations

import pytest

from tokenprune.cost import KNOWN_LLMS, LLMShape, kv_cache_bytes, prefill_flops
from tokenprune.errors import ConfigError


@pytest.mark.parametrize(("tokens", "tflops"), [(2673, 38.4), (583, 7.7)])
def test_hero_table_4_flops_within_two_percent(tokens, tflops):
    assert prefill_flops(tokens, "vicuna-7b") / 1e12 == pytest.approx(tflops, rel=0.02)


def test_hero_table_4_40_percent_row_is_not_consistent_with_its_own_formula():
    # HERO reports 14.1 TFLOPs for 1105 tokens; its formula gives 14.95 (6 % more). The
    # 100 % and 20 % rows match, so the 40 % row is the odd one; we document, not fudge.
    assert prefill_flops(1105, "vicuna-7b") / 1e12 == pytest.approx(14.95, abs=0.01)


@pytest.mark.parametrize(("tokens", "kv_mb"), [(2673, 1336.5), (1105, 552.5), (583, 291.5)])
def test_hero_table_4_kv_cache_exactly(tokens, kv_mb):
    assert kv_cache_bytes(tokens, "vicuna-7b") / 2**20 == kv_mb


def test_formula_by_hand_for_a_tiny_model():
    shape = LLMShape(hidden_size=4, intermediate_size=6, num_layers=2, num_attention_heads=2, num_key_value_heads=1)
    # per layer: 8*3*16 + 4*9*4 + 6*3*4*6 = 384 + 144 + 432 = 960
    assert prefill_flops(3, shape) == 1920
    assert kv_cache_bytes(3, shape, bytes_per_value=4) == 2 * 3 * 2 * 1 * 2 * 4


def test_from_config_and_errors():
    class Text:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads = 4096, 11008, 32, 32, 32

    class Vlm:
        text_config = Text()

    assert LLMShape.from_config(Vlm()).hidden_size == 4096
    assert KNOWN_LLMS["vicuna-13b"].num_layers == 40
    with pytest.raises(ConfigError, match="unknown LLM 'gpt'"):
        prefill_flops(10, "gpt")
    with pytest.raises(ConfigError, match="num_tokens must be an int >= 0"):
        prefill_flops(-1, "vicuna-7b")
    with pytest.raises(ConfigError, match="not divisible"):
        LLMShape(10, 10, 1, 3)
    with pytest.raises(ConfigError, match="lacks a field"):
        LLMShape.from_config(object())
