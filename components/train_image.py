"""Stage `train_image`: train the class-conditional GAN on the real training images.

    python -m components.train_image data/features/images models/image --checkpoints models/checkpoints/image \
        --metrics-dir metrics/train_image --samples metrics/train_image/samples
    torchrun --nproc-per-node 8 -m components.train_image ...        # DDP, same command otherwise

Two phases a step (discriminator, then generator, each with its own Adam); the EMA generator is saved. Every
`sample_every` steps a fixed-seed grid, a row per class, goes to `step-XXXXXXXX.png` for `dvc plots diff`.
Needs only torch, safetensors, numpy and yaml (torchvision for the grids when installed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from components import training
from components.common import require
from components.gan_model import ConditionalGAN, GANConfig, class_noise, generate, training_batch
from components.image_io import ImageSplit, load_image_split
from components.model_io import save_model
from components.training import Phase, TrainConfig, TrainingJob, TrainResult


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
            train=TrainConfig.from_params(params, "train_image"),
            sample_every=require(params, "sample_every", int, "train_image", low=1),
            samples_per_class=require(params, "samples_per_class", int, "train_image", low=1, high=64),
        )


CONFIG = TrainImageConfig


def batch_sampler(data: ImageSplit, gan: GANConfig, batch_size: int, seed: int) -> Any:
    """(step, micro, rank, world) -> real images with labels, and the noise and labels of both phases' fakes."""

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = training.step_generator(seed, step, micro, rank)
        return training_batch(*data.sample(batch_size, generator), gan, generator)

    return batch_fn


PHASES = [
    Phase("discriminator", lambda model, batch: model("discriminator", batch), lambda m: list(m.discriminator.parameters())),
    Phase("generator", lambda model, batch: model("generator", batch), lambda m: list(m.generator.parameters())),
]


def image_job(cfg: TrainImageConfig, features_dir: Path) -> TrainingJob:
    """The GAN's training job: two phases a step, the EMA update after each, fixed-seed sample grids."""
    data = load_image_split(features_dir / "train.safetensors")
    _, channels, size, _ = data.images.shape
    gan = GANConfig.from_params(cfg.model, "train_image.model", size, channels, len(data.label_names))
    model = ConditionalGAN(gan)
    grid_z, grid_labels = class_noise(gan, cfg.samples_per_class, cfg.train.seed)

    def save(out_dir: Path, result: TrainResult) -> dict[str, Any]:
        save_model(model.generator_ema, {**gan.to_json(), "label_names": data.label_names}, out_dir)
        return training.parameter_count(model.generator_ema)

    return TrainingJob(
        model=model,
        batches=batch_sampler(data, gan, cfg.train.batch_size, cfg.train.seed),
        loss=PHASES,
        params={"model": asdict(gan), "sample_every": cfg.sample_every},
        data_files=[features_dir / "train.safetensors"],
        save=save,
        description=f"GAN: {len(data.labels)} training images {tuple(data.images.shape[1:])}, {gan.num_classes} classes",
        items=lambda batch: len(batch["labels"]),
        after_step=lambda unwrapped, done: unwrapped.update_ema(done),
        samples=lambda unwrapped: generate(unwrapped.generator_ema, grid_z, grid_labels),
        sample_every=cfg.sample_every,
        sample_columns=cfg.samples_per_class,
    )


def train_image(
    cfg: TrainImageConfig, features_dir: Path, out_dir: Path, checkpoint_dir: Path, metrics_dir: Path | None = None,
    samples_dir: Path | None = None, stop_after: int | None = None,
) -> TrainResult:  # fmt: skip
    """Train the GAN on `features_dir/train.safetensors`; save the EMA generator under out_dir (rank 0)."""
    build = lambda runtime: image_job(cfg, features_dir)  # noqa: E731
    return training.run_training(cfg.train, build, out_dir, checkpoint_dir, metrics_dir, stop_after, samples_dir)


def main(argv: list[str] | None = None) -> None:
    training.training_main(
        argv, "train_image", __doc__, CONFIG,
        lambda cfg, a: train_image(cfg, a.features, a.out, a.checkpoints, a.metrics_dir, a.samples),
        "image features folder (data/features/images)", "model folder to write (models/image)",
        options={"--samples": "folder for the per-class sample grids"},
    )  # fmt: skip


if __name__ == "__main__":
    main()
