"""Stage `train_feature_net`: the classifier whose penultimate layer is the FID / KID feature space.

    python -m components.train_feature_net data/features/images models/feature_net \
        --reference data/fid_reference --checkpoints models/checkpoints/feature_net --metrics metrics/feature_net.json

Trains on the real training images (with the augment stage's copies) through the shared loop, reports
accuracy on the test split, and caches the reference features of the real test images (and of the real,
non-augmented training images, for the FID floor) as float64 safetensors. DVC re-runs this stage, and so
recomputes the reference, only when the image data or this network changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from components import training
from components.common import require, write_json
from components.feature_net import DomainFeatures, FeatureNet, FeatureNetConfig, accuracy, extract, reference_path, save_reference
from components.image_io import ImageSplit, load_image_split
from components.model_io import save_model
from components.training import TrainConfig, TrainingJob, TrainResult

SUMMARY_KEYS = ("test_accuracy", "train_accuracy", "test_images", "feature_dim", "final_loss")
"""What the stage's metrics file reports (all of it also in the model's training.json)."""


@dataclass(frozen=True)
class TrainFeatureNetConfig:
    model: dict[str, Any]
    train: TrainConfig

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainFeatureNetConfig:
        model = require(params, "model", dict, "train_feature_net")
        FeatureNetConfig.from_params(model, "train_feature_net.model", 32, 1, 2)  # key checks before any work
        return cls(model, TrainConfig.from_params(params, "train_feature_net"))


CONFIG = TrainFeatureNetConfig


def batch_sampler(data: ImageSplit, batch_size: int, seed: int) -> Any:
    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        images, labels = data.sample(batch_size, training.step_generator(seed, step, micro, rank))
        return {"images": images.float().div(127.5).sub(1.0), "labels": labels}

    return batch_fn


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["images"]), batch["labels"])


def feature_net_job(cfg: TrainFeatureNetConfig, features_dir: Path, reference_dir: Path) -> TrainingJob:
    """The feature network's job; saving also caches the real images' reference features."""
    train = load_image_split(features_dir / "train.safetensors")
    test = load_image_split(features_dir / "test.safetensors")
    _, channels, size, _ = train.images.shape
    net_cfg = FeatureNetConfig.from_params(cfg.model, "train_feature_net.model", size, channels, len(train.label_names))
    net = FeatureNet(net_cfg)

    def save(out_dir: Path, result: TrainResult) -> dict[str, Any]:
        originals = train.originals()
        save_model(net, {**net_cfg.to_json(), "label_names": train.label_names}, out_dir)
        extractor = DomainFeatures(net)
        meta = {"feature_net": asdict(net_cfg), "feature_dim": net_cfg.feature_dim}
        for split, images in (("test", test.images), ("train", originals.images)):
            save_reference(extract(extractor, images), reference_path(reference_dir, split), {**meta, "split": split})
        return {
            "test_accuracy": round(accuracy(net, test.images, test.labels), 4),
            "train_accuracy": round(accuracy(net, originals.images, originals.labels), 4),
            "test_images": len(test.labels),
            "feature_dim": net_cfg.feature_dim,
        }

    return TrainingJob(
        model=net,
        batches=batch_sampler(train, cfg.train.batch_size, cfg.train.seed),
        loss=classification_loss,
        params={"model": asdict(net_cfg)},
        data_files=[features_dir / "train.safetensors"],
        save=save,
        description=f"feature network: {len(train.labels)} training images, {len(train.label_names)} classes",
        items=lambda batch: len(batch["labels"]),
    )


def train_feature_net(
    cfg: TrainFeatureNetConfig, features_dir: Path, out_dir: Path, reference_dir: Path, checkpoint_dir: Path,
    metrics_path: Path | None = None, stop_after: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train, save the network and the real-image reference features (rank 0); the summary of what it scored."""
    build = lambda runtime: feature_net_job(cfg, features_dir, reference_dir)  # noqa: E731
    result = training.run_training(cfg.train, build, out_dir, checkpoint_dir, stop_after=stop_after)
    if not result.record:  # stopped early, or not rank 0
        return {"steps": result.steps}
    summary = {key: round(result.record[key], 4) if key == "final_loss" else result.record[key] for key in SUMMARY_KEYS}
    if metrics_path is not None:
        write_json(summary, metrics_path)
    return summary


def main(argv: list[str] | None = None) -> None:
    training.training_main(
        argv, "train_feature_net", __doc__, CONFIG,
        lambda cfg, a: train_feature_net(cfg, a.features, a.out, a.reference, a.checkpoints, a.metrics),
        "image features folder (data/features/images)", "model folder to write (models/feature_net)", curves=False,
        options={"--reference": "folder for the real-image reference features", "--metrics": "JSON metrics file (test accuracy)"},
        required=("--reference",),
    )  # fmt: skip


if __name__ == "__main__":
    main()
