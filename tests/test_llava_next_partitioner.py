"""LlavaNextPartitioner against the real HF processor and the tiny model's own packing."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from tokenprune import ConfigError, ContractError, IncompatibleError
from tokenprune.adapters.llava_next_partitioner import (
    LlavaNextPartitioner,
    tile_canvas_index,
)
from tokenprune.tiny import tiny_llava, tiny_llava_next

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from transformers.models.llava_next import modeling_llava_next as hf_llava_next  # noqa: E402

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

# The released grids plus 2x3 / 3x2, so that grids with rows != cols and both > 1 occur.
GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3), (2, 3), (3, 2))
CROP, SIDE, N = 56, 7, 49
EXTREME_SIZES = [
    (1, 1), (3, 5), (5, 3), (1, 3), (3, 1), (1, 2000), (2000, 1), (10, 2000), (2000, 10),
    (56, 56), (56, 112), (112, 56), (168, 56), (56, 168), (112, 168), (168, 112), (57, 113),
    (1000, 999), (999, 1000), (2, 7), (7, 2),
]


def _random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        if rng.random() < 0.7:
            sizes.append((rng.randint(1, 400), rng.randint(1, 400)))
        else:  # log-uniform sides, to reach strong aspect ratios
            sizes.append((int(2 ** rng.uniform(0, 10.5)), int(2 ** rng.uniform(0, 10.5))))
    return sizes


SIZES = _random_sizes(220, seed=0) + EXTREME_SIZES


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return tiny_llava_next(grids=GRIDS)


@pytest.fixture(scope="module")
def partitioner(tiny: tuple[object, object]) -> LlavaNextPartitioner:
    model, processor = tiny
    return LlavaNextPartitioner.from_model(model, processor)


def _hf_packed_ids(model: object, num_crops: int, image_size: tuple[int, int]) -> torch.Tensor:
    """Run the model's own ``pack_image_features`` on features whose value is their
    (crop, token) id ``crop * N + token``; newline tokens come out as -1."""
    ids = torch.arange(num_crops * N, dtype=torch.float64).view(num_crops, N, 1)
    packed, lengths = model.model.pack_image_features(
        [ids], torch.tensor([image_size]), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    assert int(lengths[0]) == packed[0].shape[0]
    return packed[0][:, 0].long()


def test_from_model_reads_the_geometry(partitioner: LlavaNextPartitioner) -> None:
    assert partitioner.crop_size == CROP and partitioner.patch_size == 8
    assert partitioner.tokens_per_side == SIDE
    assert partitioner.grid_pinpoints == tuple((r * CROP, c * CROP) for r, c in GRIDS)


def test_grid_and_crop_count_match_hf(partitioner: LlavaNextPartitioner) -> None:
    pinpoints = [list(p) for p in partitioner.grid_pinpoints]
    for size in SIZES:
        layout = partitioner.layout(size)
        rows, cols = hf_llava_next.get_anyres_image_grid_shape(list(size), pinpoints, CROP)
        assert layout.tiles == (rows, cols), size
        assert layout.num_partitions == hf_llava_next.image_size_to_num_patches(list(size), pinpoints, CROP), size
        assert layout.has_thumbnail and layout.image_size == size


def test_valid_tokens_are_exactly_what_pack_image_features_keeps(
    tiny: tuple[object, object], partitioner: LlavaNextPartitioner
) -> None:
    model, processor = tiny
    for size in SIZES:
        layout = partitioner.layout(size)
        geometry = partitioner.geometry(size)
        packed = _hf_packed_ids(model, layout.num_partitions, size)
        # The thumbnail's tokens first, all of them, in order.
        assert torch.equal(packed[:N], torch.arange(N)), size
        assert bool(layout.valid[0].all())
        tile_part = packed[N:]
        newline = tile_part == -1
        kept_ids = tile_part[~newline]
        # Count: valid tile tokens == what the model keeps (newlines excluded).
        assert int(layout.valid[1:].sum()) == kept_ids.numel(), size
        # Positions: the surviving (crop, token) ids are exactly our valid mask ...
        ours = torch.nonzero(layout.valid[1:].flatten()).squeeze(1) + N
        assert torch.equal(torch.sort(kept_ids).values, ours), size
        # ... and they come in canvas raster order, one newline closing each kept row.
        canvas = torch.full((geometry.canvas_shape[0] * geometry.canvas_shape[1],), -2, dtype=torch.long)
        canvas[geometry.canvas_index().flatten()] = torch.arange(N, layout.num_partitions * N)
        canvas_valid = geometry.canvas_valid().flatten()
        assert torch.equal(kept_ids, canvas[canvas_valid]), size
        kept_rows, kept_cols = geometry.kept_shape
        assert int(newline.sum()) == kept_rows and kept_ids.numel() == kept_rows * kept_cols
        assert torch.equal(torch.nonzero(newline).squeeze(1), torch.arange(1, kept_rows + 1) * (kept_cols + 1) - 1)
        # The processor's placeholder count agrees (thumbnail + kept canvas + newlines).
        assert partitioner.num_image_tokens(size) == packed.numel(), size


def test_real_processor_crop_count_and_placeholders(
    tiny: tuple[object, object], partitioner: LlavaNextPartitioner
) -> None:
    _, processor = tiny
    rng = np.random.RandomState(1)
    for size in SIZES[::3] + EXTREME_SIZES:
        height, width = size
        if height * width > 400_000:
            continue  # CI time; the geometry of these is covered by the tests above
        image = Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))
        out = processor(images=image, text="<image>", return_tensors="pt")
        assert tuple(out["image_sizes"][0].tolist()) == size
        assert out["pixel_values"].shape[1] == partitioner.layout(size).num_partitions, size
        placeholders = int((out["input_ids"] == processor.image_token_id).sum())
        assert placeholders == partitioner.num_image_tokens(size), size


def test_crop_order_is_row_major_with_rows_from_height(tiny: tuple[object, object]) -> None:
    """A 2x3 image (height 112, width 168) painted with one grey level per crop region:
    the processor's crop k is tile (k // 3, k % 3). Guards the height/width swap."""
    _, processor = tiny
    levels = np.array([[10, 50, 90], [130, 170, 210]], dtype=np.uint8)
    pixels = np.kron(levels, np.ones((CROP, CROP), dtype=np.uint8))[:, :, None].repeat(3, axis=2)
    out = processor.image_processor(Image.fromarray(pixels), return_tensors="pt", do_normalize=False)
    crops = out["pixel_values"][0]
    assert crops.shape[0] == 1 + 6
    means = crops[1:].mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(means, torch.tensor(levels.flatten(), dtype=torch.float32), atol=1.0)
    layout = LlavaNextPartitioner(((56, 112), (112, 168), (168, 112)), CROP, 8).layout((112, 168))
    assert layout.tiles == (2, 3)


