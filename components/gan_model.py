"""The image-generation family: a class-conditional DCGAN with a projection discriminator.

Generator: noise z and a label embedding, concatenated, go through the canonical DCGAN stack of transposed
convolutions (4×4 → image size, doubling each block, BatchNorm + ReLU, tanh out). Discriminator: strided
convolutions (LeakyReLU 0.2, BatchNorm after the first), then the projection head of Miyato & Koyama
(2018): `linear(h) + <embed(y), h>` on the pooled features. The generator's weights are also kept as an
exponential moving average, which is what gets saved and sampled.

Pixels are in [-1, 1] inside the model; `to_uint8` / `from_uint8` convert at the edges.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.common import ConfigError, require

FAMILY = "conditional-dcgan"
LOSSES = ("nonsaturating", "hinge")


@dataclass(frozen=True)
class GANConfig:
    image_size: int
    channels: int
    num_classes: int
    latent_dim: int
    embed_dim: int
    generator_width: int  # channels of the last generator block; earlier blocks double it
    discriminator_width: int  # channels of the first discriminator block; later blocks double it
    loss: str
    ema_decay: float

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str, image_size: int, channels: int, num_classes: int) -> GANConfig:
        cfg = cls(
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            latent_dim=require(section, "latent_dim", int, prefix, low=1, high=4096),
            embed_dim=require(section, "embed_dim", int, prefix, low=1, high=4096),
            generator_width=require(section, "generator_width", int, prefix, low=4, high=4096),
            discriminator_width=require(section, "discriminator_width", int, prefix, low=4, high=4096),
            loss=require(section, "loss", str, prefix),
            ema_decay=float(require(section, "ema_decay", (int, float), prefix, low=0, high=1)),
        )
        if cfg.loss not in LOSSES:
            raise ConfigError(f"params key '{prefix}.loss' must be one of {list(LOSSES)}, got {cfg.loss!r}")
        cfg.blocks()  # raises on an unsupported image size
        return cfg

    def blocks(self) -> int:
        """Upsampling blocks from 4×4: the image size must be 4·2^k (8, 16, 32, 64, ...)."""
        size, blocks = self.image_size, 0
        while size > 4 and size % 2 == 0:
            size //= 2
            blocks += 1
        if size != 4 or blocks < 1:
            raise ConfigError(
                f"image size {self.image_size} is not 4·2^k (k ≥ 1); set features.images.image_size to 8, 16, 32, 64, ..."
            )
        return blocks

    def to_json(self) -> dict[str, Any]:
        return {"family": FAMILY, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GANConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = cfg.blocks()
        width = cfg.generator_width * 2 ** (blocks - 1)
        self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.latent_dim + cfg.embed_dim, width, 4, 1, 0, bias=False),  # (B, W, 4, 4)
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(blocks - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, cfg.channels, 4, 2, 1), nn.Tanh()]  # (B, C, S, S)
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(labels)], dim=1)  # (B, Z + E)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        blocks = cfg.blocks()
        width = cfg.discriminator_width
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for _ in range(blocks - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, True)]
            width *= 2
        self.net = nn.Sequential(*layers)  # (B, W, 4, 4)
        self.head = nn.Linear(width, 1)
        self.embed = nn.Embedding(cfg.num_classes, width)
        init_dcgan(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.net(images).sum(dim=(2, 3))  # (B, W)
        return self.head(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)  # (B,) logits


def init_dcgan(module: nn.Module) -> None:
    """N(0, 0.02) convolutions and embeddings, N(1, 0.02) norm scales, as in the DCGAN paper."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ConditionalGAN(nn.Module):
    """Generator, discriminator and the EMA generator in one module, so one state dict checkpoints them all.

    `forward(phase, batch)` returns that phase's loss: training goes through `forward` so that DDP sees it.
    """

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()

    def forward(self, phase: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if phase == "discriminator":
            with torch.no_grad():
                fake = self.generator(batch["z_discriminator"], batch["fake_labels"])
            real_logits = self.discriminator(batch["images"], batch["labels"])
            fake_logits = self.discriminator(fake, batch["fake_labels"])
            if self.cfg.loss == "hinge":
                return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
            return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        if phase == "generator":
            fake_logits = self.discriminator(self.generator(batch["z_generator"], batch["fake_labels"]), batch["fake_labels"])
            return -fake_logits.mean() if self.cfg.loss == "hinge" else F.softplus(-fake_logits).mean()
        raise ValueError(f"unknown phase {phase!r}")

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """EMA of the generator; the decay ramps up over the first steps so early weights fade quickly."""
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        for ema, live in zip(self.generator_ema.parameters(), self.generator.parameters(), strict=True):
            ema.lerp_(live, 1 - decay)
        for ema, live in zip(self.generator_ema.buffers(), self.generator.buffers(), strict=True):
            ema.copy_(live)


def training_batch(
    images: torch.Tensor, labels: torch.Tensor, cfg: GANConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """What `ConditionalGAN.forward` takes for both phases: real uint8 images (B, C, S, S) with their labels,
    and, drawn from `generator`, the labels and noise of the fakes each phase generates."""
    size = len(labels)
    return {
        "images": from_uint8(images),
        "labels": labels,
        "fake_labels": torch.randint(0, cfg.num_classes, (size,), generator=generator),
        "z_discriminator": torch.randn(size, cfg.latent_dim, generator=generator),
        "z_generator": torch.randn(size, cfg.latent_dim, generator=generator),
    }


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def class_noise(cfg: GANConfig, per_class: int, seed: int, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (z, labels) for `per_class` samples of each class: the same seed gives the same images."""
    classes = list(range(cfg.num_classes)) if classes is None else classes
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(len(classes) * per_class, cfg.latent_dim, generator=generator)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    return z, labels


@torch.no_grad()
def generate(generator: Generator, z: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, C, S, S) from the generator in eval mode, in batches, on the generator's device."""
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    out = [
        to_uint8(generator(z[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(z), batch_size)
    ]
    generator.train(was_training)
    size = generator.cfg.image_size
    return torch.cat(out) if out else torch.zeros(0, generator.cfg.channels, size, size, dtype=torch.uint8)


def load_generator(folder: Any, key: str = "image model folder") -> tuple[Generator, dict[str, Any]]:
    """The saved (EMA) generator and its config JSON from a `models/image` folder."""
    from pathlib import Path

    from components.model_io import load_model_files

    config, state = load_model_files(Path(folder), key, FAMILY)
    generator = Generator(GANConfig.from_json(config))
    generator.load_state_dict(state)
    return generator.eval(), config
