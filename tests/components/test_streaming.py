"""The data stages stream: run on an input many times their batch size with a tiny batch, each writes exactly
what it writes with the whole input in one batch (the in-memory result)."""

from __future__ import annotations

import filecmp
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import augment, clean, features, tables
from components.common import ConfigError, DataError
from components.datasets import TEXT_SCHEMA, builtin_digits
from components.image_io import encode_png
from components.records import BRACKET, JSON, PIPE, serialise
from components.tables import Rows
from components.workers import Workers
from tests.conftest import section

WHOLE = 1_000_000  # rows per batch that hold every test input in one batch


def text_rows(n: int, seed: int, given: bool = False, groups: bool = False) -> pa.Table:
    """Records in every syntax and free prompts, with exact and near duplicates, rows that clean to nothing,
    and optionally a group column and the user's own split."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        entity = rng.randrange(n // 5 + 1)
        pairs = [("title", f"Item {entity}"), ("kind", f"k{entity % 4}"), ("size", rng.choice(["S", "M", "L"]))]
        rng.shuffle(pairs)
        roll = rng.random()
        if roll < 0.15:
            source = f"write a short line about item {entity}"
        elif roll < 0.2:
            source = "<p></p>"  # empty once the tags are gone
        else:
            source = serialise(pairs, rng.choice([PIPE, BRACKET, JSON]))
        reference = rng.choice(
            [f"Item {entity} in size {pairs[0][1]}.", f"item {entity} in size {pairs[0][1]}!", f"Other {i % 9}."]
        )
        rows.append({"record_id": f"r{i}", "source": source, "reference": reference, "origin": "test", "ingest_error": None,
                     "group": f"g{entity % 11}" if groups and rng.random() < 0.8 else None,
                     "given_split": rng.choice(["train", "train", "val", "test", None]) if given else None})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=TEXT_SCHEMA)


@pytest.fixture
def clean_cfg(tiny_params: dict[str, Any]) -> clean.CleanConfig:
    return clean.CleanConfig.from_params(section(tiny_params, "clean"))


def same_result(a: clean.CleanResult, b: clean.CleanResult) -> None:
    assert a.kept.equals(b.kept)
    assert a.removed.equals(b.removed)
    assert (a.counts, a.split) == (b.counts, b.split)


@pytest.mark.parametrize(
    ("shape", "split"),
    [({}, clean.TextSplit()), ({}, clean.TextSplit("source")), ({"given": True}, clean.TextSplit()),
     ({"groups": True}, clean.TextSplit("group")), ({"given": True}, clean.TextSplit("group", "kind"))],
)  # fmt: skip
def test_clean_text_streams_row_for_row(clean_cfg: clean.CleanConfig, shape: dict[str, bool], split: clean.TextSplit) -> None:
    table = text_rows(600, seed=len(shape) + len(split.by), **shape)
    cfg = replace(clean_cfg, text_split=split)
    whole = clean.clean_text(table, replace(cfg, batch_rows=WHOLE))
    assert whole.removed.num_rows > 30 and whole.counts["exact_duplicates_removed"] and whole.counts["emptied_by_cleaning"]
    for batch_rows, workers in ((7, 1), (64, 2)):  # two processes clean as one does
        same_result(clean.clean_text(table, replace(cfg, batch_rows=batch_rows, workers=workers)), whole)


def test_clean_text_with_a_batch_that_cleaning_empties(clean_cfg: clean.CleanConfig) -> None:
    rows = [
        ("title: A | kind: x", "An A."),
        ("title: B | kind: y", "A B."),
        ("<p></p>", "<b></b>"),
        ("title: C | kind: x", "A C."),
    ]
    table = pa.Table.from_pylist(
        [{"record_id": f"r{i}", "source": s, "reference": r, "origin": "test", "ingest_error": None, "group": f"g{i % 2}",
          "given_split": None} for i, (s, r) in enumerate(rows)],
        schema=TEXT_SCHEMA,
    )  # fmt: skip
    cfg = replace(clean_cfg, text_split=clean.TextSplit("group"))
    whole = clean.clean_text(table, replace(cfg, batch_rows=WHOLE))
    assert whole.kept.num_rows == 3 and whole.counts["emptied_by_cleaning"] == 1
    for workers in (1, 2):  # the third batch is emptied whole
        same_result(clean.clean_text(table, replace(cfg, batch_rows=1, workers=workers)), whole)
    with pytest.raises(DataError, match="all 1 validated rows are empty once cleaned"):
        clean.clean_text(table.slice(2, 1), cfg)


def digit_images(copies: int = 40) -> pa.Table:
    """Digits, the first `copies` twice (exact duplicates), and a few larger RGB images."""
    digits = pa.Table.from_batches(list(builtin_digits(200))).slice(0, 200)
    twice = digits.slice(0, copies).set_column(0, "record_id", pa.array([f"copy{i}" for i in range(copies)]))
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(12)]
    colour = pa.Table.from_pylist(
        [{**digits.slice(0, 1).to_pylist()[0], "record_id": f"rgb{i}", "image": encode_png(p), "width": 48, "height": 40,
          "mode": "RGB", "channels": 3, "label": str(i % 3)} for i, p in enumerate(rgb)],
        schema=digits.schema,
    )  # fmt: skip
    return pa.concat_tables([digits, twice, colour])


def test_clean_images_streams_row_for_row() -> None:
    table = digit_images()
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    whole = clean.clean_images(table, fractions, seed=3, batch_rows=WHOLE)
    assert whole.counts["duplicates_removed"] == 40
    same_result(clean.clean_images(table, fractions, seed=3, batch_rows=9), whole)


def test_augment_streams_row_for_row(clean_cfg: clean.CleanConfig, tiny_params: dict[str, Any]) -> None:
    kept = clean.clean_text(text_rows(600, seed=5), clean_cfg).kept
    whole = augment.augment_text(kept, copies=2, seed=4, batch_rows=WHOLE)
    assert whole.num_rows > 300
    assert augment.augment_text(kept, copies=2, seed=4, batch_rows=11).equals(whole)

    images = clean.clean_images(digit_images(), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3).kept
    cfg = augment.AugmentConfig.from_params(section(tiny_params, "augment"))
    whole_images = augment.augment_images(images, cfg.images, seed=2, batch_rows=WHOLE)
    assert whole_images.num_rows > 100
    assert augment.augment_images(images, cfg.images, seed=2, batch_rows=13).equals(whole_images)

    photos = images.filter(pa.compute.equal(images.column("mode"), "RGB"))
    patches = [augment.restore_patch_batches(Rows.of_table(photos, n), 16, 3, seed=1) for n in (1, WHOLE)]
    one_by_one, at_once = (pa.concat_tables([augment.PATCH_SCHEMA.empty_table(), *p]) for p in patches)
    assert at_once.num_rows == 3 * photos.filter(pa.compute.equal(photos.column("split"), "train")).num_rows > 0
    assert one_by_one.equals(at_once)


def same_folder(a: Path, b: Path) -> None:
    """Every file byte-identical; a Parquet file may differ in row groups only (same table)."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in names:
        if name.suffix == ".parquet":
            assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_features_stream_file_for_file(clean_cfg: clean.CleanConfig, tiny_params: dict[str, Any], tmp_path: Path) -> None:
    kept = clean.clean_text(text_rows(900, seed=6), clean_cfg).kept
    extra = augment.augment_text(kept, copies=1, seed=1)
    cfg = features.FeaturesConfig.from_params(section(tiny_params, "features"))
    images = clean.clean_images(digit_images(), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3).kept
    extra_images = augment.augment_images(images, augment.AugmentConfig.from_params(section(tiny_params, "augment")).images, 1)
    for name, batch_rows, workers in (("whole", WHOLE, 1), ("batched", 17, 1), ("parallel", 17, 2)):
        out = tmp_path / name
        rows = features.text_features_stage(Rows.of_table(kept, batch_rows), Rows.of_table(extra, batch_rows),
                                            replace(cfg, batch_rows=batch_rows, workers=workers), out / "text",
                                            out / "text.parquet")  # fmt: skip
        assert rows == kept.num_rows
        features.image_features_stage(Rows.of_table(images, batch_rows), Rows.of_table(extra_images, batch_rows), cfg,
                                      out / "images", out / "images.parquet")  # fmt: skip
    same_folder(tmp_path / "whole", tmp_path / "batched")
    same_folder(tmp_path / "batched", tmp_path / "parallel")  # two processes write the same bytes as one
    meta = json.loads((tmp_path / "whole" / "images" / "meta.json").read_text())
    assert meta["channels"] == 3  # the RGB images make the layout RGB


