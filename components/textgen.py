"""The embedded default text data: structured product records and several pieces of marketing copy for each.

A record is a handful of attributes (name, category, colour, material, price band, audience, feature, tone);
its references are written from phrase banks with a different opening, clause order, optional attributes
and word choice each time, so multi-reference BLEU rewards getting the attributes right, not copying one
template. Everything is a function of (seed, index): the same seed gives the same data on every machine.

Product names are invented words ("Kraivo Pro"), one brand word per product, and each product has about
RECORDS_PER_NAME records. The clean stage's default split groups records by `name`, so the validation and
test products, and their brand words, never occur in training: the default data measures whether the model
copies values it has never seen, as real held-out data does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from components.records import parse_source, serialise

ATTRIBUTE_ORDER = ("name", "category", "colour", "material", "price", "audience", "feature", "tone")
"""The canonical order of a serialised record; augmentation shuffles it."""

ONSETS = ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "pl", "st", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io")
ENDINGS = ("", "n", "r", "x", "s", "l", "th", "m", "ck")
RECORDS_PER_NAME = 4
"""On average; a product has several records (other colours, materials, tones), as entities do in real corpora."""
LINES = (
    "Air",
    "Pro",
    "Lite",
    "Max",
    "One",
    "Mini",
    "Classic",
    "Flex",
    "Go",
    "Core",
    "Edge",
    "Plus",
    "Trail",
    "Studio",
    "Urban",
    "Wave",
    "Spark",
    "Terra",
    "Loop",
    "Sport",
)

CATEGORIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    # category: (item noun, materials that make sense, features that make sense)
    "backpack": (
        "backpack",
        ("recycled polyester", "waxed canvas", "nylon", "leather"),
        ("water-resistant", "lightweight", "padded for a laptop", "lockable"),
    ),
    "sneakers": (
        "pair of sneakers",
        ("mesh", "suede", "recycled polyester", "leather"),
        ("cushioned", "breathable", "lightweight", "slip-resistant"),
    ),
    "desk lamp": (
        "desk lamp",
        ("aluminium", "oak", "steel", "ceramic"),
        ("dimmable", "energy-saving", "adjustable", "rechargeable"),
    ),
    "water bottle": (
        "water bottle",
        ("stainless steel", "glass", "BPA-free plastic", "aluminium"),
        ("insulated", "leak-proof", "dishwasher-safe", "lightweight"),
    ),
    "headphones": (
        "set of headphones",
        ("aluminium", "memory foam", "recycled plastic", "leather"),
        ("noise-cancelling", "wireless", "foldable", "rechargeable"),
    ),
    "jacket": (
        "jacket",
        ("merino wool", "recycled nylon", "organic cotton", "down"),
        ("waterproof", "packable", "breathable", "windproof"),
    ),
    "mug": (
        "mug",
        ("ceramic", "stoneware", "stainless steel", "glass"),
        ("insulated", "dishwasher-safe", "microwave-safe", "stackable"),
    ),
    "watch": (
        "watch",
        ("stainless steel", "titanium", "leather", "silicone"),
        ("water-resistant", "scratch-resistant", "solar-powered", "lightweight"),
    ),
    "sofa": ("sofa", ("linen", "velvet", "oak", "leather"), ("modular", "stain-resistant", "easy to assemble", "convertible")),
    "yoga mat": ("yoga mat", ("natural rubber", "cork", "TPE", "jute"), ("non-slip", "extra thick", "foldable", "lightweight")),
    "notebook": (
        "notebook",
        ("recycled paper", "vegan leather", "linen", "kraft paper"),
        ("refillable", "lay-flat", "pocket-sized", "dot-grid"),
    ),
    "sunglasses": (
        "pair of sunglasses",
        ("acetate", "titanium", "bamboo", "recycled plastic"),
        ("polarised", "scratch-resistant", "lightweight", "foldable"),
    ),
    "blender": (
        "blender",
        ("stainless steel", "glass", "BPA-free plastic", "aluminium"),
        ("quiet", "dishwasher-safe", "cordless", "compact"),
    ),
    "tent": (
        "tent",
        ("ripstop nylon", "polyester", "canvas", "aluminium"),
        ("waterproof", "ultralight", "quick to pitch", "windproof"),
    ),
    "scarf": (
        "scarf",
        ("cashmere", "merino wool", "organic cotton", "silk"),
        ("machine-washable", "hypoallergenic", "lightweight", "reversible"),
    ),
}
COLOURS = (
    "black",
    "white",
    "navy",
    "forest green",
    "sand",
    "charcoal",
    "terracotta",
    "sky blue",
    "burgundy",
    "mustard",
    "sage",
    "coral",
    "slate grey",
    "ivory",
    "plum",
)
PRICES = ("budget", "mid-range", "premium", "luxury")
AUDIENCES = (
    "students",
    "commuters",
    "runners",
    "families",
    "travellers",
    "gamers",
    "professionals",
    "hikers",
    "home cooks",
    "new parents",
    "artists",
    "remote workers",
)
TONES = ("playful", "luxurious", "minimal", "technical", "friendly")

OPTIONAL = ("material", "audience", "feature")

INTROS: dict[str, tuple[str, ...]] = {
    "playful": (
        "Meet the {name}, {a_colour} {item} that is ready for fun.",
        "Say hello to the {name}: your new favourite {colour} {item}!",
        "Who knew a {item} could be this much fun? The {name} in {colour} did.",
        "The {name} is here, and this {colour} {item} came to play.",
    ),
    "luxurious": (
        "Discover the {name}, {a_colour} {item} crafted for those who expect more.",
        "Indulge in the {name}, an exquisite {item} finished in {colour}.",
        "The {name} redefines the {item}, dressed in refined {colour}.",
        "Elegance, distilled: the {name} {item} in {colour}.",
    ),
    "minimal": (
        "The {name}. A {colour} {item}.",
        "{name}: a {item} in {colour}, nothing more.",
        "One {item}, in {colour}. The {name}.",
        "The {name} is a simple {colour} {item}.",
    ),
    "technical": (
        "The {name} is {a_colour} {item} engineered for performance.",
        "Built to spec, the {name} {item} comes in {colour}.",
        "The {name}: a {item} in {colour}, designed around measurable gains.",
        "Engineered from the ground up, the {colour} {name} sets a new bar for any {item}.",
    ),
    "friendly": (
        "Looking for a new {item}? The {name} in {colour} has you covered.",
        "Say hi to the {name}, {a_colour} {item} you will reach for every day.",
        "The {name} is {a_colour} {item} that just makes life easier.",
        "Here is the {name}: a dependable {item} in {colour}.",
    ),
}
MATERIAL_CLAUSES = (
    "It is made from {material}.",
    "Crafted in {material}.",
    "Its {material} build lasts.",
    "Built from {material} for everyday wear.",
    "The {material} finish feels great.",
)
AUDIENCE_CLAUSES = (
    "Perfect for {audience}.",
    "Designed with {audience} in mind.",
    "A great pick for {audience}.",
    "Made for {audience} on the move.",
    "{Audience} will love it.",
)
FEATURE_CLAUSES = (
    "It is {feature}.",
    "Best of all, it is {feature}.",
    "Fully {feature}, too.",
    "And yes, it is {feature}.",
    "Expect it to be {feature}.",
)
PRICE_CLAUSES: dict[str, tuple[str, ...]] = {
    "budget": ("Great value without cutting corners.", "Easy on the wallet.", "Affordable and honest."),
    "mid-range": ("Fairly priced for everyday use.", "Solid quality at a fair price.", "Good value for the money."),
    "premium": ("A premium choice that shows.", "Premium quality, built to last.", "Worth the step up to premium."),
    "luxury": ("An indulgence worth every penny.", "Pure luxury, no compromises.", "A luxury piece to treasure."),
}
OUTROS: dict[str, tuple[str, ...]] = {
    "playful": ("Go on, treat yourself!", "Fun guaranteed.", ""),
    "luxurious": ("Because you deserve the finest.", "Exceptional, in every detail.", ""),
    "minimal": ("", "That is all.", ""),
    "technical": ("Specifications available on request.", "Tested to perform.", ""),
    "friendly": ("We think you will love it.", "Happy shopping!", ""),
}


@dataclass(frozen=True)
class ProductRecord:
    """One structured source record; absent optional attributes are None."""

    name: str
    category: str
    colour: str
    material: str | None
    price: str
    audience: str | None
    feature: str | None
    tone: str

    def attributes(self) -> dict[str, str]:
        """The present attributes in canonical order."""
        values = {key: getattr(self, key) for key in ATTRIBUTE_ORDER}
        return {key: value for key, value in values.items() if value is not None}


def product_names(count: int, seed: int) -> list[str]:
    """`count` distinct product names, each with its own invented brand word (two syllables and an ending)."""
    syllables = [onset + vowel for onset in ONSETS for vowel in VOWELS]
    space = len(syllables) ** 2 * len(ENDINGS)
    picks = np.random.default_rng([seed, 7]).choice(space, size=min(count, space), replace=False)
    names = []
    for pick in picks.tolist():
        first, rest = divmod(pick, len(syllables) * len(ENDINGS))
        second, ending = divmod(rest, len(ENDINGS))
        brand = (syllables[first] + syllables[second] + ENDINGS[ending]).capitalize()
        names.append(f"{brand} {LINES[pick % len(LINES)]}")
    return names


def sample_record(rng: np.random.Generator, names: list[str]) -> ProductRecord:
    """Draw one record of one of the products; each optional attribute is absent with probability 0.2."""
    category = str(rng.choice(list(CATEGORIES)))
    _, materials, features = CATEGORIES[category]
    present = rng.random(len(OPTIONAL)) >= 0.2
    return ProductRecord(
        name=names[int(rng.integers(len(names)))],
        category=category,
        colour=str(rng.choice(COLOURS)),
        material=str(rng.choice(materials)) if present[0] else None,
        price=str(rng.choice(PRICES)),
        audience=str(rng.choice(AUDIENCES)) if present[1] else None,
        feature=str(rng.choice(features)) if present[2] else None,
        tone=str(rng.choice(TONES)),
    )


LEAVE_OUT = 0.15
"""How often a copywriter leaves out an optional attribute that the record has."""


def write_copy(record: ProductRecord, rng: np.random.Generator, leave_out: float = LEAVE_OUT) -> str:
    """One piece of copy: a tone-specific opening, then the other attributes in a random order and wording.

    Each optional attribute that is present is still left out now and then (p=`leave_out`), as real
    copywriters do.
    """
    item = CATEGORIES[record.category][0]
    article = "an" if record.colour[0] in "aeiou" else "a"
    fields = {"name": record.name, "colour": record.colour, "item": item, "a_colour": f"{article} {record.colour}"}
    sentences = [str(rng.choice(INTROS[record.tone])).format(**fields)]
    clauses: list[str] = [str(rng.choice(PRICE_CLAUSES[record.price]))]
    if record.material and rng.random() >= leave_out:
        clauses.append(str(rng.choice(MATERIAL_CLAUSES)).format(material=record.material))
    if record.audience and rng.random() >= leave_out:
        clauses.append(
            str(rng.choice(AUDIENCE_CLAUSES)).format(
                audience=record.audience, Audience=record.audience[:1].upper() + record.audience[1:]
            )
        )
    if record.feature and rng.random() >= leave_out:
        clauses.append(str(rng.choice(FEATURE_CLAUSES)).format(feature=record.feature))
    order = rng.permutation(len(clauses))
    sentences.extend(clauses[i] for i in order)
    outro = str(rng.choice(OUTROS[record.tone]))
    if outro:
        sentences.append(outro)
    return " ".join(sentences)


def record_of(source: str) -> ProductRecord | None:
    """The demo record a serialised source describes (any syntax, any key order); None if it is not one."""
    parsed = parse_source(source)
    if parsed is None:
        return None
    values = parsed.as_dict()
    required = set(ATTRIBUTE_ORDER) - set(OPTIONAL)
    if not required <= values.keys() or not values.keys() <= set(ATTRIBUTE_ORDER) or values["category"] not in CATEGORIES:
        return None
    return ProductRecord(**{key: values.get(key) for key in ATTRIBUTE_ORDER})


def generate(
    num_records: int, refs_per_record: int, seed: int, chunk_records: int = 4096
) -> Iterator[list[tuple[int, str, str]]]:
    """Yield chunks of (record index, serialised source, reference) rows, refs_per_record rows per record.

    Each chunk has its own generator seeded from (seed, chunk number), so the rows do not depend on the
    chunk being consumed lazily or on how many chunks are read.
    """
    names = product_names(max(1, num_records // RECORDS_PER_NAME), seed)
    for chunk_start in range(0, num_records, chunk_records):
        rng = np.random.default_rng([seed, chunk_start // chunk_records])
        rows: list[tuple[int, str, str]] = []
        for index in range(chunk_start, min(num_records, chunk_start + chunk_records)):
            record = sample_record(rng, names)
            source = serialise(record.attributes())
            references: set[str] = set()
            for _ in range(refs_per_record * 4):
                references.add(write_copy(record, rng))
                if len(references) == refs_per_record:
                    break
            rows.extend((index, source, reference) for reference in sorted(references))
        yield rows
