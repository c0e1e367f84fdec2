"""The source of a data-to-text row, parsed and written in one place, whatever its syntax.

Three structured syntaxes are recognised, each an ordered list of (key, value) pairs:

- `pipe`:    `name: Harbor | category: lamp`      (values may hold `:`; a `|` in a value is written `\\|`)
- `bracket`: `name[Harbor], category[lamp]`       (E2E-style meaning representations; values may hold
  `,`, `|`, `:`, quotes and balanced brackets; an unbalanced bracket is written `\\[` or `\\]`)
- `json`:    `{"name": "Harbor", "category": "lamp"}` (non-string values are kept as their JSON text)

Any other text is a free prompt (`parse_source` returns None) and passes through untouched. Cleaning (the
split key), augmentation (attribute-order shuffles), the record schema, the drift features, the retrieval
baseline and serving all go through this module. Only the standard library.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PIPE, BRACKET, JSON, PROMPT = "pipe", "bracket", "json", "prompt"
SYNTAXES = (PIPE, BRACKET, JSON)
"""The structured syntaxes; a source in none of them is a free prompt (PROMPT)."""

SCHEMA_FILE = "schema.json"
"""The record schema learned by the `features` stage; it travels with the text model folder."""
CATEGORICAL, FREE_TEXT = "categorical", "free_text"

# A key is a short name of at most three words ("customer rating"): letters, digits, `_`, `-` and `.`,
# starting with a letter or `_`. Anything looser turns ordinary sentences with a colon into "records".
KEY = r"[^\W\d][\w.\-]*(?: [\w.\-]+){0,2}"
MAX_KEY_CHARS = 64
_PIPE_FIELD = re.compile(rf"({KEY}): (.*)", re.DOTALL)
_BRACKET_KEY = re.compile(rf"\s*({KEY})\s*\[")
_ENTITY_WORD = re.compile(r"(?:^|[\s_.\-])(?:name|entity|subject)$", re.IGNORECASE)
_ENTITY_CAMEL = re.compile(r"[a-z](?:Name|Entity|Subject)$")


@dataclass(frozen=True)
class Record:
    """A parsed structured source: its syntax, its (key, value) pairs in source order, and (JSON only) the
    keys whose values were JSON literals (numbers, booleans, null, arrays, objects) rather than strings."""

    syntax: str
    pairs: tuple[tuple[str, str], ...]
    literal_keys: frozenset[str] = frozenset()

    def keys(self) -> list[str]:
        return [key for key, _ in self.pairs]

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)

    def reordered(self, order: Iterable[int]) -> str:
        """The same record with its pairs in the given order, in its own syntax."""
        return serialise([self.pairs[i] for i in order], self.syntax, self.literal_keys)


def _plausible(pairs: list[tuple[str, str]]) -> bool:
    """Distinct keys of sane length, and not a lone multi-word "key" (`Translate this: ...` is a prompt)."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys) or any(len(key) > MAX_KEY_CHARS for key in keys):
        return False
    return len(pairs) > 1 or " " not in keys[0]


def _parse_pipe(source: str) -> Record | None:
    pairs = []
    for part in source.split(" | "):
        match = _PIPE_FIELD.fullmatch(part.strip())
        if match is None or not match.group(2).strip():
            return None
        pairs.append((match.group(1).strip(), match.group(2).strip().replace("\\|", "|")))
    return Record(PIPE, tuple(pairs)) if pairs and _plausible(pairs) else None


def _parse_bracket(source: str) -> Record | None:
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(source)
    while True:
        match = _BRACKET_KEY.match(source, i)
        if match is None:
            return None
        key, i, depth, value = match.group(1), match.end(), 1, []
        while i < n:
            char = source[i]
            if char == "\\" and i + 1 < n and source[i + 1] in "[]\\":
                value.append(source[i + 1])
                i += 2
                continue
            depth += {"[": 1, "]": -1}.get(char, 0)
            if depth == 0:
                break
            value.append(char)
            i += 1
        if depth:
            return None
        pairs.append((key, "".join(value).strip()))
        i += 1
        while i < n and source[i].isspace():
            i += 1
        if i == n:
            return Record(BRACKET, tuple(pairs)) if _plausible(pairs) else None
        if source[i] != ",":
            return None
        i += 1


