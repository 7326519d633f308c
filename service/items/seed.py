"""Made-up but plausible items, for trying the API and for benchmarks
(`python -m service seed --items N`).

Every name ends in the run's token and a counter, so seeding again never collides with
earlier runs (names are unique regardless of case).

How the rows get in, fastest first:
- PostgreSQL, adding at least as many rows as the table holds: one transaction that drops
  the secondary indexes, COPYs every batch and builds the indexes again (a bulk build is
  far cheaper than maintaining five indexes row by row, and the unique index is checked
  over everything when it is rebuilt). Other sessions wait for the table meanwhile; if
  anything fails, nothing of it stays.
- PostgreSQL otherwise: batches COPYed by `writers` connections at once, each batch its
  own transaction, while this thread makes up the next ones.
- SQLite: batches of multi-row INSERTs, one writer.
"""

import itertools
import random
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from queue import Full, Queue
from typing import Any

from service.db import db
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
_A_YEAR = 365 * 24 * 3600.0


def fake_items(count: int, run_token: str, rng: random.Random) -> Iterator[dict[str, Any]]:
    """`count` rows for the items table: varied names, descriptions (one in eight empty),
    prices from 0.50 to about 2,000 (mostly cheap), creation times over the past year."""
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
        }


def run_token() -> str:
    """A short random tag that makes one seeding run's names its own."""
    return secrets.token_hex(4)


Progress = Callable[[int], None]


def seed_items(count: int, batch: int, writers: int, progress: Progress) -> None:
    """Insert `count` made-up items, `batch` rows at a time; `progress(n)` after each batch.

    Needs `db` configured. See the module docstring for how the rows get in.
    """
    rows = fake_items(count, run_token(), random.Random())
    batches = iter(lambda: list(itertools.islice(rows, batch)), [])
    with db():
        bulk = dao.bulk_load_supported()
        rebuild = bulk and count >= dao.count_all()
    if rebuild:
        _store_in_one_transaction(batches, progress)
    else:
        # SQLite lets one transaction write at a time: more writers would only queue.
        _store_in_parallel(batches, writers if bulk else 1, progress)


def _store_in_one_transaction(
    batches: Iterator[list[dict[str, Any]]], progress: Progress
) -> None:
    """One writer thread loads every batch in one transaction, indexes dropped, while this
    thread makes up the next batch (the database works meanwhile)."""
    handoff: Queue[list[dict[str, Any]] | None] = Queue(maxsize=2)

    def load() -> None:
        with db(), dao.secondary_indexes_dropped():
            while (rows := handoff.get()) is not None:
                dao.insert_many(rows)
                progress(len(rows))

    with ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(load)
        for rows in itertools.chain(batches, [None]):
            while not loading.done():  # a failed loader takes no more: stop making rows
                try:
                    handoff.put(rows, timeout=0.1)
                    break
                except Full:
                    continue
            if loading.done():
                break
        loading.result()  # the loader's error, if any


def _store_in_parallel(
    batches: Iterator[list[dict[str, Any]]], writers: int, progress: Progress
) -> None:
    def store(rows: list[dict[str, Any]]) -> int:
        with db():  # one transaction per batch, on the writer thread
            dao.insert_many(rows)
        return len(rows)

    # The database stores batches while this thread makes up the next one.
    with ThreadPoolExecutor(max_workers=writers) as pool:
        pending: deque[Future[int]] = deque()
        for rows in batches:
            pending.append(pool.submit(store, rows))
            while len(pending) > writers or (pending and pending[0].done()):
                progress(pending.popleft().result())
        while pending:
            progress(pending.popleft().result())
