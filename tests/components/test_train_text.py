"""The text family and the shared training infrastructure, on tiny CPU configurations."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from components import evaluate_text, train_text
from components.common import ConfigError
from components.metrics import corpus_scores
from components.text_model import load_pretrained
from components.training import TIMING_FILE, TrainConfig, lr_factor
from tests.conftest import REPO_ROOT, free_port, section


def config(params: dict[str, Any], **overrides: Any) -> train_text.TrainTextConfig:
    text = section(params, "train_text")
    text.update(overrides)
    return train_text.TrainTextConfig.from_params(text)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_loss_falls_over_a_few_dozen_steps(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    model = {**tiny_params["train_text"]["model"], "n_embd": 32, "dropout": 0.0}
    cfg = config(tiny_params, max_steps=60, batch_size=16, lr=1e-2, model=model)
    result = train_text.train_text(cfg, tiny_features / "text", tmp_path / "model", tmp_path / "ckpt")
    first = sum(loss for _, loss in result.losses[:5]) / 5
    last = sum(loss for _, loss in result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # an untrained model stays at ~ln(vocabulary) = 5.7
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "model").iterdir() if p.suffix in (".bin", ".pt", ".pkl")]


def test_a_rerun_resumed_at_its_last_step_writes_the_same_bytes(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    # `dvc repro --force` after a finished run resumes at max_steps: no step runs, yet the model folder that
    # DVC hashes (weights, training.json) must not change.
    cfg = config(tiny_params)
    features = tiny_features / "text"
    train_text.train_text(cfg, features, tmp_path / "first", tmp_path / "ckpt")
    again = train_text.train_text(cfg, features, tmp_path / "again", tmp_path / "ckpt")
    assert again.resumed_from == cfg.train.max_steps
    for name in ("model.safetensors", "training.json", "tokenizer.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert json.loads((tmp_path / "again" / "training.json").read_text())["final_loss"] > 0


def test_kill_and_resume_ends_bit_identical(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    cfg = config(tiny_params)  # dropout 0.1: the restored RNG state matters
    features = tiny_features / "text"
    train_text.train_text(cfg, features, tmp_path / "straight", tmp_path / "ckpt_straight")

    interrupted = train_text.train_text(cfg, features, tmp_path / "resumed", tmp_path / "ckpt", stop_after=6)
    assert interrupted.steps == 6 and not (tmp_path / "resumed").exists()  # "crashed" before saving the model
    resumed = train_text.train_text(cfg, features, tmp_path / "resumed", tmp_path / "ckpt")
    assert resumed.resumed_from == 6

    straight, again = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_corrupt_newest_checkpoint_falls_back_and_keeps_the_file(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tiny_params)
    features = tiny_features / "text"
    train_text.train_text(cfg, features, tmp_path / "model", tmp_path / "ckpt", stop_after=8)
    (run_dir,) = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]  # beside it: the trainer's lock file
    newest = run_dir / "step-00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-copy, a bad disk

    with caplog.at_level(logging.WARNING):
        result = train_text.train_text(cfg, features, tmp_path / "model", tmp_path / "ckpt")
    assert result.resumed_from == 4
    assert "step-00000008.ckpt is unreadable" in caplog.text and "resuming from the previous one" in caplog.text
    assert (run_dir / "step-00000008.ckpt.corrupt").stat().st_size == 100  # kept, not deleted


def test_the_best_validated_step_is_saved(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    cfg = config(tiny_params, max_steps=12, validate_every=4, select_by="slot_error_rate")
    result = train_text.train_text(cfg, tiny_features / "text", tmp_path / "model", tmp_path / "ckpt", tmp_path / "curves")
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    selected = record["selected"]
    assert selected["metric"] == "slot_error_rate" and selected["step"] in (4, 8, 12)
    assert set(selected["metrics"]) == {"bleu", "chrf", "value_coverage", "slot_error_rate"}
    assert result.best is not None and selected["value"] == result.best.value
    # The saved weights are the selected step's, not necessarily the last step's.
    saved = weights(tmp_path / "model")
    assert all(torch.equal(saved[k], result.best.state[k]) for k in saved if k in result.best.state)
    # Validations are curves beside the loss (dvclive, or JSON lines without it).
    logged = "".join(p.read_text() for p in (tmp_path / "curves").rglob("*") if p.is_file() and p.suffix in (".tsv", ".jsonl"))
    assert "slot_error_rate" in logged


def test_timings_go_to_timing_json_never_to_the_curves_or_the_model(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    # Wall time and throughput differ on every run: they belong in timing.json (gitignored, no stage's output),
    # never in the curves and metrics.json git tracks, nor in training.json that DVC hashes.
    cfg = config(tiny_params, validate_every=0)
    train_text.train_text(cfg, tiny_features / "text", tmp_path / "model", tmp_path / "ckpt", tmp_path / "curves")
    timing = json.loads((tmp_path / "curves" / TIMING_FILE).read_text())
    assert timing["steps"] == cfg.train.max_steps and timing["resumed_from"] is None
    assert timing["seconds"] > 0 and timing["items_per_s"] > 0
    hashed = [p for p in (tmp_path / "curves").rglob("*") if p.is_file() and p.name != TIMING_FILE]
    hashed.append(tmp_path / "model" / "training.json")
    assert any(p.name == "loss.tsv" for p in hashed)
    for path in hashed:
        text = f"{path.relative_to(tmp_path)}\n{path.read_text()}"
        assert not [word for word in ("per_s", "second", "time", "items") if word in text], path


def test_checkpoints_of_another_config_are_not_resumed(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    features = tiny_features / "text"
    train_text.train_text(config(tiny_params), features, tmp_path / "a", tmp_path / "ckpt", stop_after=8)
    result = train_text.train_text(config(tiny_params, lr=1e-3), features, tmp_path / "b", tmp_path / "ckpt")
    assert result.resumed_from is None
    assert len([p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]) == 2  # each run keeps its own folder


def tiny_pretrained(folder: Path, features: Path, n_embd: int = 16, n_layer: int = 1) -> None:
    """A tiny GPT-2 and a tokenizer without our special tokens, saved the way the hub's models are."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(features / "tokenizer.json")))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def test_init_from_a_pretrained_folder(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    tiny_pretrained(tmp_path / "pretrained", tiny_features / "text")
    cfg = config(tiny_params, init_from=str(tmp_path / "pretrained"), max_steps=3)
    result = train_text.train_text(cfg, tiny_features / "text", tmp_path / "model", tmp_path / "ckpt")
    assert result.steps == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.n_positions == 64 and tokenizer.sep_token == "<|sep|>"
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)


