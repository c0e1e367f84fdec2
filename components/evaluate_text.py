"""Stage `evaluate_text`: decode the test split and score it against every reference of each source.

Generation-based (never teacher-forced) BLEU and chrF with sacrebleu, multi-reference, with the signature
recorded; the slot metrics of components.slots (value coverage, slot error rate, hallucinated names);
perplexity of the references; and, in the same run, the same scores for a retrieval baseline: each test
source answered with a reference of the most similar training source, the test source's values substituted
for the retrieved source's (components.delex.substitute), so the model is compared with a baseline that
copies values too. The metrics name the split they were measured on (`split`, from the clean stage).

Writes `metrics/text.json`, `<out>/outputs.parquet` (one row per test source, with each source value's
status for the model and the baseline) and `<out>/samples.csv` (a DVC plot: sentence BLEU per sample,
hover for the texts).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.common import SPLIT_FILE, ConfigError, DataError, load_params, require, run_main, write_json
from components.compression import compared, compressed_info
from components.delex import Delexicaliser, substitute
from components.metrics import corpus_scores, sentence_bleu
from components.records import parse_source
from components.runtime import cpu_threads_from_params, device_from_params, evaluation_device
from components.slots import SLOT_METRICS, SlotCheck, SlotLexicon, check_output, key_coverage, slot_scores, unmeasured
from components.text_model import (
    DECODING,
    Examples,
    SourceGroup,
    decoding_options,
    generate_texts,
    group_by_source,
    load_text_model,
    make_batch,
    read_texts,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateTextConfig:
    decoding: str
    num_beams: int
    top_p: float
    temperature: float
    max_new_tokens: int
    batch_size: int
    max_sources: int | None
    samples: int
    device: str
    seed: int
    cpu_threads: int | None = None
    synonyms: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    require_values: bool = True

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateTextConfig:
        p = "evaluate_text"
        decoding = require(params, "decoding", str, p)
        if decoding not in DECODING:
            raise ConfigError(f"params key '{p}.decoding' must be one of {list(DECODING)}, got {decoding!r}")
        max_sources = params.get("max_sources")
        if max_sources is not None and (isinstance(max_sources, bool) or not isinstance(max_sources, int) or max_sources < 1):
            raise ConfigError(f"params key '{p}.max_sources' must be a positive integer or null, got {max_sources!r}")
        device = device_from_params(params, p)
        return cls(
            decoding=decoding,
            num_beams=require(params, "num_beams", int, p, low=1, high=16),
            top_p=float(require(params, "top_p", (int, float), p, low=0.01, high=1)),
            temperature=float(require(params, "temperature", (int, float), p, low=0.01, high=10)),
            max_new_tokens=require(params, "max_new_tokens", int, p, low=1),
            batch_size=require(params, "batch_size", int, p, low=1),
            max_sources=max_sources,
            samples=require(params, "samples", int, p, low=0),
            device=device,
            seed=require(params["base"], "seed", int, "base"),
            cpu_threads=cpu_threads_from_params(params["base"]),
            synonyms=synonyms_from_params(params.get("synonyms"), f"{p}.synonyms"),
            require_values=require(params, "require_values", bool, p),
        )


CONFIG = EvaluateTextConfig


def synonyms_from_params(value: Any, key: str) -> dict[str, dict[str, list[str]]]:
    """`{record key: {value: [other wordings]}}`, or null for none."""
    if value is None:
        return {}
    ok = isinstance(value, dict) and all(
        isinstance(by_value, dict)
        and all(isinstance(words, list) and all(isinstance(w, str) and w for w in words) for words in by_value.values())
        for by_value in value.values()
    )
    if not ok:
        raise ConfigError(f"params key '{key}' must map a record key to {{value: [other wordings]}}, got {value!r}")
    # YAML reads an unquoted yes / no as a boolean: it is the value "yes" / "no" here.
    spelled = lambda v: ("yes" if v else "no") if isinstance(v, bool) else str(v)  # noqa: E731
    return {str(k): {spelled(v): list(words) for v, words in by_value.items()} for k, by_value in value.items()}


def source_features(source: str) -> set[str]:
    """What retrieval compares: the (key, value) pairs of a record, or lower-cased words of free text."""
    record = parse_source(source)
    if record is not None:
        return {f"{k}={v}" for k, v in record.pairs}
    return set(source.lower().split())


def retrieval_baseline(train_rows: list[dict[str, str]], sources: list[str]) -> list[str]:
    """For each source, the first reference of the training source sharing the most features (ties: first),
    with the source's values put in place of the retrieved source's."""
    train_groups = group_by_source(train_rows)
    index: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(train_groups):
        for feature in source_features(group.source):
            index[feature].append(i)
    answers = []
    for source in sources:
        overlap: Counter[int] = Counter()
        for feature in source_features(source):
            overlap.update(index.get(feature, ()))
        best = min(overlap, key=lambda i: (-overlap[i], i)) if overlap else 0
        answers.append(substitute(train_groups[best].references[0], train_groups[best].source, source))
    return answers


def generate(
    model: Any, tokenizer: Any, delexicaliser: Delexicaliser | None, sources: list[str], cfg: EvaluateTextConfig,
    device: torch.device,
) -> list[str]:  # fmt: skip
    """The test split's outputs under the configured decoding, seeded."""
    options = decoding_options(cfg.decoding, cfg.num_beams, cfg.top_p, cfg.temperature, cfg.max_new_tokens)
    torch.manual_seed(cfg.seed)
    return generate_texts(
        model, tokenizer, sources, options, cfg.batch_size, device, cfg.max_new_tokens, show_progress=True,
        delexicaliser=delexicaliser, require_values=cfg.require_values,
    )  # fmt: skip


