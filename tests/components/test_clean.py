from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from components import clean
from components.common import ConfigError, assign_splits
from components.datasets import TEXT_SCHEMA
from components.records import parse_source
from tests.conftest import run_data_stages, section


@pytest.fixture
def cfg(tiny_params: dict[str, Any]) -> clean.CleanConfig:
    return clean.CleanConfig.from_params(section(tiny_params, "clean"))


def normalised(text: str, mask_pii: bool = True) -> str:
    return clean.normalise_text(pa.array([text]), mask_pii).to_pylist()[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Cafe\u0301", "Caf\u00e9"),  # NFD -> NFC
        ("  lots \t of\n\nspace  ", "lots of space"),
        ("bell\x07 and\u200b zero-width", "bell and zero-width"),  # control and format characters
        ("<p>Hello <b>world</b></p>", "Hello world"),
        ("Fish &amp; chips &#x2013; &lt;3", "Fish & chips \u2013 <3"),  # entities decoded, not mistaken for tags
        ("price < 30 and > 10", "price < 30 and > 10"),  # comparison signs are not tags
    ],
)
def test_normalisation(raw: str, expected: str) -> None:
    assert normalised(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Mail jane.doe+ads@example.co.uk now", "Mail [EMAIL] now"),
        ("Call 555-123-4567 today", "Call [PHONE] today"),
        ("Call (020) 7946 0958 today", "Call [PHONE] today"),
        ("Call +44 20 7946 0958 today", "Call [PHONE] today"),
        ("Only 2024 units at 19.99, model X-200", "Only 2024 units at 19.99, model X-200"),
    ],
)
def test_pii_masking(raw: str, expected: str) -> None:
    assert normalised(raw) == expected
    assert normalised(raw, mask_pii=False) == raw


def table(
    rows: list[tuple[str, str]], groups: list[str | None] | None = None, splits: list[str | None] | None = None
) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "record_id": [f"r{i}" for i in range(n)],
            "source": [r[0] for r in rows],
            "reference": [r[1] for r in rows],
            "origin": ["t"] * n,
            "ingest_error": [None] * n,
            "group": groups or [None] * n,
            "given_split": splits or [None] * n,
        },
        schema=TEXT_SCHEMA,
    )


def test_duplicates_and_emptied_rows_are_removed_and_kept_aside(cfg: clean.CleanConfig) -> None:
    source = "name: A | colour: red"
    reordered = "colour: red | name: A"
    rows = [
        (source, "The red A."),
        (source, "The red A."),  # exact duplicate
        (reordered, "The  red A."),  # same record, reordered; equal after whitespace cleaning
        (source, "the RED a!"),  # near duplicate
        (source, "<br>"),  # empty after cleaning
        (source, "A different sentence."),
    ]
    result = clean.clean_text(table(rows), cfg)
    assert result.kept.column("record_id").to_pylist() == ["r0", "r5"]
    reasons = dict(
        zip(result.removed.column("record_id").to_pylist(), result.removed.column("removed_because").to_pylist(), strict=True)
    )
    assert reasons == {"r1": "exact duplicate", "r2": "exact duplicate", "r3": "near duplicate", "r4": "empty after cleaning"}
    assert result.counts["duplicates_removed"] == 3 and result.counts["emptied_by_cleaning"] == 1
    assert result.kept.num_rows + result.removed.num_rows == len(rows)


def test_near_duplicates_switch(cfg: clean.CleanConfig) -> None:
    rows = [("name: A", "The red A."), ("name: A", "the RED a!")]
    off = clean.CleanConfig(**{**cfg.__dict__, "near_duplicates": False})
    assert clean.clean_text(table(rows), off).kept.num_rows == 2
    assert clean.clean_text(table(rows), cfg).kept.num_rows == 1


def test_split_is_by_source_so_no_source_spans_two_splits(cfg: clean.CleanConfig) -> None:
    rows = []
    for i in range(300):
        attributes = [f"name: P{i}", f"colour: c{i % 7}", "tone: minimal"]
        for j in range(3):
            order = attributes[j:] + attributes[:j]  # the same record with its attributes in other orders
            rows.append((" | ".join(order), f"Copy {j} of P{i}."))
    result = clean.clean_text(table(rows), cfg)
    splits_per_source: dict[str, set[str]] = {}
    for key, split in zip(result.kept.column("source_key").to_pylist(), result.kept.column("split").to_pylist(), strict=True):
        splits_per_source.setdefault(key, set()).add(split)
    assert len(splits_per_source) == 300
    assert all(len(s) == 1 for s in splits_per_source.values())
    counts = {s: sum(1 for v in splits_per_source.values() if s in v) for s in ("train", "val", "test")}
    assert 200 < counts["train"] < 280 and counts["val"] > 10 and counts["test"] > 10


