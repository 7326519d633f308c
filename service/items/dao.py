"""SQL for items, through the request's `AsyncSession` (`service.db.asyncio.db.session`).
Never commits: the request (or `async with db():`) does.

Lists read plain rows of the `items` table (`ItemRow`: a dict by column name), not ORM
entities: a page of 20 entities costs about a millisecond of CPU more than reading their
rows, and lists change nothing. The ORM serves one item at a time: `get`, inserts,
versioned updates, deletes.

The list statements are built once per shape - sort, which filters are set, first page or
not - with every value a bound parameter (`_list_statement`): building a SELECT in
SQLAlchemy costs about as much CPU as running it, and a page runs the same few shapes.

Writes are flushed here, so that constraint violations and lost version races raise inside
the service, where they become domain errors, and not at commit time.
"""

import operator
from collections.abc import Callable, Collection, Sequence
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CursorResult,
    Integer,
    Result,
    Select,
    Table,
    bindparam,
    case,
    delete,
    func,
    literal,
    literal_column,
    null,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.exc import IntegrityError, InvalidRequestError

from service.db.asyncio import db
from service.db.engine import fold_case
from service.items.models import Item
from service.items.schemas import ItemFilters, ItemSort

ITEMS = cast(Table, Item.__table__)
# A row of `items` as a dict by column name: the fields of `ItemOut`.
ItemRow = dict[str, Any]
# Every sortable field has an index (field, id), which both sort directions can use.
SORT_COLUMNS: dict[str, Any] = {
    "id": ITEMS.c.id,
    "name": ITEMS.c.name,
    "price": ITEMS.c.price,
    "created_at": ITEMS.c.created_at,
}
UNIQUE_NAME_INDEX = "uq_items_name_lower"
_MAX_VERSION = 2**31 - 1  # `items.version` is an INTEGER


async def get(item_id: int, *, for_update: bool = False) -> Item | None:
    """The item, or None; with `for_update`, its row locked until the request ends
    (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite has one writer at a time anyway) and
    read afresh even if the session holds it already."""
    if not for_update:
        return await db.session.get(Item, item_id)
    held = db.session.identity_map.get(db.session.identity_key(Item, item_id))
    if held is None:
        return await db.session.get(Item, item_id, with_for_update=True)
    # A locking read of a held item checks that its version has not moved (StaleDataError);
    # a refresh takes the row as it is now.
    try:
        await db.session.refresh(held, with_for_update=True)
    except InvalidRequestError:  # its row is gone
        db.session.expunge(held)
        return None
    return cast(Item, held)


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
        # A version the column cannot hold matches no row, and must not reach the driver
        # (which refuses an integer wider than the column's).
        storable = [version for version in versions if 0 <= version <= _MAX_VERSION]
        statement = statement.where(Item.version.in_(storable))
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
    values = _filter_values(filters)
    statement = _list_statement(sort, frozenset(values), positioned=False, offset=True)
    parameters = {**values, "limit": limit, "offset": offset}
    return _as_dicts(await db.session.execute(statement, parameters))


async def counted_page(
    filters: ItemFilters,
    sort: ItemSort,
    limit: int,
    offset: int,
    count_up_to: int | None,
    estimate: bool = False,
) -> tuple[int, int | None, list[ItemRow]]:
    """How many items match - every one, or no more than `count_up_to` (reading at most
    that many rows) - and one page of them in `sort` order, in one SELECT: one round trip,
    and the total read in the same snapshot as the rows beside it.

    With `estimate` (and `count_up_to`), a count that reaches `count_up_to` also brings the
    query planner's estimate of how many match, from the same statement
    (`items_estimated_count`, migration 0003: EXPLAIN, which reads no rows); None below it,
    and on databases without such an estimate (SQLite). Returns (count, estimate, page).
    """
    values = _filter_values(filters)
    bounded = count_up_to is not None
    estimate = estimate and bounded and db.session.get_bind().dialect.name == "postgresql"
    statement = _counted_page_statement(sort, frozenset(values), bounded, estimate)
    parameters = {**values, "limit": limit, "offset": offset}
    if count_up_to is not None:
        parameters["count_limit"] = count_up_to
    result = await db.session.execute(statement, parameters)
    skip = 2 if estimate else 1  # the count (and the estimate) before the page's columns
    names = tuple(result.keys())[skip:]
    rows = result.all()  # at least one: the count's row, with NULLs for an empty page
    items = [dict(zip(names, row[skip:], strict=True)) for row in rows if row.id is not None]
    first = rows[0]
    return first.total, first.estimate if estimate else None, items


