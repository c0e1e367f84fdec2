"""Image bytes and arrays for every stage and family: PNG encoding and decoding, the `features` stage's image
arrays, and sample grids.

Only numpy and the standard library at import time, so the data stages load no torch: Pillow, torch,
safetensors and torchvision (grids) are imported when used, and training still runs on a GPU box that
lacks torchvision (grids are then skipped).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.common import DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 (N, C, S, S)
    labels: torch.Tensor  # int64 (N,)
    label_names: list[str]
    augmented: torch.Tensor  # bool (N,): rows added by the augment stage (train split only)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n (images, labels) drawn with replacement by `generator`."""
        import torch

        indices = torch.randint(0, len(self.labels), (n,), generator=generator)
        return self.images[indices], self.labels[indices]

    def originals(self) -> ImageSplit:
        """Only the rows that were not made by augmentation."""
        keep = ~self.augmented
        return ImageSplit(self.images[keep], self.labels[keep], self.label_names, self.augmented[keep])


def load_image_split(path: Path) -> ImageSplit:
    """One split written by the features stage (`images`, `labels`, optional `augmented`, `meta` metadata)."""
    import torch
    from safetensors import safe_open

    if not path.is_file():
        raise DataError(f"missing {path}: run the features stage first")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        keys = set(fh.keys())
        if not {"images", "labels"} <= keys:
            raise DataError(f"{path} lacks the 'images' / 'labels' arrays (has {sorted(keys)})")
        images, labels = fh.get_tensor("images"), fh.get_tensor("labels")
        augmented = fh.get_tensor("augmented").bool() if "augmented" in keys else torch.zeros(len(labels), dtype=torch.bool)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"{path}: 'images' must be uint8 (N, C, S, S), got {images.dtype} {tuple(images.shape)}")
    if "label_names" not in meta:
        raise DataError(f"{path}: metadata has no label_names")
    return ImageSplit(images, labels.long(), list(meta["label_names"]), augmented)


def save_grid(images: torch.Tensor, path: Path, columns: int) -> bool:
    """uint8 (N, C, H, W) images as one PNG grid, `columns` per row; False (with a warning) without torchvision."""
    try:
        from torchvision.io import write_png
        from torchvision.utils import make_grid
    except ImportError as err:
        log.warning("no sample grid %s: torchvision is not installed (%s)", path, err)
        return False
    grid = make_grid(images, nrow=columns, padding=2, pad_value=255)  # (3 or C, H', W') uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_png(grid.cpu(), str(tmp))
    os.replace(tmp, path)
    return True


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 HxW or HxWxC pixels -> PNG bytes (lossless, so no stage changes a pixel by storing it)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes with one intensity channel (alpha aside): they decode to greyscale, everything else to RGB."""


def channel_layout(modes: Iterable[str | None]) -> int:
    """The channels a dataset trains on: 1 when every image is greyscale, else 3 (greyscale ones replicated)."""
    return 1 if all(mode in GREY_MODES for mode in modes) else 3


def to_layout(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) pixels as (C, H, W) with C = `channels` (grey replicated, or RGB as luma)."""
    if pixels.ndim == 3 and channels == 1:
        pixels = np.rint(pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None] if channels == 1 else np.repeat(pixels[..., None], channels, axis=2)
    return np.array(pixels.transpose(2, 0, 1), order="C")  # a writable copy: decoded buffers are read-only


def image_array(image: Any) -> np.ndarray:
    """A loaded Pillow image as uint8 (H, W) for greyscale modes or (H, W, 3) RGB for the others.

    Alpha is dropped, palettes expanded, and 16-bit / 32-bit greyscale scaled to 8 bits by its bit depth
    (Pillow's own conversion clips them at 255 instead).
    """
    if image.mode in ("L", "RGB"):
        return np.asarray(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        wide = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        return np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.asarray(image.convert("L" if image.mode in GREY_MODES else "RGB"))


def decode_image(data: bytes) -> np.ndarray:
    """Pixels of encoded image bytes, as `image_array` gives them."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image_array(image)
