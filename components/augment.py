"""Stage `augment`: seeded extra training rows, from the train split only.

- text: copies of each train row whose source is a record (any syntax of components.records) with its
  attributes in a shuffled order, in the same syntax (same reference), so the model learns that attribute
  order carries no meaning; free prompts get no copies (said once in the log);
- images: flips, small rotations, crops and brightness / contrast jitter with torchvision transforms v2;
- restore: random patches (with flips / 90-degree turns) of the train photographs.

Writes only the new rows (`<out>/text.parquet`, `<out>/images.parquet`, `<out>/restore_patches.parquet`);
with `augment.enabled: false` the text and image files exist and are empty, so the DAG shape never changes,
and the restore patches (the restorer's training crops) are plain random crops, without flips or turns.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.common import (
    ConfigError,
    DataError,
    load_params,
    progress,
    require,
    run_main,
)
from components.image_io import channel_layout, decode_image, encode_png, to_layout
from components.records import parse_source
from components.tables import ParquetSink, Rows, image_batch_rows

log = logging.getLogger(__name__)

PATCH_SCHEMA = pa.schema([("record_id", pa.string()), ("source_id", pa.string()), ("image", pa.binary())])


@dataclass(frozen=True)
class ImageAugment:
    copies: int
    hflip: bool
    rotation_degrees: float
    crop_scale: tuple[float, float]
    brightness: float
    contrast: float


@dataclass(frozen=True)
class AugmentConfig:
    seed: int
    enabled: bool
    text_copies: int
    images: ImageAugment
    patch_size: int
    patches_per_image: int
    batch_rows: int = 65_536

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AugmentConfig:
        text = require(params, "text", dict, "augment")
        images = require(params, "images", dict, "augment")
        restore = require(params, "restore", dict, "augment")
        copies = require(text, "shuffled_copies", int, "augment.text", low=0, high=20)
        image_copies = require(images, "copies", int, "augment.images", low=0, high=20)
        rotation = require(images, "rotation_degrees", (int, float), "augment.images", low=0, high=180)
        scale = require(images, "crop_scale", list, "augment.images")
        if len(scale) != 2 or not all(isinstance(v, (int, float)) for v in scale) or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(
                f"params key 'augment.images.crop_scale' must be [low, high] with 0 < low <= high <= 1, got {scale!r}"
            )
        jitter = {}
        for key in ("brightness", "contrast"):
            jitter[key] = require(images, key, (int, float), "augment.images", low=0, high=1)
        patch_size = require(restore, "patch_size", int, "augment.restore", low=8, high=1024)
        patches = require(restore, "patches_per_image", int, "augment.restore", low=0)
        return cls(
            seed=require(params["base"], "seed", int, "base"),
            enabled=require(params, "enabled", bool, "augment"),
            text_copies=copies,
            images=ImageAugment(
                image_copies,
                require(images, "hflip", bool, "augment.images"),
                float(rotation),
                (float(scale[0]), float(scale[1])),
                float(jitter["brightness"]),
                float(jitter["contrast"]),
            ),
            patch_size=patch_size,
            patches_per_image=patches,
            batch_rows=require(params, "batch_rows", int, "augment", low=1),
        )


CONFIG = AugmentConfig


def train_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("split"), "train"))


def train_batches(rows: Rows, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The train rows, a batch at a time."""
    for batch in rows.batches(columns):
        yield train_rows(pa.Table.from_batches([batch]))


def augmented_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("augmented_from", pa.string()))


def text_copies(rows: Rows, copies: int, seed: int) -> Iterator[pa.Table]:
    """`copies` rows per train row whose record attributes are shuffled (in the record's own syntax), a batch
    at a time; free prompts and single-attribute records have no order to shuffle and are skipped. One
    random stream runs through the batches, so the rows do not depend on the batch size."""
    rng = np.random.default_rng([seed, 1])
    schema = augmented_schema(rows.schema)
    prompts = seen = 0
    for table in train_batches(rows) if copies else ():
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in table.to_pylist():
            seen += 1
            record = parse_source(row["source"])  # cached: a record's references lie together
            if record is None:
                prompts += 1
                continue
            if len(record.pairs) < 2:
                continue
            for copy in range(copies):
                for name in rows.schema.names:
                    columns[name].append(row[name])
                columns["source"][-1] = record.reordered(rng.permutation(len(record.pairs)).tolist())
                columns["record_id"][-1] = f"{row['record_id']}#shuffle{copy}"
                columns["augmented_from"].append(row["record_id"])
        yield pa.table(columns, schema=schema)
    if prompts:
        log.info("text: %d of %d train sources are free prompts, not records: attribute-order shuffles skip them", prompts, seen)


def augment_text(table: pa.Table, copies: int, seed: int, batch_rows: int = 65_536) -> pa.Table:
    """text_copies of an in-memory table, as one table."""
    schema = augmented_schema(table.schema)
    return pa.concat_tables([schema.empty_table(), *text_copies(Rows.of_table(table, batch_rows), copies, seed)])


def image_pipeline(cfg: ImageAugment, size: tuple[int, int]) -> Any:
    """The torchvision v2 transform for one generation-training image of the given (H, W)."""
    from torchvision.transforms import v2

    steps = [
        v2.RandomRotation(cfg.rotation_degrees),
        v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
    ]
    if cfg.hflip:
        steps.insert(0, v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def to_tensor(pixels: np.ndarray) -> Any:
    import torch

    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.array(chw, copy=True))  # decoded PIL buffers are read-only


