"""Stage `train_restore`: train the restorer (super-resolution or denoising) on random patches.

    python -m components.train_restore data/features/restore models/restore \
        --checkpoints models/checkpoints/restore --metrics-dir metrics/train_restore

Each step takes random `crop_size` crops of the augment stage's training patches, degrades them
(`restore_model.degrade`: bicubic downscaling, or Gaussian noise) and minimises the L1 distance of the
restored crop to the clean one, through the shared training loop. Saves `model.safetensors` +
`config.json` + `training.json` under the output folder. Needs only torch, safetensors, numpy and yaml.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from components import training
from components.common import ConfigError, require
from components.model_io import save_model
from components.restore_model import RestoreConfig, Restorer, degrade, load_patches
from components.training import TrainConfig, TrainingJob, TrainResult


@dataclass(frozen=True)
class TrainRestoreConfig:
    model: RestoreConfig
    crop_size: int
    train: TrainConfig

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainRestoreConfig:
        model = RestoreConfig.from_params(require(params, "model", dict, "train_restore"), "train_restore.model")
        crop = require(params, "crop_size", int, "train_restore", low=4, high=4096)
        if crop % model.scale:
            raise ConfigError(f"params key 'train_restore.crop_size' ({crop}) must be a multiple of the scale ({model.scale})")
        return cls(model, crop, TrainConfig.from_params(params, "train_restore"))


CONFIG = TrainRestoreConfig
log = logging.getLogger(__name__)


def batch_sampler(patches: torch.Tensor, cfg: TrainRestoreConfig) -> Any:
    """(step, micro, rank, world) -> {degraded, clean}: random crops of random patches, degraded."""
    n, _, height, width = patches.shape
    size, batch = cfg.crop_size, cfg.train.batch_size

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = training.step_generator(cfg.train.seed, step, micro, rank)
        indices = torch.randint(0, n, (batch,), generator=generator).tolist()
        tops = torch.randint(0, height - size + 1, (batch,), generator=generator).tolist()
        lefts = torch.randint(0, width - size + 1, (batch,), generator=generator).tolist()
        clean = torch.stack([patches[i, :, t : t + size, s : s + size] for i, t, s in zip(indices, tops, lefts, strict=True)])
        clean = clean.float().div(255.0)  # (B, C, size, size)
        return {"degraded": degrade(clean, cfg.model, generator), "clean": clean}

    return batch_fn


def restore_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.l1_loss(model(batch["degraded"]), batch["clean"])


def fit_to_data(cfg: TrainRestoreConfig, patches: torch.Tensor) -> TrainRestoreConfig:
    """The config for these patches: the model takes their channel layout, and crops no larger than them."""
    side = min(patches.shape[-2], patches.shape[-1]) // cfg.model.scale * cfg.model.scale
    crop = cfg.crop_size
    if side < crop:
        if side < 2 * cfg.model.scale:
            raise ConfigError(f"restore patches are {side} px a side: too small to train on; raise augment.restore.patch_size")
        log.warning("train_restore.crop_size=%d is larger than the %d px patches: training on %d px crops", crop, side, side)
        crop = side
    return replace(cfg, model=replace(cfg.model, channels=int(patches.shape[1])), crop_size=crop)


def restore_job(cfg: TrainRestoreConfig, features_dir: Path) -> TrainingJob:
    """The restorer's training job: L1 on degraded random crops of the training patches."""
    patches = load_patches(features_dir / "train.safetensors")
    cfg = fit_to_data(cfg, patches)
    model = Restorer(cfg.model)

    def save(out_dir: Path, result: TrainResult) -> dict[str, Any]:
        save_model(model, cfg.model.to_json(), out_dir)
        return training.parameter_count(model)

    return TrainingJob(
        model=model,
        batches=batch_sampler(patches, cfg),
        loss=restore_loss,
        params={"model": asdict(cfg.model), "crop_size": cfg.crop_size},
        data_files=[features_dir / "train.safetensors"],
        save=save,
        description=(
            f"restorer ({cfg.model.task}, scale {cfg.model.scale}, {'greyscale' if cfg.model.channels == 1 else 'RGB'}): "
            f"{len(patches)} patches {tuple(patches.shape[1:])}"
        ),
        items=lambda batch: len(batch["clean"]),
    )


def train_restore(
    cfg: TrainRestoreConfig, features_dir: Path, out_dir: Path, checkpoint_dir: Path, metrics_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:  # fmt: skip
    """Train the restorer on `features_dir/train.safetensors` patches and save it under out_dir (rank 0)."""
    build = lambda runtime: restore_job(cfg, features_dir)  # noqa: E731
    return training.run_training(cfg.train, build, out_dir, checkpoint_dir, metrics_dir, stop_after)


def main(argv: list[str] | None = None) -> None:
    training.training_main(
        argv, "train_restore", __doc__, CONFIG,
        lambda cfg, a: train_restore(cfg, a.features, a.out, a.checkpoints, a.metrics_dir),
        "restore features folder (data/features/restore)", "model folder to write (models/restore)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
