"""Stage `train_text`: train the data-to-text generator (from scratch, or fine-tune `init_from`).

    python -m components.train_text data/features/text models/text --checkpoints models/checkpoints/text
    torchrun --nproc-per-node 8 -m components.train_text ...        # DDP, same command otherwise

Writes a save_pretrained folder (safetensors + config + tokenizer) and `training.json` (the params and the
data hash that produced it). Every `validate_every` steps the model writes the first `validate_sources`
validation sources, decoded as the service decodes (`validate_beams` beams, 1: greedy; copied values
required), and is scored on them (BLEU, chrF and the slot metrics); the weights of the best step by
`select_by` are the ones saved, and `training.json` says which step that was.

With `lora` (and `init_from`), peft's low-rank adapters are trained and the pretrained weights stay frozen;
the folder then holds the adapter (safetensors) and `base_model.json` (the base's path and content hash),
or, with `lora.merge: true`, merged whole weights. Needs only torch, transformers, tokenizers, safetensors,
sacrebleu, numpy and yaml (and peft with `lora`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from components import training
from components.common import ConfigError, require
from components.delex import COPYING_FILE, Delexicaliser
from components.metrics import corpus_scores
from components.slots import SlotLexicon, check_output, slot_scores
from components.text_model import (
    TOKENIZER_FILE,
    Examples,
    LoraSettings,
    TextModelConfig,
    add_lora,
    base_reference,
    build_model,
    decoding_options,
    generate_texts,
    group_by_source,
    load_examples,
    load_pretrained,
    make_batch,
    read_texts,
    save_text_model,
    tokenizer_from_file,
)
from components.training import TrainConfig, TrainingJob, TrainResult, Validation

log = logging.getLogger(__name__)


SELECTION = {"bleu": "max", "chrf": "max", "value_coverage": "max", "slot_error_rate": "min"}
"""The validation scores a text model can be selected by, and which way is better."""


@dataclass(frozen=True)
class TrainTextConfig:
    init_from: Path | None
    model: TextModelConfig
    train: TrainConfig
    lora: LoraSettings | None = None
    validate_sources: int = 200
    select_by: str = "bleu"
    validate_beams: int = 4

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainTextConfig:
        init_from = params.get("init_from")
        if init_from is not None and (not isinstance(init_from, str) or not init_from):
            raise ConfigError(f"params key 'train_text.init_from' must be a folder path or null, got {init_from!r}")
        select_by = require(params, "select_by", str, "train_text")
        if select_by not in SELECTION:
            raise ConfigError(f"params key 'train_text.select_by' must be one of {list(SELECTION)}, got {select_by!r}")
        lora = params.get("lora")
        if lora is not None and not isinstance(lora, dict):
            raise ConfigError(
                f"params key 'train_text.lora' must be a mapping (r, alpha, dropout, target_modules, merge) or null, got {lora!r}"
            )
        if lora is not None and not init_from:
            raise ConfigError("params key 'train_text.lora' needs train_text.init_from: LoRA adapts a pretrained model")
        return cls(
            init_from=Path(init_from) if init_from else None,
            lora=LoraSettings.from_params(lora, "train_text.lora") if lora is not None else None,
            model=TextModelConfig.from_params(require(params, "model", dict, "train_text"), "train_text.model"),
            train=TrainConfig.from_params(params, "train_text"),
            validate_sources=require(params, "validate_sources", int, "train_text", low=1),
            select_by=select_by,
            validate_beams=require(params, "validate_beams", int, "train_text", low=1, high=16),
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


def text_validation(
    cfg: TrainTextConfig, features_dir: Path, tokenizer: Any, delexicaliser: Delexicaliser | None
) -> Validation | None:
    """Model selection on generated validation text; None when the validation split is empty."""
    rows = read_texts(features_dir / "val.parquet")
    groups = group_by_source(rows, cfg.validate_sources)
    if not groups:
        log.warning("train_text: no validation rows, so no model selection: the last step's weights are saved")
        return None
    sources, references = [g.source for g in groups], [g.references for g in groups]
    train_rows = read_texts(features_dir / "train.parquet")
    lexicon = SlotLexicon.from_training(((r["source"], r["reference"]) for r in train_rows), [r["source"] for r in rows])
    new_tokens = cfg.model.max_length // 2  # half the context for the source, half for the text

    def run(model: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        decoding = "beam" if cfg.validate_beams > 1 else "greedy"
        options = decoding_options(decoding, cfg.validate_beams, 1.0, 1.0, new_tokens)
        outputs = generate_texts(model, tokenizer, sources, options, 64, device, new_tokens, delexicaliser=delexicaliser)
        scores = corpus_scores(outputs, references)
        slots = slot_scores([check_output(s, o, lexicon) for s, o in zip(sources, outputs, strict=True)], False)
        found = {"bleu": scores["bleu"], "chrf": scores["chrf"]}
        # No measurable value (free prompts): NaN, which never wins the selection, instead of a missing key.
        return found | {k: float("nan") if slots[k] is None else slots[k] for k in ("value_coverage", "slot_error_rate")}

    return Validation(run, cfg.select_by, SELECTION[cfg.select_by])


def text_job(cfg: TrainTextConfig, features_dir: Path) -> TrainingJob:
    """The text family's training job: our BPE model from scratch, or a pretrained one fine-tuned."""
    delexicaliser = Delexicaliser.load(features_dir)
    reference = None
    if cfg.init_from is not None:
        placeholders = delexicaliser.placeholders() if delexicaliser else None
        model, tokenizer = load_pretrained(cfg.init_from, "train_text.init_from", placeholders)
        if cfg.lora is not None:
            reference = base_reference(cfg.init_from)  # before training: the weights it starts from
            ours = [tokenizer.pad_token, tokenizer.sep_token, tokenizer.eos_token, *(placeholders or [])]
            model = add_lora(model, cfg.lora, sorted({tokenizer.convert_tokens_to_ids(t) for t in ours}))
    else:
        tokenizer = tokenizer_from_file(features_dir / TOKENIZER_FILE)
        model = build_model(cfg.model, tokenizer)
    max_length = min(cfg.model.max_length, model.config.max_position_embeddings)
    examples = load_examples(features_dir, "train", tokenizer, cfg.init_from is None, max_length)

    def save(out_dir: Path, result: TrainResult) -> dict[str, Any]:
        # Counted before saving: merging folds the adapters into the weights in place.
        counts = training.parameter_count(model)
        trainable = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)} if cfg.lora else {}
        save_text_model(training.unwrap(model), tokenizer, out_dir, features_dir, cfg.lora, reference)
        return counts | trainable

    inputs = [features_dir / name for name in (TOKENIZER_FILE, "train.safetensors", "train.parquet", "val.parquet", COPYING_FILE)]
    return TrainingJob(
        model=model,
        batches=batch_sampler(examples, cfg.train.batch_size, tokenizer.pad_token_id, cfg.train.seed),
        loss=text_loss,
        params={
            "init_from": str(cfg.init_from) if cfg.init_from else None,
            "model": asdict(cfg.model),
            **({"lora": asdict(cfg.lora)} if cfg.lora else {}),
            **(
                {"validate_sources": cfg.validate_sources, "select_by": cfg.select_by, "validate_beams": cfg.validate_beams}
                if cfg.train.validate_every
                else {}
            ),
        },
        data_files=[p for p in inputs if p.is_file()],
        save=save,
        description=f"text model: {len(examples)} training sequences",
        items=lambda batch: int(batch["attention_mask"].sum()),
        validation=text_validation(cfg, features_dir, tokenizer, delexicaliser) if cfg.train.validate_every else None,
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
