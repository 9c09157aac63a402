"""A small built-in evaluation set: procedurally drawn scenes with answerable questions.

Twelve images are drawn with PIL from fixed coordinates (no randomness, no binary files in
the repository): flat-coloured shapes on plain backgrounds, counts, positions, a word and a
number. Every question can be answered from the pixels alone, and the images come in many
aspect ratios (square, 3:1 and 4:1 wide, 1:2 and 1:3 tall) so LLaVA-NeXT picks different
tile grids for them. Shapes are drawn without anti-aliasing in the exact RGB values of
:data:`PALETTE`, which makes them easy to check by pixel.

Use :func:`sample_set` for the :class:`~tokenprune.experiments.Sample` list,
:func:`sample_image` for one demo picture, :func:`render` for one scene by id and
:func:`write_sample_set` to export PNGs and a JSONL file (the JSONL loader's format).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

    from .datasets import Sample

__all__ = ["PALETTE", "SCENE_IDS", "render", "sample_image", "sample_set", "write_sample_set"]

Colour = tuple[int, int, int]

PALETTE: dict[str, Colour] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
    "yellow": (245, 205, 40), "orange": (245, 130, 30), "purple": (140, 60, 180),
    "black": (20, 20, 20), "white": (250, 250, 250), "gray": (128, 128, 128),
    "beige": (236, 226, 204), "navy": (25, 30, 70), "sky": (150, 200, 240),
}  # fmt: skip
"""Colour name -> exact RGB drawn. Answer colours are the first nine (common names)."""


# ---------------------------------------------------------------- drawing helpers
def _circle(draw: ImageDraw.ImageDraw, cx: int, cy: int, radius: int, colour: str) -> None:
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=PALETTE[colour])


def _square(draw: ImageDraw.ImageDraw, cx: int, cy: int, half: int, colour: str) -> None:
    draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=PALETTE[colour])


def _triangle(draw: ImageDraw.ImageDraw, cx: int, cy: int, radius: int, colour: str) -> None:
    """Upward equilateral triangle inscribed in a circle of ``radius``."""
    points = [(cx + radius * math.sin(a), cy - radius * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    draw.polygon(points, fill=PALETTE[colour])


def _star(draw: ImageDraw.ImageDraw, cx: int, cy: int, radius: int, colour: str) -> None:
    """Five-pointed star, inner radius 0.45 of the outer."""
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else 0.45 * radius
        angle = k * math.pi / 5
        points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    draw.polygon(points, fill=PALETTE[colour])


def _text(draw: ImageDraw.ImageDraw, cx: int, cy: int, text: str, size: int, colour: str) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default(size=size)
    draw.text((cx, cy), text, fill=PALETTE[colour], font=font, anchor="mm")


def _canvas(width: int, height: int, background: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), PALETTE[background])
    return image, ImageDraw.Draw(image)


def _box(draw: ImageDraw.ImageDraw, x0: int, y0: int, x1: int, y1: int, colour: str) -> None:
    draw.rectangle((x0, y0, x1, y1), fill=PALETTE[colour])


def _polygon(draw: ImageDraw.ImageDraw, points: list[tuple[int, int]], colour: str) -> None:
    draw.polygon(points, fill=PALETTE[colour])


# ---------------------------------------------------------------- scenes
Shape = tuple  # (drawing helper, *its arguments after ``draw``)


def _scene(width: int, height: int, background: str, *shapes: Shape) -> Callable[[], Image.Image]:
    """A scene drawer: a fresh ``width`` x ``height`` canvas with ``shapes`` drawn in order."""

    def draw_scene() -> Image.Image:
        image, draw = _canvas(width, height, background)
        for helper, *arguments in shapes:
            helper(draw, *arguments)
        return image

    return draw_scene


def _each(helper: Callable[..., None], centres: tuple[tuple[int, int], ...], size: int, colour: str) -> tuple[Shape, ...]:
    """The same shape at every centre."""
    return tuple((helper, cx, cy, size, colour) for cx, cy in centres)


_GRID_COLOURS = ("purple", "orange", "blue", "green", "red", "yellow", "black", "gray", "white")

_house = _scene(
    640, 480, "sky",
    (_box, 0, 330, 639, 479, "green"),  # grass
    (_circle, 540, 90, 45, "yellow"),  # sun
    (_box, 200, 220, 400, 380, "red"),  # house body
    (_polygon, [(180, 220), (300, 130), (420, 220)], "black"),  # roof
    (_box, 280, 300, 320, 380, "white"),  # door
)  # fmt: skip
_circle_colour = _scene(640, 480, "beige", (_square, 140, 240, 70, "red"), (_circle, 330, 240, 75, "green"), (_triangle, 520, 250, 85, "blue"))  # fmt: skip
_count_squares = _scene(
    1008, 336, "white",
    *_each(_square, ((90, 90), (260, 230), (480, 110), (700, 240), (900, 100)), 45, "orange"),
    *_each(_circle, ((380, 250), (800, 120)), 40, "blue"),
)  # fmt: skip
_count_circles_tall = _scene(
    336, 1008, "beige",
    *_each(_circle, ((110, 140), (220, 480), (120, 830)), 60, "purple"),
    *_each(_triangle, ((240, 300), (230, 680)), 60, "yellow"),
)  # fmt: skip
_triangle_side = _scene(800, 400, "white", (_triangle, 170, 210, 110, "orange"), (_circle, 620, 200, 100, "blue"))  # fmt: skip
_above_below = _scene(400, 800, "white", (_circle, 200, 180, 90, "red"), (_square, 200, 610, 90, "blue"))  # fmt: skip
_sign_word = _scene(672, 448, "gray", (_box, 96, 124, 576, 324, "white"), (_text, 336, 224, "STOP", 120, "black"))  # fmt: skip
_number = _scene(480, 640, "navy", (_text, 240, 320, "42", 220, "white"))
_shape_of_red = _scene(500, 500, "white", (_star, 150, 160, 110, "red"), (_circle, 360, 150, 80, "blue"), (_square, 250, 390, 75, "green"))  # fmt: skip
_background = _scene(336, 336, "blue", (_circle, 168, 168, 70, "yellow"))
_bigger = _scene(900, 600, "beige", (_circle, 300, 300, 200, "green"), (_square, 700, 320, 40, "blue"))  # fmt: skip
_grid_corner = _scene(
    672, 672, "beige",
    *((_square, 112 + 224 * (k % 3), 112 + 224 * (k // 3), 90, colour) for k, colour in enumerate(_GRID_COLOURS)),
)  # fmt: skip
_count_stars_wide = _scene(1344, 336, "navy", *_each(_star, ((170, 170), (500, 150), (840, 190), (1180, 160)), 110, "yellow"))  # fmt: skip


@dataclass(frozen=True)
class _Scene:
    id: str
    draw: Callable[[], Image.Image]
    question: str
    answers: tuple[str, ...]
    category: str
    metric: str = "exact_match"


_SCENES: tuple[_Scene, ...] = (
    _Scene("house", _house, "What colour is the house?", ("red",), "color"),
    _Scene("circle_colour", _circle_colour, "What colour is the circle?", ("green",), "color"),
    _Scene("count_squares", _count_squares, "How many squares are there?", ("5", "five"), "count"),
    _Scene("count_circles_tall", _count_circles_tall, "How many circles are in the image?", ("3",), "count"),
    _Scene("triangle_side", _triangle_side, "Is the triangle on the left or the right side of the image?", ("left",), "position"),
    _Scene("above_below", _above_below, "Is the red circle above or below the blue square?", ("above",), "position"),
    _Scene("sign_word", _sign_word, "What word is written on the sign?", ("STOP",), "text", "anls"),
    _Scene("number", _number, "What number is shown in the image?", ("42",), "text", "anls"),
    _Scene("shape_of_red", _shape_of_red, "What shape is the red object?", ("star",), "shape"),
    _Scene("background", _background, "What colour is the background?", ("blue",), "color"),
    _Scene("bigger", _bigger, "Which is bigger, the green circle or the blue square?", ("green circle", "circle"), "size"),
    _Scene("grid_corner", _grid_corner, "What colour is the square in the top-left corner?", ("purple",), "position"),
    _Scene("count_stars_wide", _count_stars_wide, "How many stars are there?", ("4",), "count"),
)  # fmt: skip
_BY_ID = {scene.id: scene for scene in _SCENES}
SCENE_IDS: tuple[str, ...] = tuple(_BY_ID)


def render(scene_id: str) -> Image.Image:
    """Draw the built-in scene ``scene_id`` (a fresh RGB image each call)."""
    try:
        scene = _BY_ID[scene_id]
    except KeyError:
        raise ConfigError(f"no built-in scene {scene_id!r}; available: {', '.join(SCENE_IDS)}") from None
    return scene.draw()


def sample_image() -> Image.Image:
    """A 640x480 demo picture: a red house with a black roof under a yellow sun."""
    return render("house")


def sample_set() -> list[Sample]:
    """The built-in samples, images drawn lazily when first loaded."""
    from .datasets import Sample

    return [
        Sample(
            id=scene.id,
            image=functools.partial(render, scene.id),
            question=scene.question,
            answers=scene.answers,
            category=scene.category,
            metric=scene.metric,
        )
        for scene in _SCENES
    ]


def write_sample_set(directory: str | Path) -> Path:
    """Write the scenes as PNGs plus ``samples.jsonl`` into ``directory``; returns the JSONL path.

    The file is in the format :func:`~tokenprune.experiments.load_jsonl` reads, with image
    paths relative to ``directory``.
    """
    folder = Path(directory)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for scene in _SCENES:
        relative = f"images/{scene.id}.png"
        scene.draw().save(folder / relative)
        record = {
            "id": scene.id,
            "image": relative,
            "question": scene.question,
            "answers": list(scene.answers),
            "category": scene.category,
            "metric": scene.metric,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    path = folder / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
