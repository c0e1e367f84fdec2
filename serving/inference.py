"""The promoted models as plain Python objects, batched where it pays; no BentoML here.

`serving/service.py` wraps these in BentoML services; tests and benches can drive them directly. Every
output is a pure function of (model, request, seed): batching changes how fast, never what comes back.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Caps that bound the work of one request; the public API validates against them.
MAX_NEW_TOKENS = 256
MAX_IMAGES = 16
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOAD_SIDE = 4096
UPLOAD_FORMATS = ("PNG", "JPEG", "MPO")  # what the API documents (MPO: a camera's multi-picture JPEG, its first
# picture is read); Pillow would also read GIF, TIFF, BMP, WebP, ...


@dataclass(frozen=True)
class TextRequest:
    prompt: str
    decoding: str = "beam"  # greedy | beam | nucleus; beam is what evaluate_text measures
    temperature: float = 1.0
    top_p: float = 0.9
    num_beams: int = 4
    max_new_tokens: int = 64
    seed: int = 0

    def group_key(self) -> tuple[Any, ...]:
        """Requests that may share one `generate` call: same decoding, and for sampling the same seed."""
        sampled = self.decoding == "nucleus"
        return (self.decoding, self.temperature, self.top_p, self.num_beams, self.max_new_tokens, self.seed if sampled else None)


class TextGenerator:
    """The text model of a `save_pretrained` folder (models/text), generating from prompts in batches."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        from components.text_model import load_text_model

        self.model, self.tokenizer, self.delexicaliser = load_text_model(folder, "text model", device)
        self.device = self.model.device  # an int8 model stays on the CPU
        self.max_length = int(self.model.config.max_position_embeddings)

    def generate(self, requests: list[TextRequest]) -> list[str]:
        """Texts for the requests, in order; requests with the same decoding settings run as one batch."""
        from components.text_model import decoding_options, generate_texts

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.group_key(), []).append(index)
        for indices in groups.values():
            first = requests[indices[0]]
            options = decoding_options(first.decoding, first.num_beams, first.top_p, first.temperature, first.max_new_tokens)
            torch.manual_seed(first.seed)  # sampling only; greedy and beam search ignore it
            prompts = [requests[i].prompt for i in indices]
            texts = generate_texts(
                self.model, self.tokenizer, prompts, options, len(prompts), self.device, first.max_new_tokens,
                delexicaliser=self.delexicaliser,
            )  # fmt: skip
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = text
        return [text or "" for text in outputs]


@dataclass(frozen=True)
class ImageRequest:
    label: int
    n: int = 1
    seed: int = 0


class ImageGenerator:
    """A class-conditional generator of either kind (components.image_generators: the GAN of models/image, or
    the diffusion model of models/diffusion): the GAN generates every image of every request in a batch in one
    forward pass; diffusion samples request by request (see `generate`)."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        from components.image_generators import load_image_generator

        self.model = load_image_generator(folder).to(device)
        self.kind: str = self.model.kind
        self.label_names: list[str] = self.model.label_names

    def generate(self, requests: list[ImageRequest]) -> list[list[np.ndarray]]:
        """uint8 (H, W, C) images per request; a request's noise comes from its own seed only (the same noise
        `evaluate_image` draws for `n` samples of one class from that seed)."""
        if self.kind == "diffusion" and len(requests) > 1:
            # A UNet's float sums on the CPU depend on the batch size, and sampling compounds the difference over
            # its steps (seen: one pixel off in a mixed batch): each request is sampled alone, so its images
            # depend on its seed only. The GAN's single forward pass stays batched.
            return [images for request in requests for images in self.generate([request])]
        noise, labels = zip(*(self.model.class_noise(r.n, r.seed, [r.label]) for r in requests), strict=True)
        images = self.model.generate(torch.cat(noise), torch.cat(labels)).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        out, start = [], 0
        for r in requests:
            out.append([images[i] for i in range(start, start + r.n)])
            start += r.n
        return out


class ImageRestorer:
    """The restorer of models/restore, on whole uint8 (H, W) greyscale or (H, W, 3) RGB images.

    The answer has the upload's layout. A greyscale model restores an RGB upload channel by channel (its
    noise model is per channel); an RGB model restores a greyscale upload as grey RGB and returns the grey.
    """

    def __init__(self, folder: Path, device: torch.device) -> None:
        from components.restore_model import load_restorer

        self.model = load_restorer(folder).to(device)
        self.device = device

    @property
    def task(self) -> str:
        return self.model.cfg.task

    @property
    def channels(self) -> int:
        return int(self.model.cfg.channels)

    def restore(self, pixels: np.ndarray) -> np.ndarray:
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        x = torch.from_numpy(np.ascontiguousarray(chw)).float().div(255.0)  # (C, H, W)
        if self.channels == 1:
            batch = x[:, None]  # each channel its own greyscale image
        else:
            batch = (x if len(x) == 3 else x.expand(3, -1, -1))[None]
        with torch.inference_mode():
            y = self.model(batch.to(self.device)).clamp(0, 1).cpu()
        y = y[:, 0] if self.channels == 1 else (y[0] if len(x) == 3 else y[0].mean(dim=0, keepdim=True))
        out = (y * 255).round().to(torch.uint8).numpy()  # (C, H', W')
        return out[0] if pixels.ndim == 2 else out.transpose(1, 2, 0)


def png_bytes(pixels: np.ndarray, metadata: dict[str, str]) -> bytes:
    """PNG of uint8 (H, W) or (H, W, C) pixels with provenance as tEXt chunks."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class UploadError(ValueError):
    """An uploaded image that cannot be accepted; the message names the problem."""


def decode_upload(data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS, max_side: int = MAX_UPLOAD_SIDE) -> np.ndarray:
    """uint8 (H, W) greyscale or (H, W, 3) RGB pixels of a PNG or JPEG upload (components.image_io.image_array),
    refusing other formats, corrupt files and decompression bombs.

    The size comes from the header before any pixel is decoded, so a tiny file claiming a huge image
    costs nothing; Pillow's own bomb check is made an error too.
    """
    from PIL import Image

    from components.image_io import image_array

    if not data:
        raise UploadError("image: the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in UPLOAD_FORMATS:
                raise UploadError(f"image: {image.format} is not accepted; send PNG or JPEG")
            width, height = image.size
            if width * height > max_pixels or max(width, height) > max_side:
                raise UploadError(f"image: {width}x{height} is over the limit ({max_side} px a side, {max_pixels} pixels)")
            image.load()
            return image_array(image)
    except UploadError:
        raise
    except Image.DecompressionBombError as err:
        raise UploadError(f"image: refused as a decompression bomb ({err})") from err
    except Exception as err:  # Pillow raises several types for truncated or non-image data
        raise UploadError(f"image: not a readable image ({type(err).__name__}: {err})") from err


def model_provenance(folder: Path) -> dict[str, str]:
    """params hash and data hash from a model folder's training.json (empty strings when absent)."""
    record_path = folder / "training.json"
    if not record_path.is_file():
        return {"params_hash": "", "data_hash": ""}
    record = json.loads(record_path.read_text(encoding="utf-8"))
    import hashlib

    params = json.dumps(record.get("params", {}), sort_keys=True, default=str)
    return {"params_hash": hashlib.sha256(params.encode()).hexdigest()[:16], "data_hash": str(record.get("data_hash", ""))}
