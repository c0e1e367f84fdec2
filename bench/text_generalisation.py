"""Does the text model generalise to entities it never saw? The default data, copying on and off, in one run.

    python bench/text_generalisation.py                       # group split, delexicalise on and off
    python bench/text_generalisation.py --splits group source  # also the leaky source-hash split
    python bench/text_generalisation.py --records 2000 --steps 200   # a quick look

Runs the text half of the DAG in-process with the default params (the demo generator, clean, augment,
features, train_text, evaluate_text) under a temporary folder, once per (split, copying) pair, and prints
one JSON object: per run BLEU, chrF, value_coverage, slot_error_rate, hallucinated_names, the same for the
retrieval baseline, the coverage of the entity key, the selected training step and the wall time. With
`source` in --splits, the gap between the two splits' scores is what a leaking split hides.

`generator_ceiling` scores the demo generator itself on the same test sources and references: one copy
as it writes its references, one that says every value, and the consensus (minimum Bayes risk by BLEU)
of --ceiling-samples copies that say every value. No model of this data can expect to beat them by much:
the references are random draws of wording and clause order, so they bound what BLEU can reward.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORTED = ("bleu", "chrf", "value_coverage", "slot_error_rate", "hallucinated_names")


def run_once(params: dict[str, Any], raw: Any, split: str, delexicalise: bool, work: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from components import augment, clean, evaluate_text, features, train_text
    from components.common import SPLIT_FILE, write_json

    section = lambda name: {**params[name], "base": params["base"]}  # noqa: E731
    start = time.perf_counter()
    clean_cfg = clean.CleanConfig.from_params(section("clean"))
    result = clean.clean_text(raw, replace(clean_cfg, text_split=clean.TextSplit(split)))
    augmented = augment.augment_text(result.kept, params["augment"]["text"]["shuffled_copies"], params["base"]["seed"])
    feature_cfg = features.FeaturesConfig.from_params(section("features"))
    features_dir = work / "features"
    features.text_features_stage(result.kept, augmented, replace(feature_cfg, delexicalise=delexicalise), features_dir)
    write_json(result.split, features_dir / SPLIT_FILE)
    trained = train_text.train_text(
        train_text.TrainTextConfig.from_params(section("train_text")), features_dir, work / "model", work / "checkpoints"
    )
    metrics = evaluate_text.evaluate_text(
        evaluate_text.EvaluateTextConfig.from_params(section("evaluate_text")),
        work / "model", features_dir, work / "text.json", work / "evaluation",
    )  # fmt: skip
    entity = (metrics["entity_keys"] or [None])[0]
    splits = {s: int(pq.read_table(features_dir / f"{s}.parquet").num_rows) for s in ("train", "val", "test")}
    return {
        "split": result.split,
        "delexicalise": delexicalise,
        "copied_keys": metrics["copied_keys"],
        **{key: metrics[key] for key in REPORTED},
        "retrieval_baseline": {key: metrics[f"{key}_retrieval_baseline"] for key in REPORTED},
        "bleu_over_baseline": round(metrics["bleu"] - metrics["bleu_retrieval_baseline"], 2),
        f"value_coverage_{entity}": metrics["value_coverage_by_key"].get(entity) if entity else None,
        "selected": trained.record.get("selected", {}).get("step"),
        "test_sources": metrics["test_sources"],
        "rows": splits,
        "seconds": round(time.perf_counter() - start, 1),
    }


def generator_ceiling(features_dir: Path, seed: int, samples: int) -> dict[str, dict[str, float]]:
    """BLEU and chrF of copy the demo generator writes for the test sources, scored as evaluate_text scores."""
    import numpy as np
    import pyarrow.parquet as pq

    from components import textgen
    from components.metrics import corpus_scores, sentence_bleu
    from components.text_model import group_by_source

    groups = group_by_source(pq.read_table(features_dir / "test.parquet").to_pylist())
    rng = np.random.default_rng([seed, 99])
    written: dict[str, list[str]] = {"as_references": [], "every_value": [], "every_value_consensus": []}
    for group in groups:
        record = textgen.record_of(group.source)
        assert record is not None, f"not a demo record: {group.source!r}"
        written["as_references"].append(textgen.write_copy(record, rng))
        copies = [textgen.write_copy(record, rng, leave_out=0.0) for _ in range(samples)]
        written["every_value"].append(copies[0])
        agreement = [sentence_bleu(copy, copies[:i] + copies[i + 1 :]) for i, copy in enumerate(copies)]
        written["every_value_consensus"].append(copies[int(np.argmax(agreement))])
    references = [group.references for group in groups]
    scores = {name: corpus_scores(texts, references) for name, texts in written.items()}
    return {name: {"bleu": score["bleu"], "chrf": score["chrf"]} for name, score in scores.items()}


def main(argv: list[str] | None = None) -> None:
    import pyarrow as pa
    import yaml

    from components import datasets

    parser = argparse.ArgumentParser(prog="python bench/text_generalisation.py", description=__doc__)
    parser.add_argument("--splits", nargs="+", choices=["group", "source"], default=["group"])
    parser.add_argument("--records", type=int, default=None, help="demo records (default: params.yaml's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: params.yaml's)")
    parser.add_argument("--ceiling-samples", type=int, default=16, help="generator copies per source for the consensus")
    parser.add_argument("--keep", type=Path, default=None, help="run here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    if args.steps:
        params["train_text"]["max_steps"] = args.steps
    text = params["ingest"]["text"]
    records = args.records or text["num_records"]
    raw = pa.Table.from_batches(list(datasets.generated_text(records, text["refs_per_record"], params["base"]["seed"])))
    work = args.keep or Path(tempfile.mkdtemp(prefix="text-generalisation-"))
    runs = []
    for split in args.splits:
        for delexicalise in (True, False):
            runs.append(run_once(params, raw, split, delexicalise, work / f"{split}-{'copy' if delexicalise else 'nocopy'}"))
    first = work / f"{args.splits[0]}-copy" / "features"
    ceiling = generator_ceiling(first, params["base"]["seed"], args.ceiling_samples)
    summary = {"records": records, "steps": params["train_text"]["max_steps"], "runs": runs}
    print(json.dumps({**summary, "generator_ceiling": {"split": args.splits[0], **ceiling}}, indent=2))


if __name__ == "__main__":
    main()
