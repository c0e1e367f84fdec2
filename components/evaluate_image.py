"""Stage `evaluate_image`: FID and KID of the class-conditional generator, in the domain feature space.

    python -m components.evaluate_image models/image models/feature_net data/fid_reference \
        data/features/images --metrics metrics/image.json --out data/evaluation/image

`samples_per_class` images per class are generated from fixed seeds and compared with the real test images
through torchmetrics' FrechetInceptionDistance / KernelInceptionDistance, whose `feature=` module is our
feature network. The real side comes from the reference features cached by `train_feature_net` (the
metrics receive features through an identity `feature=` module, so torchmetrics does all the statistics);
each generated image goes through the network once for both metrics. In the same run: the floor (real
train images vs real test images: how close a perfect generator could get on this much data), the share
of generated images the classifier assigns to the class they were asked for, and, when InceptionV3
weights are available, the standard `fid_inception`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.common import ConfigError, load_params, require, run_main, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateImageConfig:
    samples_per_class: int
    kid_subsets: int
    kid_subset_size: int
    batch_size: int
    inception: bool
    inception_weights: Path | None
    grid_per_class: int
    device: str
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateImageConfig:
        p = "evaluate_image"
        weights = params.get("inception_weights")
        if weights is not None and (not isinstance(weights, str) or not weights):
            raise ConfigError(f"params key '{p}.inception_weights' must be a file path or null, got {weights!r}")
        device = require(params, "device", str, p)
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"params key '{p}.device' must be one of ['auto', 'cpu', 'cuda'], got {device!r}")
        return cls(
            samples_per_class=require(params, "samples_per_class", int, p, low=2),
            kid_subsets=require(params, "kid_subsets", int, p, low=1),
            kid_subset_size=require(params, "kid_subset_size", int, p, low=2),
            batch_size=require(params, "batch_size", int, p, low=1),
            inception=require(params, "inception", bool, p),
            inception_weights=Path(weights) if weights else None,
            grid_per_class=require(params, "grid_per_class", int, p, low=1, high=64),
            device=device,
            seed=require(params["base"], "seed", int, "base"),
        )


class PrecomputedFeatures(nn.Module):
    """A torchmetrics `feature=` module for inputs that already are features: the identity, with its width."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics FID between two (N, d) feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """torchmetrics KID (mean, std over random subsets) between two (N, d) feature sets; the subsets are
    drawn from a fixed seed without disturbing the caller's RNG."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights: Path | None, batch_size: int) -> tuple[float | None, str]:
    """Standard FID (torch-fidelity's InceptionV3 through torchmetrics) and a status line.

    The weights come from `weights` when given, else from the library's own download, which fails offline:
    then the value is None and the status says why; the pipeline goes on with the domain metrics.
    """
    if weights is not None and not weights.is_file():
        return None, f"unavailable: inception_weights {weights} does not exist"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights) if weights else None)
    except Exception as err:  # no torch-fidelity, no network, or a bad weights file
        return None, f"unavailable: {type(err).__name__}: {err}"[:300]
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
    return float(metric.compute()), "computed"


def evaluate_image(
    cfg: EvaluateImageConfig,
    model_dir: Path,
    feature_net_dir: Path,
    reference_dir: Path,
    images_dir: Path,
    metrics_path: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Generate, score against the cached real test features, write metrics and a sample grid."""
    from components.feature_net import DomainFeatures, extract, load_feature_net, prepare
    from components.gan_model import class_noise, generate, load_generator
    from components.image_io import load_image_split, save_grid
    from components.train_feature_net import load_reference
    from components.training import evaluation_device

    device = evaluation_device(cfg.device)
    generator, gen_config = load_generator(model_dir)
    net = load_feature_net(feature_net_dir).to(device)
    if gen_config.get("label_names") != json.loads((feature_net_dir / "config.json").read_text())["label_names"]:
        raise ConfigError(f"{model_dir} and {feature_net_dir} were trained on different label sets")
    extractor = DomainFeatures(net)
    real_test = load_reference(reference_dir / "test.safetensors")
    real_train = load_reference(reference_dir / "train.safetensors")
    if real_test.shape[1] != extractor.num_features:
        raise ConfigError(f"{reference_dir} was computed with another feature network (width {real_test.shape[1]})")

    z, labels = class_noise(generator.cfg, cfg.samples_per_class, cfg.seed + 1)
    fake_images = generate(generator.to(device), z, labels, cfg.batch_size)
    fake = extract(extractor, fake_images, cfg.batch_size)
    with torch.no_grad():
        predicted = torch.cat(
            [net(prepare(fake_images[i : i + cfg.batch_size], net.cfg.image_size, net.cfg.channels, device)).argmax(1).cpu()
             for i in range(0, len(fake_images), cfg.batch_size)]
        )  # fmt: skip
    kid_mean, kid_std = kid_from_features(real_test, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    floor_kid, _ = kid_from_features(real_test, real_train, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    training = json.loads((feature_net_dir / "training.json").read_text(encoding="utf-8"))
    metrics: dict[str, Any] = {
        "fid_domain": round(fid_from_features(real_test, fake), 4),
        "kid_domain": round(kid_mean, 6),
        "kid_domain_std": round(kid_std, 6),
        "fid_domain_floor": round(fid_from_features(real_test, real_train), 4),
        "kid_domain_floor": round(floor_kid, 6),
        "feature_net_accuracy": training["test_accuracy"],
        "generated_class_accuracy": round(float((predicted == labels).float().mean()), 4),
        "generated_images": len(fake_images),
        "real_test_images": len(real_test),
    }
    if cfg.inception:
        test_images = load_image_split(images_dir / "test.safetensors").images
        value, status = inception_fid(test_images, fake_images, cfg.inception_weights, cfg.batch_size)
        if value is not None:
            metrics["fid_inception"] = round(value, 4)
        metrics["fid_inception_status"] = status
        if value is None:
            log.warning("fid_inception skipped: %s", status)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The generated images themselves: a champion / challenger comparison embeds both models' samples with
    # one feature network (the champion's), so the two FIDs share a yardstick even when the data changed.
    from safetensors.torch import save_file

    save_file({"images": fake_images.contiguous(), "labels": labels.contiguous()}, str(out_dir / "generated_images.safetensors"))
    grid_z, grid_labels = class_noise(generator.cfg, cfg.grid_per_class, cfg.seed + 1)
    save_grid(generate(generator, grid_z, grid_labels), out_dir / "samples.png", cfg.grid_per_class)
    write_json(metrics, metrics_path)
    log.info(
        "FID (domain) %.3f (floor %.3f), KID %.5f, class accuracy of samples %.3f",
        metrics["fid_domain"],
        metrics["fid_domain_floor"],
        metrics["kid_domain"],
        metrics["generated_class_accuracy"],
    )
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate_image", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="generator folder (models/image)")
    parser.add_argument("feature_net", type=Path, help="feature network folder (models/feature_net)")
    parser.add_argument("reference", type=Path, help="cached real-image features (data/fid_reference)")
    parser.add_argument("images", type=Path, help="image features folder (data/features/images), for fid_inception")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write (metrics/image.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the sample grid")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: evaluate_image(
            EvaluateImageConfig.from_params(load_params("evaluate_image", args.params)),
            args.model,
            args.feature_net,
            args.reference,
            args.images,
            args.metrics,
            args.out,
        )
    )


if __name__ == "__main__":
    main()
