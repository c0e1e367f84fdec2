"""The one source parser: each syntax, awkward values, round trips, free prompts, and the learned schema."""

from __future__ import annotations

import json

import pytest

from components import records
from components.records import (
    BRACKET,
    CATEGORICAL,
    FREE_TEXT,
    JSON,
    PIPE,
    PROMPT,
    canonical_source,
    infer_schema,
    key_order,
    parse_source,
    serialise,
    syntax_of,
)


def test_pipe_syntax() -> None:
    record = parse_source("name: Harbor | category: desk lamp | ratio: 3:1")
    assert record is not None and record.syntax == PIPE
    assert record.pairs == (("name", "Harbor"), ("category", "desk lamp"), ("ratio", "3:1"))


@pytest.mark.parametrize(
    "value",
    ["a, b", "a|b", "a | b", "x: y", "[draft]", 'say "hi"', "it's", "a [b] c", '50% off, [new] | 2:1 "x"'],
)
@pytest.mark.parametrize("syntax", [PIPE, BRACKET, JSON])
def test_awkward_values_round_trip(syntax: str, value: str) -> None:
    pairs = [("name", "Harbor"), ("note", value), ("price range", "cheap")]
    source = serialise(pairs, syntax)
    record = parse_source(source)
    assert record is not None, source
    assert record.syntax == syntax
    assert list(record.pairs) == pairs


def test_bracket_syntax_as_in_e2e() -> None:
    source = "name[The Eagle], eatType[coffee shop], food[Japanese], customer rating[5 out of 5], near[Burger King]"
    record = parse_source(source)
    assert record is not None and record.syntax == BRACKET
    assert record.as_dict() == {
        "name": "The Eagle",
        "eatType": "coffee shop",
        "food": "Japanese",
        "customer rating": "5 out of 5",
        "near": "Burger King",
    }


def test_bracket_values_with_commas_nested_and_escaped_brackets() -> None:
    record = parse_source(r"name[Blue, Red], size[large [XL]], note[a \] b], tag[x|y: z]")
    assert record is not None
    assert record.as_dict() == {"name": "Blue, Red", "size": "large [XL]", "note": "a ] b", "tag": "x|y: z"}
    assert serialise(record.pairs, BRACKET) == r"name[Blue, Red], size[large [XL]], note[a \] b], tag[x|y: z]"


def test_json_object_keeps_literals() -> None:
    record = parse_source('{"name": "Harbor", "price": 12.5, "in_stock": true, "tags": ["a", "b"]}')
    assert record is not None and record.syntax == JSON
    assert record.as_dict() == {"name": "Harbor", "price": "12.5", "in_stock": "true", "tags": '["a", "b"]'}
    assert record.literal_keys == {"price", "in_stock", "tags"}
    again = json.loads(record.reordered([1, 0, 2, 3]))
    assert list(again) == ["price", "name", "in_stock", "tags"] and again["price"] == 12.5 and again["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    "prompt",
    [
        "Write a cheerful description of a lamp.",
        "a lamp, amber, oak",
        "name: | category: lamp",  # empty value
        "name: a | name: b",  # repeated key
        "name[Harbor], category[lamp",  # unclosed bracket
        "name[Harbor] category[lamp]",  # no comma between pairs
        "[1, 2, 3]",
        "{not json}",
        '["a JSON list"]',
        "{}",
        "12: 30 | 1: 2",  # keys must start with a letter
        "Translate the following into French: Hello, world",  # a lone multi-word key is a sentence
        "Describe the list [1, 2, 3]",
        "Write four words about this: a lamp | b: c",  # a "key" of more than three words
        '{" a": 1, "a": 2}',  # keys equal once stripped
    ],
)
def test_free_prompts_pass_through(prompt: str) -> None:
    assert parse_source(prompt) is None
    assert syntax_of(prompt) == PROMPT
    assert canonical_source(prompt) == " ".join(prompt.casefold().split())


def test_a_value_may_end_in_a_backslash() -> None:
    record = parse_source("path: C:\\ | drive: c")
    assert record is not None and record.as_dict() == {"path": "C:\\", "drive": "c"}


def test_a_few_record_like_prompts_do_not_make_a_prompt_dataset_structured() -> None:
    sources = [f"write about lamp {i}" for i in range(99)] + ["Note: buy milk"]
    assert infer_schema(sources, max_categorical_values=10)["syntax"] == PROMPT
    assert infer_schema(sources[:2] + ["Note: a", "Note: b"], max_categorical_values=10)["syntax"] == PIPE


def test_canonical_source_ignores_order_and_syntax() -> None:
    pairs = [("name", "Harbor"), ("colour", "amber")]
    keys = {canonical_source(serialise(order, syntax)) for order in (pairs, pairs[::-1]) for syntax in (PIPE, BRACKET, JSON)}
    assert keys == {"colour: amber | name: Harbor"}


def test_schema_is_learned_from_the_sources() -> None:
    sources = [
        serialise([("name", f"Item {i}"), ("colour", ["red", "blue"][i % 2]), ("size", ["S", "M", "L"][i % 3])], BRACKET)
        for i in range(30)
    ] + ["a free prompt"]
    schema = infer_schema(sources, max_categorical_values=10)
    assert schema["syntax"] == BRACKET
    assert schema["syntaxes"] == {BRACKET: 30, PROMPT: 1}
    assert schema["order"] == ["name", "colour", "size"]  # the order records list them in
    assert key_order(json.loads(json.dumps(schema, sort_keys=True))) == ["name", "colour", "size"]  # survives sorting
    assert schema["keys"]["name"] == {"rows": 30, "distinct": 30, "kind": FREE_TEXT}
    assert schema["keys"]["colour"] == {"rows": 30, "distinct": 2, "kind": CATEGORICAL, "values": {"blue": 15, "red": 15}}
    assert schema["keys"]["size"]["kind"] == CATEGORICAL


def test_schema_stops_counting_a_keys_values_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "DISTINCT_VALUES_COUNTED", 5)
    sources = [serialise([("name", f"Item {i % 12}"), ("colour", ["red", "blue"][i % 2])], PIPE) for i in range(40)]
    schema = infer_schema(sources, max_categorical_values=3)
    assert schema["keys"]["name"] == {"rows": 40, "distinct": 5, "distinct_capped": True, "kind": FREE_TEXT}
    assert schema["keys"]["colour"] == {"rows": 40, "distinct": 2, "kind": CATEGORICAL, "values": {"blue": 20, "red": 20}}


def test_schema_of_free_prompts_has_no_keys() -> None:
    schema = infer_schema(["write about a lamp", "describe a chair"], max_categorical_values=10)
    assert schema["syntax"] == PROMPT and schema["keys"] == {}
