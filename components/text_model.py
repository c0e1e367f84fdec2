"""The text family: a decoder-only transformer (GPT-2 architecture from `transformers`) for data-to-text.

A training example is `source <|sep|> target <|endoftext|>`; the loss covers the target and the end token
only. The same prompt format is used by evaluation and serving, so it lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import ConfigError, require
from components.model_io import check_safetensors_folder

PAD, SEP, EOS = "<|pad|>", "<|sep|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, SEP, EOS)


@dataclass(frozen=True)
class TextModelConfig:
    n_layer: int
    n_head: int
    n_embd: int
    max_length: int
    dropout: float

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str) -> TextModelConfig:
        cfg = cls(
            n_layer=require(section, "n_layer", int, prefix, low=1),
            n_head=require(section, "n_head", int, prefix, low=1),
            n_embd=require(section, "n_embd", int, prefix, low=8),
            max_length=require(section, "max_length", int, prefix, low=8),
            dropout=float(require(section, "dropout", (int, float), prefix, low=0, high=0.9)),
        )
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"params key '{prefix}.n_embd' ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head})")
        return cfg


def build_model(cfg: TextModelConfig, tokenizer: Any) -> Any:
    """A GPT-2 causal LM sized by cfg, vocabulary from the tokenizer, randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.max_length,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def tokenizer_from_file(path: Path) -> Any:
    """Our BPE tokenizer (features stage) as a transformers fast tokenizer, special tokens declared."""
    from transformers import PreTrainedTokenizerFast

    if not path.is_file():
        raise ConfigError(f"tokenizer not found: {path} (run the features stage first)")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=PAD, sep_token=SEP, eos_token=EOS, bos_token=EOS)


def ensure_special_tokens(tokenizer: Any, model: Any) -> None:
    """Give a pretrained tokenizer our pad / separator / end tokens and grow the embeddings to match."""
    missing = {}
    if tokenizer.pad_token is None:
        missing["pad_token"] = PAD
    if tokenizer.sep_token is None:
        missing["sep_token"] = SEP
    if tokenizer.eos_token is None:
        missing["eos_token"] = EOS
    if missing:
        tokenizer.add_special_tokens(missing)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


def load_pretrained(path: Path, key: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a save_pretrained folder, safetensors only; our tokens added if missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safetensors_folder(path, f"params key '{key}'")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_special_tokens(tokenizer, model)
    return model, tokenizer


def example_ids(source_ids: list[int], target_ids: list[int], tokenizer: Any, max_length: int) -> tuple[list[int], int]:
    """(token ids of `source SEP target EOS`, length of the prompt part), truncated to max_length.

    The source is cut first (keeping room for at least a few target tokens), the target after.
    """
    room_for_source = max(1, max_length - 2 - min(len(target_ids), max_length // 2))
    prompt = source_ids[:room_for_source] + [tokenizer.sep_token_id]
    ids = (prompt + target_ids + [tokenizer.eos_token_id])[:max_length]
    return ids, len(prompt)


def prompt_ids(source: str, tokenizer: Any, max_length: int, max_new_tokens: int) -> list[int]:
    """The generation prompt for a source record: its tokens and the separator, leaving room to generate."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    return ids[: max(1, max_length - max_new_tokens - 1)] + [tokenizer.sep_token_id]