def test_split_is_deterministic_and_independent_of_other_rows() -> None:
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    keys = [f"k{i}" for i in range(500)]
    full = assign_splits(keys, fractions, seed=1)
    assert full == assign_splits(keys, fractions, seed=1)
    assert assign_splits(keys[:250], fractions, seed=1) == full[:250]  # new data does not move old rows
    assert full != assign_splits(keys, fractions, seed=2)


def test_small_sets_still_get_every_split() -> None:
    splits = assign_splits([f"photo{i}" for i in range(5)], {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    assert set(splits) == {"train", "val", "test"}


def test_image_duplicates_by_pixels(tiny_params: dict[str, Any]) -> None:
    from components.datasets import builtin_digits

    digits = pa.Table.from_batches(list(builtin_digits(100))).slice(0, 20)
    doubled = pa.concat_tables([digits, digits.slice(0, 5).set_column(0, "record_id", pa.array([f"copy{i}" for i in range(5)]))])
    result = clean.clean_images(doubled, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    assert result.kept.num_rows == 20 and result.counts["duplicates_removed"] == 5
    assert set(result.removed.column("record_id").to_pylist()) == {f"copy{i}" for i in range(5)}


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": 0.8, "val": 0.1}, "'clean.splits' must have exactly the keys"),
        ({"train": 0.8, "val": 0.1, "test": 0.2}, "must sum to 1"),
        ({"train": 1.0, "val": 0.0, "test": 0.0}, "train and test fractions must be > 0"),
    ],
)
def test_invalid_split_params_name_the_key(tiny_params: dict[str, Any], splits: dict[str, float], message: str) -> None:
    params = section(tiny_params, "clean")
    params["splits"] = splits
    with pytest.raises(ConfigError, match=message):
        clean.CleanConfig.from_params(params)


def test_clean_writes_metrics_that_add_up(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    run_data_stages(tiny_params, tmp_path)
    metrics_path = tmp_path / "metrics" / "data.json"
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics) == {"text", "images", "restore"}
    for m in metrics.values():
        assert m["rows_in"] == m["rows_valid"] + m["rows_quarantined"]
        assert m["rows_valid"] == m["rows_clean"] + m["duplicates_removed"] + m["emptied_by_cleaning"]
        assert sum(m["splits"].values()) == m["rows_clean"]
        assert all(v > 0 for v in m["splits"].values())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"q": "say &quot;hi&quot;",  "n":12}', '{"q": "say \\"hi\\"", "n": 12}'),  # still JSON, one spelling
        ("a: x &#124; y | b: <i>z</i>", "a: x \\| y | b: z"),  # an entity decoded to ` | ` is escaped in its value
        ("name[<b>Eagle</b>],food[Thai ]", "name[Eagle], food[Thai]"),
        ("name[Eagle], note[<br>]", "name[Eagle]"),  # a pair left empty is dropped
        ("Mail me at jane@example.com", "Mail me at [EMAIL]"),  # a free prompt, cleaned whole
    ],
)
def test_records_are_cleaned_value_by_value_and_keep_their_syntax(raw: str, expected: str) -> None:
    from components.records import parse_source

    cleaned = clean.clean_sources(pa.array([raw, raw]), mask_pii=True).to_pylist()
    assert cleaned == [expected, expected]
    before, after = parse_source(raw), parse_source(expected)
    assert (before is None) == (after is None)
    if before is not None and after is not None:
        assert before.syntax == after.syntax


# --- how text is split --------------------------------------------------------------------------------


def entity_rows(entities: int = 60, per_entity: int = 4) -> list[tuple[str, str]]:
    """Records of `entities` venues, each several times with other attributes (as real corpora have them)."""
    foods = ["Italian", "French", "Thai", "Indian", "Greek"]
    rows = []
    for e in range(entities):
        for k in range(per_entity):
            food, area = foods[(e + k) % len(foods)], ["riverside", "city centre"][k % 2]
            source = f"name[Venue {e}], food[{food}], area[{area}]"
            rows.append((source, f"Venue {e} serves {food} food in the {area}."))
    return rows


