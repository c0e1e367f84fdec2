"""Slot metrics for data-to-text: does the output say the values its source gives, and only those?

For every (key, value) pair of a record source, the output either realises the value, names another value
of the same key instead (`wrong`), or leaves it out (`missing`). Matching is on normalised words:
case-folded, NFKC, punctuation dropped (`mid-range` = `mid range`), a value's numbers up to twenty in either
spelling (`3` = `three`) and thousands separators removed (`1,000` = `1000`). A key can have synonyms
(`{key: {value: [other wordings]}}`, from `evaluate_text.synonyms`), and a yes/no value is said when the
output names its key with the right polarity (`familyFriendly: yes` -> "family friendly", `no` -> "not
family friendly"; the other way round is a wrong value).

- `value_coverage`: realised values / source values;
- `slot_error_rate`: (missing + wrong) values / source values, the slot error rate of the data-to-text
  literature without its `added` term (an added entity is `hallucinated_names`);
- `hallucinated_names`: the share of outputs that name an entity (a value of an entity key,
  `records.is_entity_key`, anywhere in the data) that their source does not give.

Only values that can be said are counted. A (key, value) pair that the training references say in under
half the rows that have it (a style attribute such as `mood: playful`, a value always paraphrased, such as
`price: budget` written "easy on the wallet") is not measured, unless synonyms make it sayable; the
evaluation reports how many values of each key were left out. A value training never saw is measured.
Free prompts have no values; they count in `hallucinated_names` only. Only the standard library.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from components.records import is_entity_key, parse_source

REALISED, WRONG, MISSING = "realised", "wrong", "missing"
SLOT_METRICS = ("value_coverage", "slot_error_rate", "hallucinated_names")
"""The keys `evaluate_text` reports for the model, and with a `_retrieval_baseline` suffix for the baseline."""

NUMBER_WORDS = {
    word: str(number)
    for number, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
BOOLEAN_VALUES = frozenset({"yes", "no", "true", "false"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_WORD = re.compile(r"[^\W_]+|[£$€¥%]")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

Words = tuple[str, ...]


DIGIT_WORDS = {digit: word for word, digit in NUMBER_WORDS.items()}
NEGATIONS = frozenset({"not", "no", "non", "never", "without", "t"})  # "isn't" splits into "isn", "t"
POSITIVE, NEGATIVE = frozenset({"yes", "true"}), frozenset({"no", "false"})


def normalise(text: str) -> Words:
    """The words a match compares: case-folded, punctuation dropped, thousands separators removed."""
    return tuple(_WORD.findall(_THOUSANDS.sub("", unicodedata.normalize("NFKC", text)).casefold()))


def number_variant(words: Words) -> Words | None:
    """The same words with each number up to twenty in its other spelling (3 <-> three), if any changed.
    Only a value's own numbers are respelled: "one" in an output is a number only where a value says so."""
    swapped = tuple(NUMBER_WORDS.get(w) or DIGIT_WORDS.get(w) or w for w in words)
    return swapped if swapped != words else None


def polarity_said(words: Words, key: Words) -> bool | None:
    """For a yes/no value: None when the output never names the key; else whether it names it without a
    negation in the three words before ("family friendly" -> True, "not family friendly" -> False)."""
    found = None
    for i in range(len(words) - len(key) + 1):
        if words[i : i + len(key)] == key:
            negated = bool(NEGATIONS & set(words[max(0, i - 3) : i]))
            found = found or not negated
    return found


def key_words(key: str) -> Words:
    """A key as the words an output would use for it: `familyFriendly` / `family_friendly` -> family friendly."""
    return normalise(_CAMEL.sub(" ", key).replace("_", " "))


def contains(words: Words, part: Words) -> bool:
    """Whether `part` occurs in `words` as a contiguous run."""
    n = len(part)
    return bool(n) and any(words[i : i + n] == part for i in range(len(words) - n + 1))


