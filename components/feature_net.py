"""The domain feature network for FID / KID: a small CNN classifier trained on the real training images.

No InceptionV3 weights are reachable offline, so FID here is measured in the penultimate layer of a
classifier of our own data (`fid_domain`). `DomainFeatures` wraps it the way torchmetrics' FID and KID expect
a custom `feature=` module: uint8 images (N, C, H, W) of any size and channel count in, (N, d) features out,
with `num_features` set so torchmetrics needs no dummy forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.common import require

FAMILY = "domain-feature-net"


@dataclass(frozen=True)
class FeatureNetConfig:
    image_size: int
    channels: int
    num_classes: int
    width: int  # channels of the first conv block; each of the three blocks doubles it
    feature_dim: int  # the FID feature space
    dropout: float

    @classmethod
    def from_params(
        cls, section: dict[str, Any], prefix: str, image_size: int, channels: int, num_classes: int
    ) -> FeatureNetConfig:
        return cls(
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            width=require(section, "width", int, prefix, low=4, high=1024),
            feature_dim=require(section, "feature_dim", int, prefix, low=2, high=4096),
            dropout=float(require(section, "dropout", (int, float), prefix, low=0, high=0.9)),
        )

    def to_json(self) -> dict[str, Any]:
        return {"family": FAMILY, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureNetConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
        nn.MaxPool2d(2),
    )


class FeatureNet(nn.Module):
    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(conv_block(cfg.channels, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w))
        # Standardised features: KID's polynomial kernel (x·y/d + 1)^3 assumes unit-scale features,
        # as Inception's pooled activations roughly are; raw projections blow it up.
        self.project = nn.Sequential(nn.Linear(4 * w, cfg.feature_dim), nn.BatchNorm1d(cfg.feature_dim, affine=False))
        self.classify = nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, d) of images in [-1, 1]; taken before the ReLU so no unit is
        clamped to zero (a degenerate covariance makes FID unstable)."""
        h = self.body(x).mean(dim=(2, 3))  # (N, 4w), global average pool
        return self.project(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))  # (N, classes) logits


class DomainFeatures(nn.Module):
    """torchmetrics `feature=` adapter: uint8 images of any size / channel count -> (N, d) float features."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net.eval()
        self.num_features = net.cfg.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare(images, self.net.cfg.image_size, self.net.cfg.channels, next(self.net.parameters()).device)
        return self.net.features(x).float()


def prepare(images: torch.Tensor, size: int, channels: int, device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] with the network's channel count and size."""
    x = images.to(device).float().div(127.5).sub(1.0)
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True) if channels == 1 else x[:, :1].expand(-1, channels, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def feature_net_from_state(config: dict[str, Any], state: dict[str, torch.Tensor]) -> FeatureNet:
    """The network in eval mode from its saved config JSON and safetensors state (a folder's, or a git revision's)."""
    net = FeatureNet(FeatureNetConfig.from_json(config))
    net.load_state_dict(state)
    return net.eval()


def load_feature_net(folder: Path, key: str = "feature network folder") -> FeatureNet:
    from components.model_io import load_model_files

    config, state = load_model_files(Path(folder), key, FAMILY)
    return feature_net_from_state(config, state)


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of uint8 images (N, C, H, W) the classifier puts in their labelled class."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = prepare(images[i : i + batch_size], net.cfg.image_size, net.cfg.channels, device)
        correct += int((net(x).argmax(dim=1).cpu() == labels[i : i + batch_size]).sum())
    return correct / max(1, len(labels))


def reference_path(reference_dir: Path, split: str) -> Path:
    """Where `train_feature_net` caches a split's real-image features."""
    return reference_dir / f"{split}.safetensors"


def save_reference(features: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    """Cached real-image features (N, d) as safetensors, with what produced them in the metadata."""
    import json

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous()}, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})


def load_reference(path: Path) -> torch.Tensor:
    """(N, d) float64 reference features written by `save_reference`."""
    from safetensors.torch import load_file

    from components.common import DataError

    if not path.is_file():
        raise DataError(f"missing {path}: run the train_feature_net stage first")
    return load_file(str(path))["features"]


@torch.no_grad()
def extract(extractor: DomainFeatures, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N, d) float64 features of uint8 images, in batches."""
    parts = [extractor(images[i : i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, extractor.num_features, dtype=torch.float64)