def _parse_json(source: str) -> Record | None:
    try:
        data = json.loads(source)
    except ValueError:
        return None
    if not isinstance(data, dict) or not data:
        return None
    pairs, literals = [], set()
    for key, value in data.items():
        if not key.strip() or len(key) > MAX_KEY_CHARS or not key.isprintable():
            return None
        if isinstance(value, str):
            pairs.append((key.strip(), value.strip()))
        else:
            pairs.append((key.strip(), json.dumps(value, ensure_ascii=False, separators=(", ", ": "))))
            literals.add(key.strip())
    if len({key for key, _ in pairs}) != len(pairs):  # keys equal once stripped
        return None
    return Record(JSON, tuple(pairs), frozenset(literals))


@functools.lru_cache(maxsize=1 << 14)
def parse_source(source: str) -> Record | None:
    """The record a source holds, in whichever structured syntax it is written; None for a free prompt."""
    text = source.strip()
    if not text:
        return None
    if text[0] == "{":
        return _parse_json(text)
    if text[-1] == "]" and "[" in text:
        record = _parse_bracket(text)
        if record is not None:
            return record
    return _parse_pipe(text)


@functools.lru_cache(maxsize=4096)
def is_entity_key(key: str) -> bool:
    """Whether a key names the record's entity: `name`, `entity` or `subject`, alone or as the last word
    (`venue_name`, `productName`, `brand name`)."""
    return bool(_ENTITY_WORD.search(key) or _ENTITY_CAMEL.search(key))


def syntax_of(source: str) -> str:
    record = parse_source(source)
    return record.syntax if record is not None else PROMPT


def _escape_brackets(value: str) -> str:
    depth = 0
    for char in value:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            break
    if depth == 0:
        return value.replace("\\", "\\\\") if "\\" in value else value
    return value.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def serialise(pairs: Iterable[tuple[str, str]] | dict[str, str], syntax: str = PIPE, literal_keys: Iterable[str] = ()) -> str:
    """(key, value) pairs as a source in `syntax`, in the given order; `parse_source` inverts it.

    For JSON, values of `literal_keys` that are valid JSON are written as JSON (a number stays a number).
    """
    items = list(pairs.items() if isinstance(pairs, dict) else pairs)
    if syntax == PIPE:
        return " | ".join(f"{key}: {value.replace('|', chr(92) + '|') if ' | ' in value else value}" for key, value in items)
    if syntax == BRACKET:
        return ", ".join(f"{key}[{_escape_brackets(value)}]" for key, value in items)
    if syntax == JSON:
        literal = frozenset(literal_keys)
        obj: dict[str, Any] = {}
        for key, value in items:
            obj[key] = value
            if key in literal:
                try:
                    obj[key] = json.loads(value)
                except ValueError:
                    pass
        return json.dumps(obj, ensure_ascii=False)
    raise ValueError(f"unknown record syntax {syntax!r}; one of {list(SYNTAXES)}")


def canonical_source(source: str) -> str:
    """The grouping key of a source: a record's pairs sorted by key, in one syntax, so the same record
    reordered or written in another syntax is the same source; a free prompt case-folded and space-collapsed."""
    return canonical_record(source)[0]


def canonical_record(source: str) -> tuple[str, Record | None]:
    """canonical_source and the record it writes (its pairs sorted by key; None for a free prompt), from one parse."""
    record = parse_source(source)
    if record is None:
        return " ".join(source.casefold().split()), None
    pairs = tuple(sorted(record.pairs))
    return serialise(pairs, PIPE), Record(PIPE, pairs)


# --- the record schema, learned from the data -----------------------------------------------------------

DISTINCT_VALUES_COUNTED = 100_000
"""Distinct values counted per key. A key past it is free text whatever follows, and counting every name of a
corpus of millions made the features stage's memory grow with the corpus; its schema entry then says
`distinct_capped`."""


