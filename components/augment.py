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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
from components.tables import write_parquet_atomic

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
        )


CONFIG = AugmentConfig


def train_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("split"), "train"))


def augment_text(table: pa.Table, copies: int, seed: int) -> pa.Table:
    """`copies` rows per train row whose record attributes are shuffled (in the record's own syntax); free
    prompts and single-attribute records have no order to shuffle and are skipped."""
    rng = np.random.default_rng([seed, 1])
    columns: dict[str, list[Any]] = {name: [] for name in table.column_names}
    columns["augmented_from"] = []
    prompts = 0
    rows = train_rows(table).to_pylist() if copies else []
    for row in rows:
        record = parse_source(row["source"])
        if record is None:
            prompts += 1
            continue
        if len(record.pairs) < 2:
            continue
        for copy in range(copies):
            for name in table.column_names:
                columns[name].append(row[name])
            columns["source"][-1] = record.reordered(rng.permutation(len(record.pairs)).tolist())
            columns["record_id"][-1] = f"{row['record_id']}#shuffle{copy}"
            columns["augmented_from"].append(row["record_id"])
    if prompts:
        log.info(
            "text: %d of %d train sources are free prompts, not records: attribute-order shuffles skip them", prompts, len(rows)
        )
    return pa.table(columns, schema=table.schema.append(pa.field("augmented_from", pa.string())))


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


def augment_images(table: pa.Table, cfg: ImageAugment, seed: int) -> pa.Table:
    """`cfg.copies` transformed copies of each train image, labels kept."""
    import torch

    torch.manual_seed(seed)
    out: list[dict[str, Any]] = []
    rows = train_rows(table).to_pylist() if cfg.copies else []
    for row in progress(rows, desc="augment images", unit="img"):
        pixels = decode_image(row["image"])
        transform = image_pipeline(cfg, pixels.shape[:2])
        for copy in range(cfg.copies):
            augmented = from_tensor(transform(to_tensor(pixels)))
            out.append(
                {
                    **row,
                    "record_id": f"{row['record_id']}#aug{copy}",
                    "image": encode_png(augmented),
                    "format": "PNG",
                    "augmented_from": row["record_id"],
                }
            )
    schema = table.schema.append(pa.field("augmented_from", pa.string()))
    return pa.Table.from_pylist(out, schema=schema)


def restore_patches(table: pa.Table, patch_size: int, per_image: int, seed: int, symmetries: bool = True) -> pa.Table:
    """Random square patches of the train photos (randomly flipped / turned with `symmetries`), in the
    dataset's channel layout (greyscale when every photo is; else RGB). Patches are at most as large as the
    smallest train photo."""
    import torch
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    rows = train_rows(table).to_pylist() if per_image else []
    if not rows:
        return pa.Table.from_pylist([], schema=PATCH_SCHEMA)
    channels = channel_layout(table.column("mode").to_pylist())
    smallest = min(min(row["width"], row["height"]) for row in rows)
    if smallest < patch_size:
        log.warning(
            "restore: the smallest train photo is %d px a side, under augment.restore.patch_size=%d: patches are %d px",
            smallest, patch_size, smallest,
        )  # fmt: skip
        patch_size = smallest
    flips = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()] if symmetries else []
    transform = v2.Compose([v2.RandomCrop(patch_size), *flips])
    out: list[dict[str, Any]] = []
    for row in rows:
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
    return pa.Table.from_pylist(out, schema=PATCH_SCHEMA)


def augment(cfg: AugmentConfig, clean_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write the augmented rows of each dataset; returns how many."""
    tables = {}
    for name in ("text", "images", "restore"):
        path = clean_dir / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"missing input {path}: run the clean stage first")
        tables[name] = pq.read_table(path)
    enabled = cfg.enabled
    text = augment_text(tables["text"], cfg.text_copies if enabled else 0, cfg.seed)
    images = augment_images(tables["images"], cfg.images if enabled else ImageAugment(0, False, 0, (1, 1), 0, 0), cfg.seed)
    # The restorer's training data are patches either way; disabled augmentation only drops their symmetries.
    patches = restore_patches(tables["restore"], cfg.patch_size, cfg.patches_per_image, cfg.seed, symmetries=enabled)
    write_parquet_atomic(text, out_dir / "text.parquet")
    write_parquet_atomic(images, out_dir / "images.parquet")
    write_parquet_atomic(patches, out_dir / "restore_patches.parquet")
    counts = {"text": text.num_rows, "images": images.num_rows, "restore_patches": patches.num_rows}
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