def test_pixel_geometry_matches_processor_padding(
    tiny: tuple[object, object], partitioner: LlavaNextPartitioner
) -> None:
    """For a white image, the processor's zero padding must sit exactly where our resized
    size and padding put it (that geometry drives ``overlap``)."""
    _, processor = tiny
    for size in _random_sizes(40, seed=5) + [(3, 5), (10, 300), (300, 10), (61, 100)]:
        height, width = size
        image = Image.fromarray(np.full((height, width, 3), 255, dtype=np.uint8))
        crops = processor.image_processor(image, return_tensors="pt", do_normalize=False)["pixel_values"][0]
        geometry = partitioner.geometry(size)
        rows, cols = geometry.tiles
        canvas = crops[1:, 0].reshape(rows, cols, CROP, CROP).permute(0, 2, 1, 3).reshape(rows * CROP, cols * CROP)
        expected = torch.zeros_like(canvas, dtype=torch.bool)
        top, left = geometry.padding
        expected[top : top + geometry.resized_size[0], left : left + geometry.resized_size[1]] = True
        assert torch.equal(canvas > 0.5, expected), size


def test_tile_canvas_index_by_hand() -> None:
    index = tile_canvas_index(2, 3, 2)  # canvas 4 x 6
    assert index.shape == (6, 4)
    assert index[0].tolist() == [0, 1, 6, 7]  # tile (0, 0)
    assert index[2].tolist() == [4, 5, 10, 11]  # tile (0, 2)
    assert index[3].tolist() == [12, 13, 18, 19]  # tile (1, 0)
    assert sorted(index.flatten().tolist()) == list(range(24))


