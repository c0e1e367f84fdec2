"""Stage `evaluate_restore`: PSNR and SSIM of the restorer on held-out full images, next to the baseline.

    python -m components.evaluate_restore models/restore data/features/restore \
        --metrics metrics/restore.json --out data/evaluation/restore

Every test photograph is cropped to a multiple of the scale, degraded exactly as in training (noise from
a fixed seed, per channel of the dataset's layout: one channel for greyscale photos, so their noise is
greyscale too), restored, and scored with torchmetrics' PSNR and SSIM (data range 1), on all channels and on the
luma channel Y (ITU-R BT.601, as super-resolution papers report) with a border of `scale` pixels cropped.
The classical baseline of the same run (bicubic upscaling; the noisy input) is scored the same way.
Figures are means over images. Also writes per-image scores and a side-by-side crop (PNG plot).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.common import ConfigError, DataError, load_params, require, run_main, write_json
from components.compression import compared, compressed_info
from components.image_io import save_grid
from components.metrics import restoration_scores
from components.restore_model import baseline, crop_to_scale, degrade, load_restorer
from components.runtime import cpu_threads_from_params, device_from_params, evaluation_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateRestoreConfig:
    split: str
    comparison_crop: int
    device: str
    seed: int
    cpu_threads: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateRestoreConfig:
        p = "evaluate_restore"
        split = require(params, "split", str, p)
        if split not in ("val", "test"):
            raise ConfigError(f"params key '{p}.split' must be 'val' or 'test', got {split!r}")
        device = device_from_params(params, p)
        return cls(
            split=split,
            comparison_crop=require(params, "comparison_crop", int, p, low=16, high=4096),
            device=device,
            seed=require(params["base"], "seed", int, "base"),
            cpu_threads=cpu_threads_from_params(params["base"]),
        )


CONFIG = EvaluateRestoreConfig


def load_images(path: Path) -> tuple[list[torch.Tensor], list[str]]:
    """The full photographs of a restore split: uint8 (C, H, W) each, with their record ids."""
    from safetensors import safe_open

    if not path.is_file():
        raise DataError(f"missing {path}: run the features stage first")
    with safe_open(str(path), framework="pt") as fh:
        ids = json.loads((fh.metadata() or {}).get("meta", "{}")).get("record_ids", [])
        images = [fh.get_tensor(f"image_{i}") for i in range(len(ids))]
    if not images:
        raise DataError(f"{path} holds no images to evaluate on")
    return images, ids


def evaluate_restore(
    cfg: EvaluateRestoreConfig, model_dir: Path, features_dir: Path, metrics_path: Path, out_dir: Path,
    compressed_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Score the restorer and its baseline on every image of the split; write metrics, table and a crop.
    With `compressed_dir`, its compressed copy restores the same degraded images (the `compressed` keys)."""
    device = evaluation_device(cfg.device, cfg.cpu_threads)
    model = load_restorer(model_dir).to(device)
    compressed = None
    if compressed_dir is not None:
        info = compressed_info(compressed_dir, "evaluate_restore --compressed")
        compressed = load_restorer(compressed_dir, "evaluate_restore --compressed").to(device)
        if compressed.cfg != model.cfg:
            raise ConfigError(f"{compressed_dir} is not a compressed copy of {model_dir}: rerun the compress stage")
    compressed_rows: list[dict[str, float]] = []
    rcfg = model.cfg
    images, ids = load_images(features_dir / f"{cfg.split}.safetensors")
    if images[0].shape[0] != rcfg.channels:
        raise DataError(
            f"{features_dir} holds {images[0].shape[0]}-channel photos but {model_dir} was trained on {rcfg.channels}: "
            "rerun train_restore on these features (dvc repro)"
        )
    border = rcfg.scale if rcfg.task == "super_resolution" else 0
    rows: list[dict[str, Any]] = []
    comparison: list[torch.Tensor] = []
    for index, (image, record_id) in enumerate(zip(images, ids, strict=True)):
        clean = crop_to_scale(image, rcfg.scale)[None].float().div(255.0).to(device)  # (1, C, H, W)
        generator = torch.Generator().manual_seed(cfg.seed + index)
        degraded = degrade(clean, rcfg, generator)
        with torch.inference_mode():
            restored = model(degraded).clamp(0, 1)
        classical = baseline(degraded, rcfg).clamp(0, 1)
        ours, theirs = restoration_scores(restored, clean, border), restoration_scores(classical, clean, border)
        if compressed is not None:
            with torch.inference_mode():
                compressed_rows.append(restoration_scores(compressed(degraded).clamp(0, 1), clean, border))
        rows.append({"record_id": record_id, **ours, **{f"{k}_baseline": v for k, v in theirs.items()}})
        if index == 0:
            size = min(cfg.comparison_crop, clean.shape[-2], clean.shape[-1])
            top, left = (clean.shape[-2] - size) // 2, (clean.shape[-1] - size) // 2
            comparison = [t[0, :, top : top + size, left : left + size] for t in (classical, restored, clean)]
    metrics: dict[str, Any] = {key: round(sum(r[key] for r in rows) / len(rows), 4) for key in rows[0] if key != "record_id"}
    metrics.update(
        task=rcfg.task,
        scale=rcfg.scale,
        noise_sigma=rcfg.noise_sigma if rcfg.task == "denoise" else None,
        baseline="bicubic" if rcfg.task == "super_resolution" else "noisy input",
        # The channel layout trained and scored on: greyscale photos restore (and are noised) as one channel.
        layout="greyscale" if rcfg.channels == 1 else "rgb",
        images=len(rows),
        split=cfg.split,
        psnr_gain=round(metrics["psnr"] - metrics["psnr_baseline"], 4),
    )
    if compressed_dir is not None:
        scores = {key: round(sum(r[key] for r in compressed_rows) / len(compressed_rows), 4) for key in compressed_rows[0]}
        metrics["compressed"] = compared(scores, metrics, info)
        log.info("compressed (%s, %.0f %% of the size): PSNR %.3f dB (%+.4f)", info["method"], 100 * info["size_ratio"],
                 scores["psnr"], metrics["compressed"]["psnr_delta"])  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(rows, out_dir / "per_image.json")
    # Baseline | restored | original, centre crop of the first image.
    save_grid(torch.stack([(t * 255).round().to(torch.uint8).cpu() for t in comparison]), out_dir / "comparison.png", 3)
    write_json(metrics, metrics_path)
    log.info(
        "%s: PSNR %.2f dB (baseline %.2f), SSIM %.4f (baseline %.4f), PSNR-Y %.2f (baseline %.2f) on %d images",
        rcfg.task,
        metrics["psnr"],
        metrics["psnr_baseline"],
        metrics["ssim"],
        metrics["ssim_baseline"],
        metrics["psnr_y"],
        metrics["psnr_y_baseline"],
        len(rows),
    )
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate_restore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="restorer folder (models/restore)")
    parser.add_argument("features", type=Path, help="restore features folder (data/features/restore)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write (metrics/restore.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for per-image scores and the comparison crop")
    parser.add_argument("--compressed", type=Path, default=None, help="also score this compressed copy")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: evaluate_restore(
            EvaluateRestoreConfig.from_params(load_params("evaluate_restore", args.params)),
            args.model,
            args.features,
            args.metrics,
            args.out,
            args.compressed,
        )
    )


if __name__ == "__main__":
    main()
