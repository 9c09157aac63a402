"""One override grammar: Pipeline.from_dict, sweep grids and lmms-eval model_args accept the same keys."""

from __future__ import annotations

from pathlib import Path

import pytest

import tokenprune as tp
from tokenprune.experiments.sweep import grid_points, load_config
from tokenprune.overrides import apply_overrides

BASE = {"adapter": "llava_next", "allocator": "hired", "selector": "cls_final", "budget": 0.2}
KEYS = {"allocator.alpha": 0.3, "budget": 0.1, "selector": "hero", "double_softmax": True, "adapter.newline": "row"}


def test_apply_overrides_replaces_parts_then_sets_options():
    config = apply_overrides(BASE, KEYS)
    assert config == {
        "adapter": {"name": "llava_next", "newline": "row"},
        "allocator": {"name": "hired", "alpha": 0.3},
        "selector": {"name": "hero", "double_softmax": True},
        "budget": 0.1,
    }


def test_bare_options_route_to_the_one_part_that_takes_them():
    config = apply_overrides(BASE, {"alpha": 0.3})
    assert config["allocator"] == {"name": "hired", "alpha": 0.3}
    with pytest.raises(tp.ConfigError, match=r"no part of this pipeline takes option 'alpah'. Did you mean 'alpha'"):
        apply_overrides(BASE, {"alpah": 0.3})
    with pytest.raises(tp.ConfigError, match=r"Did you mean 'selector\.final_layer'"):
        apply_overrides(BASE, {"selectr.final_layer": 1})
    with pytest.raises(tp.ConfigError, match="given twice with different values"):
        apply_overrides(BASE, {"alpha": 0.3, "allocator.alpha": 0.4})
    with pytest.raises(tp.ConfigError, match="adapter options were given without an adapter"):
        apply_overrides({**BASE, "adapter": None}, {"adapter.newline": "row"})


def _via_from_dict(keys: dict) -> tp.Pipeline:
    return tp.Pipeline.from_dict({**BASE, **keys})


def _via_sweep(keys: dict) -> tp.Pipeline:
    (point,) = grid_points(load_config({"base": BASE, "grid": {key: [value] for key, value in keys.items()}}))
    return tp.Pipeline.from_dict(point.config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenprune.tiny import save_tiny, tiny_llava_next

    path = tmp_path_factory.mktemp("tiny_next")
    save_tiny(*tiny_llava_next(seed=0), path)
    return path


def _via_lmms_eval(keys: dict, checkpoint: Path) -> tp.Pipeline:
    pytest.importorskip("lmms_eval")
    from tokenprune.experiments.lmms_eval_plugin import TokenpruneLlavaNext

    args = {"pretrained": str(checkpoint), "dtype": "float32", "device": "cpu", **BASE, **keys}
    return TokenpruneLlavaNext.create_from_arg_string(args).pipe


def test_the_same_keys_work_through_from_dict_sweep_grids_and_lmms_eval(checkpoint):
    expected = tp.Pipeline(
        adapter="llava_next", allocator="hired", selector="hero", budget=0.1,
        allocator_options={"alpha": 0.3}, selector_options={"double_softmax": True},
        adapter_options={"newline": "row"},
    )  # fmt: skip
    pipelines = [_via_from_dict(KEYS), _via_sweep(KEYS), _via_lmms_eval(KEYS, checkpoint)]
    for pipe in pipelines:
        assert pipe == expected and pipe.to_dict() == expected.to_dict()
