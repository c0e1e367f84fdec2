from __future__ import annotations

from collections import defaultdict

from components import textgen
from components.records import parse_source, serialise


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