def test_valid_mask_by_hand(partitioner: LlavaNextPartitioner) -> None:
    # 61 x 100 -> pinpoint (112, 112), 2x2 tiles, canvas 14 x 14 tokens. The model unpads:
    # 100/61 > 14/14, new height int(round(61 * 14 / 100)) = 8, padding (14 - 8) // 2 = 3,
    # so canvas rows 3..10 stay: tile row 0 keeps token rows 3-6, tile row 1 rows 0-3.
    layout = partitioner.layout((61, 100))
    assert layout.tiles == (2, 2)
    rows_kept = layout.valid[1:].view(4, SIDE, SIDE).all(dim=2)
    any_kept = layout.valid[1:].view(4, SIDE, SIDE).any(dim=2)
    assert torch.equal(rows_kept, any_kept)  # whole token rows are kept or dropped
    top = [False] * 3 + [True] * 4
    bottom = [True] * 4 + [False] * 3
    assert rows_kept.tolist() == [top, top, bottom, bottom]
    assert layout.capacity.tolist() == [49, 28, 28, 28, 28]


def test_overlap_columns_sum_to_one(partitioner: LlavaNextPartitioner) -> None:
    for size in SIZES:
        overlap = partitioner.layout(size).overlap
        assert overlap is not None and overlap.dtype == torch.float32
        assert float(overlap.min()) >= 0.0
        assert torch.allclose(overlap.sum(0), torch.ones(N), atol=1e-6), size


def test_overlap_square_2x2_gives_quadrants(partitioner: LlavaNextPartitioner) -> None:
    overlap = partitioner.layout((112, 112)).overlap.view(4, SIDE, SIDE)
    # Side 7 is odd: thumbnail row/column 3 straddles the tile boundary half and half.
    for tile, (rows, cols) in enumerate([(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(4, 7)),
                                         (slice(4, 7), slice(0, 3)), (slice(4, 7), slice(4, 7))]):
        assert bool((overlap[tile][rows, cols] == 1).all())
        assert float(overlap[tile].sum()) == pytest.approx(49 / 4)
    assert overlap[:, 3, 3].tolist() == [0.25] * 4
    assert overlap[:, 0, 3].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert overlap[:, 3, 0].tolist() == [0.5, 0.0, 0.5, 0.0]


def test_overlap_wide_1x2_splits_columns_not_rows(partitioner: LlavaNextPartitioner) -> None:
    layout = partitioner.layout((50, 100))
    assert layout.tiles == (1, 2)
    overlap = layout.overlap.view(2, SIDE, SIDE)
    # Independent of the thumbnail row; by column: left tile gets columns 0-2 and half of 3.
    per_column = torch.tensor([1, 1, 1, 0.5, 0, 0, 0], dtype=torch.float32)
    assert torch.equal(overlap[0], per_column.expand(SIDE, SIDE))
    assert torch.equal(overlap[1], (1 - per_column).expand(SIDE, SIDE))


def test_overlap_hand_computed_with_asymmetric_padding(partitioner: LlavaNextPartitioner) -> None:
    # 61 x 100 in a 112 x 112 canvas: width fits (scale 1.12), height ceil(61 * 1.12) = 69,
    # padding 43 px: 21 on top, 22 below. Tile row 0 holds canvas rows 21..55 of the image,
    # 35 of its 69 rows, i.e. original rows [0, 35 * 61 / 69). Thumbnail row 3 spans
    # [3 * 61 / 7, 4 * 61 / 7): its share in tile row 0 is 35 * 7 / 69 - 3 = 38 / 69.
    # Columns split exactly in the middle (no horizontal padding): column 3 is half/half.
    geometry = partitioner.geometry((61, 100))
    assert geometry.resized_size == (69, 112) and geometry.padding == (21, 0)
    overlap = partitioner.layout((61, 100)).overlap.view(4, SIDE, SIDE).double()
    top = Fraction(38, 69)
    expected = {
        (0, 3, 3): top / 2, (1, 3, 3): top / 2, (2, 3, 3): (1 - top) / 2, (3, 3, 3): (1 - top) / 2,
        (0, 3, 0): top, (2, 3, 0): 1 - top, (1, 3, 0): 0, (0, 2, 0): 1, (2, 4, 0): 1, (0, 4, 0): 0,
        (1, 3, 6): top, (3, 3, 6): 1 - top,
    }
    for (tile, row, col), share in expected.items():
        assert float(overlap[tile, row, col]) == pytest.approx(float(share), abs=1e-6), (tile, row, col)


