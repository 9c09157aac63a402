"""Document functions of the local task tokenprune_tiny_vqa (see tokenprune_tiny_vqa.yaml)."""

from pathlib import Path
from typing import Any

from PIL import Image

FOLDER = Path(__file__).resolve().parent


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The document's picture; its path is relative to this folder."""
    with Image.open(FOLDER / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    return doc["question"]
