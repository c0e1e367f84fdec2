from __future__ import annotations

from collections import defaultdict

import numpy as np

from components import textgen
from components.records import BRACKET, JSON, PIPE, parse_source, serialise


def rows(num_records: int, refs: int, seed: int) -> list[tuple[int, str, str]]:
    return [row for chunk in textgen.generate(num_records, refs, seed, chunk_records=7) for row in chunk]


def test_same_seed_same_data_and_other_seed_other_data() -> None:
    assert rows(30, 3, seed=5) == rows(30, 3, seed=5)
    assert rows(30, 3, seed=5) != rows(30, 3, seed=6)


def test_chunk_size_does_not_change_the_rows_of_the_first_chunk() -> None:
    first = next(textgen.generate(10, 2, 3, chunk_records=10))
    assert first == [row for chunk in textgen.generate(10, 2, 3, chunk_records=10) for row in chunk]


def test_each_record_has_distinct_references_that_name_it() -> None:
    by_record: dict[int, list[str]] = defaultdict(list)
    sources = {}
    for index, source, reference in rows(200, 3, seed=1):
        by_record[index].append(reference)
        sources[index] = source
    assert len(by_record) == 200
    for index, references in by_record.items():
        assert len(set(references)) == 3, references
        record = parse_source(sources[index])
        assert record is not None
        attributes = record.as_dict()
        for reference in references:
            assert attributes["name"] in reference
            assert attributes["colour"] in reference


def test_phrasing_varies_across_the_corpus() -> None:
    openings = {reference.split(" ")[0] for _, _, reference in rows(300, 3, seed=2)}
    assert len(openings) >= 10


def test_articles_agree_with_the_colour() -> None:
    text = " ".join(reference for _, _, reference in rows(500, 3, seed=4))
    assert " a ivory" not in text and " a ochre" not in text
    assert " an ivory" in text


def test_serialise_and_parse_round_trip_and_free_text_is_not_a_record() -> None:
    attributes = {"name": "Nova Air", "colour": "sage", "tone": "minimal"}
    record = parse_source(serialise(attributes))
    assert record is not None and record.as_dict() == attributes
    assert parse_source("write an ad for a lamp") is None
    assert parse_source("name: a | name: b") is None  # repeated key


def test_record_of_reads_back_any_syntax_and_only_demo_records() -> None:
    names = textgen.product_names(5, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        record = textgen.sample_record(rng, names)
        attributes = record.attributes()
        shuffled = dict(reversed(list(attributes.items())))
        for syntax in (PIPE, BRACKET, JSON):
            assert textgen.record_of(serialise(shuffled, syntax)) == record
    assert textgen.record_of("write an ad for a lamp") is None
    assert textgen.record_of(serialise({"name": "Nova Air", "colour": "sage"})) is None  # not every required key
    full = textgen.sample_record(rng, names).attributes()
    assert textgen.record_of(serialise({**full, "weight": "2 kg"})) is None  # a key the generator never writes
    assert textgen.record_of(serialise({**full, "category": "spaceship"})) is None


def test_a_copy_that_leaves_nothing_out_says_every_value() -> None:
    rng = np.random.default_rng(1)
    names = textgen.product_names(20, seed=1)
    left_out = 0
    for _ in range(200):
        record = textgen.sample_record(rng, names)
        optional = [v for k, v in record.attributes().items() if k in textgen.OPTIONAL]
        complete = textgen.write_copy(record, rng, leave_out=0.0).lower()
        assert all(value.lower() in complete for value in optional), (record, complete)
        usual = textgen.write_copy(record, rng).lower()
        left_out += sum(value.lower() not in usual for value in optional)
    assert left_out > 0  # the default copywriter does leave values out
