"""Stage `train_text`: train the data-to-text generator (from scratch, or fine-tune `init_from`).

    python -m components.train_text data/features/text models/text --checkpoints models/checkpoints/text
    torchrun --nproc-per-node 8 -m components.train_text ...        # DDP, same command otherwise

Writes a save_pretrained folder (safetensors + config + tokenizer) and `training.json` (the params and the
data hash that produced it). Needs only torch, transformers, tokenizers, safetensors, numpy and yaml.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common import ConfigError, DataError, load_params, require, run_main, write_json
from components.text_model import TextModelConfig, build_model, example_ids, load_pretrained, tokenizer_from_file
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
    unwrap,
)

log = logging.getLogger(__name__)


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
            train=TrainConfig.from_params(params, "train_text", require(params["base"], "seed", int, "base")),
        )


@dataclass
class Examples:
    """Tokenized training sequences (`source SEP target EOS`) with the length of each prompt."""

    ids: list[list[int]]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def read_ragged(path: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(source ids, target ids) per row from a features safetensors file."""
    from safetensors.numpy import load_file

    arrays = load_file(str(path))

    def split(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
        return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    return split(arrays["source_ids"], arrays["source_offsets"]), split(arrays["target_ids"], arrays["target_offsets"])


def read_texts(path: Path) -> list[dict[str, str]]:
    """Rows of a features split as dicts (record_id, source, reference, source_key)."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["record_id", "source", "reference", "source_key"]).to_pylist()


def load_examples(features_dir: Path, split: str, tokenizer: Any, ours: bool, max_length: int) -> Examples:
    """Training sequences of a split: our token arrays, or the texts re-tokenized by a pretrained tokenizer."""
    if ours:
        sources, targets = read_ragged(features_dir / f"{split}.safetensors")
    else:
        rows = read_texts(features_dir / f"{split}.parquet")
        sources = tokenizer([r["source"] for r in rows], add_special_tokens=False)["input_ids"]
        targets = tokenizer([r["reference"] for r in rows], add_special_tokens=False)["input_ids"]
    pairs = [example_ids(s, t, tokenizer, max_length) for s, t in zip(sources, targets, strict=True)]
    if not pairs:
        raise DataError(f"no {split} examples in {features_dir}")
    return Examples([p[0] for p in pairs], [p[1] for p in pairs])


def make_batch(examples: Examples, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and the padding, so only the target is learned."""
    width = max(len(examples.ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    for row, i in enumerate(indices):
        ids = torch.tensor(examples.ids[i], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        labels[row, examples.prompt_lengths[i] : len(ids)] = ids[examples.prompt_lengths[i] :]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_sampler(examples: Examples, batch_size: int, pad_id: int, seed: int) -> Any:
    """(step, micro, rank, world) -> batch: a pure function of its arguments, so resume replays the data."""
    n = len(examples)

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(seed, step, micro, rank))
        indices = torch.randint(0, n, (batch_size,), generator=generator).tolist()
        return make_batch(examples, indices, pad_id)

    return batch_fn


def text_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def train_text(
    cfg: TrainTextConfig,
    features_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    metrics_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or fine-tune) the text generator and save it with its tokenizer under out_dir (rank 0)."""
    runtime = setup_runtime(cfg.train)
    try:
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        if cfg.init_from is not None:
            model, tokenizer = load_pretrained(cfg.init_from, "train_text.init_from")
            ours = False
        else:
            tokenizer = tokenizer_from_file(features_dir / "tokenizer.json")
            model = build_model(cfg.model, tokenizer)
            ours = True
        max_length = min(cfg.model.max_length, model.config.max_position_embeddings)
        examples = load_examples(features_dir, "train", tokenizer, ours, max_length)
        inputs = [features_dir / "tokenizer.json", features_dir / "train.safetensors", features_dir / "train.parquet"]
        hashed = data_hash([p for p in inputs if p.is_file()])
        fingerprint = cfg.train.fingerprint(asdict(cfg.model), str(cfg.init_from), hashed)
        log.info(
            "text model: %.2fM parameters, %d training sequences, device %s%s",
            sum(p.numel() for p in model.parameters()) / 1e6,
            len(examples),
            runtime.device,
            f", {runtime.world_size} processes" if runtime.distributed else "",
        )
        start = time.perf_counter()
        result = fit(
            model,
            batch_sampler(examples, cfg.train.batch_size, tokenizer.pad_token_id, cfg.train.seed),
            text_loss,
            cfg.train,
            runtime,
            checkpoint_dir,
            fingerprint,
            metrics_dir=metrics_dir,
            stop_after=stop_after,
            items_per_batch=lambda batch: int(batch["attention_mask"].sum()),
        )
        log.info("trained to step %d in %.1f s", result.steps, time.perf_counter() - start)
        if runtime.is_main and result.steps >= cfg.train.max_steps:
            final = unwrap(model)
            final.save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
            if (features_dir / "vocabulary.json").is_file():  # the service measures prompts' OOV share with it
                shutil.copy2(features_dir / "vocabulary.json", out_dir / "vocabulary.json")
            params = {
                "init_from": str(cfg.init_from) if cfg.init_from else None,
                "model": asdict(cfg.model),
                "train": asdict(cfg.train),
            }
            write_json(training_record(params, hashed, result, final), out_dir / "training.json")
        return result
    finally:
        teardown_runtime(runtime)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(
        "python -m components.train_text", __doc__, "text features folder (data/features/text)",
        "model folder to write (models/text)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: train_text(
            TrainTextConfig.from_params(load_params("train_text", args.params)),
            args.features,
            args.out,
            args.checkpoints,
            args.metrics_dir,
        )
    )


if __name__ == "__main__":
    main()
