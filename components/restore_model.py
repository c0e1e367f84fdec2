"""The image-restoration family: a compact residual CNN for super-resolution (×2/×3/×4) or denoising.

The network works at the input's resolution (a head conv, `blocks` residual blocks, a tail conv) and, for
super-resolution, upsamples with a sub-pixel convolution (ESPCN's PixelShuffle). It predicts a residual
over the classical answer: bicubic upscaling for super-resolution, the noisy input itself for denoising
(DnCNN's residual learning), so an untrained network starts at the baseline it has to beat.

`degrade` makes the low-quality input from a clean image, the same way for training and evaluation.
Pixels are floats in [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.common import ConfigError, DataError, require

FAMILY = "residual-restorer"
TASKS = ("super_resolution", "denoise")


@dataclass(frozen=True)
class RestoreConfig:
    task: str
    scale: int  # super-resolution factor; 1 for denoising
    noise_sigma: float  # denoising: Gaussian noise σ on the 0-255 scale
    channels: int
    width: int
    blocks: int

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str) -> RestoreConfig:
        task = require(section, "task", str, prefix)
        if task not in TASKS:
            raise ConfigError(f"params key '{prefix}.task' must be one of {list(TASKS)}, got {task!r}")
        scale = require(section, "scale", int, prefix, low=1, high=8)
        if task == "super_resolution" and scale not in (2, 3, 4):
            raise ConfigError(f"params key '{prefix}.scale' must be 2, 3 or 4 for super_resolution, got {scale}")
        return cls(
            task=task,
            scale=scale if task == "super_resolution" else 1,
            noise_sigma=float(require(section, "noise_sigma", (int, float), prefix, low=0, high=255)),
            channels=3,  # the training data's layout replaces it (train_restore): 1 for greyscale photos
            width=require(section, "width", int, prefix, low=4, high=1024),
            blocks=require(section, "blocks", int, prefix, low=0, high=64),
        )

    def to_json(self) -> dict[str, Any]:
        return {"family": FAMILY, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestoreConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(True), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Restorer(nn.Module):
    def __init__(self, cfg: RestoreConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = nn.Conv2d(cfg.channels, cfg.width, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(cfg.width) for _ in range(cfg.blocks)])
        self.tail = nn.Conv2d(cfg.width, cfg.channels * cfg.scale**2, 3, padding=1)
        self.upsample = nn.PixelShuffle(cfg.scale)
        nn.init.zeros_(self.tail.weight)  # start exactly at the baseline
        nn.init.zeros_(self.tail.bias)

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        h = self.head(degraded)  # (B, W, h, w)
        residual = self.upsample(self.tail(h + self.body(h)))  # (B, C, h·s, w·s)
        return baseline(degraded, self.cfg) + residual


def bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize (PIL / MATLAB-like when shrinking), clamped to [0, 1]."""
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def baseline(degraded: torch.Tensor, cfg: RestoreConfig) -> torch.Tensor:
    """The classical answer: bicubic upscaling, or the noisy input as it is."""
    if cfg.task == "super_resolution":
        return bicubic(degraded, (degraded.shape[-2] * cfg.scale, degraded.shape[-1] * cfg.scale))
    return degraded


def crop_to_scale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop height and width down to multiples of the scale, so down- and up-scaling round-trip exactly."""
    h, w = images.shape[-2] // scale * scale, images.shape[-1] // scale * scale
    return images[..., :h, :w]


def degrade(clean: torch.Tensor, cfg: RestoreConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The model's input for a clean (B, C, H, W) batch: bicubic downscaling by `scale` (H, W multiples of
    it), or additive Gaussian noise of σ/255 (not clamped, as in the denoising literature)."""
    if cfg.task == "super_resolution":
        return bicubic(clean, (clean.shape[-2] // cfg.scale, clean.shape[-1] // cfg.scale))
    noise = torch.randn(clean.shape, generator=generator, device="cpu").to(clean.device)
    return clean + noise * (cfg.noise_sigma / 255.0)


def load_restorer(folder: Path, key: str = "restore model folder") -> Restorer:
    from components.model_io import load_model_files

    config, state = load_model_files(Path(folder), key, FAMILY)
    model = Restorer(RestoreConfig.from_json(config))
    model.load_state_dict(state)
    return model.eval()


def load_patches(path: Path) -> torch.Tensor:
    """uint8 (N, C, P, P) training patches written by the features stage (C: the dataset's channel layout)."""
    from safetensors import safe_open

    if not path.is_file():
        raise DataError(f"missing {path}: run the features stage first")
    with safe_open(str(path), framework="pt") as fh:
        if "patches" not in set(fh.keys()):
            raise DataError(f"{path} has no 'patches' array")
        patches = fh.get_tensor("patches")
    if len(patches) == 0:
        raise DataError(f"{path} holds no training patches: set augment.restore.patches_per_image above 0")
    return patches