def perplexity(model: Any, tokenizer: Any, rows: list[dict[str, str]], batch_size: int, device: torch.device) -> float:
    """exp(mean negative log-likelihood per target token) of the references given their sources, as the
    model reads and writes them (`model_source`, `model_reference`: placeholders where it copies)."""
    from torchmetrics.text import Perplexity

    max_length = model.config.max_position_embeddings
    examples = Examples.from_texts([r["model_source"] for r in rows], [r["model_reference"] for r in rows], tokenizer, max_length)
    metric = Perplexity(ignore_index=-100).to(device)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = make_batch(examples, list(range(start, min(start + batch_size, len(examples)))), tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            metric.update(logits[:, :-1], batch["labels"][:, 1:])  # position t predicts token t+1
    return float(metric.compute())


def evaluate_text(
    cfg: EvaluateTextConfig, model_dir: Path, features_dir: Path, metrics_path: Path, out_dir: Path,
    compressed_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Score the model on the test split, next to the retrieval baseline; write metrics and outputs. With
    `compressed_dir`, its compressed copy is scored the same way (the `compressed` keys)."""
    device = evaluation_device(cfg.device, cfg.cpu_threads)
    if compressed_dir is not None:
        compressed_info(compressed_dir, "evaluate_text --compressed")  # before the long part
    model, tokenizer, delexicaliser = load_text_model(model_dir, "evaluate_text model folder", device)
    test_rows = read_texts(features_dir / "test.parquet")
    if not test_rows:
        raise DataError(f"{features_dir / 'test.parquet'} has no rows")
    train_rows = read_texts(features_dir / "train.parquet")
    groups = group_by_source(test_rows, cfg.max_sources)
    kept = {g.source_key for g in groups}
    sources = [g.source for g in groups]
    references = [g.references for g in groups]

    hypotheses = generate(model, tokenizer, delexicaliser, sources, cfg, device)
    baseline = retrieval_baseline(train_rows, sources)
    lexicon = SlotLexicon.from_training(
        ((r["source"], r["reference"]) for r in train_rows), [r["source"] for r in test_rows], cfg.synonyms
    )
    model_checks = [check_output(s, h, lexicon) for s, h in zip(sources, hypotheses, strict=True)]
    baseline_checks = [check_output(s, b, lexicon) for s, b in zip(sources, baseline, strict=True)]
    model_slots = slot_scores(model_checks, bool(lexicon.entity_keys))
    baseline_slots = slot_scores(baseline_checks, bool(lexicon.entity_keys))
    model_scores = corpus_scores(hypotheses, references)
    baseline_scores = corpus_scores(baseline, references)
    ppl = perplexity(model, tokenizer, [r for r in test_rows if r["source_key"] in kept], cfg.batch_size, device)
    metrics = {
        **model_scores,
        **{key: model_slots[key] for key in SLOT_METRICS},
        "perplexity": round(ppl, 3),
        "bleu_retrieval_baseline": baseline_scores["bleu"],
        "chrf_retrieval_baseline": baseline_scores["chrf"],
        **{f"{key}_retrieval_baseline": baseline_slots[key] for key in SLOT_METRICS},
        "value_coverage_by_key": key_coverage(model_checks),
        "source_values": model_slots["values"],
        "unmeasured_values": unmeasured(lexicon),
        "entity_keys": list(lexicon.entity_keys),
        "copied_keys": dict(delexicaliser.keys) if delexicaliser else {},
        "split": read_split(features_dir),
        "test_sources": len(groups),
        "references_per_source": round(sum(map(len, references)) / len(references), 2),
        "decoding": cfg.decoding,
    }
    if compressed_dir is not None:
        metrics["compressed"] = compressed_scores(cfg, compressed_dir, sources, references, lexicon, test_rows, kept, metrics)
    write_json(metrics, metrics_path)
    write_outputs(groups, hypotheses, baseline, model_checks, baseline_checks, out_dir, cfg.samples)
    log.info(
        "BLEU %.2f (retrieval baseline %.2f), chrF %.2f, value coverage %s (baseline %s), hallucinated names %s, "
        "perplexity %.2f on %d test sources (split: %s)",
        metrics["bleu"],
        metrics["bleu_retrieval_baseline"],
        metrics["chrf"],
        metrics["value_coverage"],
        metrics["value_coverage_retrieval_baseline"],
        metrics["hallucinated_names"],
        metrics["perplexity"],
        len(groups),
        metrics["split"].get("by"),
    )
    return metrics


def compressed_scores(
    cfg: EvaluateTextConfig, folder: Path, sources: list[str], references: list[list[str]], lexicon: SlotLexicon,
    test_rows: list[dict[str, str]], kept: set[str], fp32: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The compressed model's scores on the same sources, decoding and seed, next to the fp32 model's."""
    info = compressed_info(folder, "evaluate_text --compressed")
    device = evaluation_device(cfg.device, cfg.cpu_threads)
    model, tokenizer, delexicaliser = load_text_model(folder, "evaluate_text --compressed", device)
    device = model.device  # an int8 model runs on the CPU
    hypotheses = generate(model, tokenizer, delexicaliser, sources, cfg, device)
    checks = [check_output(s, h, lexicon) for s, h in zip(sources, hypotheses, strict=True)]
    slots = slot_scores(checks, bool(lexicon.entity_keys))
    ppl = perplexity(model, tokenizer, [r for r in test_rows if r["source_key"] in kept], cfg.batch_size, device)
    scores = {**corpus_scores(hypotheses, references), **{key: slots[key] for key in SLOT_METRICS}, "perplexity": round(ppl, 3)}
    for signature in ("sacrebleu_signature", "chrf_signature"):  # the fp32 scores' own, the same
        scores.pop(signature)
    block = compared(scores, fp32, info)
    log.info("compressed (%s, %.0f %% of the size): BLEU %.2f (%+.2f), slot error rate %s", info["method"],
             100 * info["size_ratio"], block["bleu"], block["bleu_delta"], block["slot_error_rate"])  # fmt: skip
    return block


def read_split(features_dir: Path) -> dict[str, Any]:
    """How the clean stage split the data (`split.json` of the features folder)."""
    path = features_dir / SPLIT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"by": "unknown"}


def write_outputs(
    groups: list[SourceGroup], hypotheses: list[str], baseline: list[str], model_checks: list[SlotCheck],
    baseline_checks: list[SlotCheck], out_dir: Path, samples: int,
) -> None:  # fmt: skip
    import pyarrow as pa

    from components.tables import write_parquet_atomic

    rows = [
        {
            "source": g.source,
            "hypothesis": h,
            "retrieval": b,
            "references": g.references,
            "sentence_bleu": sentence_bleu(h, g.references),
            "values": m.values,
            "hallucinated_names": m.hallucinated,
            "retrieval_values": r.values,
            "retrieval_hallucinated_names": r.hallucinated,
        }
        for g, h, b, m, r in zip(groups, hypotheses, baseline, model_checks, baseline_checks, strict=True)
    ]
    value = pa.list_(pa.struct([("key", pa.string()), ("value", pa.string()), ("status", pa.string())]))
    schema = pa.schema(
        [("source", pa.string()), ("hypothesis", pa.string()), ("retrieval", pa.string()),
         ("references", pa.list_(pa.string())), ("sentence_bleu", pa.float64()), ("values", value),
         ("hallucinated_names", pa.list_(pa.string())), ("retrieval_values", value),
         ("retrieval_hallucinated_names", pa.list_(pa.string()))]
    )  # fmt: skip
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), out_dir / "outputs.parquet")
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "samples.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sample", "sentence_bleu", "source", "hypothesis", "reference"])
        writer.writeheader()
        for i, row in enumerate(rows[:samples]):
            writer.writerow(
                {
                    "sample": i,
                    "sentence_bleu": row["sentence_bleu"],
                    "source": row["source"],
                    "hypothesis": row["hypothesis"],
                    "reference": row["references"][0],
                }
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate_text", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="trained model folder (models/text)")
    parser.add_argument("features", type=Path, help="text features folder (data/features/text)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics file (metrics/text.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for outputs.parquet and samples.csv")
    parser.add_argument("--compressed", type=Path, default=None, help="also score this compressed copy")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: evaluate_text(
            EvaluateTextConfig.from_params(load_params("evaluate_text", args.params)),
            args.model,
            args.features,
            args.metrics,
            args.out,
            args.compressed,
        )
    )


if __name__ == "__main__":
    main()
