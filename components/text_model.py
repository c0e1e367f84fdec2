"""The text family: a decoder-only transformer (GPT-2 architecture from `transformers`) for data-to-text.

A training example is `source <|sep|> target <|endoftext|>`; the loss covers the target and the end token
only. The family owns everything that depends on that format: building, loading and saving the model,
the training examples and their batches, and generation with its decoding options, so training,
evaluation and serving share one definition of each.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import ConfigError, DataError, progress, require, write_json
from components.delex import COPYING_FILE, Delexicaliser, values_said
from components.model_io import check_safetensors_folder
from components.records import SCHEMA_FILE

if TYPE_CHECKING:
    import torch

PAD, SEP, EOS = "<|pad|>", "<|sep|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, SEP, EOS)
DECODING = ("greedy", "beam", "nucleus")
TOKENIZER_FILE = "tokenizer.json"
VOCABULARY_FILE = "vocabulary.json"  # training-source words; the service measures prompts' OOV share with it
ADAPTER_CONFIG = "adapter_config.json"  # peft's: a folder holding it is a LoRA adapter, not whole weights
BASE_FILE = "base_model.json"  # the pretrained model a LoRA fine-tune started from: path and content hash


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


@dataclass(frozen=True)
class LoraSettings:
    """`train_text.lora`: low-rank adapters (peft) on a pretrained model, which stays frozen."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None  # None: peft's default for the architecture (GPT-2: c_attn)
    merge: bool  # save merged whole weights instead of the adapter and its base's reference

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str) -> LoraSettings:
        targets = section.get("target_modules")
        if targets is not None and (
            not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ConfigError(f"params key '{prefix}.target_modules' must be a list of module names or null, got {targets!r}")
        return cls(
            r=require(section, "r", int, prefix, low=1, high=4096),
            alpha=float(require(section, "alpha", (int, float), prefix, low=0)),
            dropout=float(require(section, "dropout", (int, float), prefix, low=0, high=0.9)),
            target_modules=tuple(targets) if targets else None,
            merge=require(section, "merge", bool, prefix),
        )


def add_lora(model: Any, settings: LoraSettings, new_token_ids: list[int]) -> Any:
    """The model wrapped by peft: only the adapters (and the rows of tokens we added to its vocabulary, which
    the pretrained model never learnt) are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else None,
        task_type="CAUSAL_LM",
        trainable_token_indices=new_token_ids or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module the architecture does not have
        raise ConfigError(f"params key 'train_text.lora': {str(err).splitlines()[0]}") from None


def weights_digest(folder: Path) -> str:
    """sha256 over a save_pretrained folder's config and safetensors weights: what a LoRA adapter was trained on."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def base_reference(base: Path) -> dict[str, str]:
    """What a LoRA adapter records of its base: the path and the content hash, taken when training starts."""
    return {"path": str(base.resolve()), "hash": weights_digest(base)}


def save_lora_model(model: Any, settings: LoraSettings, reference: dict[str, str], tokenizer: Any, folder: Path) -> None:
    """Merged whole weights (`merge`), or the adapter (peft's safetensors) with the base model's config and a
    reference to the base (path and content hash) that loading checks."""
    if settings.merge:
        model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    else:
        # Not the whole (resized) embedding matrices, which peft adds by default once the vocabulary grew: the
        # rows of the tokens we added are trainable tokens, saved as such, and the rest is the base's.
        model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
        model.get_base_model().config.save_pretrained(folder)  # config.json: the architecture the service reads
    write_json(reference | {"vocab_size": len(tokenizer), "merged": settings.merge}, folder / BASE_FILE)


def load_adapter_model(folder: Path, key: str, vocab_size: int) -> Any:
    """A LoRA adapter folder on its base model, refused unless the base is the one it was trained on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not (folder / BASE_FILE).is_file():
        raise ConfigError(f"{key}: {folder} holds a LoRA adapter without {BASE_FILE}: retrain it with train_text.lora")
    reference = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
    if not isinstance(reference, dict) or not {"path", "hash"} <= set(reference):
        raise ConfigError(f"{key}: {folder / BASE_FILE} lacks the base model's path and hash: retrain the adapter")
    base = Path(reference["path"])
    if not base.is_dir():
        raise ConfigError(
            f"{key}: {folder} is a LoRA adapter of {base}, which is missing: restore it, or retrain with lora.merge: true"
        )
    check_safetensors_folder(base, f"{key} (base model)")
    found = weights_digest(base)
    if found != reference["hash"]:
        raise ConfigError(
            f"{key}: {folder} is a LoRA adapter of {base}, whose weights changed ({found[:19]}…, trained on "
            f"{reference['hash'][:19]}…): restore that base model, or retrain the adapter"
        )
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)  # the added rows are the adapter's trained tokens
    return PeftModel.from_pretrained(model, folder)


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


def load_text_model(folder: Path, key: str, device: torch.device | None = None) -> tuple[Any, Any, Delexicaliser | None]:
    """(model in eval mode, tokenizer, delexicaliser or None) of a trained or compressed model folder
    (`models/text`, `models/compressed/text`), safetensors only. An int8 model stays on the CPU whatever
    `device` says (quantised layers have no CUDA kernels): callers put inputs on `model.device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.compression import INT8, compression_of

    check_safetensors_folder(folder, key)
    compression = compression_of(folder)
    if compression is not None and compression["method"] == INT8:
        model = load_int8_text_model(folder, key)
        device = None
    elif (folder / ADAPTER_CONFIG).is_file():
        model = load_adapter_model(folder, key, len(AutoTokenizer.from_pretrained(folder)))
    else:  # fp32 compute for half-precision weights too: what a CPU does fastest
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    try:
        delexicaliser = Delexicaliser.load(folder)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    return (model.to(device) if device is not None else model).eval(), AutoTokenizer.from_pretrained(folder), delexicaliser


def linear_projections(model: Any) -> Any:
    """The model (in place) with GPT-2's `Conv1D` projections as the `nn.Linear` layers they are (Conv1D keeps
    its weight as in × out), and output embeddings that share the input embeddings' weight given their own
    copy: so quantisation finds every projection, and the lookup and the last layer are stored apart."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, name, linear)
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        untied = nn.Linear(output.in_features, output.out_features, bias=output.bias is not None)
        untied.weight.data = output.weight.data.clone()
        if output.bias is not None:
            untied.bias.data = output.bias.data.clone()
        model.set_output_embeddings(untied)
    model.config.tie_word_embeddings = False
    return model


def compress_text_model(source: Path, folder: Path, method: str) -> dict[str, Any]:
    """A compressed copy of a text model folder (components/compression.py says what int8 and fp16 / bf16
    store), with its tokenizer, vocabulary, schema and delexicaliser; a LoRA adapter is merged into its base
    first. Returns compression.json's content."""
    from safetensors.torch import save_file

    from components.compression import COMPRESSION_FILE, HALF, INT8, int8_state, quantize_linears, write_compression

    model, _, _ = load_text_model(source, "compress text model folder")
    source_bytes = None
    if (source / ADAPTER_CONFIG).is_file():  # measured against the merged model, not the adapter's few weights
        model = model.merge_and_unload()
        source_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    weights = ("config.json", ADAPTER_CONFIG, BASE_FILE, COMPRESSION_FILE)
    for path in source.iterdir():  # tokenizer, generation config, vocabulary, schema, delexicaliser, provenance
        if path.is_file() and path.suffix != ".safetensors" and path.name not in weights:
            shutil.copy2(path, folder / path.name)
    if method == INT8:
        quantize_linears(linear_projections(model))
        model.config.save_pretrained(folder)
        save_file(int8_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})  # one key: see compression
    else:
        model.to(HALF[method]).save_pretrained(folder, safe_serialization=True)
    return write_compression(folder, method, source, source_bytes)


def load_int8_text_model(folder: Path, key: str) -> Any:
    """An int8 text model folder: the architecture its config.json names, prepared as at saving, then filled."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from components.compression import load_int8_state, quantize_linears

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    quantize_linears(linear_projections(model))
    load_int8_state(model, load_file(str(folder / "model.safetensors")), key)
    return model


def save_text_model(
    model: Any, tokenizer: Any, folder: Path, features_dir: Path, lora: LoraSettings | None = None,
    base: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """A save_pretrained folder (safetensors, config, tokenizer) with the training vocabulary, the record
    schema and the delexicaliser beside it: the service builds its request model and drift log from the
    first two, and evaluation and the service fill the model's placeholders with the third. A LoRA model
    (`lora`, fine-tuned from the model `base` references) is saved as `save_lora_model` says."""
    if lora is not None and base is not None:
        save_lora_model(model, lora, base, tokenizer, folder)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / COPYING_FILE).unlink(missing_ok=True)
    for name in (VOCABULARY_FILE, SCHEMA_FILE, COPYING_FILE):
        if (features_dir / name).is_file():
            shutil.copy2(features_dir / name, folder / name)


def load_pretrained(path: Path, key: str, placeholders: list[str] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a save_pretrained folder, safetensors only; our tokens (and the
    delexicaliser's placeholders, as whole tokens) added if missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safetensors_folder(path, f"params key '{key}'")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if placeholders:
        tokenizer.add_tokens(placeholders)
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


# --- training examples --------------------------------------------------------------------------------


@dataclass
class Examples:
    """Tokenized sequences (`source SEP target EOS`) with the length of each prompt."""

    ids: list[list[int]]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_token_ids(cls, sources: list[list[int]], targets: list[list[int]], tokenizer: Any, max_length: int) -> Examples:
        pairs = [example_ids(s, t, tokenizer, max_length) for s, t in zip(sources, targets, strict=True)]
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    @classmethod
    def from_texts(cls, sources: list[str], targets: list[str], tokenizer: Any, max_length: int) -> Examples:
        encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        return cls.from_token_ids(encode(sources), encode(targets), tokenizer, max_length)


def read_ragged(path: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(source ids, target ids) per row from a features safetensors file."""
    from safetensors.numpy import load_file

    if not path.is_file():
        raise DataError(f"missing {path}: run the features stage first")
    arrays = load_file(str(path))

    def split(ids: Any, offsets: Any) -> list[list[int]]:
        return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    return split(arrays["source_ids"], arrays["source_offsets"]), split(arrays["target_ids"], arrays["target_offsets"])


def read_texts(path: Path) -> list[dict[str, str]]:
    """Rows of a features split as dicts (record_id, source, reference, source_key, and model_source /
    model_reference: what the model reads and writes, placeholders and all)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"missing {path}: run the features stage first")
    columns = ["record_id", "source", "reference", "source_key", "model_source", "model_reference"]
    available = pq.read_schema(path).names
    if not set(columns) <= set(available):
        raise DataError(f"{path} lacks columns {sorted(set(columns) - set(available))}: rerun the features stage")
    return pq.read_table(path, columns=columns).to_pylist()


@dataclass(frozen=True)
class SourceGroup:
    """One test source with all its references (the multi-reference unit of BLEU)."""

    source_key: str
    source: str
    references: list[str]


def group_by_source(rows: list[dict[str, str]], limit: int | None = None) -> list[SourceGroup]:
    """Rows -> one group per distinct source, in first-seen order; `limit` keeps the first N groups."""
    refs: dict[str, list[str]] = defaultdict(list)
    first: dict[str, str] = {}
    for row in rows:
        first.setdefault(row["source_key"], row["source"])
        refs[row["source_key"]].append(row["reference"])
    groups = [SourceGroup(key, first[key], refs[key]) for key in first]
    return groups[:limit] if limit else groups


def load_examples(features_dir: Path, split: str, tokenizer: Any, ours: bool, max_length: int) -> Examples:
    """Training sequences of a split: our token arrays, or the texts re-tokenized by a pretrained tokenizer."""
    if ours:
        examples = Examples.from_token_ids(*read_ragged(features_dir / f"{split}.safetensors"), tokenizer, max_length)
    else:
        rows = read_texts(features_dir / f"{split}.parquet")
        examples = Examples.from_texts(
            [r["model_source"] for r in rows], [r["model_reference"] for r in rows], tokenizer, max_length
        )
    if not len(examples):
        raise DataError(f"no {split} examples in {features_dir}")
    return examples


def make_batch(examples: Examples, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and the padding, so only the target is learned."""
    import torch

    width = max(len(examples.ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    for row, i in enumerate(indices):
        ids = torch.tensor(examples.ids[i], dtype=torch.long)
        input_ids[row, : len(ids)] = ids  # (B, T)
        attention[row, : len(ids)] = 1
        labels[row, examples.prompt_lengths[i] : len(ids)] = ids[examples.prompt_lengths[i] :]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --- generation ---------------------------------------------------------------------------------------


def decoding_options(decoding: str, num_beams: int, top_p: float, temperature: float, max_new_tokens: int) -> dict[str, Any]:
    """`model.generate` keyword arguments for greedy, beam or nucleus decoding."""
    if decoding not in DECODING:
        raise ValueError(f"decoding must be one of {list(DECODING)}, got {decoding!r}")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if decoding == "beam":
        # Every beam comes back: generate_texts keeps the one that says the most source values.
        options.update(num_beams=num_beams, num_return_sequences=num_beams, do_sample=False, early_stopping=True)
    elif decoding == "nucleus":
        options.update(do_sample=True, top_p=top_p, temperature=temperature)
    else:
        options.update(do_sample=False, num_beams=1)
    return options


PLACEHOLDER_BONUS = 6.0
"""Log-odds added to a missing copied value's placeholder where the model starts a placeholder (after the
space token that precedes one): it then writes the value still missing rather than another."""


@functools.lru_cache(maxsize=8)
def boundary_tokens(tokenizer: Any) -> frozenset[int]:
    """Tokens after which a placeholder may start a clause: those ending a sentence (`.`, `!`, `?`) and
    bare spaces (the space before a placeholder is a token of its own)."""
    boundary = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and (not text.strip() or text.rstrip()[-1:] in ".!?"):
            boundary.add(token_id)
    return frozenset(boundary)


class RequirePlaceholders:
    """A `generate` logits processor for a delexicalising model: while a sequence lacks a placeholder its
    source needs (a copied key the source gives), that placeholder gets `bonus` log-odds and, with
    `block_end` (beam search), the sequence may not end. Greedy and beam search otherwise leave out an
    attribute whose clause has many openings, each less likely than ending the text: the most likely text
    is a shorter one. A single greedy path barred from ending rambles instead, so greedy gets the bonus only.
    """

    def __init__(
        self, required: list[list[int]], prompt_width: int, eos_token_id: int, bonus: float, block_end: bool,
        after_tokens: frozenset[int] | None = None,
    ) -> None:  # fmt: skip
        self.required = required  # per source; beams of source i are rows i * beams ... (i + 1) * beams - 1
        self.prompt_width = prompt_width
        self.eos_token_id = eos_token_id
        self.bonus = bonus
        self.block_end = block_end
        self.after_tokens = after_tokens  # the bonus applies only right after one of them (None: anywhere)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        beams = input_ids.shape[0] // len(self.required)
        width = max((len(r) for r in self.required), default=0)
        if not width:
            return scores
        required = torch.full((len(self.required), width), -1, dtype=torch.long)
        for i, tokens in enumerate(self.required):
            required[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        required = required.repeat_interleave(beams, dim=0).to(input_ids.device)  # (rows, K), -1 = none
        written = input_ids[:, self.prompt_width :]  # (rows, T)
        present = (written.unsqueeze(-1) == required.unsqueeze(1)).any(dim=1)  # (rows, K)
        missing = (required >= 0) & ~present
        rows = missing.any(dim=1)
        if not bool(rows.any()):
            return scores
        boost = rows.clone()
        # Not at the text's first token: there the model's own choice (usually the name) is the right one,
        # and a bonus would open the text with whichever value is missing (measured: -0.3 BLEU by default).
        if self.after_tokens is not None:
            last = written[:, -1] if written.shape[1] else torch.full_like(rows, -1, dtype=torch.long)
            after = torch.tensor(sorted(self.after_tokens), dtype=torch.long, device=input_ids.device)
            boost &= torch.isin(last, after)
        row_index, slot = missing.nonzero(as_tuple=True)
        keep = boost[row_index]
        scores[row_index[keep], required[row_index[keep], slot[keep]]] += self.bonus
        if self.block_end:
            scores[rows, self.eos_token_id] = float("-inf")
        return scores


def generate_texts(
    model: Any, tokenizer: Any, sources: list[str], options: dict[str, Any], batch_size: int, device: torch.device,
    max_new_tokens: int, show_progress: bool = False, delexicaliser: Delexicaliser | None = None,
    require_values: bool = True,
) -> list[str]:  # fmt: skip
    """Batched decoding of `source SEP`; left padding so every prompt ends where generation starts. With a
    delexicaliser, the model reads each source with its hidden values as placeholders, and the placeholders
    it writes are filled with the source's values. Beam search (the decoding evaluation and the service
    default to) returns every beam, and the text kept is the one that says the most of the source's values
    (the beam score breaks ties). With `require_values`, a missing copied value's placeholder is favoured
    and no beam may end before it has written each one (RequirePlaceholders)."""
    import torch
    from transformers import LogitsProcessorList

    max_length = model.config.max_position_embeddings
    options = {**options, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    model_sources = [delexicaliser.model_source(s) for s in sources] if delexicaliser else sources
    outputs: list[str] = []
    model.eval()
    starts = range(0, len(sources), batch_size)
    for start in progress(starts, desc="generate", unit="batch") if show_progress else starts:
        prompts = [prompt_ids(s, tokenizer, max_length, max_new_tokens) for s in model_sources[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        batch_options = dict(options)
        beams = options.get("num_beams", 1)
        if delexicaliser is not None and require_values:
            chunk = sources[start : start + batch_size]
            required = [[tokenizer.convert_tokens_to_ids(p) for p in delexicaliser.required(s)] for s in chunk]
            batch_options["logits_processor"] = LogitsProcessorList(
                [
                    RequirePlaceholders(
                        required, width, tokenizer.eos_token_id, PLACEHOLDER_BONUS, beams > 1, boundary_tokens(tokenizer)
                    )
                ]
            )
        with torch.inference_mode():
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **batch_options)
        outputs.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    per_source = options.get("num_return_sequences", 1)
    texts = [text.strip() for text in outputs]
    if delexicaliser is not None:
        texts = [delexicaliser.relexicalise(sources[i // per_source], text) for i, text in enumerate(texts)]
    if per_source == 1:
        return texts
    candidates = [texts[i : i + per_source] for i in range(0, len(texts), per_source)]
    return [max(found, key=lambda text: values_said(source, text)) for source, found in zip(sources, candidates, strict=True)]
