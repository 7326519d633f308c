"""SQL for items, through the request's `AsyncSession` (`service.db.asyncio.db.session`).
Never commits: the request (or `async with db():`) does.

Lists read plain rows of the `items` table (`ItemRow`), not ORM entities: a page of 20
entities costs about a millisecond of CPU more than reading their rows, and lists change
nothing. The ORM serves one item at a time: `get`, inserts, versioned updates, deletes.

Writes are flushed here, so that constraint violations and lost version races raise inside
the service, where they become domain errors, and not at commit time.
"""

import json
from collections.abc import Collection, Sequence
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Row,
    Select,
    Table,
    delete,
    func,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from service.db.asyncio import db
from service.items.models import Item
from service.items.schemas import ItemFilters, ItemSort

ITEMS = cast(Table, Item.__table__)
# A row of `items`: the columns of `ItemOut`, read by attribute (`row.name`).
ItemRow = Row[Any]
# Every sortable field has an index (field, id), which both sort directions can use.
SORT_COLUMNS: dict[str, Any] = {
    "id": ITEMS.c.id,
    "name": ITEMS.c.name,
    "price": ITEMS.c.price,
    "created_at": ITEMS.c.created_at,
}
UNIQUE_NAME_INDEX = "uq_items_name_lower"


async def get(item_id: int) -> Item | None:
    return await db.session.get(Item, item_id)


async def add(item: Item) -> None:
    """INSERT `item` now (it gets its id). Raises IntegrityError on a taken name."""
    db.session.add(item)
    await db.session.flush()


def is_modified(item: Item) -> bool:
    """Whether `item` has changes not yet saved (a value set to what it was is none)."""
    return db.session.is_modified(item)


async def save_changes() -> None:
    """UPDATE the items changed in this session now, each only if its version is still the
    one read (else `StaleDataError`). Raises IntegrityError on a taken name."""
    await db.session.flush()


async def delete_item(item_id: int, versions: Collection[int] | None = None) -> bool:
    """DELETE the item, only at one of `versions` if given; whether a row was deleted."""
    statement = delete(Item).where(Item.id == item_id)
    if versions is not None:
        statement = statement.where(Item.version.in_(versions))
    result = await db.session.execute(
        statement, execution_options={"synchronize_session": False}
    )
    return cast(CursorResult[Any], result).rowcount == 1


def is_name_taken_error(error: IntegrityError) -> bool:
    """Whether `error` is the case-insensitive unique index on names refusing a row."""
    return UNIQUE_NAME_INDEX in str(error.orig)


async def page_rows(
    filters: ItemFilters, sort: ItemSort, limit: int, offset: int
) -> Sequence[ItemRow]:
    """One page of items in `sort` order: one SELECT."""
    statement = _ordered(_filtered(filters), sort).limit(limit).offset(offset)
    rows: Sequence[ItemRow] = (await db.session.execute(statement)).all()
    return rows


async def count(filters: ItemFilters) -> int:
    """How many items match: `SELECT count(*)`, which reads every one of them."""
    statement = _filtered(filters).with_only_columns(func.count(), maintain_column_froms=True)
    return await db.session.scalar(statement) or 0


async def count_up_to(filters: ItemFilters, limit: int) -> int:
    """How many items match, counting no further than `limit`: reads at most `limit` rows."""
    matching: Select[Any] = _filtered(filters).with_only_columns(
        literal_column("1"), maintain_column_froms=True
    )
    matching = matching.limit(limit)
    return await db.session.scalar(select(func.count()).select_from(matching.subquery())) or 0


async def estimated_count(filters: ItemFilters) -> int | None:
    """The query planner's estimate of how many items match (PostgreSQL's EXPLAIN: reads no
    rows, only statistics); None where the database has no such estimate (SQLite)."""
    if db.session.get_bind().dialect.name != "postgresql":
        return None
    plan = await db.session.scalar(Explain(_filtered(filters)))
    if isinstance(plan, str):  # asyncpg hands json over undecoded
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


class Explain(Executable, ClauseElement):
    """`EXPLAIN (FORMAT JSON) <statement>`, with the statement's parameters bound by the
    driver like any other query's (PostgreSQL only)."""

    inherit_cache = False

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _explain(element: Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + compiler.process(element.statement, **kw)


async def items_after(
    filters: ItemFilters, sort: ItemSort, after: Sequence[Any] | None, limit: int
) -> Sequence[ItemRow]:
    """Up to `limit` items following the position `after` = (sort value, id) in `sort`
    order, or from the start; one SELECT, as cheap at any depth (a range scan of the
    (field, id) index)."""
    statement = _ordered(_filtered(filters), sort).limit(limit)
    if after is not None:
        statement = statement.where(_follows(sort, after))
    rows: Sequence[ItemRow] = (await db.session.execute(statement)).all()
    return rows


def _filtered(filters: ItemFilters) -> Select[Any]:
    """The matching rows of `items` (a Core SELECT of the table: no ORM entities)."""
    c = ITEMS.c
    statement = select(ITEMS)
    if filters.q is not None:
        statement = statement.where(c.name.icontains(filters.q, autoescape=True))
    if filters.min_price is not None:
        statement = statement.where(c.price >= filters.min_price)
    if filters.max_price is not None:
        statement = statement.where(c.price <= filters.max_price)
    if filters.created_after is not None:
        statement = statement.where(c.created_at >= filters.created_after)
    if filters.created_before is not None:
        statement = statement.where(c.created_at < filters.created_before)
    return statement


def _ordered(statement: Select[Any], sort: ItemSort) -> Select[Any]:
    columns = _sort_key(sort)
    return statement.order_by(*(c.desc() if sort.descending else c.asc() for c in columns))


def _sort_key(sort: ItemSort) -> tuple[Any, ...]:
    column = SORT_COLUMNS[sort.field]
    return (column,) if column is ITEMS.c.id else (column, ITEMS.c.id)


def _follows(sort: ItemSort, after: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after `after` = (value, id) in `sort` order: the row-value comparison
    `(field, id) > (:value, :id)` (`<` descending), which the (field, id) index answers as
    a range scan."""
    columns = _sort_key(sort)
    if len(columns) == 1:  # sorting by id alone
        row, position = columns[0], after[-1]
    else:
        row, position = tuple_(*columns), tuple(after)
    return cast(ColumnElement[bool], row < position if sort.descending else row > position)