def infer_schema(sources: Iterable[str], max_categorical_values: int) -> dict[str, Any]:
    """The record schema of a set of training sources (each distinct source once).

    - `syntax`: the most common syntax; `prompt` unless at least half the sources are records (a few
      prompts that happen to read as `Note: ...` do not make a prompt dataset structured);
    - `order`: the keys in the order records usually list them (mean relative position), which the service
      writes prompts in (`keys` is an object: JSON writers may sort it);
    - `keys`: per key: `rows` (records with the key), `distinct` values (counted up to DISTINCT_VALUES_COUNTED;
      past it, `distinct_capped` is true), `kind` (`categorical`: at most `max_categorical_values` distinct
      values that repeat, on average twice or more, never an entity key; else `free_text`), `values` (value
      counts, categorical keys only: free text such as names is not copied out of the data) and, for JSON,
      `literal` (values are JSON numbers etc.).
    """
    syntaxes: Counter[str] = Counter()
    values: dict[str, Counter[str]] = defaultdict(Counter)
    # Running sums, not lists of positions: a few million records would hold tens of millions of floats.
    position_sum: dict[str, float] = defaultdict(float)  # added in order, as sum() of the list did (3.11)
    position_count: Counter[str] = Counter()
    literal: Counter[str] = Counter()
    total = 0
    rows: Counter[str] = Counter()
    capped: set[str] = set()
    for source in sources:
        total += 1
        record = parse_source(source)
        if record is None:
            syntaxes[PROMPT] += 1
            continue
        syntaxes[record.syntax] += 1
        for index, (key, value) in enumerate(record.pairs):
            rows[key] += 1
            counts = values[key]
            if value in counts or len(counts) < DISTINCT_VALUES_COUNTED:
                counts[value] += 1
            else:
                capped.add(key)
            position_sum[key] += index / max(1, len(record.pairs) - 1)
            position_count[key] += 1
            literal[key] += key in record.literal_keys
    structured = sum(n for name, n in syntaxes.items() if name != PROMPT)
    syntax = max(SYNTAXES, key=lambda name: syntaxes[name]) if structured and 2 * structured >= total else PROMPT
    keys: dict[str, Any] = {}
    for key in sorted(values, key=lambda k: (position_sum[k] / position_count[k], k)):
        counts = values[key]
        distinct = len(counts)
        # An entity's name is never a category, however few entities training has: held-out ones are new.
        categorical = (
            key not in capped and distinct <= max_categorical_values and rows[key] >= 2 * distinct and not is_entity_key(key)
        )
        entry: dict[str, Any] = {"rows": rows[key], "distinct": distinct, "kind": CATEGORICAL if categorical else FREE_TEXT}
        if key in capped:
            entry["distinct_capped"] = True
        if categorical:
            entry["values"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        if syntax == JSON:
            entry["literal"] = literal[key] * 2 > rows[key]
        keys[key] = entry
    return {
        "syntax": syntax,
        "sources": total,
        "syntaxes": {name: syntaxes[name] for name in (*SYNTAXES, PROMPT) if syntaxes[name]},
        "order": list(keys),
        "keys": keys,
        "entity_keys": [key for key in keys if is_entity_key(key)],
    }


def key_order(schema: dict[str, Any]) -> list[str]:
    """The schema's keys in the order training records list them."""
    return [key for key in schema.get("order", schema["keys"]) if key in schema["keys"]]


def categorical_keys(schema: dict[str, Any]) -> list[str]:
    return [key for key in key_order(schema) if schema["keys"][key].get("kind") == CATEGORICAL]


def categorical_values(schema: dict[str, Any]) -> dict[str, frozenset[str]]:
    """Each categorical key with the values training saw (what the log and the drift reference may hold)."""
    return {key: frozenset(schema["keys"][key].get("values", {})) for key in categorical_keys(schema)}


def entity_keys(schema: dict[str, Any]) -> list[str]:
    """The schema's keys that name the record's entity (`is_entity_key`)."""
    return [key for key in key_order(schema) if is_entity_key(key)]


def literal_keys(schema: dict[str, Any]) -> frozenset[str]:
    return frozenset(key for key, entry in schema.get("keys", {}).items() if entry.get("literal"))


def check_schema(schema: Any, where: str) -> dict[str, Any]:
    """A loaded schema, checked enough that its users can index it; ValueError naming `where` otherwise."""
    if (
        not isinstance(schema, dict)
        or schema.get("syntax") not in (*SYNTAXES, PROMPT)
        or not isinstance(schema.get("keys"), dict)
    ):
        raise ValueError(f"{where}: not a record schema (needs 'syntax' in {[*SYNTAXES, PROMPT]} and a 'keys' object)")
    return schema
