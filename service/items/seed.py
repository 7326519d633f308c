"""Made-up but plausible items, for trying the API and for benchmarks
(`python -m service seed --items N`).

Every name ends in the run's token and a counter, so seeding again never collides with
earlier runs (names are unique regardless of case).

How the rows get in, fastest first:
- PostgreSQL makes the rows up itself (`seed_dao.insert_made_up`: one INSERT ... SELECT per
  batch, nothing but the words crosses the wire).
  - Adding at least as many rows as the table holds: one transaction that drops the
    secondary indexes, inserts every batch and builds the indexes again (a bulk build is
    far cheaper than maintaining four indexes row by row, and the unique index is checked
    over everything when it is rebuilt). Other sessions wait for the table meanwhile; if
    anything fails, nothing of it stays.
  - Otherwise, or `--online` (a service is using the table): batches inserted by `writers`
    connections at once, each batch its own transaction.
- SQLite: rows made up here (`fake_items`, the same kinds of rows), batches of multi-row
  INSERTs, one writer.
"""

import itertools
import random
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service.db import db
from service.items import seed_dao
from service.principal import CLI_PREFIX

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
_A_YEAR = 365 * 24 * 3600.0
# Who the seeded items say created them (`created_by`, `updated_by`).
SEEDED_BY = f"{CLI_PREFIX}seed"


def fake_items(count: int, run_token: str, rng: random.Random) -> Iterator[dict[str, Any]]:
    """`count` rows for the items table: varied names, descriptions (one in eight empty),
    prices from 0.50 to about 2,000 (mostly cheap), creation times over the past year,
    created by `SEEDED_BY`."""
    now = datetime.now(UTC).timestamp()
    choice, chance = rng.choice, rng.random
    for number in range(1, count + 1):
        style, material, thing = choice(_STYLES), choice(_MATERIALS), choice(_THINGS)
        created_at = datetime.fromtimestamp(now - chance() * _A_YEAR, UTC)
        description = (
            None if chance() < 0.125 else f"{style} {thing} in {material}, {choice(_FEATURES)}."
        )
        yield {
            "name": f"{style} {material} {thing} {run_token}-{number}",
            "description": description,
            # Log-uniform between 0.50 and ~2,000: most things are cheap, a few are not.
            "price": Decimal(int(50 * 4000 ** chance())).scaleb(-2),
            "created_at": created_at,
            "updated_at": created_at,
            "version": 1,
            "created_by": SEEDED_BY,
            "updated_by": SEEDED_BY,
        }


def run_token() -> str:
    """A short random tag that makes one seeding run's names its own."""
    return secrets.token_hex(4)


Progress = Callable[[int], None]


def seed_items(
    count: int, batch: int, writers: int, progress: Progress, online: bool = False
) -> None:
    """Insert `count` made-up items, `batch` rows at a time; `progress(n)` after each batch.
    `online`: never the bulk load that locks the table (a service using it meanwhile).

    Needs `db` configured. See the module docstring for how the rows get in.
    """
    token = run_token()
    numbered = [range(first, min(first + batch, count + 1)) for first in range(1, count + 1, batch)]
    with db():
        made_in_database = seed_dao.bulk_load_supported()
        rebuild = made_in_database and not online and count >= seed_dao.count_all()

    def store(numbers: range) -> int:
        seed_dao.insert_made_up(
            numbers, token, SEEDED_BY, styles=_STYLES, materials=_MATERIALS, things=_THINGS,
            features=_FEATURES,
        )
        return len(numbers)

    if rebuild:
        with db(), seed_dao.secondary_indexes_dropped():
            for numbers in numbered:
                progress(store(numbers))
    elif made_in_database:
        _in_parallel(numbered, store, writers, progress)
    else:
        # SQLite lets one transaction write at a time: more writers would only queue.
        rows = fake_items(count, token, random.Random())
        for numbers in numbered:
            with db():
                seed_dao.insert_many(list(itertools.islice(rows, len(numbers))))
            progress(len(numbers))


def _in_parallel(
    batches: list[range], store: Callable[[range], int], writers: int, progress: Progress
) -> None:
    """`store` every batch, each in its own transaction, `writers` at a time."""

    def store_in_transaction(numbers: range) -> int:
        with db():
            return store(numbers)

    with ThreadPoolExecutor(max_workers=writers) as pool:
        for stored in pool.map(store_in_transaction, batches):
            progress(stored)