def test_init_from_a_pickle_only_folder_is_refused(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    tiny_pretrained(tmp_path / "pretrained", tiny_features / "text")
    folder = tmp_path / "pretrained"
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cfg = config(tiny_params, init_from=str(folder))
    with pytest.raises(ConfigError, match=r"refusing .*only pickle weights \['pytorch_model.bin'\]"):
        train_text.train_text(cfg, tiny_features / "text", tmp_path / "model", tmp_path / "ckpt")
    assert not (tmp_path / "model").exists()


def test_invalid_training_params_name_the_key(tiny_params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="'train_text.precision' must be one of"):
        config(tiny_params, precision="fp8")
    with pytest.raises(ConfigError, match="'train_text.model.n_embd' .* multiple of n_head"):
        config(tiny_params, model={**tiny_params["train_text"]["model"], "n_embd": 15})


def test_learning_rate_warms_up_then_decays_to_the_floor(tiny_params: dict[str, Any]) -> None:
    cfg = TrainConfig.from_params(
        {**tiny_params["train_text"], "max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}, "train_text", seed=0
    )
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_bleu_matches_the_sacrebleu_command_line(tmp_path: Path) -> None:
    hypotheses = ["The red lamp is bright.", "A blue mug for home cooks.", "Minimal. Black."]
    refs_a = ["The red lamp is very bright.", "A blue mug made for home cooks.", "Minimal and black."]
    refs_b = ["Bright red lamp.", "The blue mug, for cooks at home.", "Black. Minimal."]
    for name, lines in (("hyp", hypotheses), ("a", refs_a), ("b", refs_b)):
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "sacrebleu", str(tmp_path / "a"), str(tmp_path / "b"), "-i", str(tmp_path / "hyp")]
    cli = subprocess.run(
        [*command, "-m", "bleu", "chrf", "-b", "-f", "text", "-w", "2"], capture_output=True, text=True, check=True
    )
    cli_bleu, cli_chrf = (float(line) for line in cli.stdout.split())
    ours = corpus_scores(hypotheses, [list(pair) for pair in zip(refs_a, refs_b, strict=True)])
    assert ours["bleu"] == pytest.approx(cli_bleu, abs=0.01) and ours["chrf"] == pytest.approx(cli_chrf, abs=0.01)
    assert ours["sacrebleu_signature"].startswith("nrefs:2|")


def test_variable_reference_counts() -> None:
    scored = corpus_scores(["a b c d", "e f g h"], [["a b c d"], ["x y z w", "e f g h"]])
    assert scored["bleu"] == pytest.approx(100.0)


def test_retrieval_baseline_picks_the_most_similar_source() -> None:
    train = [
        {"source_key": "1", "source": "name: A | colour: red | tone: minimal", "reference": "Red A."},
        {"source_key": "2", "source": "name: B | colour: blue | tone: playful", "reference": "Blue B!"},
    ]
    # The retrieved text is moved to the test source: its values replace the retrieved source's.
    assert evaluate_text.retrieval_baseline(train, ["name: C | colour: blue | tone: playful"]) == ["Blue C!"]
    assert evaluate_text.retrieval_baseline(train, ["name: D | colour: red"]) == ["Red D."]


@pytest.mark.slow
def test_evaluate_writes_metrics_and_outputs(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    train_text.train_text(config(tiny_params), tiny_features / "text", tmp_path / "model", tmp_path / "ckpt")
    cfg = evaluate_text.EvaluateTextConfig.from_params(section(tiny_params, "evaluate_text"))
    metrics = evaluate_text.evaluate_text(
        cfg, tmp_path / "model", tiny_features / "text", tmp_path / "text.json", tmp_path / "eval"
    )
    assert {"bleu", "chrf", "perplexity", "bleu_retrieval_baseline", "sacrebleu_signature"} <= set(metrics)
    test_sources = len({r["source_key"] for r in pq.read_table(tiny_features / "text" / "test.parquet").to_pylist()})
    assert metrics["test_sources"] == min(6, test_sources) and metrics["perplexity"] > 1
    assert 0 <= metrics["value_coverage"] <= 1 and 0 <= metrics["slot_error_rate"] <= 1
    assert metrics["value_coverage_retrieval_baseline"] is not None and metrics["split"]["by"] in ("group", "unknown")
    outputs = pq.read_table(tmp_path / "eval" / "outputs.parquet").to_pylist()
    assert {v["status"] for row in outputs for v in row["values"]} <= {"realised", "missing", "wrong"}
    assert all(len(row["values"]) == len(row["retrieval_values"]) > 0 for row in outputs)
    assert (tmp_path / "eval" / "outputs.parquet").is_file()
    assert len((tmp_path / "eval" / "samples.csv").read_text().splitlines()) == 1 + min(3, metrics["test_sources"])


def test_perplexity_is_exp_of_the_target_token_loss(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    from components.text_model import Examples, example_ids, make_batch

    tiny_pretrained(tmp_path / "model", tiny_features / "text")
    model, tokenizer = load_pretrained(tmp_path / "model", "test")
    rows = [
        {"model_source": "name: A | colour: red", "model_reference": "A red thing."},
        {"model_source": "name: B", "model_reference": "B, long."},
    ]
    pairs = [
        example_ids(tokenizer(r["model_source"])["input_ids"], tokenizer(r["model_reference"])["input_ids"], tokenizer, 64)
        for r in rows
    ]
    batch = make_batch(Examples([p[0] for p in pairs], [p[1] for p in pairs]), [0, 1], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = math.exp(float(model(**batch).loss))  # transformers' mean NLL over the target tokens
    ours = evaluate_text.perplexity(model, tokenizer, rows, batch_size=1, device=torch.device("cpu"))
    assert ours == pytest.approx(expected, rel=1e-4)


def run_ddp_worker(out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    worker = str(REPO_ROOT / "tests" / "components" / "ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    run = subprocess.run([*command, worker, str(out), *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "gan"])
def test_ddp_two_processes_agree_on_the_weights(tmp_path: Path, family: str) -> None:
    run_ddp_worker(tmp_path, family)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    start = torch.load(tmp_path / "initial.pt", weights_only=True)
    assert any(not torch.equal(start[k], rank0[k]) for k in start)  # it did train