def test_overlap_3_tiles_in_one_row_splits_at_thirds(partitioner: LlavaNextPartitioner) -> None:
    layout = partitioner.layout((56, 168))
    assert layout.tiles == (1, 3)
    per_column = layout.overlap.view(3, SIDE, SIDE)[:, 0, :]
    # Tile edges at 7/3 and 14/3 thumbnail columns.
    expected = torch.tensor([
        [1, 1, 1 / 3, 0, 0, 0, 0],
        [0, 0, 2 / 3, 1, 2 / 3, 0, 0],
        [0, 0, 0, 0, 1 / 3, 1, 1],
    ])
    assert torch.allclose(per_column, expected, atol=1e-6)


def test_tall_image_gets_rows(partitioner: LlavaNextPartitioner) -> None:
    layout = partitioner.layout((300, 110))
    assert layout.tiles == (3, 2)  # (height, width) pinpoint (168, 112): 3 rows, 2 columns
    assert layout.partition_names()[1:] == ["tile r0c0", "tile r0c1", "tile r1c0", "tile r1c1", "tile r2c0", "tile r2c1"]
    overlap = layout.overlap.view(3, 2, SIDE, SIDE)
    # Thumbnail row 0 lies in tile row 0 only, whatever the column.
    assert float(overlap[0, :, 0, :].sum()) == pytest.approx(SIDE)


def test_image_size_accepts_tensors_and_rejects_junk(partitioner: LlavaNextPartitioner) -> None:
    assert partitioner.layout(torch.tensor([61, 100])).tiles == (2, 2)
    for bad in [(0, 5), (5,), (5.0, 3), "big", (True, 3), torch.tensor([1.0, 2.0])]:
        with pytest.raises(ContractError, match="image_size"):
            partitioner.layout(bad)  # type: ignore[arg-type]


def test_bad_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="multiples of crop_size"):
        LlavaNextPartitioner(((56, 100),), 56, 8)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        LlavaNextPartitioner(((60, 120),), 60, 8)
    with pytest.raises(ConfigError, match="non-empty"):
        LlavaNextPartitioner((), 56, 8)
    with pytest.raises(ConfigError, match="int >= 1"):
        LlavaNextPartitioner(((56, 112),), 0, 8)


def test_from_model_rejects_mismatched_processor(tiny: tuple[object, object]) -> None:
    model, processor = tiny
    _, other_grids = tiny_llava_next(grids=((1, 2), (2, 1)))
    with pytest.raises(IncompatibleError, match="image_grid_pinpoints"):
        LlavaNextPartitioner.from_model(model, other_grids)
    _, other_crop = tiny_llava_next(crop_size=64, patch_size=8, grids=GRIDS)
    with pytest.raises(IncompatibleError):
        LlavaNextPartitioner.from_model(model, other_crop)
    _, other_patch = tiny_llava_next(patch_size=7, grids=GRIDS)
    with pytest.raises(IncompatibleError, match="patch_size"):
        LlavaNextPartitioner.from_model(model, other_patch)
    llava, llava_processor = tiny_llava()
    with pytest.raises(IncompatibleError, match="not a LLaVA-NeXT config"):
        LlavaNextPartitioner.from_model(llava)
    with pytest.raises(IncompatibleError, match="no image_grid_pinpoints"):
        LlavaNextPartitioner.from_model(model, llava_processor)
    # The image processor alone is accepted too.
    assert LlavaNextPartitioner.from_model(model, processor.image_processor).tokens_per_side == SIDE