def from_tensor(tensor: Any) -> np.ndarray:
    array = tensor.numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def image_copies(rows: Rows, cfg: ImageAugment, seed: int) -> Iterator[pa.Table]:
    """`cfg.copies` transformed copies of each train image, labels kept, a batch at a time (one seeded torch
    stream through all batches)."""
    import torch

    torch.manual_seed(seed)
    schema = augmented_schema(rows.schema)
    for table in progress(train_batches(rows) if cfg.copies else (), desc="augment images", unit="batch"):
        out: list[dict[str, Any]] = []
        for row in table.to_pylist():
            pixels = decode_image(row["image"])
            transform = image_pipeline(cfg, pixels.shape[:2])
            for copy in range(cfg.copies):
                augmented = from_tensor(transform(to_tensor(pixels)))
                out.append({**row, "record_id": f"{row['record_id']}#aug{copy}", "image": encode_png(augmented),
                            "format": "PNG", "augmented_from": row["record_id"]})  # fmt: skip
        yield pa.Table.from_pylist(out, schema=schema)


def augment_images(table: pa.Table, cfg: ImageAugment, seed: int, batch_rows: int = 1024) -> pa.Table:
    """image_copies of an in-memory table, as one table."""
    schema = augmented_schema(table.schema)
    return pa.concat_tables([schema.empty_table(), *image_copies(Rows.of_table(table, batch_rows), cfg, seed)])


def restore_patch_batches(rows: Rows, patch_size: int, per_image: int, seed: int, symmetries: bool = True) -> Iterator[pa.Table]:
    """Random square patches of the train photos (randomly flipped / turned with `symmetries`), in the
    dataset's channel layout (greyscale when every photo is; else RGB), a batch of photos at a time. Patches
    are at most as large as the smallest train photo."""
    import torch
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    columns = ["mode", "width", "height", "split"]
    sizes = pa.Table.from_batches(list(rows.batches(columns)), pa.schema([rows.schema.field(c) for c in columns]))
    train = train_rows(sizes)
    if not per_image or not train.num_rows:
        return
    channels = channel_layout(sizes.column("mode").to_pylist())
    smallest = int(pc.min(pc.min_element_wise(train.column("width"), train.column("height"))).as_py())
    if smallest < patch_size:
        log.warning(
            "restore: the smallest train photo is %d px a side, under augment.restore.patch_size=%d: patches are %d px",
            smallest, patch_size, smallest,
        )  # fmt: skip
        patch_size = smallest
    flips = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()] if symmetries else []
    transform = v2.Compose([v2.RandomCrop(patch_size), *flips])
    for table in train_batches(rows, ["record_id", "image", "split"]):
        out: list[dict[str, Any]] = []
        for row in table.to_pylist():
            image = torch.from_numpy(to_layout(decode_image(row["image"]), channels))
            for index in range(per_image):
                patch = transform(image)
                if symmetries and torch.rand(()) < 0.5:
                    patch = patch.transpose(1, 2)  # with the flips: all 8 square symmetries
                out.append(
                    {
                        "record_id": f"{row['record_id']}#patch{index}",
                        "source_id": row["record_id"],
                        "image": encode_png(from_tensor(patch.contiguous())),  # (P, P) grey or (P, P, 3)
                    }
                )
        yield pa.Table.from_pylist(out, schema=PATCH_SCHEMA)


def restore_patches(table: pa.Table, patch_size: int, per_image: int, seed: int, symmetries: bool = True) -> pa.Table:
    """restore_patch_batches of an in-memory table, as one table."""
    batches = restore_patch_batches(Rows.of_table(table, 64), patch_size, per_image, seed, symmetries)
    return pa.concat_tables([PATCH_SCHEMA.empty_table(), *batches])


def write_batches(tables: Iterable[pa.Table], schema: pa.Schema, path: Path) -> int:
    """Stream tables into one Parquet file (it appears only when complete); returns its rows."""
    with ParquetSink(path, schema) as sink:
        for table in tables:
            sink.write(table)
        return sink.rows


def augment(cfg: AugmentConfig, clean_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write the augmented rows of each dataset, streaming; returns how many."""
    inputs = {}
    for name in ("text", "images", "restore"):
        path = clean_dir / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"missing input {path}: run the clean stage first")
        batch_rows = cfg.batch_rows if name == "text" else image_batch_rows(path, cfg.batch_rows)
        inputs[name] = Rows.of_file(path, batch_rows)
    enabled = cfg.enabled
    text, images, restore = inputs["text"], inputs["images"], inputs["restore"]
    image_cfg = cfg.images if enabled else ImageAugment(0, False, 0, (1, 1), 0, 0)
    counts = {
        "text": write_batches(text_copies(text, cfg.text_copies if enabled else 0, cfg.seed), augmented_schema(text.schema),
                              out_dir / "text.parquet"),
        "images": write_batches(image_copies(images, image_cfg, cfg.seed), augmented_schema(images.schema),
                                out_dir / "images.parquet"),
        # The restorer's training data are patches either way; disabled augmentation only drops their symmetries.
        "restore_patches": write_batches(
            restore_patch_batches(restore, cfg.patch_size, cfg.patches_per_image, cfg.seed, symmetries=enabled),
            PATCH_SCHEMA, out_dir / "restore_patches.parquet",
        ),
    }  # fmt: skip
    log.info("augmented rows: %s", counts)
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.augment", description=__doc__)
    parser.add_argument("clean", type=Path, help="clean data folder (data/clean)")
    parser.add_argument("out", type=Path, help="output folder (data/augmented)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(lambda: augment(AugmentConfig.from_params(load_params("augment", args.params)), args.clean, args.out))


if __name__ == "__main__":
    main()
