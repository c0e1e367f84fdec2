"""Data of several shapes, built by the tests themselves (none of it the demo's): text corpora in each source
syntax and file format, image class folders and photographs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.records import JSON, PROMPT, serialise

VENUES = ("Copper Kettle", "Blue Spoon", "Old Mill", "Green Door", "Lantern", "Harbour Light", "Stone Oven", "Red Fern")
CUISINES = ("Thai", "Italian", "Indian", "French", "Mexican")
AREAS = ("riverside", "city centre", "old town")
PRICES = ("cheap", "moderate", "high")
NOTES = ("open late, weekends too", "cash only [no cards]", "terrace | garden", "kids: welcome", 'the "best" pie')


def corpus(syntax: str, records: int = 60, refs: int = 2) -> list[tuple[Any, str]]:
    """(source, reference) rows: `refs` references per source, a quarter of the records with a note."""
    rng = np.random.default_rng(0)
    rows: list[tuple[Any, str]] = []
    for index in range(records):
        venue = f"{VENUES[index % len(VENUES)]} {index}"
        cuisine, area, price = (str(rng.choice(v)) for v in (CUISINES, AREAS, PRICES))
        pairs = [("venue", venue), ("cuisine", cuisine), ("area", area), ("price range", price)]
        if index % 4 == 0:
            pairs.append(("note", NOTES[index % len(NOTES)]))
        source: Any = (
            f"Write a line about {venue}, a {price} {cuisine} place in the {area}."
            if syntax == PROMPT
            else serialise(pairs, syntax)
        )
        for ref in range(refs):
            if ref % 2 == 0:
                reference = f"{venue} is a {price} {cuisine} restaurant in the {area}."
            else:
                reference = f"In the {area}, {venue} serves {cuisine} food at {price} prices."
            rows.append((source, reference))
    return rows


def write_text(rows: list[tuple[Any, str]], fmt: str, folder: Path, syntax: str) -> Path:
    folder.mkdir(parents=True)
    sources, references = [s for s, _ in rows], [r for _, r in rows]
    if fmt == "csv":
        with (folder / "corpus.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["mr", "ref"])
            writer.writerows(zip(sources, references, strict=True))
    elif fmt == "jsonl":
        with (folder / "corpus.jsonl").open("w", encoding="utf-8") as fh:
            for source, reference in rows:
                # A JSON-syntax source as a JSON object, as such corpora store it.
                value = json.loads(source) if syntax == JSON else source
                fh.write(json.dumps({"mr": value, "ref": reference}) + "\n")
    else:
        pq.write_table(pa.table({"mr": sources, "ref": references}), folder / "corpus.parquet")
    return folder


def smooth_image(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """A picture-like image: smooth random shapes, so restoration and generation have structure to learn."""
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), channels), dtype=np.uint8)
    image = Image.fromarray(small[..., 0] if channels == 1 else small).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


def write_image_classes(kind: str, root: Path) -> tuple[Path, int]:
    """Class folders of uneven size; returns (root, image count)."""
    rng = np.random.default_rng(1)
    sizes = {"owl": 24, "fox": 14, "eel": 8}
    for label, count in sizes.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            if kind == "grey16":
                Image.fromarray(smooth_image(rng, 16, 16, 1)).save(root / label / f"{i}.png")
            else:
                Image.fromarray(smooth_image(rng, 48, 48, 3)).save(root / label / f"{i}.jpg", quality=92)
    return root, sum(sizes.values())


PHOTO_KINDS = ("one", "one-grey", "many", "many-rgb")
"""one RGB JPEG, one greyscale PNG, six greyscale PNGs, six RGB JPEGs (sizes differ)."""


def write_photos(kind: str, root: Path) -> tuple[Path, int]:
    """A flat photo folder of `kind` (PHOTO_KINDS); returns (root, photo count)."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    if kind == "one":
        Image.fromarray(smooth_image(rng, 120, 200, 3)).save(root / "only.jpg", quality=95)
        return root, 1
    if kind == "one-grey":
        Image.fromarray(smooth_image(rng, 150, 90, 1)).save(root / "only.png")
        return root, 1
    for i in range(6):
        if kind == "many":
            Image.fromarray(smooth_image(rng, 80 + 8 * i, 96, 1)).save(root / f"grey-{i}.png")
        else:
            Image.fromarray(smooth_image(rng, 96, 72 + 8 * i, 3)).save(root / f"rgb-{i}.jpg", quality=95)
    return root, 6