async def items_after(
    filters: ItemFilters, sort: ItemSort, after: Sequence[Any] | None, limit: int
) -> Sequence[ItemRow]:
    """Up to `limit` items following the position `after` = (sort value, id) in `sort`
    order, or from the start; one SELECT, as cheap at any depth (a range scan of the
    (field, id) index)."""
    values = _filter_values(filters)
    statement = _list_statement(
        sort, frozenset(values), positioned=after is not None, offset=False
    )
    parameters = {**values, "limit": limit}
    if after is not None:
        parameters["after_value"], parameters["after_id"] = after
    return _as_dicts(await db.session.execute(statement, parameters))


def _as_dicts(result: Result[Any]) -> list[ItemRow]:
    # Row._asdict() works out the column names again for every row.
    names = tuple(result.keys())
    return [dict(zip(names, row, strict=True)) for row in result]


# -- the list statements, one per shape; values are bound parameters named as below -------

# Each filter: the column it tests, and how it compares that column with its value.
_FILTER_TESTS: dict[str, tuple[ColumnElement[Any], Callable[[Any, Any], Any]]] = {
    # `q` is bound as a LIKE pattern with its own % _ / escaped (`_filter_values`).
    "q": (
        ITEMS.c.name,
        lambda column, value: fold_case(column).contains(fold_case(value), escape="/"),
    ),
    "min_price": (ITEMS.c.price, operator.ge),
    "max_price": (ITEMS.c.price, operator.le),
    "created_after": (ITEMS.c.created_at, operator.ge),
    "created_before": (ITEMS.c.created_at, operator.lt),
}


def _conditions(
    value: Callable[[str, ColumnElement[Any]], ColumnElement[Any]],
) -> dict[str, ColumnElement[bool]]:
    """Each filter's condition on `items`, by the filter's name, comparing its column with
    `value(name, column)`."""
    return {
        name: test(column, value(name, column)) for name, (column, test) in _FILTER_TESTS.items()
    }


def _bound(name: str, column: ColumnElement[Any]) -> ColumnElement[Any]:
    return bindparam(name, type_=column.type)


_FILTERS = _conditions(_bound)
# `items_estimated_count`'s arguments after the query text, in order (migration 0003): the
# query refers to them as $1..$5.
_ESTIMATE_ARGUMENTS = ("q", "min_price", "max_price", "created_after", "created_before")
_POSITIONAL = _conditions(
    lambda name, column: literal_column(f"${_ESTIMATE_ARGUMENTS.index(name) + 1}")
)
# Renders the positional query's text: any PostgreSQL dialect whose parameter style does
# not double the % of the LIKE pattern's literals.
_ESTIMATE_DIALECT = PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]


def _filter_values(filters: ItemFilters) -> dict[str, Any]:
    """The bound values of the filters that are set, by parameter name: its keys say which
    statement shape to run."""
    values = {name: getattr(filters, name) for name in _FILTERS}
    if filters.q is not None:
        values["q"] = _like_escaped(filters.q)
    return {name: value for name, value in values.items() if value is not None}


