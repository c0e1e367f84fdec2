"""Stage `train_restore`: train the restorer (super-resolution or denoising) on random patches.

    python -m components.train_restore data/features/restore models/restore \
        --checkpoints models/checkpoints/restore --metrics-dir metrics/train_restore

Each step takes random `crop_size` crops of the augment stage's training patches, degrades them
(`restore_model.degrade`: bicubic downscaling, or Gaussian noise) and minimises the L1 distance of the
restored crop to the clean one, through the shared training loop. Saves `model.safetensors` +
`config.json` + `training.json` under the output folder. Needs only torch, safetensors, numpy and yaml.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from components.common import ConfigError, DataError, load_params, require, run_main, write_json
from components.model_io import save_model
from components.restore_model import RestoreConfig, Restorer, degrade
from components.training import (
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
        return cls(model, crop, TrainConfig.from_params(params, "train_restore", require(params["base"], "seed", int, "base")))


def load_patches(path: Path, crop_size: int) -> torch.Tensor:
    """uint8 (N, 3, P, P) training patches written by the features stage, checked against the crop size."""
    from safetensors import safe_open

    if not path.is_file():
        raise DataError(f"missing {path}: run the features stage first")
    with safe_open(str(path), framework="pt") as fh:
        if "patches" not in set(fh.keys()):
            raise DataError(f"{path} has no 'patches' array")
        patches = fh.get_tensor("patches")
    if len(patches) == 0:
        raise DataError(f"{path} holds no training patches (augment.restore.patches_per_image is 0?)")
    if patches.shape[-1] < crop_size or patches.shape[-2] < crop_size:
        raise ConfigError(
            f"params key 'train_restore.crop_size' ({crop_size}) is larger than the patches "
            f"({patches.shape[-2]}x{patches.shape[-1]}, augment.restore.patch_size)"
        )
    return patches


def batch_sampler(patches: torch.Tensor, cfg: TrainRestoreConfig) -> Any:
    """(step, micro, rank, world) -> {degraded, clean}: random crops of random patches, degraded."""
    n, _, height, width = patches.shape
    size = cfg.crop_size

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(cfg.train.seed, step, micro, rank))
        batch = cfg.train.batch_size
        indices = torch.randint(0, n, (batch,), generator=generator).tolist()
        tops = torch.randint(0, height - size + 1, (batch,), generator=generator).tolist()
        lefts = torch.randint(0, width - size + 1, (batch,), generator=generator).tolist()
        clean = torch.stack([patches[i, :, t : t + size, s : s + size] for i, t, s in zip(indices, tops, lefts, strict=True)])
        clean = clean.float().div(255.0)
        return {"degraded": degrade(clean, cfg.model, generator), "clean": clean}

    return batch_fn


def restore_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.l1_loss(model(batch["degraded"]), batch["clean"])


def train_restore(
    cfg: TrainRestoreConfig,
    features_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    metrics_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the restorer on `features_dir/train.safetensors` patches and save it under out_dir (rank 0)."""
    patches = load_patches(features_dir / "train.safetensors", cfg.crop_size)
    runtime = setup_runtime(cfg.train)
    try:
        torch.manual_seed(cfg.train.seed)
        model = Restorer(cfg.model)
        hashed = data_hash([features_dir / "train.safetensors"])
        log.info(
            "restorer (%s, scale %d): %.3fM parameters, %d patches %s, device %s",
            cfg.model.task,
            cfg.model.scale,
            sum(p.numel() for p in model.parameters()) / 1e6,
            len(patches),
            tuple(patches.shape[1:]),
            runtime.device,
        )
        start = time.perf_counter()
        result = fit(
            model,
            batch_sampler(patches, cfg),
            restore_loss,
            cfg.train,
            runtime,
            checkpoint_dir,
            cfg.train.fingerprint(asdict(cfg.model), cfg.crop_size, hashed),
            metrics_dir=metrics_dir,
            stop_after=stop_after,
            items_per_batch=lambda batch: len(batch["clean"]),
        )
        log.info("trained to step %d in %.1f s", result.steps, time.perf_counter() - start)
        if runtime.is_main and result.steps >= cfg.train.max_steps:
            save_model(model, cfg.model.to_json(), out_dir)
            params = {"model": asdict(cfg.model), "crop_size": cfg.crop_size, "train": asdict(cfg.train)}
            write_json(training_record(params, hashed, result, model), out_dir / "training.json")
        return result
    finally:
        teardown_runtime(runtime)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(
        "python -m components.train_restore", __doc__, "restore features folder (data/features/restore)",
        "model folder to write (models/restore)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: train_restore(
            TrainRestoreConfig.from_params(load_params("train_restore", args.params)),
            args.features,
            args.out,
            args.checkpoints,
            args.metrics_dir,
        )
    )


if __name__ == "__main__":
    main()
