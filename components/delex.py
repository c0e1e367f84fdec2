"""Delexicalisation: the text model writes typed placeholders where the source's values go, and they are
filled back in after generation, so a value the model never saw (a new product or venue name) is copied,
not guessed.

- `choose_keys` picks, from the training rows, the keys whose values the references copy verbatim (in at
  least `min_share` of the rows that have the key). A key that is free text (names, descriptions) is
  `hidden`: its value becomes `<|key|>` in the model's source too, so an unseen name looks exactly like a
  seen one. A categorical key (few values, all seen in training) is `shown`: the model still reads its
  value (it may choose "an" before "ivory"), and writes `<|key|>` where the value goes.
- `Delexicaliser.model_source` / `delexicalise` turn a source and a reference into what the model trains
  on; `relexicalise` fills a generated text's placeholders from its source. Values match whole words,
  case-insensitively, longest first; a value placed at the start of a sentence is capitalised there.
- `substitute` moves a text written for one source to another (the retrieval baseline's answers).

The chosen keys are `copying.json` in the features folder and in the model folder: training, evaluation
and the service read the same file. Only the standard library.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.records import parse_source, serialise

COPYING_FILE = "copying.json"
HIDDEN, SHOWN = "hidden", "shown"
_PLACEHOLDER = re.compile(r"<\|([^|<>]+)\|>")
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+)$")
_DROPPED = "\x00"


def placeholder(key: str) -> str:
    """The token that stands for a key's value; `<...>` never survives cleaning, so no real text has one."""
    return f"<|{key}|>"


def value_pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for whole-word, case-insensitive occurrences of any of the values, longest first (so
    "Blue Spice Bar" wins over "Blue Spice"), matched in one pass (a replaced value is never re-scanned)."""
    distinct = sorted({v for v in values if v.strip()}, key=lambda v: (-len(v), v))
    return _compiled(tuple(distinct)) if distinct else None


@functools.lru_cache(maxsize=1 << 16)
def _compiled(values: tuple[str, ...]) -> re.Pattern[str]:
    """The pattern of a sorted value tuple, compiled once: a corpus has far more distinct value sets than the
    512 patterns `re` keeps, and compiling was most of the features stage's time."""
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(v) for v in values) + r")(?!\w)", re.IGNORECASE)


def _ascii_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _ascii_starts(text: str, lowered: str, needle: str) -> Iterator[int]:
    """Where the lower-cased ASCII `needle` occurs in `text` (lowered: text.lower()) as a whole word."""
    start = 0
    while (at := lowered.find(needle, start)) >= 0:
        end = at + len(needle)
        if (at == 0 or not _ascii_word(text[at - 1])) and (end == len(text) or not _ascii_word(text[end])):
            yield at
        start = at + 1


def _ascii_matches(text: str, values: tuple[str, ...]) -> list[tuple[int, int]]:
    """The spans `value_pattern(values).finditer(text)` gives, for ASCII text and values, by substring search:
    at each position the first value (longest first) that occurs there as a whole word, case-insensitively;
    matches never overlap. Compiling a pattern per source's value set was most of the features stage's time."""
    lowered = text.lower()
    first_at: dict[int, int] = {}
    for value in values:
        for at in _ascii_starts(text, lowered, value.lower()):
            first_at.setdefault(at, at + len(value))  # values come longest first: an earlier one wins this position
    spans, reached = [], 0
    for at in sorted(first_at):
        if at >= reached:
            spans.append((at, first_at[at]))
            reached = first_at[at]
    return spans


def value_spans(text: str, values: Iterable[str]) -> list[tuple[int, int]]:
    """Where `value_pattern(values)` matches in `text` (whole words, any case, longest value first)."""
    distinct = tuple(sorted({v for v in values if v.strip()}, key=lambda v: (-len(v), v)))
    if not distinct:
        return []
    if text.isascii() and all(v.isascii() for v in distinct):
        return _ascii_matches(text, distinct)
    return [match.span() for match in _compiled(distinct).finditer(text)]


def delexicalise_text(text: str, slots: Mapping[str, str]) -> str:
    """`text` with each slot value (placeholder -> value) replaced by its placeholder; when two slots share a
    value, the first one's placeholder is used."""
    by_value: dict[str, str] = {}
    for token, value in slots.items():
        by_value.setdefault(value.casefold(), token)
    spans = value_spans(text, slots.values())
    if not spans:
        return text
    parts, done = [], 0
    for start, end in spans:
        parts += [text[done:start], by_value[text[start:end].casefold()]]
        done = end
    return "".join(parts) + text[done:]


def relexicalise_text(text: str, slots: Mapping[str, str], fallback: Mapping[str, str] | None = None) -> str:
    """`text` with every placeholder replaced by its slot's value (or the fallback's); a placeholder neither
    knows is dropped, with the space around it."""

    def fill(match: re.Match[str]) -> str:
        value = slots.get(match.group(0), (fallback or {}).get(match.group(0), ""))
        if not value:
            return _DROPPED
        if _SENTENCE_START.search(text[: match.start()]):
            value = value[:1].upper() + value[1:]
        return value

    # A model that writes a placeholder right after a full stop ("fun.<|venue|>") still means a new sentence.
    text = re.sub(r"(?<=[.!?])(?=<\|[^|<>]+\|>)", " ", text)
    filled = _PLACEHOLDER.sub(fill, text)
    return re.sub(r"\s*" + _DROPPED, "", filled).strip() if _DROPPED in filled else filled


