"""Images of any mode and photo sets of any size: decoding, channel layout, and splits of too few photos."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from components import clean
from components.common import DataError
from components.datasets import IMAGE_SCHEMA, _image_row
from components.image_io import channel_layout, decode_image, to_layout


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "shape", "top"),
    [
        (Image.new("L", (5, 4), 200), (4, 5), 200),
        (Image.new("LA", (5, 4), (200, 0)), (4, 5), 200),
        (Image.new("1", (5, 4), 1), (4, 5), 255),
        (Image.new("I;16", (5, 4), 65535), (4, 5), 255),  # scaled by bit depth, not clipped
        (Image.new("I;16", (5, 4), 257 * 100), (4, 5), 100),
        (Image.new("RGBA", (5, 4), (10, 20, 30, 0)), (4, 5, 3), 30),  # alpha dropped
        (Image.new("P", (5, 4), 3), (4, 5, 3), None),
        (Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (4, 5, 3), 255),
    ],
    ids=["L", "LA", "1", "I16-max", "I16-mid", "RGBA", "P", "CMYK"],
)
def test_every_mode_decodes_to_grey_or_rgb(image: Image.Image, shape: tuple[int, ...], top: int | None) -> None:
    pixels = decode_image(encoded(image, "TIFF" if image.mode == "CMYK" else "PNG"))
    assert pixels.shape == shape and pixels.dtype == np.uint8
    if top is not None:
        assert int(pixels.max()) == top


def test_channel_layout_is_grey_only_when_every_image_is() -> None:
    assert channel_layout(["L", "I;16", "1"]) == 1
    assert channel_layout(["L", "RGB"]) == 3 and channel_layout(["P"]) == 3
    grey = np.full((4, 6), 9, np.uint8)
    assert to_layout(grey, 1).shape == (1, 4, 6) and to_layout(grey, 3).shape == (3, 4, 6)
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 1] = 100
    assert to_layout(rgb, 1).shape == (1, 4, 6) and int(to_layout(rgb, 1).max()) == round(100 * 0.587)


def photos(*sizes: tuple[int, int]) -> pa.Table:
    rng = np.random.default_rng(0)
    rows = [
        _image_row(f"p{i}.png", None, encoded(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))), f"p{i}.png")
        for i, (w, h) in enumerate(sizes)
    ]
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def test_a_single_photo_is_cut_into_disjoint_bands_one_per_split() -> None:
    table = photos((200, 120))
    result = clean.band_split(clean.clean_images(table, FRACTIONS, seed=1), FRACTIONS)
    assert result.counts["split_by"] == "band"
    bands = {row["split"]: decode_image(row["image"]) for row in result.kept.to_pylist()}
    assert set(bands) == {"train", "test"}  # a 20 px val band would be under MIN_BAND: its pixels are tested
    assert sum(b.shape[1] for b in bands.values()) == 200 and all(b.shape[0] == 120 for b in bands.values())
    whole = decode_image(table.column("image")[0].as_py())
    assert np.array_equal(np.concatenate([bands["train"], bands["test"]], axis=1), whole)
    assert set(result.kept.column("record_id").to_pylist()) == {"p0.png"}  # still one record


@pytest.mark.parametrize(
    ("length", "sizes"),
    [(64, {"train": 32, "val": 0, "test": 32}), (100, {"train": 58, "val": 0, "test": 42}),
     (200, {"train": 140, "val": 0, "test": 60}), (400, {"train": 280, "val": 40, "test": 80})],
)  # fmt: skip
def test_bands_are_never_narrower_than_the_minimum(length: int, sizes: dict[str, int]) -> None:
    assert clean.band_sizes(length, FRACTIONS) == sizes


def test_the_smallest_valid_photo_splits_and_a_smaller_one_is_one_clear_error() -> None:
    result = clean.band_split(clean.clean_images(photos((64, 64)), FRACTIONS, seed=1), FRACTIONS)
    assert sorted(result.kept.column("split").to_pylist()) == ["test", "train"]
    with pytest.raises(DataError, match=r"too few to keep whole photos apart.*add photos"):
        clean.band_split(clean.clean_images(photos((60, 30)), FRACTIONS, seed=1), FRACTIONS)
