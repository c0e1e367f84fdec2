"""Stage `train_diffusion`: train the class-conditional diffusion UNet on the real training images.

    python -m components.train_diffusion data/features/images models/diffusion --checkpoints models/checkpoints/diffusion \
        --metrics-dir metrics/train_diffusion --samples metrics/train_diffusion/samples
    torchrun --nproc-per-node 8 -m components.train_diffusion ...        # DDP, same command otherwise

The GAN's data, loop and outputs (components.training: AMP, checkpoints and resume, DDP, dvclive curves), one
denoising loss a step, the EMA update after each. Every `sample_every` steps a fixed-seed grid, a row per
class, sampled with the model's own sampler and steps, goes to `step-XXXXXXXX.png` for `dvc plots diff`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from components import training
from components.common import require
from components.diffusion_model import (
    ConditionalDiffusion,
    DiffusionConfig,
    class_noise,
    generate,
    sampling_unet,
    save_diffusion,
    training_batch,
)
from components.image_io import ImageSplit, load_image_split
from components.training import TrainConfig, TrainingJob, TrainResult


@dataclass(frozen=True)
class TrainDiffusionConfig:
    model: dict[str, Any]  # checked by DiffusionConfig once the data gives image size, channels and classes
    train: TrainConfig
    sample_every: int
    samples_per_class: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainDiffusionConfig:
        model = require(params, "model", dict, "train_diffusion")
        # Key checks now; the data's image size is known only when training starts (sample_size must fit it then).
        DiffusionConfig.from_params(model, "train_diffusion.model", image_size=2**16, channels=1, num_classes=2)
        return cls(
            model=model,
            train=TrainConfig.from_params(params, "train_diffusion"),
            sample_every=require(params, "sample_every", int, "train_diffusion", low=1),
            samples_per_class=require(params, "samples_per_class", int, "train_diffusion", low=1, high=64),
        )


CONFIG = TrainDiffusionConfig


def batch_sampler(data: ImageSplit, model: DiffusionConfig, batch_size: int, seed: int) -> Any:
    """(step, micro, rank, world) -> real images with their (partly dropped) labels, noise and timesteps."""

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = training.step_generator(seed, step, micro, rank)
        return training_batch(*data.sample(batch_size, generator), model, generator)

    return batch_fn


def diffusion_job(cfg: TrainDiffusionConfig, features_dir: Path) -> TrainingJob:
    """The diffusion model's training job: one loss a step, the EMA update after each, fixed-seed grids."""
    data = load_image_split(features_dir / "train.safetensors")
    _, channels, size, _ = data.images.shape
    model_cfg = DiffusionConfig.from_params(cfg.model, "train_diffusion.model", size, channels, len(data.label_names))
    model = ConditionalDiffusion(model_cfg)
    grid_noise, grid_labels = class_noise(model_cfg, cfg.samples_per_class, cfg.train.seed)

    def save(out_dir: Path, result: TrainResult) -> dict[str, Any]:
        save_diffusion(model, data.label_names, out_dir)
        return training.parameter_count(sampling_unet(model))

    return TrainingJob(
        model=model,
        batches=batch_sampler(data, model_cfg, cfg.train.batch_size, cfg.train.seed),
        loss=lambda wrapped, batch: wrapped(batch),
        params={"model": asdict(model_cfg), "sample_every": cfg.sample_every},
        data_files=[features_dir / "train.safetensors"],
        save=save,
        description=(
            f"diffusion: {len(data.labels)} training images {tuple(data.images.shape[1:])}, {model_cfg.num_classes} classes"
        ),
        items=lambda batch: len(batch["labels"]),
        after_step=lambda unwrapped, done: unwrapped.update_ema(done),
        samples=lambda unwrapped: generate(sampling_unet(unwrapped), model_cfg, grid_noise, grid_labels),
        sample_every=cfg.sample_every,
        sample_columns=cfg.samples_per_class,
    )


def train_diffusion(
    cfg: TrainDiffusionConfig, features_dir: Path, out_dir: Path, checkpoint_dir: Path, metrics_dir: Path | None = None,
    samples_dir: Path | None = None, stop_after: int | None = None,
) -> TrainResult:  # fmt: skip
    """Train on `features_dir/train.safetensors`; save the EMA UNet under out_dir (rank 0)."""
    build = lambda runtime: diffusion_job(cfg, features_dir)  # noqa: E731
    return training.run_training(cfg.train, build, out_dir, checkpoint_dir, metrics_dir, stop_after, samples_dir)


def main(argv: list[str] | None = None) -> None:
    training.training_main(
        argv, "train_diffusion", __doc__, CONFIG,
        lambda cfg, a: train_diffusion(cfg, a.features, a.out, a.checkpoints, a.metrics_dir, a.samples),
        "image features folder (data/features/images)", "model folder to write (models/diffusion)",
        options={"--samples": "folder for the per-class sample grids"},
    )  # fmt: skip


if __name__ == "__main__":
    main()
