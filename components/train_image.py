"""Stage `train_image`: train the class-conditional GAN on the real training images.

    python -m components.train_image data/features/images models/image --checkpoints models/checkpoints/image \
        --metrics-dir metrics/train_image --samples metrics/train_image/samples
    torchrun --nproc-per-node 8 -m components.train_image ...        # DDP, same command otherwise

The shared training loop runs two phases per step (discriminator, then generator, each with its own Adam);
the EMA generator is updated after every step and saved as `model.safetensors` + `config.json`, with
`training.json` (params, data hash). A grid of fixed-seed samples, one row per class, is written every
`sample_every` steps as `step-XXXXXXXX.png` so `dvc plots diff` shows experiments side by side.
Needs only torch, safetensors, numpy and yaml (torchvision for the grids when installed).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from components.common import load_params, require, run_main, write_json
from components.gan_model import ConditionalGAN, GANConfig, class_noise, from_uint8, generate
from components.image_io import ImageSplit, load_image_split, save_grid
from components.model_io import save_model
from components.training import (
    Phase,
    TrainConfig,
    TrainResult,
    data_hash,
    fit,
    hash_seed,
    setup_runtime,
    stage_parser,
    teardown_runtime,
    training_record,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainImageConfig:
    model: dict[str, Any]  # checked by GANConfig once the data gives image size, channels and classes
    train: TrainConfig
    sample_every: int
    samples_per_class: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainImageConfig:
        model = require(params, "model", dict, "train_image")
        GANConfig.from_params(model, "train_image.model", image_size=32, channels=1, num_classes=2)  # key checks now
        return cls(
            model=model,
            train=TrainConfig.from_params(params, "train_image", require(params["base"], "seed", int, "base")),
            sample_every=require(params, "sample_every", int, "train_image", low=1),
            samples_per_class=require(params, "samples_per_class", int, "train_image", low=1, high=64),
        )


def gan_config(cfg: TrainImageConfig, data: ImageSplit) -> GANConfig:
    _, channels, height, width = data.images.shape
    return GANConfig.from_params(
        cfg.model, "train_image.model", image_size=height, channels=channels, num_classes=len(data.label_names)
    )


def batch_sampler(data: ImageSplit, gan: GANConfig, batch_size: int, seed: int) -> Any:
    """(step, micro, rank, world) -> real images with labels, and the noise and labels of both phases' fakes."""
    n = len(data.labels)

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(seed, step, micro, rank))
        indices = torch.randint(0, n, (batch_size,), generator=generator)
        return {
            "images": from_uint8(data.images[indices]),
            "labels": data.labels[indices],
            "fake_labels": torch.randint(0, gan.num_classes, (batch_size,), generator=generator),
            "z_discriminator": torch.randn(batch_size, gan.latent_dim, generator=generator),
            "z_generator": torch.randn(batch_size, gan.latent_dim, generator=generator),
        }

    return batch_fn


PHASES = [
    Phase("discriminator", lambda model, batch: model("discriminator", batch), lambda m: list(m.discriminator.parameters())),
    Phase("generator", lambda model, batch: model("generator", batch), lambda m: list(m.generator.parameters())),
]


def train_image(
    cfg: TrainImageConfig,
    features_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    metrics_dir: Path | None = None,
    samples_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the GAN on `features_dir/train.safetensors`; save the EMA generator under out_dir (rank 0)."""
    data = load_image_split(features_dir / "train.safetensors")
    gan = gan_config(cfg, data)
    runtime = setup_runtime(cfg.train)
    try:
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        model = ConditionalGAN(gan)
        hashed = data_hash([features_dir / "train.safetensors"])
        fingerprint = cfg.train.fingerprint(asdict(gan), hashed)
        grid_z, grid_labels = class_noise(gan, cfg.samples_per_class, cfg.train.seed)

        def after_step(unwrapped: torch.nn.Module, done: int) -> None:
            unwrapped.update_ema(done)
            if runtime.is_main and samples_dir is not None and (done % cfg.sample_every == 0 or done == cfg.train.max_steps):
                grid = generate(unwrapped.generator_ema, grid_z, grid_labels)
                save_grid(grid, samples_dir / f"step-{done:08d}.png", cfg.samples_per_class)

        log.info(
            "GAN: generator %.2fM, discriminator %.2fM parameters, %d training images %s, %d classes, device %s",
            sum(p.numel() for p in model.generator.parameters()) / 1e6,
            sum(p.numel() for p in model.discriminator.parameters()) / 1e6,
            len(data.labels),
            tuple(data.images.shape[1:]),
            gan.num_classes,
            runtime.device,
        )
        start = time.perf_counter()
        result = fit(
            model,
            batch_sampler(data, gan, cfg.train.batch_size, cfg.train.seed),
            PHASES,
            cfg.train,
            runtime,
            checkpoint_dir,
            fingerprint,
            metrics_dir=metrics_dir,
            stop_after=stop_after,
            items_per_batch=lambda batch: len(batch["labels"]),
            after_step=after_step,
        )
        log.info("trained to step %d in %.1f s", result.steps, time.perf_counter() - start)
        if runtime.is_main and result.steps >= cfg.train.max_steps:
            final_grid = samples_dir / f"step-{result.steps:08d}.png" if samples_dir else None
            if final_grid is not None and not final_grid.exists():  # resumed at the last step: no step ran
                save_grid(generate(model.generator_ema, grid_z, grid_labels), final_grid, cfg.samples_per_class)
            save_model(model.generator_ema, {**gan.to_json(), "label_names": data.label_names}, out_dir)
            params = {"model": asdict(gan), "train": asdict(cfg.train), "sample_every": cfg.sample_every}
            write_json(training_record(params, hashed, result, model.generator_ema), out_dir / "training.json")
        return result
    finally:
        teardown_runtime(runtime)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(
        "python -m components.train_image", __doc__, "image features folder (data/features/images)",
        "model folder to write (models/image)",
    )  # fmt: skip
    parser.add_argument("--samples", type=Path, default=None, help="folder for the per-class sample grids")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: train_image(
            TrainImageConfig.from_params(load_params("train_image", args.params)),
            args.features,
            args.out,
            args.checkpoints,
            args.metrics_dir,
            args.samples,
        )
    )


if __name__ == "__main__":
    main()
