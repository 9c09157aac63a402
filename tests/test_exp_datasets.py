"""Datasets: Sample, JSONL and save_to_disk loaders, the built-in drawn set, sharding."""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenprune import ConfigError
from tokenprune.experiments import (
    SCENE_IDS,
    DatasetError,
    Sample,
    load_hf,
    load_jsonl,
    load_samples,
    rank_from_env,
    render,
    sample_image,
    sample_set,
    shard,
    write_sample_set,
)


# ---------------------------------------------------------------- Sample
def test_sample_normalises_answers_and_validates() -> None:
    sample = Sample(id="a", image="x.png", question="q?", answers="yes")  # type: ignore[arg-type]
    assert sample.answers == ("yes",)
    vqa_style = Sample(id="b", image="x.png", question="q?", answers=[{"answer": "2"}, {"answer": "two"}])  # type: ignore[arg-type]
    assert vqa_style.answers == ("2", "two")
    with pytest.raises(DatasetError, match="answers"):
        Sample(id="c", image="x.png", question="q?", answers=())
    with pytest.raises(DatasetError, match="unknown metric"):
        Sample(id="d", image="x.png", question="q?", answers=("a",), metric="bleu")
    with pytest.raises(DatasetError, match="id"):
        Sample(id="", image="x.png", question="q?", answers=("a",))
    with pytest.raises(DatasetError, match="image"):
        Sample(id="e", image=3, question="q?", answers=("a",))  # type: ignore[arg-type]


def test_sample_load_image_from_path_and_loader(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 200).save(tmp_path / "grey.png")
    from_path = Sample(id="p", image=tmp_path / "grey.png", question="q", answers=("a",)).load_image()
    assert from_path.mode == "RGB" and from_path.size == (4, 3) and from_path.getpixel((0, 0)) == (200, 200, 200)
    from_loader = Sample(id="l", image=lambda: Image.new("RGB", (2, 2), (1, 2, 3)), question="q", answers=("a",))
    assert from_loader.load_image().getpixel((1, 1)) == (1, 2, 3)
    broken = Sample(id="b", image=lambda: "not an image", question="q", answers=("a",))  # type: ignore[arg-type,return-value]
    with pytest.raises(DatasetError, match="not a PIL image"):
        broken.load_image()
    with pytest.raises(DatasetError, match="cannot read image"):
        Sample(id="m", image=tmp_path / "missing.png", question="q", answers=("a",)).load_image()


