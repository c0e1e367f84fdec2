"""The source record of a data-to-text row: `key: value | key: value` text, parsed and written in one place.

Cleaning (the split key), augmentation (shuffled attribute order), the drift features, the retrieval baseline
and serving all read or write records through these two functions. A source that is not a record (a free
prompt) parses to None and is treated as plain text. Only the standard library.
"""

from __future__ import annotations

FIELD_SEPARATOR = " | "
KEY_SEPARATOR = ": "


def serialise(attributes: dict[str, str]) -> str:
    """`key: value | key: value`, in the given order."""
    return FIELD_SEPARATOR.join(f"{key}{KEY_SEPARATOR}{value}" for key, value in attributes.items())


def parse_source(source: str) -> dict[str, str] | None:
    """Inverse of `serialise`; None when the text is not a `key: value | ...` record (e.g. a free prompt)."""
    attributes: dict[str, str] = {}
    for part in source.split(FIELD_SEPARATOR):
        key, sep, value = part.partition(KEY_SEPARATOR)
        if not sep or not key or not value or key in attributes:
            return None
        attributes[key] = value
    return attributes