def _like_escaped(text: str) -> str:
    """`text` matching only itself inside a LIKE pattern with ESCAPE '/'."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


@cache
def _filtered(names: frozenset[str]) -> Select[Any]:
    """The rows of `items` matching the filters `names` (a Core SELECT of the table: no ORM
    entities)."""
    return select(ITEMS).where(*(_FILTERS[name] for name in _FILTERS if name in names))


@cache
def _list_statement(
    sort: ItemSort, filters: frozenset[str], positioned: bool, offset: bool
) -> Select[Any]:
    """Matching items in `sort` order, `:limit` of them; after the position
    (`:after_value`, `:after_id`) if `positioned`; from row `:offset` if `offset`."""
    columns = _sort_key(sort)
    statement = _filtered(filters).order_by(
        *(c.desc() if sort.descending else c.asc() for c in columns)
    ).limit(bindparam("limit", type_=Integer))
    if positioned:
        statement = statement.where(_follows(sort))
    if offset:
        # BIGINT: page x size passes 2**31 - 1 (asyncpg refuses a larger INTEGER).
        statement = statement.offset(bindparam("offset", type_=BigInteger))
    return statement


@cache
def _counted_page_statement(
    sort: ItemSort, filters: frozenset[str], bounded: bool, estimate: bool = False
) -> Select[Any]:
    """`total` - how many rows match, counting no further than `:count_limit` if `bounded` -
    (with `estimate`: and `estimate`, the planner's estimate when the count reached
    `:count_limit`, else NULL; PostgreSQL) and the columns of the page
    `_list_statement(sort, filters, offset=True)`: the count's one row left-joined to the
    page's rows, so that an empty page still brings the count."""
    matching = _filtered(filters)
    counted: Select[Any]
    if bounded:
        ones: Select[Any] = matching.with_only_columns(
            literal_column("1"), maintain_column_froms=True
        )
        count_limit = bindparam("count_limit", type_=Integer)
        counted = select(func.count().label("total")).select_from(
            ones.limit(count_limit).subquery()
        )
        if estimate:
            # In the count's one row, so it runs once, and only above the threshold.
            reached = case((func.count() >= count_limit, _estimated_count(filters)))
            counted = counted.add_columns(reached.label("estimate"))
    else:
        counted = matching.with_only_columns(
            func.count().label("total"), maintain_column_froms=True
        )
    total = counted.subquery("counted")
    page = _list_statement(sort, filters, positioned=False, offset=True).subquery("page")
    # The join keeps no order of its own: the page's order again, on its 1-100 rows.
    order = (page.c[column.name] for column in _sort_key(sort))
    counts = (total.c.total, total.c.estimate) if estimate else (total.c.total,)
    return (
        select(*counts, page)
        .select_from(total.outerjoin(page, true()))
        .order_by(*(c.desc() if sort.descending else c.asc() for c in order))
    )


def _estimated_count(filters: frozenset[str]) -> ColumnElement[int]:
    """`items_estimated_count(...)` (migration 0003) of the rows matching `filters`: the
    filtered query as text with $1..$5 for the filters' values, then the values, bound as
    the page's own (NULL for a filter not set)."""
    query = select(ITEMS.c.id).where(
        *(_POSITIONAL[name] for name in _FILTERS if name in filters)
    )
    sql = str(query.compile(dialect=_ESTIMATE_DIALECT, compile_kwargs={"literal_binds": True}))
    arguments = (
        _bound(name, _FILTER_TESTS[name][0]) if name in filters else null()
        for name in _ESTIMATE_ARGUMENTS
    )
    return func.items_estimated_count(literal(sql), *arguments, type_=BigInteger)


def _sort_key(sort: ItemSort) -> tuple[Any, ...]:
    column = SORT_COLUMNS[sort.field]
    return (column,) if column is ITEMS.c.id else (column, ITEMS.c.id)


def _follows(sort: ItemSort) -> ColumnElement[bool]:
    """Rows strictly after the position (`:after_value`, `:after_id`) in `sort` order: the
    row-value comparison `(field, id) > (:after_value, :after_id)` (`<` descending), which
    the (field, id) index answers as a range scan. Sorting by id alone compares the id."""
    columns = _sort_key(sort)
    after_id = bindparam("after_id", type_=ITEMS.c.id.type)
    row: ColumnElement[Any]
    position: ColumnElement[Any]
    if len(columns) == 1:
        row, position = columns[0], after_id
    else:
        after_value = bindparam("after_value", type_=columns[0].type)
        row, position = tuple_(*columns), tuple_(after_value, after_id)
    return row < position if sort.descending else row > position