def ngrams(words: Words, longest: int) -> set[Words]:
    return {words[i : i + n] for n in range(1, longest + 1) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class SlotLexicon:
    """What the matcher knows about the data: every value each key takes (for `wrong` values and named
    entities), the keys that name entities, the synonyms, and the pairs not measured."""

    known: Mapping[str, frozenset[Words]]
    entity_keys: tuple[str, ...]
    synonyms: Mapping[str, Mapping[str, tuple[Words, ...]]] = field(default_factory=dict)
    unsaid: frozenset[tuple[str, str]] = frozenset()  # pairs the training references rarely say: not measured
    seen_pairs: Mapping[str, frozenset[str]] = field(default_factory=dict)  # training values of each key

    @classmethod
    def from_training(
        cls, rows: Iterable[tuple[str, str]], other_sources: Iterable[str] = (),
        synonyms: Mapping[str, Mapping[str, Sequence[str]]] | None = None, min_share: float = 0.5,
    ) -> SlotLexicon:  # fmt: skip
        """The lexicon of training (source, reference) rows plus other sources (test, validation), with the
        pairs the references say in under `min_share` of their rows marked unsaid."""
        rows = list(rows)
        lexicon = cls.from_sources([s for s, _ in rows] + list(other_sources), synonyms)
        said: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for source, reference in rows:
            for value in check_output(source, reference, lexicon).values:
                counts = said[(value["key"], value["value"])]
                counts[0] += value["status"] == REALISED
                counts[1] += 1
        unsaid = frozenset(pair for pair, (realised, total) in said.items() if realised < min_share * total)
        seen: dict[str, set[str]] = defaultdict(set)
        for key, value in said:
            seen[key].add(value)
        return replace(lexicon, unsaid=unsaid, seen_pairs={k: frozenset(v) for k, v in seen.items()})

    @classmethod
    def from_sources(
        cls, sources: Iterable[str], synonyms: Mapping[str, Mapping[str, Sequence[str]]] | None = None
    ) -> SlotLexicon:
        known: dict[str, set[Words]] = defaultdict(set)
        for source in dict.fromkeys(sources):
            record = parse_source(source)
            for key, value in record.pairs if record is not None else ():
                if words := normalise(value):
                    known[key].add(words)
        normalised_synonyms = {
            key: {
                " ".join(normalise(value)): tuple(normalise(w) for w in wordings if normalise(w))
                for value, wordings in by_value.items()
            }
            for key, by_value in (synonyms or {}).items()
        }
        return cls(
            known={key: frozenset(values) for key, values in known.items()},
            entity_keys=tuple(key for key in known if is_entity_key(key)),
            synonyms=normalised_synonyms,
        )

    def realisations(self, key: str, value: str) -> list[Words]:
        """Every wording that realises `key: value` (a yes/no value's key words are checked apart, with
        their polarity: `check_output`)."""
        own = normalise(value)
        forms = [own, number_variant(own), *self.synonyms.get(key, {}).get(" ".join(own), ())]
        return [form for form in forms if form]

    @cached_property
    def unsaid_keys(self) -> frozenset[str]:
        """Keys none of whose seen values the references say (style attributes): an unseen value of one is
        not measured either."""
        said_keys = {key for key, values in self.seen_pairs.items() if any((key, v) not in self.unsaid for v in values)}
        return frozenset(key for key in self.seen_pairs if key not in said_keys)

    def seen(self, key: str, value: str) -> bool:
        return value in self.seen_pairs.get(key, ())

    @cached_property
    def names(self) -> frozenset[Words]:
        """Every entity name in the data."""
        return frozenset(name for key in self.entity_keys for name in self.known.get(key, ()))

    @cached_property
    def longest(self) -> int:
        """Words in the longest known value: the longest run an output is searched for."""
        return max((len(value) for values in self.known.values() for value in values), default=1)


@dataclass(frozen=True)
class SlotCheck:
    """One output against its source: each value's status, and the entities it names that the source lacks."""

    values: list[dict[str, str]]  # {key, value, status}
    hallucinated: list[str]

    def count(self, status: str) -> int:
        return sum(v["status"] == status for v in self.values)


def check_output(source: str, output: str, lexicon: SlotLexicon) -> SlotCheck:
    """The status of every value of `source` in `output`, and the foreign entity names `output` contains."""
    record = parse_source(source)
    pairs = record.pairs if record is not None else ()
    words = normalise(output)
    grams = ngrams(words, lexicon.longest)
    given = [normalise(value) for _, value in pairs]

    def overlaps(found: Words, value: Words) -> bool:
        return contains(found, value) or contains(value, found)

    statuses = []
    for (key, value), own in zip(pairs, given, strict=True):
        forms = lexicon.realisations(key, value)
        if not forms or (key, value) in lexicon.unsaid or (key in lexicon.unsaid_keys and not lexicon.seen(key, value)):
            continue
        polarity = value.strip().casefold()
        said = polarity_said(words, key_words(key)) if polarity in BOOLEAN_VALUES else None
        if any(form in grams if len(form) <= lexicon.longest else contains(words, form) for form in forms):
            status = REALISED
        elif said is not None:
            status = REALISED if said == (polarity in POSITIVE) else WRONG
        else:
            others = grams & lexicon.known.get(key, frozenset())
            status = WRONG if any(not overlaps(other, own) for other in others) else MISSING
        statuses.append({"key": key, "value": value, "status": status})
    foreign = sorted(
        " ".join(name) for name in grams & lexicon.names if not any(overlaps(name, value) for value in given if value)
    )
    return SlotCheck(statuses, foreign)


def slot_scores(checks: Sequence[SlotCheck], has_entities: bool) -> dict[str, Any]:
    """The three slot metrics over a set of outputs (None where there is nothing to measure)."""
    values = sum(len(c.values) for c in checks)
    missing = sum(c.count(MISSING) for c in checks)
    wrong = sum(c.count(WRONG) for c in checks)
    return {
        "value_coverage": round(sum(c.count(REALISED) for c in checks) / values, 4) if values else None,
        "slot_error_rate": round((missing + wrong) / values, 4) if values else None,
        "hallucinated_names": round(sum(bool(c.hallucinated) for c in checks) / len(checks), 4)
        if checks and has_entities
        else None,
        "values": values,
        "missing_values": missing,
        "wrong_values": wrong,
    }


def unmeasured(lexicon: SlotLexicon) -> dict[str, int]:
    """Per key, how many of its values are not measured (the references rarely say them)."""
    counts: dict[str, int] = defaultdict(int)
    for key, _ in lexicon.unsaid:
        counts[key] += 1
    return dict(sorted(counts.items()))


def key_coverage(checks: Sequence[SlotCheck]) -> dict[str, float]:
    """value_coverage of each key separately."""
    seen: dict[str, list[bool]] = defaultdict(list)
    for check in checks:
        for value in check.values:
            seen[value["key"]].append(value["status"] == REALISED)
    return {key: round(sum(flags) / len(flags), 4) for key, flags in sorted(seen.items())}
