"""Made-up but plausible items, for trying the API and for benchmarks
(`python -m service seed --items N`).

Every name ends in the run's token and a counter, so seeding again never collides with
earlier runs (names are unique regardless of case).
"""

import random
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from service.items import dao

_STYLES = (
    "Rustic", "Modern", "Vintage", "Compact", "Deluxe", "Classic", "Nordic", "Industrial",
    "Handmade", "Minimal", "Folding", "Portable", "Heavy-duty", "Cordless", "Smart",
)
_MATERIALS = (
    "oak", "walnut", "bamboo", "steel", "brass", "linen", "wool", "ceramic", "glass",
    "leather", "cotton", "marble", "copper", "rattan", "aluminium",
)
_THINGS = (
    "desk lamp", "armchair", "coffee table", "bookshelf", "teapot", "rug", "mirror",
    "backpack", "water bottle", "cutting board", "wall clock", "planter", "stool",
    "blanket", "kettle", "headphones", "notebook", "umbrella", "vase", "toolbox",
)
_FEATURES = (
    "easy to clean", "built to last", "made in small batches", "ships flat-packed",
    "with a two-year warranty", "in three colours", "with a matte finish",
    "light enough to carry anywhere", "designed in Lisbon", "from sustainable sources",
)
_A_YEAR = timedelta(days=365).total_seconds()


def fake_items(count: int, run_token: str, rng: random.Random) -> Iterator[dict[str, Any]]:
    """`count` rows for the items table: varied names, descriptions (one in eight empty),
    prices from 0.50 to about 2,000 (mostly cheap), creation times over the past year."""
    now = datetime.now(UTC)
    for number in range(1, count + 1):
        style, material, thing = (
            rng.choice(_STYLES), rng.choice(_MATERIALS), rng.choice(_THINGS)
        )
        created_at = now - timedelta(seconds=rng.random() * _A_YEAR)
        description = (
            None
            if rng.random() < 0.125
            else f"{style} {thing} in {material}, {rng.choice(_FEATURES)}."
        )
        yield {
            "name": f"{style} {material} {thing} {run_token}-{number}",
            "description": description,
            # Log-uniform between 0.50 and ~2,000: most things are cheap, a few are not.
            "price": Decimal(int(50 * 4000 ** rng.random())).scaleb(-2),
            "created_at": created_at,
            "updated_at": created_at,
            "version": 1,
        }


def run_token() -> str:
    """A short random tag that makes one seeding run's names its own."""
    return secrets.token_hex(4)


def insert_items(rows: list[dict[str, Any]]) -> None:
    """Insert one batch of `fake_items` rows in the current unit of work."""
    dao.insert_many(rows)
