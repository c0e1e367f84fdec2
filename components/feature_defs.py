"""Per-record features that describe the data for drift monitoring.

The `features` stage writes them for the training data (the drift reference); the serving request log
computes the same ones for live traffic. Keep them cheap and defined here once.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from components.records import parse_source

REFERENCE_DIR = "reference"
"""Sub-folder of the features stage's output holding the drift reference tables (`<family>.parquet`)."""
ATTRIBUTE_PREFIX = "attr_"
OTHER_VALUE = "(other)"
"""What an attribute column holds for a value training never saw: a name typed into a categorical field is
never copied into the log, and a new value still shows up as drift."""
TEXT_FEATURE_COLUMNS = ("source_chars", "source_tokens", "num_attributes", "oov_share", "reference_chars", "reference_tokens")
WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the unit of the out-of-vocabulary share."""
    return WORD.findall(text.lower())


def oov_share(text: str, vocabulary: Collection[str]) -> float:
    """Share of the text's words that no training source contains (0 for a text without words)."""
    tokens = words(text)
    return sum(token not in vocabulary for token in tokens) / len(tokens) if tokens else 0.0


IMAGE_FEATURE_COLUMNS = ("width", "height", "brightness", "contrast", "sharpness")


def attribute_column(key: str) -> str:
    """The drift-feature column of a record attribute."""
    return f"{ATTRIBUTE_PREFIX}{key}"


def text_features(
    source: str,
    source_tokens: int,
    reference: str | None = None,
    reference_tokens: int | None = None,
    vocabulary: Collection[str] | None = None,
    attributes: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Any]:
    """Lengths, attribute count and (given the training vocabulary) the out-of-vocabulary share of one text
    row; one `attr_<key>` column per key of `attributes` (the schema's categorical keys, with the values
    training saw) holds its value, OTHER_VALUE for an unseen one, None when the record lacks the key."""
    record = parse_source(source)
    values = record.as_dict() if record is not None else {}
    row: dict[str, Any] = {
        "source_chars": len(source),
        "source_tokens": source_tokens,
        "num_attributes": len(values),
        "oov_share": oov_share(source, vocabulary) if vocabulary is not None else None,
        "reference_chars": len(reference) if reference is not None else None,
        "reference_tokens": reference_tokens,
    }
    for key, known in (attributes or {}).items():
        value = values.get(key)
        row[attribute_column(key)] = value if value is None or value in known else OTHER_VALUE
    return row


def image_features(pixels: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and sharpness of an HxW or HxWxC uint8 image, all on a 0-1 intensity scale.

    Sharpness is the variance of a 4-neighbour Laplacian of the grey image, a standard focus measure.
    """
    grey = pixels.astype(np.float32) / 255.0
    if grey.ndim == 3:
        grey = grey[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if grey.shape[2] >= 3 else grey[..., 0]
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return {
        "width": float(pixels.shape[1]),
        "height": float(pixels.shape[0]),
        "brightness": float(grey.mean()),
        "contrast": float(grey.std()),
        "sharpness": float(laplacian.var()) if laplacian.size else 0.0,
    }
