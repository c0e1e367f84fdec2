"""Stage `train_feature_net`: the classifier whose penultimate layer is the FID / KID feature space.

    python -m components.train_feature_net data/features/images models/feature_net \
        --reference data/fid_reference --checkpoints models/checkpoints/feature_net --metrics metrics/feature_net.json

Trains on the real training images (with the augment stage's copies) through the shared loop, reports
accuracy on the test split, and caches the reference features of the real test images (and of the real,
non-augmented training images, for the FID floor) as float64 safetensors. DVC re-runs this stage, and so
recomputes the reference, only when the image data or this network changes.
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

from components.common import load_params, require, run_main, write_json
from components.feature_net import DomainFeatures, FeatureNet, FeatureNetConfig, extract, prepare
from components.image_io import ImageSplit, load_image_split
from components.model_io import save_model
from components.training import (
    TrainConfig,
    TrainResult,
    data_hash,
    fit,
    hash_seed,
    setup_runtime,
    stage_parser,
    teardown_runtime,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainFeatureNetConfig:
    model: dict[str, Any]
    train: TrainConfig

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainFeatureNetConfig:
        model = require(params, "model", dict, "train_feature_net")
        FeatureNetConfig.from_params(model, "train_feature_net.model", 32, 1, 2)  # key checks before any work
        return cls(model, TrainConfig.from_params(params, "train_feature_net", require(params["base"], "seed", int, "base")))


def batch_sampler(data: ImageSplit, batch_size: int, seed: int) -> Any:
    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(seed, step, micro, rank))
        indices = torch.randint(0, len(data.labels), (batch_size,), generator=generator)
        return {"images": data.images[indices].float().div(127.5).sub(1.0), "labels": data.labels[indices]}

    return batch_fn


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["images"]), batch["labels"])


@torch.no_grad()
def accuracy(net: FeatureNet, data: ImageSplit, batch_size: int = 1000) -> float:
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(data.labels), batch_size):
        x = prepare(data.images[i : i + batch_size], net.cfg.image_size, net.cfg.channels, device)
        correct += int((net(x).argmax(dim=1).cpu() == data.labels[i : i + batch_size]).sum())
    return correct / max(1, len(data.labels))


def save_reference(features: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    import json

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous()}, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})


def train_feature_net(
    cfg: TrainFeatureNetConfig,
    features_dir: Path,
    out_dir: Path,
    reference_dir: Path,
    checkpoint_dir: Path,
    metrics_path: Path | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train, report test accuracy, save the network and the real-image reference features (rank 0)."""
    train = load_image_split(features_dir / "train.safetensors")
    test = load_image_split(features_dir / "test.safetensors")
    _, channels, size, _ = train.images.shape
    net_cfg = FeatureNetConfig.from_params(cfg.model, "train_feature_net.model", size, channels, len(train.label_names))
    runtime = setup_runtime(cfg.train)
    try:
        torch.manual_seed(cfg.train.seed)
        net = FeatureNet(net_cfg)
        hashed = data_hash([features_dir / "train.safetensors"])
        start = time.perf_counter()
        result: TrainResult = fit(
            net,
            batch_sampler(train, cfg.train.batch_size, cfg.train.seed),
            classification_loss,
            cfg.train,
            runtime,
            checkpoint_dir,
            cfg.train.fingerprint(asdict(net_cfg), hashed),
            stop_after=stop_after,
            items_per_batch=lambda batch: len(batch["labels"]),
        )
        summary: dict[str, Any] = {"steps": result.steps}
        if runtime.is_main and result.steps >= cfg.train.max_steps:
            net.eval()
            summary = {
                "test_accuracy": round(accuracy(net, test), 4),
                "train_accuracy": round(accuracy(net, train.originals()), 4),
                "test_images": len(test.labels),
                "feature_dim": net_cfg.feature_dim,
                "final_loss": round(result.final_loss, 4),
                "train_seconds": round(time.perf_counter() - start, 1),
            }
            save_model(net, {**net_cfg.to_json(), "label_names": train.label_names}, out_dir)
            params = {"model": asdict(net_cfg), "train": asdict(cfg.train)}
            # No timings in the model folder: a rerun must give the same bytes (and DVC hash).
            kept = {k: v for k, v in summary.items() if k != "train_seconds"}
            write_json({"params": params, "data_hash": hashed, **kept}, out_dir / "training.json")
            extractor = DomainFeatures(net)
            meta = {"feature_net_data_hash": hashed, "feature_dim": net_cfg.feature_dim}
            for split, images in (("test", test.images), ("train", train.originals().images)):
                save_reference(extract(extractor, images), reference_dir / f"{split}.safetensors", {**meta, "split": split})
            if metrics_path is not None:
                write_json(summary, metrics_path)
            log.info("feature network: test accuracy %.4f on %d images", summary["test_accuracy"], len(test.labels))
        return summary
    finally:
        teardown_runtime(runtime)


def load_reference(path: Path) -> torch.Tensor:
    """(N, d) float64 reference features written by this stage."""
    from safetensors.torch import load_file

    from components.common import DataError

    if not path.is_file():
        raise DataError(f"missing {path}: run the train_feature_net stage first")
    return load_file(str(path))["features"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(
        "python -m components.train_feature_net", __doc__, "image features folder (data/features/images)",
        "model folder to write (models/feature_net)", curves=False,
    )  # fmt: skip
    parser.add_argument("--reference", type=Path, required=True, help="folder for the real-image reference features")
    parser.add_argument("--metrics", type=Path, default=None, help="JSON metrics file (test accuracy)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: train_feature_net(
            TrainFeatureNetConfig.from_params(load_params("train_feature_net", args.params)),
            args.features,
            args.out,
            args.reference,
            args.checkpoints,
            args.metrics,
        )
    )


if __name__ == "__main__":
    main()