def tagged_by_worker(context: str, item: int) -> tuple[str, int, int]:
    if item == 3:
        raise ValueError("item 3 is bad")
    return context, item, os.getpid()


def test_workers_keep_order_and_report_failures() -> None:
    with Workers(2) as workers:
        results = list(workers.map(tagged_by_worker, "ctx", (i for i in range(20) if i != 3)))
        assert [(c, i) for c, i, _ in results] == [("ctx", i) for i in range(20) if i != 3]
        assert os.getpid() not in {pid for *_, pid in results}  # the work ran in the spawned workers
        with pytest.raises(ValueError, match="item 3 is bad"):
            list(workers.map(tagged_by_worker, "ctx", range(10)))
    with Workers(1) as here:
        assert {pid for *_, pid in here.map(tagged_by_worker, "", [0, 1])} == {os.getpid()}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "all"])
def test_a_bad_worker_count_is_named(tiny_params: dict[str, Any], bad: object) -> None:
    params = section(tiny_params, "clean")
    with pytest.raises(ConfigError, match=r"params key 'base.data_workers' must be 0 \(one per core\) or a positive"):
        clean.CleanConfig.from_params({**params, "base": {**params["base"], "data_workers": bad}})
    assert clean.CleanConfig.from_params({**params, "base": {**params["base"], "data_workers": 3}}).workers == 3


