"""Slot metrics counted by hand, delexicalisation round trips, and a model that copies names it never saw."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from components import clean, evaluate_text, features, train_text
from components.datasets import TEXT_SCHEMA
from components.delex import HIDDEN, SHOWN, Delexicaliser, choose_keys, delexicalise_text, substitute, value_pattern, value_spans
from components.records import BRACKET, JSON, PIPE, serialise
from components.slots import MISSING, REALISED, WRONG, SlotLexicon, check_output, normalise, slot_scores
from tests.conftest import section

EAGLE = "name[The Eagle], food[Italian], area[riverside], priceRange[£20-25]"
SPICE = "name[Blue Spice], food[French], area[city centre], priceRange[cheap]"
SPICE_BAR = "name[Blue Spice Bar], food[Thai], area[riverside], priceRange[cheap]"


def statuses(source: str, output: str, lexicon: SlotLexicon) -> dict[str, str]:
    return {v["key"]: v["status"] for v in check_output(source, output, lexicon).values}


def test_slot_statuses_and_rates_counted_by_hand() -> None:
    lexicon = SlotLexicon.from_sources([EAGLE, SPICE, SPICE_BAR])
    # name realised, food wrong (another food of the data), area realised, price range left out.
    first = check_output(EAGLE, "The Eagle serves French food by the riverside.", lexicon)
    assert {v["key"]: v["status"] for v in first.values} == {
        "name": REALISED, "food": WRONG, "area": REALISED, "priceRange": MISSING,
    }  # fmt: skip
    # Every value said (price range in another spelling of the same words), and another venue named.
    second = check_output(SPICE, "Blue Spice is a cheap French place in the City-Centre, next to The Eagle.", lexicon)
    assert second.count(REALISED) == 4 and second.hallucinated == ["the eagle"]
    scores = slot_scores([first, second], has_entities=True)
    assert scores["values"] == 8 and scores["missing_values"] == 1 and scores["wrong_values"] == 1
    assert scores["value_coverage"] == pytest.approx(6 / 8)
    assert scores["slot_error_rate"] == pytest.approx(2 / 8)
    assert scores["hallucinated_names"] == pytest.approx(1 / 2)


def test_a_name_inside_the_sources_own_name_is_not_a_hallucination() -> None:
    lexicon = SlotLexicon.from_sources([SPICE, SPICE_BAR])
    check = check_output(SPICE_BAR, "Blue Spice Bar serves cheap Thai food by the riverside.", lexicon)
    assert check.hallucinated == [] and check.count(REALISED) == 4


def test_numbers_yes_no_values_and_synonyms() -> None:
    source = "rating: 3 | familyFriendly: yes | seats: 1,200 | name: Hall"
    lexicon = SlotLexicon.from_sources([source])
    assert statuses(source, "Hall has three stars, 1200 seats and is family friendly.", lexicon) == dict.fromkeys(
        ["rating", "familyFriendly", "seats", "name"], REALISED
    )
    assert statuses(source, "Hall: 3 stars, 1200 seats, kids welcome.", lexicon)["familyFriendly"] == MISSING
    with_synonyms = SlotLexicon.from_sources([source], {"familyFriendly": {"yes": ["kids welcome"]}})
    assert statuses(source, "Hall: 3 stars, 1200 seats, kids welcome.", with_synonyms)["familyFriendly"] == REALISED
    assert normalise("Mid-Range, 1,000") == ("mid", "range", "1000")
    # Polarity: "not family friendly" says `no` and contradicts `yes`; a stray "one" is no rating.
    no_kids = "rating: 1 | familyFriendly: no | name: Bar"
    both = SlotLexicon.from_sources([source, no_kids])
    assert statuses(no_kids, "Bar isn't family friendly, rated one.", both) == dict.fromkeys(
        ["rating", "familyFriendly", "name"], REALISED
    )
    assert statuses(source, "Hall is a nice one, not family friendly.", both)["familyFriendly"] == WRONG
    assert statuses(source, "Hall is a nice one, not family friendly.", both)["rating"] == MISSING
    # Synonyms written as YAML reads them (an unquoted yes is True) still apply.
    from components.evaluate_text import synonyms_from_params

    assert synonyms_from_params({"familyFriendly": {True: ["kids welcome"]}}, "k") == {
        "familyFriendly": {"yes": ["kids welcome"]}
    }


def test_no_entity_key_means_no_hallucination_figure_and_prompts_have_no_values() -> None:
    lexicon = SlotLexicon.from_sources(["colour: red | size: big", "Write a poem"])
    checks = [check_output("colour: red | size: big", "A big red one.", lexicon), check_output("Write a poem", "Roses.", lexicon)]
    scores = slot_scores(checks, has_entities=bool(lexicon.entity_keys))
    assert scores["hallucinated_names"] is None and scores["value_coverage"] == 1.0 and scores["values"] == 2


@pytest.mark.parametrize("syntax", [PIPE, BRACKET, JSON])
def test_delexicalisation_round_trip(syntax: str) -> None:
    pairs = [("name", "Dr. Mo's Café"), ("near", "Café Rouge"), ("price", "£20-25"), ("rating", "5"), ("area", "city centre")]
    source = serialise(pairs, syntax)
    reference = (
        "City centre favourite Dr. Mo's Café, near Café Rouge, costs £20-25 and is rated 5 of 5. Dr. Mo's Café stays open late."
    )
    delexicaliser = Delexicaliser({"name": HIDDEN, "near": HIDDEN, "price": HIDDEN, "rating": HIDDEN, "area": SHOWN})
    delexicalised = delexicaliser.delexicalise(source, reference)
    assert delexicalised == (
        "<|area|> favourite <|name|>, near <|near|>, costs <|price|> and is rated <|rating|> of <|rating|>. "
        "<|name|> stays open late."
    )
    # Filled back in, the text is the reference again (a value starting a sentence is capitalised there).
    assert delexicaliser.relexicalise(source, delexicalised) == reference
    model_source = delexicaliser.model_source(source)
    assert "Café" not in model_source and "city centre" in model_source and "<|name|>" in model_source


def test_value_search_finds_what_the_value_regex_finds() -> None:
    # The ASCII substring search must give the regex's spans exactly: longest value first at a position,
    # whole words only, any case, no overlaps; other text goes through the regex itself.
    rng = random.Random(1)
    alphabet = "aAbB _.-1"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        values = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 4))]
        pattern = value_pattern(values)
        assert value_spans(text, values) == ([m.span() for m in pattern.finditer(text)] if pattern else []), (text, values)
    assert value_spans("Café Noir at the café", ["café"]) == [(0, 4), (17, 21)]
    assert delexicalise_text("The Blue Spice Bar, not blue spice.", {"<|a|>": "Blue Spice", "<|b|>": "Blue Spice Bar"}) == (
        "The <|b|>, not <|a|>."
    )


def test_relexicalisation_drops_a_placeholder_the_source_cannot_fill() -> None:
    delexicaliser = Delexicaliser({"name": HIDDEN, "near": HIDDEN})
    assert delexicaliser.relexicalise("name: Zizzi", "<|name|> is near <|near|>, in town.") == "Zizzi is near, in town."


def test_keys_are_copied_when_references_repeat_their_values() -> None:
    rows = [
        (f"name: N{i} | mood: {'happy' if i % 2 else 'sad'} | code: x{i}", f"N{i} feels {'glad' if i % 2 else 'sad'}.")
        for i in range(10)
    ]
    delexicaliser, shares = choose_keys(rows, 0.5, categorical=["mood"])
    assert shares == {"name": 1.0, "mood": 0.5, "code": 0.0}
    assert dict(delexicaliser.keys) == {"name": HIDDEN, "mood": SHOWN}


def test_retrieval_answers_are_moved_to_the_test_source() -> None:
    text = substitute("The Eagle is an Italian place by the riverside.", EAGLE, "name[Zizzi], food[Thai]")
    assert text == "Zizzi is an Thai place by the riverside."  # area kept: the test source has none
    # Yes / no and bare numbers are too common to swap wherever they appear.
    moved = substitute(
        "No kids, 5 tables at The Eagle.", "name: The Eagle | kids: no | tables: 5", "name: Zizzi | kids: yes | tables: 1"
    )
    assert moved == "No kids, 5 tables at Zizzi."


# --- a model that copies ------------------------------------------------------------------------------

SYLLABLES = ("ka", "lo", "mi", "ve", "ru", "to", "ne", "sa", "di", "po", "zu", "fe")
CUISINES = ("Thai", "Italian", "Indian", "French")
AREAS = ("riverside", "city centre")


def venue_table(venues: int = 240, per_venue: int = 2) -> pa.Table:
    """Records of invented venues, `per_venue` each with other attributes, and two templated references."""
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(venues):
        a, b, c = (SYLLABLES[int(i)] for i in rng.integers(len(SYLLABLES), size=3))
        name = f"{a}{b}{c}".capitalize()
        for _ in range(per_venue):
            cuisine, area = str(rng.choice(CUISINES)), str(rng.choice(AREAS))
            source = f"name[{name}], food[{cuisine}], area[{area}]"
            rows.append((source, f"{name} serves {cuisine} food in the {area}."))
            rows.append((source, f"In the {area}, {name} is a {cuisine} place."))
    n = len(rows)
    return pa.table(
        {"record_id": [f"r{i}" for i in range(n)], "source": [s for s, _ in rows], "reference": [r for _, r in rows],
         "origin": ["test"] * n, "ingest_error": [None] * n, "group": [None] * n, "given_split": [None] * n},
        schema=TEXT_SCHEMA,
    )  # fmt: skip


def train_and_score(tiny_params: dict[str, Any], kept: pa.Table, out: Path, delexicalise: bool) -> dict[str, Any]:
    text = {**tiny_params["features"]["text"], "vocab_size": 400, "delexicalise": delexicalise}
    cfg = features.FeaturesConfig.from_params({**tiny_params["features"], "text": text})
    empty = pa.table({"record_id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                      "reference": pa.array([], pa.string()), "source_key": pa.array([], pa.string())})  # fmt: skip
    features.text_features_stage(kept, empty, cfg, out / "features")
    model = {"n_layer": 2, "n_head": 2, "n_embd": 48, "max_length": 64, "dropout": 0.0}
    train = section(tiny_params, "train_text") | {"model": model, "max_steps": 250, "batch_size": 16, "lr": 3e-3,
                                                  "warmup_steps": 20, "checkpoint_every": 250, "validate_every": 0}  # fmt: skip
    train_text.train_text(train_text.TrainTextConfig.from_params(train), out / "features", out / "model", out / "ckpt")
    evaluation = section(tiny_params, "evaluate_text") | {"max_new_tokens": 24, "max_sources": None, "batch_size": 32}
    return evaluate_text.evaluate_text(
        evaluate_text.EvaluateTextConfig.from_params(evaluation), out / "model", out / "features", out / "text.json", out / "eval"
    )


def test_a_delexicalised_model_copies_names_it_never_saw(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    cfg = clean.CleanConfig.from_params(section(tiny_params, "clean"))
    kept = clean.clean_text(venue_table(), replace(cfg, near_duplicates=False)).kept

    def names(split: str) -> set[str]:
        pairs = zip(kept.column("source").to_pylist(), kept.column("split").to_pylist(), strict=True)
        return {source.split("]")[0] for source, where in pairs if where == split}

    assert names("test") and not names("test") & names("train")  # the group split: test venues are new

    copying = train_and_score(tiny_params, kept, tmp_path / "on", delexicalise=True)
    guessing = train_and_score(tiny_params, kept, tmp_path / "off", delexicalise=False)
    assert json.loads((tmp_path / "on" / "model" / "copying.json").read_text())["keys"]["name"] == HIDDEN
    assert not (tmp_path / "off" / "model" / "copying.json").exists()
    assert copying["value_coverage_by_key"]["name"] >= 0.9, copying
    assert guessing["value_coverage_by_key"]["name"] <= copying["value_coverage_by_key"]["name"] - 0.3, guessing
    assert copying["hallucinated_names"] <= 0.02, copying


def test_a_missing_placeholder_is_favoured_and_ends_are_barred_until_it_is_written() -> None:
    import torch

    from components.text_model import RequirePlaceholders

    # Two sources, two beams each; prompt of width 2; token 9 = end, 5 and 6 = placeholders.
    processor = RequirePlaceholders([[5, 6], []], prompt_width=2, eos_token_id=9, bonus=2.0, block_end=True)
    input_ids = torch.tensor([[1, 2, 5, 3], [1, 2, 5, 6], [1, 2, 3, 3], [1, 2, 4, 4]])
    scores = processor(input_ids, torch.zeros(4, 10))
    assert scores[0, 6] == 2.0 and scores[0, 5] == 0.0 and scores[0, 9] == float("-inf")  # 6 still missing
    assert torch.equal(scores[1], torch.zeros(10))  # both written: left alone
    assert torch.equal(scores[2:], torch.zeros(2, 10))  # the second source needs nothing
    # A placeholder in the prompt (a hidden source value) does not count as written.
    greedy = RequirePlaceholders([[5]], prompt_width=2, eos_token_id=9, bonus=2.0, block_end=False)
    scores = greedy(torch.tensor([[5, 2, 3]]), torch.zeros(1, 10))
    assert scores[0, 5] == 2.0 and scores[0, 9] == 0.0


def test_values_the_references_never_say_are_not_measured_unless_synonyms_say_them() -> None:
    rows = [(f"name: N{i} | tone: playful | price: budget", f"N{i} is fun and easy on the wallet.") for i in range(6)]
    lexicon = SlotLexicon.from_training(rows, ["name: M | tone: minimal | price: budget"])
    assert lexicon.unsaid == {("tone", "playful"), ("price", "budget")}
    check = check_output("name: M | tone: minimal | price: budget", "M is nice.", lexicon)
    # `price: budget` is not measured; nor is `tone: minimal`, unseen, since no tone is ever said.
    assert [(v["key"], v["status"]) for v in check.values] == [("name", REALISED)]
    assert lexicon.unsaid_keys == {"tone", "price"}
    # A key some of whose values are said measures its unseen values.
    mixed = SlotLexicon.from_training([*rows, ("name: K | price: cheap", "K is cheap.")] * 2)
    assert "price" not in mixed.unsaid_keys
    assert [v["key"] for v in check_output("name: M | price: dear", "M.", mixed).values] == ["name", "price"]
    said = SlotLexicon.from_training(rows, synonyms={"price": {"budget": ["easy on the wallet"]}})
    assert said.unsaid == {("tone", "playful")}


def test_the_placeholder_bonus_waits_for_a_clause_boundary() -> None:
    import torch

    from components.text_model import RequirePlaceholders

    processor = RequirePlaceholders([[5]], prompt_width=1, eos_token_id=9, bonus=2.0, block_end=True, after_tokens=frozenset({3}))
    mid_sentence = processor(torch.tensor([[1, 4]]), torch.zeros(1, 10))
    assert mid_sentence[0, 5] == 0.0 and mid_sentence[0, 9] == float("-inf")  # no bonus, but no end either
    after_full_stop = processor(torch.tensor([[1, 4, 3]]), torch.zeros(1, 10))
    assert after_full_stop[0, 5] == 2.0
    assert processor(torch.tensor([[1]]), torch.zeros(1, 10))[0, 5] == 0.0  # the first token is the model's own
