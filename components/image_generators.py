"""Either class-conditional image generator behind one interface: the GAN (`gan_model`) or the diffusion UNet
(`diffusion_model`), chosen by the `family` a model folder's config.json names.

Evaluation calls this, so both generators are sampled, seeded and scored the same way: fixed noise per
seed, then uint8 images (N, C, S, S). Each family still owns its model and sampling. Serving
(serving/inference.py) and bench/fid.py load generators through it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components import diffusion_model, gan_model
from components.common import ConfigError
from components.model_io import CONFIG, check_safetensors_folder

KINDS = {"gan": gan_model.FAMILY, "diffusion": diffusion_model.FAMILY}
"""Generator kind (what a request or a param names) -> the family its model folder's config.json states."""


@dataclass
class ImageGenerator:
    kind: str
    module: nn.Module
    model_cfg: Any  # GANConfig | DiffusionConfig
    config: dict[str, Any]  # the folder's config.json

    @property
    def num_classes(self) -> int:
        return self.model_cfg.num_classes

    @property
    def label_names(self) -> list[str]:
        return list(self.config.get("label_names") or [])

    @property
    def sampling_steps(self) -> int | None:
        return self.model_cfg.sampling_steps if self.kind == "diffusion" else None

    def to(self, device: torch.device | str) -> ImageGenerator:
        self.module.to(device)
        return self

    def class_noise(self, per_class: int, seed: int, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed (noise, labels) for `per_class` samples of each class: the same seed gives the same images."""
        family = gan_model if self.kind == "gan" else diffusion_model
        return family.class_noise(self.model_cfg, per_class, seed, classes)

    def generate(
        self, noise: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, steps: int | None = None
    ) -> torch.Tensor:
        """uint8 images (N, C, S, S); `steps` (diffusion only) defaults to the model's sampling steps."""
        if self.kind == "gan":
            return gan_model.generate(self.module, noise, labels, batch_size)
        return diffusion_model.generate(self.module, self.model_cfg, noise, labels, batch_size, steps)


def generator_kind(folder: Path, key: str = "image generator folder") -> str:
    """'gan' or 'diffusion', from the folder's config.json; a clear error for anything else."""
    check_safetensors_folder(folder, key)
    family = json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("family")
    for kind, name in KINDS.items():
        if family == name:
            return kind
    raise ConfigError(f"{key}: {folder} holds a {family!r} model, not an image generator ({sorted(KINDS.values())})")


def load_image_generator(folder: Path | str, key: str = "image generator folder") -> ImageGenerator:
    """The saved generator of either family, in eval mode on the CPU."""
    folder = Path(folder)
    kind = generator_kind(folder, key)
    if kind == "gan":
        module, config = gan_model.load_generator(folder, key)
        return ImageGenerator(kind, module, module.cfg, config)
    unet, cfg, config = diffusion_model.load_diffusion(folder, key)
    return ImageGenerator(kind, unet, cfg, config)
