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

from components.common import ConfigError, load_params, require, run_main, write_json
from components.feature_net import DomainFeatures, extract, load_feature_net, load_reference, prepare, reference_path
from components.gan_model import class_noise, generate, load_generator
from components.image_io import load_image_split, save_grid
from components.metrics import fid_from_features, inception_fid, kid_from_features
from components.runtime import cpu_threads_from_params, device_from_params, evaluation_device

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
    cpu_threads: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateImageConfig:
        p = "evaluate_image"
        weights = params.get("inception_weights")
        if weights is not None and (not isinstance(weights, str) or not weights):
            raise ConfigError(f"params key '{p}.inception_weights' must be a file path or null, got {weights!r}")
        device = device_from_params(params, p)
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
            cpu_threads=cpu_threads_from_params(params["base"]),
        )


CONFIG = EvaluateImageConfig


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
    device = evaluation_device(cfg.device, cfg.cpu_threads)
    generator, gen_config = load_generator(model_dir)
    net = load_feature_net(feature_net_dir).to(device)
    if gen_config.get("label_names") != json.loads((feature_net_dir / "config.json").read_text())["label_names"]:
        raise ConfigError(f"{model_dir} and {feature_net_dir} were trained on different label sets")
    extractor = DomainFeatures(net)
    real_test = load_reference(reference_path(reference_dir, "test"))
    real_train = load_reference(reference_path(reference_dir, "train"))
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
