"""Stages `evaluate_image` and `evaluate_diffusion`: FID and KID of a class-conditional generator, GAN or
diffusion (its folder's config.json says which), in the domain feature space.

    python -m components.evaluate_image models/image models/feature_net data/fid_reference \
        data/features/images --metrics metrics/image.json --out data/evaluation/image
    python -m components.evaluate_image models/diffusion models/feature_net data/fid_reference \
        data/features/images --metrics metrics/diffusion.json --out data/evaluation/diffusion

`samples_per_class` images per class are generated from fixed seeds and compared with the real test images
through torchmetrics' FrechetInceptionDistance / KernelInceptionDistance, whose `feature=` module is our
feature network. The real side comes from the reference features cached by `train_feature_net` (the
metrics receive features through an identity `feature=` module, so torchmetrics does all the statistics);
each generated image goes through the network once for both metrics. In the same run: the floor (real
train images vs real test images: how close a perfect generator could get on this much data), the share
of generated images the classifier assigns to the class they were asked for, and, when InceptionV3
weights are available, the standard `fid_inception`. Both generators get the same metrics file keys, so
`dvc exp show` lists them side by side.

A diffusion model is also scored at each of `diffusion_steps` sampling steps (same noise, same labels): the
`fid_domain_steps_<n>` keys and `<out>/fid_by_steps.csv`, a DVC plot. Its headline numbers are those of the
model's own `sampling_steps`. Wall time per generated image goes to `<out>/timing.json` (not a metric: it
depends on the machine, and metrics files must be the same bytes on every `dvc repro`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.common import ConfigError, load_params, require, run_main, write_json
from components.compression import compared, compressed_info
from components.feature_net import DomainFeatures, extract, load_feature_net, load_reference, prepare, reference_path
from components.image_generators import load_image_generator
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
    diffusion_steps: tuple[int, ...]
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
        steps = require(params, "diffusion_steps", list, p)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in steps):
            raise ConfigError(f"params key '{p}.diffusion_steps' must be a list of positive integers, got {steps!r}")
        return cls(
            samples_per_class=require(params, "samples_per_class", int, p, low=2),
            kid_subsets=require(params, "kid_subsets", int, p, low=1),
            kid_subset_size=require(params, "kid_subset_size", int, p, low=2),
            batch_size=require(params, "batch_size", int, p, low=1),
            inception=require(params, "inception", bool, p),
            inception_weights=Path(weights) if weights else None,
            grid_per_class=require(params, "grid_per_class", int, p, low=1, high=64),
            diffusion_steps=tuple(sorted(set(steps))),
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
    compressed_dir: Path | None = None,
) -> dict[str, Any]:
    """Generate, score against the cached real test features, write metrics and a sample grid. With
    `compressed_dir`, its compressed copy generates from the same noise and is scored the same way (the
    `compressed` keys)."""
    device = evaluation_device(cfg.device, cfg.cpu_threads)
    generator = load_image_generator(model_dir, "evaluate_image model").to(device)
    net = load_feature_net(feature_net_dir).to(device)
    if generator.label_names != json.loads((feature_net_dir / "config.json").read_text())["label_names"]:
        raise ConfigError(f"{model_dir} and {feature_net_dir} were trained on different label sets")
    extractor = DomainFeatures(net)
    real_test = load_reference(reference_path(reference_dir, "test"))
    real_train = load_reference(reference_path(reference_dir, "train"))
    if real_test.shape[1] != extractor.num_features:
        raise ConfigError(f"{reference_dir} was computed with another feature network (width {real_test.shape[1]})")

    noise, labels = generator.class_noise(cfg.samples_per_class, cfg.seed + 1)
    own_steps = generator.sampling_steps
    if own_steps is not None and max(cfg.diffusion_steps, default=0) > generator.model_cfg.train_timesteps:
        raise ConfigError(
            f"params key 'evaluate_image.diffusion_steps' {list(cfg.diffusion_steps)}: {model_dir} was trained with "
            f"{generator.model_cfg.train_timesteps} timesteps, so it samples in at most that many steps"
        )
    by_steps: dict[int, float] = {}
    timing: dict[str, Any] = {"generator": generator.kind, "device": str(device), "images": len(labels)}
    if own_steps is not None:
        for steps in [n for n in cfg.diffusion_steps if n != own_steps]:
            started = time.perf_counter()
            images = generator.generate(noise, labels, cfg.batch_size, steps)
            timing[f"ms_per_image_steps_{steps}"] = round(1000 * (time.perf_counter() - started) / max(len(labels), 1), 3)
            by_steps[steps] = fid_from_features(real_test, extract(extractor, images, cfg.batch_size))
            log.info("FID (domain) at %d sampling steps: %.3f", steps, by_steps[steps])
    started = time.perf_counter()
    fake_images = generator.generate(noise, labels, cfg.batch_size)
    timing["ms_per_image"] = round(1000 * (time.perf_counter() - started) / max(len(labels), 1), 3)
    scores = generated_scores(cfg, fake_images, labels, extractor, real_test, device)
    floor_kid, _ = kid_from_features(real_test, real_train, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    training = json.loads((feature_net_dir / "training.json").read_text(encoding="utf-8"))
    metrics: dict[str, Any] = {
        "fid_domain": scores["fid_domain"],
        "kid_domain": scores["kid_domain"],
        "kid_domain_std": scores["kid_domain_std"],
        "fid_domain_floor": round(fid_from_features(real_test, real_train), 4),
        "kid_domain_floor": round(floor_kid, 6),
        "feature_net_accuracy": training["test_accuracy"],
        "generated_class_accuracy": scores["generated_class_accuracy"],
        "generated_images": len(fake_images),
        "real_test_images": len(real_test),
    }
    if compressed_dir is not None:  # the same noise and labels, at the model's own steps
        info = compressed_info(compressed_dir, "evaluate_image --compressed")
        compressed = load_image_generator(compressed_dir, "evaluate_image --compressed").to(device)
        if compressed.kind != generator.kind or compressed.label_names != generator.label_names:
            raise ConfigError(f"{compressed_dir} is not a compressed copy of {model_dir}: rerun the compress stage")
        started = time.perf_counter()
        compressed_images = compressed.generate(noise, labels, cfg.batch_size)
        timing["compressed_ms_per_image"] = round(1000 * (time.perf_counter() - started) / max(len(labels), 1), 3)
        compressed_scores = generated_scores(cfg, compressed_images, labels, extractor, real_test, device)
        metrics["compressed"] = compared(compressed_scores, scores, info)
        log.info("compressed (%s, %.0f %% of the size): FID (domain) %.3f (%+.4f)", info["method"], 100 * info["size_ratio"],
                 metrics["compressed"]["fid_domain"], metrics["compressed"]["fid_domain_delta"])  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    if own_steps is not None:
        metrics["sampling_steps"] = own_steps
        by_steps[own_steps] = metrics["fid_domain"]
        metrics |= {f"fid_domain_steps_{n}": round(by_steps[n], 4) for n in sorted(by_steps)}
        with open(out_dir / "fid_by_steps.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sampling_steps", "fid_domain"])
            writer.writerows([n, round(by_steps[n], 4)] for n in sorted(by_steps))
    if cfg.inception:
        test_images = load_image_split(images_dir / "test.safetensors").images
        value, status = inception_fid(test_images, fake_images, cfg.inception_weights, cfg.batch_size)
        if value is not None:
            metrics["fid_inception"] = round(value, 4)
        metrics["fid_inception_status"] = status
        if value is None:
            log.warning("fid_inception skipped: %s", status)
    # The generated images themselves: a champion / challenger comparison embeds both models' samples with
    # one feature network (the champion's), so the two FIDs share a yardstick even when the data changed.
    from safetensors.torch import save_file

    save_file({"images": fake_images.contiguous(), "labels": labels.contiguous()}, str(out_dir / "generated_images.safetensors"))
    grid_noise, grid_labels = generator.class_noise(cfg.grid_per_class, cfg.seed + 1)
    save_grid(generator.generate(grid_noise, grid_labels), out_dir / "samples.png", cfg.grid_per_class)
    write_json(metrics, metrics_path)
    write_json(timing, out_dir / "timing.json")
    log.info(
        "%s: FID (domain) %.3f (floor %.3f), KID %.5f, class accuracy of samples %.3f, %.2f ms per image",
        generator.kind,
        metrics["fid_domain"],
        metrics["fid_domain_floor"],
        metrics["kid_domain"],
        metrics["generated_class_accuracy"],
        timing["ms_per_image"],
    )
    return metrics


def generated_scores(
    cfg: EvaluateImageConfig, images: torch.Tensor, labels: torch.Tensor, extractor: DomainFeatures,
    real_test: torch.Tensor, device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """FID and KID of generated images against the real test features, and the share the feature network
    assigns to the class they were asked for."""
    fake = extract(extractor, images, cfg.batch_size)
    net = extractor.net
    with torch.no_grad():
        predicted = torch.cat(
            [net(prepare(images[i : i + cfg.batch_size], net.cfg.image_size, net.cfg.channels, device)).argmax(1).cpu()
             for i in range(0, len(images), cfg.batch_size)]
        )  # fmt: skip
    kid_mean, kid_std = kid_from_features(real_test, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    return {
        "fid_domain": round(fid_from_features(real_test, fake), 4),
        "kid_domain": round(kid_mean, 6),
        "kid_domain_std": round(kid_std, 6),
        "generated_class_accuracy": round(float((predicted == labels).float().mean()), 4),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate_image", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="generator folder, GAN or diffusion (models/image, models/diffusion)")
    parser.add_argument("feature_net", type=Path, help="feature network folder (models/feature_net)")
    parser.add_argument("reference", type=Path, help="cached real-image features (data/fid_reference)")
    parser.add_argument("images", type=Path, help="image features folder (data/features/images), for fid_inception")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write (metrics/image.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the sample grid")
    parser.add_argument("--compressed", type=Path, default=None, help="also score this compressed copy")
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
            args.compressed,
        )
    )


if __name__ == "__main__":
    main()
