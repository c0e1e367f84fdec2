"""Stage `train_text`: train the data-to-text generator (from scratch, or fine-tune `init_from`).

    python -m components.train_text data/features/text models/text --checkpoints models/checkpoints/text
    torchrun --nproc-per-node 8 -m components.train_text ...        # DDP, same command otherwise

Writes a save_pretrained folder (safetensors + config + tokenizer) and `training.json` (the params and the
data hash that produced it). Needs only torch, transformers, tokenizers, safetensors, numpy and yaml.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from components import training
from components.common import ConfigError, require
from components.text_model import (
    TOKENIZER_FILE,
    Examples,
    TextModelConfig,
    build_model,
    load_examples,
    load_pretrained,
    make_batch,
    save_text_model,
    tokenizer_from_file,
)
from components.training import TrainConfig, TrainingJob, TrainResult


@dataclass(frozen=True)
class TrainTextConfig:
    init_from: Path | None
    model: TextModelConfig
    train: TrainConfig

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainTextConfig:
        init_from = params.get("init_from")
        if init_from is not None and (not isinstance(init_from, str) or not init_from):
            raise ConfigError(f"params key 'train_text.init_from' must be a folder path or null, got {init_from!r}")
        return cls(
            init_from=Path(init_from) if init_from else None,
            model=TextModelConfig.from_params(require(params, "model", dict, "train_text"), "train_text.model"),
            train=TrainConfig.from_params(params, "train_text"),
        )


CONFIG = TrainTextConfig


def batch_sampler(examples: Examples, batch_size: int, pad_id: int, seed: int) -> Any:
    """(step, micro, rank, world) -> batch: a pure function of its arguments, so resume replays the data."""

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        indices = torch.randint(0, len(examples), (batch_size,), generator=training.step_generator(seed, step, micro, rank))
        return make_batch(examples, indices.tolist(), pad_id)

    return batch_fn


def text_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def text_job(cfg: TrainTextConfig, features_dir: Path) -> TrainingJob:
    """The text family's training job: our BPE model from scratch, or a pretrained one fine-tuned."""
    if cfg.init_from is not None:
        model, tokenizer = load_pretrained(cfg.init_from, "train_text.init_from")
    else:
        tokenizer = tokenizer_from_file(features_dir / TOKENIZER_FILE)
        model = build_model(cfg.model, tokenizer)
    max_length = min(cfg.model.max_length, model.config.max_position_embeddings)
    examples = load_examples(features_dir, "train", tokenizer, cfg.init_from is None, max_length)

    def save(out_dir: Path, result: TrainResult) -> dict[str, Any]:
        save_text_model(training.unwrap(model), tokenizer, out_dir, features_dir)
        return training.parameter_count(model)

    inputs = [features_dir / TOKENIZER_FILE, features_dir / "train.safetensors", features_dir / "train.parquet"]
    return TrainingJob(
        model=model,
        batches=batch_sampler(examples, cfg.train.batch_size, tokenizer.pad_token_id, cfg.train.seed),
        loss=text_loss,
        params={"init_from": str(cfg.init_from) if cfg.init_from else None, "model": asdict(cfg.model)},
        data_files=[p for p in inputs if p.is_file()],
        save=save,
        description=f"text model: {len(examples)} training sequences",
        items=lambda batch: int(batch["attention_mask"].sum()),
    )


def train_text(
    cfg: TrainTextConfig, features_dir: Path, out_dir: Path, checkpoint_dir: Path, metrics_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:  # fmt: skip
    """Train (or fine-tune) the text generator and save it with its tokenizer under out_dir (rank 0)."""
    build = lambda runtime: text_job(cfg, features_dir)  # noqa: E731
    return training.run_training(cfg.train, build, out_dir, checkpoint_dir, metrics_dir, stop_after)


def main(argv: list[str] | None = None) -> None:
    training.training_main(
        argv, "train_text", __doc__, CONFIG,
        lambda cfg, a: train_text(cfg, a.features, a.out, a.checkpoints, a.metrics_dir),
        "text features folder (data/features/text)", "model folder to write (models/text)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