def splits_of(kept: pa.Table, key: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for value, split in zip(kept.column(key).to_pylist(), kept.column("split").to_pylist(), strict=True):
        out.setdefault(value, set()).add(split)
    return out


def test_auto_split_groups_records_by_their_entity_key(cfg: clean.CleanConfig) -> None:
    rows = entity_rows()
    result = clean.clean_text(table(rows), cfg)
    names = [parse_source(s).as_dict()["name"] for s in result.kept.column("source").to_pylist()]
    kept = result.kept.append_column("entity", pa.array(names))
    assert all(len(s) == 1 for s in splits_of(kept, "entity").values()), "an entity is in two splits"
    assert set(kept.column("split").to_pylist()) == {"train", "val", "test"}
    assert result.split == {"by": "group", "group": "name", "groups": 60}
    assert result.counts["split_by"] == "group" and result.counts["split_group"] == "name"
    # The source hash, asked for, spreads the same venue over the splits (the leak the group split prevents).
    by_source = clean.clean_text(table(rows), replace(cfg, text_split=clean.TextSplit("source")))
    names = [parse_source(s).as_dict()["name"] for s in by_source.kept.column("source").to_pylist()]
    leaked = splits_of(by_source.kept.append_column("entity", pa.array(names)), "entity")
    assert any(len(s) > 1 for s in leaked.values()) and by_source.split == {"by": "source"}


def test_group_column_split_merges_groups_that_share_a_source(cfg: clean.CleanConfig) -> None:
    rows = [(f"topic: t{i % 40}", f"Text {i}.") for i in range(200)]
    groups = [f"author{i % 25}" if i % 2 else f" Author{i % 25} " for i in range(200)]  # case and spaces differ
    result = clean.clean_text(table(rows, groups=groups), cfg)
    kept = result.kept
    assert result.split["by"] == "group" and result.split["group"] == "column"
    folded = kept.append_column("folded", pa.array([g.strip().casefold() for g in kept.column("group").to_pylist()]))
    assert all(len(s) == 1 for s in splits_of(folded, "folded").values())
    assert all(len(s) == 1 for s in splits_of(kept, "source_key").values())
    # 40 topics x 25 authors, each topic written by several authors: everything is connected into fewer units.
    assert result.split["groups"] < 25


def test_group_split_by_a_named_attribute_and_its_errors(cfg: clean.CleanConfig) -> None:
    rows = entity_rows()
    by_food = clean.clean_text(table(rows), replace(cfg, text_split=clean.TextSplit("group", "food")))
    assert by_food.split["group"] == "food"
    foods = [parse_source(s).as_dict()["food"] for s in by_food.kept.column("source").to_pylist()]
    assert all(len(s) == 1 for s in splits_of(by_food.kept.append_column("food", pa.array(foods)), "food").values())
    with pytest.raises(ConfigError, match="'clean.text_split.group' names 'colour'"):
        clean.clean_text(table(rows), replace(cfg, text_split=clean.TextSplit("group", "colour")))
    prompts = [(f"Write about item {i}", f"Item {i} is good.") for i in range(20)]
    with pytest.raises(ConfigError, match="'clean.text_split.by' is 'group' but there is no group"):
        clean.clean_text(table(prompts), replace(cfg, text_split=clean.TextSplit("group")))
    assert clean.clean_text(table(prompts), cfg).split == {"by": "source"}  # auto: nothing to group by


def test_given_split_keeps_rows_where_the_user_put_them(cfg: clean.CleanConfig) -> None:
    rows = entity_rows(entities=10, per_entity=2)
    splits = ["test" if i % 5 == 0 else "val" if i % 5 == 1 else "train" for i in range(len(rows))]
    rows.append(rows[0])  # the same row in train as in test: the user's test set keeps it, train does not
    splits.append("train")
    rows.append(rows[2])  # a duplicate inside one split is still dropped
    splits.append(splits[2])
    result = clean.clean_text(table(rows, splits=splits), cfg)
    kept = dict(zip(result.kept.column("record_id").to_pylist(), result.kept.column("split").to_pylist(), strict=True))
    # The test row stays in test; its copy in train is set aside (never trained on), as is the in-split duplicate.
    assert kept == {f"r{i}": split for i, split in enumerate(splits) if i < len(rows) - 2}
    assert result.split == {"by": "given", "sources_in_two_splits": 1, "train_rows_dropped": 1}
    reasons = result.removed.column("removed_because").to_pylist()
    assert sorted(reasons) == ["exact duplicate", "train row of a source in the given val or test split"]
    with pytest.raises(ConfigError, match="'clean.text_split.by' is 'given' but the data has no split"):
        clean.clean_text(table(rows), replace(cfg, text_split=clean.TextSplit("given")))
