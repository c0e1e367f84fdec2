"""Champion / challenger comparisons: paired bootstrap per family, non-inferiority decision, history."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.metrics import corpus_scores as score
from monitoring.promotion import compare_image, compare_restore, compare_text, record
from tests.conftest import REPO_ROOT

SOURCES = [f"name: item {i} | colour: c{i % 7}" for i in range(60)]
REFERENCES = [[f"The item {i} comes in colour c{i % 7} and looks great .", f"Item {i} , colour c{i % 7} ."] for i in range(60)]


def outputs(hypotheses: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"source": SOURCES, "hypothesis": hypotheses, "references": REFERENCES})


def test_text_bleu_matches_sacrebleu_and_a_worse_challenger_is_not_promoted() -> None:
    good = [refs[0] for refs in REFERENCES]
    bad = [h.split(" and ")[0] + " ." if i % 2 else "something else entirely ." for i, h in enumerate(good)]
    kept = compare_text(outputs(good), outputs(bad), tolerance=1.0, samples=200, seed=0)
    assert kept.champion == pytest.approx(score(good, REFERENCES)["bleu"], abs=0.01)
    assert not kept.promote and kept.delta < -1.0 and kept.ci_high < 0 and "possibly worse" in kept.reason
    promoted = compare_text(outputs(bad), outputs(good), tolerance=1.0, samples=200, seed=0)
    assert promoted.promote and promoted.ci_low > 0
    same = compare_text(outputs(good), outputs(good), tolerance=0.0, samples=50, seed=0)
    assert same.promote and same.delta == 0 and same.ci_low == same.ci_high == 0


def test_restore_psnr_within_tolerance_is_promoted_and_a_clear_drop_is_not() -> None:
    champion = [{"record_id": f"p{i}", "psnr": 30.0 + i % 3} for i in range(12)]
    slightly = [{"record_id": f"p{i}", "psnr": 29.95 + i % 3} for i in range(12)]
    much_worse = [{"record_id": f"p{i}", "psnr": 28.0 + i % 3} for i in range(12)]
    assert compare_restore(champion, slightly, tolerance=0.2, samples=200, seed=0).promote
    decision = compare_restore(champion, much_worse, tolerance=0.2, samples=200, seed=0)
    assert not decision.promote and decision.delta == -2.0


def test_image_fid_comparison_prefers_features_closer_to_the_real_ones() -> None:
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(0, 1, (300, 4)))
    close = torch.from_numpy(rng.normal(0, 1, (300, 4)))
    far = torch.from_numpy(rng.normal(1.5, 1, (300, 4)))
    assert not compare_image(close, far, real, tolerance=0.1, samples=30, seed=0).promote
    better = compare_image(far, close, real, tolerance=0.1, samples=30, seed=0)
    assert better.promote and better.metric == "-fid_domain" and better.challenger > better.champion


def test_every_decision_is_recorded(tmp_path: Path) -> None:
    champion = [{"record_id": "a", "psnr": 30.0}, {"record_id": "b", "psnr": 31.0}]
    keep = compare_restore(champion, [{"record_id": "a", "psnr": 20.0}, {"record_id": "b", "psnr": 21.0}], 0.2, 50, 0)
    take = compare_restore(champion, [{"record_id": "a", "psnr": 31.0}, {"record_id": "b", "psnr": 32.0}], 0.2, 50, 0)
    record(tmp_path / "history.json", [keep], "retrain-1", promoted=False)
    record(tmp_path / "history.json", [take], "retrain-2", promoted=True)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [(h["experiment"], h["promoted"]) for h in history] == [("retrain-1", False), ("retrain-2", True)]
    assert history[0]["comparisons"][0]["reason"].startswith("psnr: challenger")


# One writer process: says it is ready, waits for the start signal so every writer appends at the same time.
APPEND = """
import sys, time
from pathlib import Path
from monitoring.promotion import record
history, start, name, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(start.parent / f"ready-{name}").touch()
while not start.exists():
    time.sleep(0.001)
for i in range(n):
    record(history, [], f"{name}-{i}", promoted=False)
"""


def test_concurrent_writers_lose_no_entry(tmp_path: Path) -> None:
    # Issue 15: an unlocked read-append-rewrite let one flow's decision overwrite another's.
    history, start, writers, entries = tmp_path / "history.json", tmp_path / "start", 6, 20
    names = [f"w{w}" for w in range(writers)]
    procs = [
        subprocess.Popen([sys.executable, "-c", APPEND, str(history), str(start), name, str(entries)], cwd=REPO_ROOT)
        for name in names
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{name}").exists() for name in names) and time.monotonic() < deadline:
            time.sleep(0.01)
        start.touch()
        assert [proc.wait(timeout=120) for proc in procs] == [0] * writers
    finally:
        for proc in procs:
            proc.kill()
    recorded = [h["experiment"] for h in json.loads(history.read_text())]
    assert sorted(recorded) == sorted(f"{name}-{i}" for name in names for i in range(entries))
    for name in names:  # each writer's own entries stay in its order
        assert [e for e in recorded if e.startswith(f"{name}-")] == [f"{name}-{i}" for i in range(entries)]
    assert not history.with_name(f".{history.name}.tmp").exists()