@dataclass(frozen=True)
class Delexicaliser:
    """The keys a model copies, each `hidden` or `shown` in the model's source (see the module docstring)."""

    keys: Mapping[str, str]

    def placeholders(self) -> list[str]:
        """The placeholder tokens the tokenizer must keep whole."""
        return [placeholder(key) for key in self.keys]

    def slots(self, source: str) -> dict[str, str]:
        """placeholder -> value for the copied keys a source gives (none for a free prompt)."""
        record = parse_source(source)
        pairs = record.pairs if record is not None else ()
        return {placeholder(key): value for key, value in pairs if key in self.keys and value.strip()}

    def required(self, source: str) -> list[str]:
        """The placeholders a text for this source should write: one per distinct value (two keys with the
        same value share the first one's placeholder, as `delexicalise` writes it)."""
        first: dict[str, str] = {}
        for token, value in self.slots(source).items():
            first.setdefault(value.casefold(), token)
        return list(first.values())

    def model_source(self, source: str) -> str:
        """The source as the model reads it: hidden keys' values are their placeholders."""
        record = parse_source(source)
        if record is None or not any(self.keys.get(key) == HIDDEN for key in record.keys()):
            return source
        hidden = {key for key in record.keys() if self.keys.get(key) == HIDDEN}
        pairs = [(key, placeholder(key) if key in hidden else value) for key, value in record.pairs]
        return serialise(pairs, record.syntax, record.literal_keys - hidden)

    def delexicalise(self, source: str, text: str) -> str:
        """A reference as the model learns it: the source's copied values replaced by placeholders."""
        return delexicalise_text(text, self.slots(source))

    def relexicalise(self, source: str, text: str) -> str:
        """A generated text with the source's values filled in."""
        return relexicalise_text(text, self.slots(source))

    def to_json(self) -> dict[str, Any]:
        return {"keys": dict(self.keys)}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / COPYING_FILE).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Delexicaliser | None:
        """The folder's delexicaliser; None when it has no `copying.json` (a model that writes values itself)."""
        path = folder / COPYING_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict) or not all(mode in (HIDDEN, SHOWN) for mode in keys.values()):
            raise ValueError(f"{path}: not a copying file (needs 'keys': {{key: '{HIDDEN}' | '{SHOWN}'}})")
        return cls(keys)


def choose_keys(
    rows: Iterable[tuple[str, str]], min_share: float, categorical: Iterable[str] = ()
) -> tuple[Delexicaliser, dict[str, float]]:
    """The delexicaliser of a training set of (source, reference) rows, and each key's verbatim share.

    A key is copied when its value occurs verbatim in at least `min_share` of the references of the rows
    that have it; `categorical` keys are shown, the others hidden.
    """
    present: Counter[str] = Counter()
    verbatim: Counter[str] = Counter()
    for source, reference in rows:
        record = parse_source(source)
        ascii_reference = reference.isascii()
        lowered = reference.lower() if ascii_reference else ""
        for key, value in record.pairs if record is not None else ():
            if not value.strip():
                continue
            present[key] += 1
            if ascii_reference and value.isascii():
                verbatim[key] += next(_ascii_starts(reference, lowered, value.lower()), None) is not None
            else:
                verbatim[key] += bool(value_spans(reference, [value]))
    shares = {key: round(verbatim[key] / present[key], 4) for key in present}
    shown = frozenset(categorical)
    keys = {key: SHOWN if key in shown else HIDDEN for key in present if shares[key] >= min_share}
    return Delexicaliser(keys), shares


def values_said(source: str, text: str) -> int:
    """How many of the source's values the text says verbatim (whole words, any case)."""
    record = parse_source(source)
    return sum(1 for _, value in (record.pairs if record is not None else ()) if value_spans(text, [value]))


def substitute(text: str, from_source: str, to_source: str) -> str:
    """A text written for `from_source`, rewritten for `to_source`: each value of the first that the text
    says verbatim becomes the second's value of the same key (kept where the second lacks the key)."""
    every_key = Delexicaliser(dict.fromkeys(_keys(from_source) | _keys(to_source), HIDDEN))
    # A yes / no or a bare number is too common a word to be the value wherever it appears ("no kids").
    original = {t: v for t, v in every_key.slots(from_source).items() if not _too_common(v)}
    return relexicalise_text(delexicalise_text(text, original), every_key.slots(to_source), fallback=original)


def _too_common(value: str) -> bool:
    return value.strip().casefold() in ("yes", "no", "true", "false") or value.strip().replace(".", "", 1).isdigit()


def _keys(source: str) -> set[str]:
    record = parse_source(source)
    return set(record.keys()) if record is not None else set()
