"""Pictures of what a pipeline kept: each partition's crop with its kept tokens lit.

One panel per partition (thumbnail, then tiles in grid order), the crop as the vision tower
saw it, pruned patches dimmed, padding hatched grey, and a bar under each panel showing
kept / allocated / valid tokens. Drawn with PIL only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .contracts import Layout, Selection

__all__ = ["kept_tokens_figure", "crops_to_images"]

_PANEL = 224
_GAP = 12
_BAR = 34
_TITLE = 18


def crops_to_images(crops: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Any]:
    """``[P, 3, H, W]`` normalised pixels back to PIL images."""
    from PIL import Image

    pixels = crops.detach().float().cpu()
    if mean is not None and std is not None:
        pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def _panel(image: Any, layout: Layout, selection: Selection, partition: int) -> Any:
    from PIL import Image, ImageDraw

    side = layout.tokens_per_side
    panel = image.convert("RGB").resize((_PANEL, _PANEL), Image.Resampling.BILINEAR)
    shade = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept = torch.zeros(side * side, dtype=torch.bool)
    kept[selection.indices[partition].cpu()] = True
    valid = layout.valid[partition].cpu()
    cell = _PANEL / side
    for token in range(side * side):
        y, x = divmod(token, side)
        box = (round(x * cell), round(y * cell), round((x + 1) * cell) - 1, round((y + 1) * cell) - 1)
        if not bool(valid[token]):
            draw.rectangle(box, fill=(128, 128, 128, 200))
        elif not bool(kept[token]):
            draw.rectangle(box, fill=(0, 0, 0, 165))
        else:
            draw.rectangle(box, outline=(255, 215, 0, 255))
    return Image.alpha_composite(panel.convert("RGBA"), shade).convert("RGB")


def kept_tokens_figure(
    crops: Sequence[Any],
    layout: Layout,
    selection: Selection,
    allocated: Sequence[int],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Write a PNG of the kept tokens over each partition; returns its path."""
    from PIL import Image, ImageDraw

    names = layout.partition_names()
    rows, cols = layout.tiles
    kept = selection.counts.tolist()
    capacity = layout.capacity.tolist()
    # thumbnail on the left, the tile grid to its right, as the image is laid out
    positions: list[tuple[int, int]] = []
    if layout.has_thumbnail:
        positions.append((0, 0))
        positions += [(r, 1 + c) for r in range(rows) for c in range(cols)]
        grid_rows, grid_cols = max(rows, 1), cols + 1
    elif rows:
        positions = [(r, c) for r in range(rows) for c in range(cols)]
        grid_rows, grid_cols = rows, cols
    else:
        positions, grid_rows, grid_cols = [(0, 0)], 1, 1
    cell_w, cell_h = _PANEL + _GAP, _TITLE + _PANEL + _BAR + _GAP
    header = 28 if title else 0
    figure = Image.new("RGB", (grid_cols * cell_w + _GAP, header + grid_rows * cell_h + _GAP), "white")
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((_GAP, 8), title, fill="black")
    for p, (r, c) in enumerate(positions):
        left, top = _GAP + c * cell_w, header + _GAP + r * cell_h
        draw.text((left, top), names[p], fill="black")
        figure.paste(_panel(crops[p], layout, selection, p), (left, top + _TITLE))
        bar_top = top + _TITLE + _PANEL + 6
        draw.rectangle((left, bar_top, left + _PANEL, bar_top + 10), outline="gray")
        if capacity[p]:
            draw.rectangle((left, bar_top, left + round(_PANEL * allocated[p] / capacity[p]), bar_top + 10), fill=(180, 200, 235))
            draw.rectangle((left, bar_top, left + round(_PANEL * kept[p] / capacity[p]), bar_top + 10), fill=(40, 90, 220))
        draw.text((left, bar_top + 13), f"kept {kept[p]} / budget {allocated[p]} / valid {capacity[p]}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)
    return path