ORPHAN_FILE = """
import sys
from components.workers import Workers
from tests.components.test_streaming import napping
with Workers(2) as workers:
    list(workers.map(napping, sys.argv[1], range(4)))
"""


def napping(folder: str, item: int) -> int:
    Path(folder, str(os.getpid())).touch()
    time.sleep(60)
    return item


def test_workers_stop_when_their_stage_is_killed(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO_ROOT

    stage = subprocess.Popen([sys.executable, "-c", ORPHAN_FILE, str(tmp_path)], cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while len(busy := list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(busy) == 2, "the workers never started their batches"
    workers = [psutil.Process(int(path.name)) for path in busy]
    stage.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel's signal can stop the workers
    stage.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        worker.kill()
    assert not alive, f"workers outlived their stage: {[w.pid for w in alive]}"


def test_worker_count_follows_the_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    from components import workers

    monkeypatch.setattr(workers, "_cgroup_cpu_quota", lambda: 0.5)
    assert workers.available_cores() == 1
    monkeypatch.setattr(workers, "_cgroup_cpu_quota", lambda: None)
    assert workers.available_cores() == len(os.sched_getaffinity(0))


def test_distinct_in_parts_is_one_sort(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    digests = rng.integers(0, 2**64, (6000, 2), dtype=np.uint64)
    digests[1000:3000] = digests[rng.integers(0, 1000, 2000)]  # repeats
    digests[3000:3010, 0] = digests[5, 0]  # first halves equal, second halves not: the two-half sort decides
    spill = tables.DigestSpill(tmp_path / "digests")
    for part in np.array_split(digests, 3):
        spill.append(part)
    on_disk = spill.array()
    assert isinstance(on_disk, np.memmap) and np.array_equal(on_disk, digests)
    subset = np.sort(rng.choice(len(digests), 4000, replace=False))
    for rows in (None, subset):
        whole = tables.distinct(digests, rows, part_rows=1 << 20)
        assert 0 < whole.count < (len(digests) if rows is None else len(rows))
        for part_rows in (1000, 97):  # 8 and 64 parts
            parts = tables.distinct(on_disk, rows, part_rows=part_rows)
            assert np.array_equal(parts.ids, whole.ids) and np.array_equal(parts.first, whole.first)
    assert tables.DigestSpill(tmp_path / "none").array().shape == (0, 2)


def test_tensor_sink_writes_what_safetensors_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"b_ids": rng.integers(0, 9, 50, dtype=np.int32), "a_offsets": np.arange(11, dtype=np.int64),
              "images": rng.integers(0, 255, (6, 3, 4, 4), dtype=np.uint8),
              "empty": np.zeros((0, 2), dtype=np.int64)}  # fmt: skip
    meta = {"label_names": ["a", "ä"], "rows": 6}
    features.save_arrays(arrays, tmp_path / "whole.safetensors", meta)
    sink = features.TensorSink(tmp_path / "streamed.safetensors")
    for name, array in arrays.items():
        sink.declare(name, array.dtype, array.shape[1:])
        for part in np.array_split(array, 3):
            sink.append(name, part)
    sink.close(meta)
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "streamed.safetensors").read_bytes()
    with (
        pytest.raises(ValueError, match=r"tensor images is uint8\[3, 4, 4\] per row"),
        features.TensorSink(tmp_path / "bad.safetensors") as bad,
    ):
        bad.append("images", arrays["images"])
        bad.append("images", arrays["images"][:, :1])
    with pytest.raises(ValueError, match="tensor weights is float32"), features.TensorSink(tmp_path / "bad.safetensors") as bad:
        bad.declare("weights", np.float32)
    assert not (tmp_path / "bad.safetensors").exists()


CLEAN_A_FILE = """
import sys
from pathlib import Path
from components import clean
from components.common import load_params
from components.tables import Rows
cfg = clean.CleanConfig.from_params(load_params("clean", sys.argv[1]))
folder = Path(sys.argv[2])
rows = Rows.of_file(folder / "valid.parquet", cfg.batch_rows)
outcome = clean.clean_text_rows(rows, cfg, folder / "kept.parquet", folder / "removed.parquet")
print(outcome.kept_rows + outcome.removed_rows)
"""
MEMORY_BOUND_MB = 1024  # issue 18's goal; the stage that read whole tables peaked at 2.6 GB here


@pytest.mark.slow
def test_clean_keeps_a_million_rows_within_the_memory_bound(tmp_path: Path, real_params: dict[str, Any]) -> None:
    import subprocess
    import sys
    import time

    import psutil

    from components.textgen import generate
    from tests.conftest import REPO_ROOT, write_params

    # 200 000 generated rows five times over, each copy's references told apart so that none is a duplicate:
    # a million rows to clean, at a fifth of the generator's time.
    generated = [row for chunk in generate(200_000 // 3 + 1, 3, seed=0, chunk_records=50_000) for row in chunk]
    n = len(generated)
    with pq.ParquetWriter(tmp_path / "valid.parquet", TEXT_SCHEMA, compression="zstd") as writer:
        for copy in range(5):
            columns = {"record_id": [f"r{copy}-{j}" for j in range(n)], "source": [s for _, s, _ in generated],
                       "reference": [f"{r} ({copy})" for _, _, r in generated], "origin": ["generated"] * n,
                       "ingest_error": [None] * n, "group": [None] * n, "given_split": [None] * n}  # fmt: skip
            writer.write_table(pa.table(columns, schema=TEXT_SCHEMA))
    rows = 5 * n
    # One process: the bound is on the stage's own memory; workers (each a stage process of its own) would
    # be measured apart.
    params = write_params({**real_params, "base": {**real_params["base"], "data_workers": 1}}, tmp_path / "params.yaml")
    child = subprocess.Popen([sys.executable, "-c", CLEAN_A_FILE, str(params), str(tmp_path)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = child.communicate()
    assert child.returncode == 0, err.decode()[-2000:]
    assert int(out.decode().split()[-1]) == pq.ParquetFile(tmp_path / "valid.parquet").metadata.num_rows
    assert peak / 2**20 < MEMORY_BOUND_MB, f"clean peaked at {peak / 2**20:.0f} MB on {rows} rows"