# ---------------------------------------------------------------- JSONL
def _image(path: Path, colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)
    return path


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "a.png")
    absolute = _image(tmp_path / "elsewhere" / "b.png", (0, 0, 255))
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "img/a.png", "question": "Colour?", "answers": "red", "category": "color", "source": "x"},
            "",  # blank lines are skipped but still counted
            {
                "id": 7,
                "image": str(absolute),
                "question": "Colour?",
                "answers": ["blue", "navy"],
                "metric": "exact_match",
            },
        ],
    )
    first, second = load_jsonl(path, metric="vqa_accuracy")
    assert first.id == "1" and first.answers == ("red",) and first.category == "color"
    assert first.image == tmp_path / "img" / "a.png" and first.metric == "vqa_accuracy"
    assert first.meta == {"source": "x"}
    assert second.id == "7" and second.answers == ("blue", "navy") and second.metric == "exact_match"
    assert second.load_image().getpixel((0, 0)) == (0, 0, 255)
    assert [s.id for s in load_jsonl(path, limit=1)] == ["1"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"data\.jsonl:2: not valid JSON"),
        ('["a", "list"]', r"data\.jsonl:2: expected a JSON object"),
        ({"image": "a.png", "answers": ["x"]}, r"data\.jsonl:2: missing field 'question'"),
        ({"question": "q", "answers": ["x"]}, r"data\.jsonl:2: missing field 'image'"),
        ({"image": "a.png", "question": "q"}, r"data\.jsonl:2: missing field 'answers'"),
        (
            {"image": "nope.png", "question": "q", "answers": ["x"]},
            r"data\.jsonl:2: field 'image': file not found: .*nope\.png",
        ),
        ({"image": "a.png", "question": "q", "answers": [1, 2]}, r"data\.jsonl:2: field 'answers'"),
        ({"image": "a.png", "question": "q", "answers": []}, r"data\.jsonl:2: field 'answers'"),
        ({"image": "a.png", "question": "", "answers": ["x"]}, r"data\.jsonl:2: field 'question'"),
        ({"image": "a.png", "question": "q", "answers": ["x"], "category": 3}, r"data\.jsonl:2: field 'category'"),
        ({"image": "a.png", "question": "q", "answers": ["x"], "metric": "bleu"}, r"data\.jsonl:2: field 'metric'"),
        (
            {"id": "1", "image": "a.png", "question": "q", "answers": ["x"]},
            r"data\.jsonl:2: field 'id': duplicate id '1' \(first on line 1\)",
        ),
    ],
)
def test_load_jsonl_errors_name_file_line_and_field(tmp_path: Path, bad_line: object, message: str) -> None:
    _image(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "question": "q", "answers": ["x"]}, bad_line])
    with pytest.raises(DatasetError, match=message):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such JSONL file"):
        load_jsonl(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------- Hugging Face datasets
def test_load_hf_round_trip(tmp_path: Path) -> None:
    import datasets as hf

    images = [Image.new("RGB", (5 + i, 4), (10 * i, 20, 30)) for i in range(3)]
    features = hf.Features(
        {
            "img": hf.Image(),
            "query": hf.Value("string"),
            "label": [{"answer": hf.Value("string"), "answer_id": hf.Value("int32")}],
            "qid": hf.Value("int64"),
            "kind": hf.Value("string"),
        }
    )
    data = hf.Dataset.from_dict(
        {
            "img": images,
            "query": ["q0", "q1", "q2"],
            "label": [[{"answer": "a", "answer_id": 1}, {"answer": "b", "answer_id": 2}]] * 3,
            "qid": [100, 101, 102],
            "kind": ["x", "y", "x"],
        },
        features=features,
    )
    data.save_to_disk(str(tmp_path / "flat"))
    columns = {"image": "img", "question": "query", "answers": "label", "id": "qid", "category": "kind"}
    samples = load_hf(tmp_path / "flat", columns=columns, metric="vqa_accuracy")
    assert [s.id for s in samples] == ["100", "101", "102"]
    assert [s.question for s in samples] == ["q0", "q1", "q2"]
    assert samples[0].answers == ("a", "b") and samples[2].category == "x" and samples[1].metric == "vqa_accuracy"
    for sample, original in zip(samples, images):
        loaded = sample.load_image()
        assert loaded.size == original.size and loaded.tobytes() == original.tobytes()
    assert len(load_hf(tmp_path / "flat", columns=columns, limit=2)) == 2

    hf.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DatasetError, match="choose a split.*test, train"):
        load_hf(tmp_path / "splits", columns=columns)
    assert [s.id for s in load_hf(tmp_path / "splits", split="test", columns=columns)] == ["100"]
    with pytest.raises(DatasetError, match="no column 'image' for field 'image'.*columns=\\{'image'"):
        load_hf(tmp_path / "flat")
    with pytest.raises(ConfigError, match="unknown field"):
        load_hf(tmp_path / "flat", columns={"picture": "img"})
    assert [s.id for s in load_samples({"kind": "hf", "path": str(tmp_path / "flat"), "columns": columns})] == [
        "100",
        "101",
        "102",
    ]


# ---------------------------------------------------------------- built-in sample set
@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cx: float
    cy: float
    area: int


