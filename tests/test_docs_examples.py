"""The code in docs/extending.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import tokenprune as tp

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_extending_examples_run():
    blocks = python_blocks(DOCS / "extending.md")
    assert len(blocks) >= 4
    namespace: dict[str, object] = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOCS / "extending.md"), "exec"), namespace)
        assert "attention_shift" in tp.list_selectors() and "by_relevance" in tp.list_allocators()
        assert isinstance(namespace["pipe"].adapter, tp.VLMAdapter)  # the worked adapter example ran
        assert namespace["pipe"].last_stats[0].kept == (12,) and namespace["answer"].shape[0] == 1
        assert tp.build_selector("attention_shift@paper", late=-2).late == -2
        namespace["test_attention_shift"]()  # the hypothesis check shown in the docs passes
    finally:
        tp.SELECTORS.unregister("attention_shift")
        tp.ALLOCATORS.unregister("by_relevance")
        tp.ADAPTERS.unregister("column_llava")