def _colour_name(rgb: np.ndarray) -> str:
    """A colour name from hue/saturation/value; independent of the generator's palette."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))
    if s < 0.25:
        return "black" if v < 0.25 else "white" if v > 0.9 else "gray"
    hue = h * 360
    for limit, name in ((15, "red"), (40, "orange"), (70, "yellow"), (170, "green"), (250, "blue"), (340, "purple")):
        if hue < limit:
            return name
    return "red"


def _components(mask: np.ndarray) -> list[tuple[int, float, float, int, int]]:
    """4-connected components of a boolean mask: (area, cx, cy, width, height), via runs + union-find."""
    parent: list[int] = []
    runs: list[tuple[int, int, int]] = []  # (y, x0, x1) half-open

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []
    for y in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0]))))
        current = []
        for x0, x1 in zip(edges[::2].tolist(), edges[1::2].tolist()):
            index = len(runs)
            runs.append((y, x0, x1))
            parent.append(index)
            for other in previous:
                _, o0, o1 = runs[other]
                if o0 < x1 and x0 < o1:
                    parent[find(index)] = find(other)
            current.append(index)
        previous = current
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(find(index), []).append(run)
    stats = []
    for group in groups.values():
        area = sum(x1 - x0 for _, x0, x1 in group)
        cx = sum((x1 - x0) * (x0 + x1 - 1) / 2 for _, x0, x1 in group) / area
        cy = sum((x1 - x0) * y for y, x0, x1 in group) / area
        width = max(x1 for _, _, x1 in group) - min(x0 for _, x0, _ in group)
        height = max(y for y, _, _ in group) - min(y for y, _, _ in group) + 1
        stats.append((area, cx, cy, width, height))
    return stats


def _shapes(image: Image.Image, min_area: int = 300) -> tuple[str, list[Shape]]:
    """Background colour name and the flat-coloured shapes of a drawn scene."""
    pixels = np.asarray(image).astype(np.int32)
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    values, counts = np.unique(packed, return_counts=True)
    background = values[counts.argmax()]

    def rgb(value: int) -> np.ndarray:
        return np.array([(value >> 16) & 255, (value >> 8) & 255, value & 255])

    shapes = []
    for value, count in zip(values.tolist(), counts.tolist()):
        if count < min_area or value == background:
            continue
        colour = rgb(value)
        mask = packed == value
        for area, cx, cy, width, height in _components(mask):
            if area < min_area:
                continue
            fill = area / (height * width)
            # Fill of the bounding box: square 1, circle pi/4, triangle 1/2, 5-point star ~0.38.
            kind = (
                "square"
                if fill > 0.93
                else "circle"
                if 0.7 < fill < 0.85
                else "triangle"
                if 0.45 < fill < 0.56
                else "star"
                if 0.3 < fill < 0.45
                else "other"
            )
            if kind in ("square", "circle") and not 0.9 < width / height < 1.1:
                kind = "rectangle" if kind == "square" else "other"
            shapes.append(Shape(_colour_name(colour), kind, cx, cy, area))
    return _colour_name(rgb(int(background))), shapes


def _only(shapes: list[Shape], **wanted: str) -> Shape:
    found = [s for s in shapes if all(getattr(s, k) == v for k, v in wanted.items())]
    assert len(found) == 1, (wanted, shapes)
    return found[0]


def test_sample_set_is_deterministic_and_varied() -> None:
    first, second = sample_set(), sample_set()
    assert 8 <= len(first) <= 14 and [s.id for s in first] == list(SCENE_IDS)
    assert len({s.id for s in first}) == len(first)
    sizes = []
    for a, b in zip(first, second):
        image_a, image_b = a.load_image(), b.load_image()
        assert image_a.mode == "RGB" and image_a.tobytes() == image_b.tobytes()
        assert a.answers and a.question.endswith("?") and a.metric in ("exact_match", "anls")
        sizes.append(image_a.size)
    assert any(w / h >= 3 for w, h in sizes) and any(h / w >= 2 for w, h in sizes) and any(w == h for w, h in sizes)
    assert len(set(sizes)) >= 10
    assert sample_image().size == (640, 480)


def test_sample_set_questions_are_answerable_from_pixels() -> None:
    answers = {s.id: s.answers[0] for s in sample_set()}
    scenes = {scene_id: _shapes(render(scene_id)) for scene_id in SCENE_IDS if scene_id not in ("sign_word", "number")}

    _, shapes = scenes["house"]
    roof = _only(shapes, kind="triangle")
    # The body is the largest shape under the roof (its door lowers its fill, so no "kind").
    house = max((s for s in shapes if abs(s.cx - roof.cx) < 5 and s.cy > roof.cy), key=lambda s: s.area)
    assert house.colour == answers["house"] == "red"
    _, shapes = scenes["circle_colour"]
    assert _only(shapes, kind="circle").colour == answers["circle_colour"] == "green"
    _, shapes = scenes["count_squares"]
    assert str(sum(s.kind == "square" for s in shapes)) == answers["count_squares"] == "5"
    _, shapes = scenes["count_circles_tall"]
    assert str(sum(s.kind == "circle" for s in shapes)) == answers["count_circles_tall"] == "3"
    _, shapes = scenes["count_stars_wide"]
    assert str(sum(s.kind == "star" for s in shapes)) == answers["count_stars_wide"] == "4"
    _, shapes = scenes["triangle_side"]
    side = "left" if _only(shapes, kind="triangle").cx < render("triangle_side").width / 2 else "right"
    assert side == answers["triangle_side"]
    _, shapes = scenes["above_below"]
    circle, square = _only(shapes, kind="circle", colour="red"), _only(shapes, kind="square", colour="blue")
    assert ("above" if circle.cy < square.cy else "below") == answers["above_below"]
    _, shapes = scenes["shape_of_red"]
    assert _only(shapes, colour="red").kind == answers["shape_of_red"] == "star"
    background, _ = scenes["background"]
    assert background == answers["background"] == "blue"
    _, shapes = scenes["bigger"]
    circle, square = _only(shapes, kind="circle", colour="green"), _only(shapes, kind="square", colour="blue")
    assert circle.area > 10 * square.area and answers["bigger"] == "green circle"
    _, shapes = scenes["grid_corner"]
    squares = [s for s in shapes if s.kind == "square"]
    assert len(squares) >= 8  # the beige background hides none but may merge the white one
    assert min(squares, key=lambda s: s.cx + s.cy).colour == answers["grid_corner"]


def test_text_scenes_draw_text_inside_their_sign() -> None:
    pixels = np.asarray(render("sign_word"))
    dark = np.argwhere(pixels.sum(axis=-1) < 150)
    assert len(dark) > 2000  # the letters
    assert dark[:, 0].min() > 124 and dark[:, 0].max() < 324 and dark[:, 1].min() > 96 and dark[:, 1].max() < 576
    pixels = np.asarray(render("number"))
    assert (pixels.sum(axis=-1) > 600).sum() > 2000  # white digits on navy


def test_write_sample_set_round_trips_through_load_jsonl(tmp_path: Path) -> None:
    path = write_sample_set(tmp_path / "set")
    loaded = load_jsonl(path)
    builtin = sample_set()
    assert [(s.id, s.question, s.answers, s.category, s.metric) for s in loaded] == [
        (s.id, s.question, s.answers, s.category, s.metric) for s in builtin
    ]
    assert loaded[1].load_image().tobytes() == builtin[1].load_image().tobytes()
    assert [s.id for s in load_samples(path)] == [s.id for s in builtin]
    assert [s.id for s in load_samples(str(path), limit=2)] == [s.id for s in builtin[:2]]


# ---------------------------------------------------------------- dispatch, sharding
def test_load_samples_dispatch_and_errors(tmp_path: Path) -> None:
    assert len(load_samples("sample")) == len(SCENE_IDS)
    assert [s.id for s in load_samples({"kind": "sample", "limit": 3})] == list(SCENE_IDS[:3])
    with pytest.raises(ConfigError, match="not 'sample', a .jsonl file"):
        load_samples(tmp_path / "data.csv")
    with pytest.raises(ConfigError, match="allowed: 'sample', 'jsonl', 'hf'"):
        load_samples({"kind": "csv", "path": "x"})
    with pytest.raises(ConfigError, match="only 'limit'"):
        load_samples("sample", split="train")


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 16])
def test_shard_is_disjoint_covering_balanced_and_deterministic(world_size: int) -> None:
    items = [f"s{i}" for i in range(13)]
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    flattened = [item for part in shards for item in part]
    assert sorted(flattened) == sorted(items) and len(flattened) == len(items)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard(iter(items), rank, world_size) for rank in range(world_size)]
    assert shard(items, 0, world_size)[0] == "s0"


def test_shard_rejects_bad_ranks() -> None:
    with pytest.raises(ConfigError, match=r"rank must be in \[0, 1\]"):
        shard([1, 2], 2, 2)
    with pytest.raises(ConfigError, match="world_size must be >= 1"):
        shard([1], 0, 0)
    with pytest.raises(ConfigError, match="must be an int"):
        shard([1], True, 2)


def test_rank_from_env() -> None:
    assert rank_from_env({}) == (0, 1)
    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    with pytest.raises(ConfigError):
        rank_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="must be ints"):
        rank_from_env({"RANK": "x"})
