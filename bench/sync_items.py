"""The service's two item lists as they were served before the items API went async: `def`
routes on the sync `service.db` (psycopg2) reading ORM entities (`select(Item)`), the code
of the service's sync version, kept here as the "today (sync)" of the async targets.

The HTTP contract is the service's own - the same parameters, schemas (`ItemPage`,
`ItemScroll`), signed cursors and count modes, through the service's router helpers and
cursor code - so a sync and an async response differ only in how they were made.
"""

from collections.abc import Sequence
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi_pagination import create_page, resolve_params
from fastapi_pagination.bases import AbstractParams
from sqlalchemy import ColumnElement, Select, func, literal_column, select, tuple_

from service.auth import Requirement
from service.config import Settings
from service.db import db
from service.items.models import Item
from service.items.router import Filters, Sort, preferred_count
from service.items.schemas import CountMode, ItemFilters, ItemOut, ItemPage, ItemScroll, ItemSort
from service.items.service import _cursor_after, _position

router = APIRouter(prefix="/items", dependencies=[Depends(Requirement("items:read", reads=True))])


async def cursor_secret(request: Request) -> bytes:
    # async: a sync dependency would cost every scroll page a hop to the threadpool
    settings: Settings = request.app.state.settings
    return settings.cursor_key()


# Every sortable field has an index (field, id), which both sort directions can use.
SORT_COLUMNS: dict[str, Any] = {
    "id": Item.id,
    "name": Item.name,
    "price": Item.price,
    "created_at": Item.created_at,
}


@router.get("", response_model=ItemPage)
def list_items(
    filters: Filters,
    request: Request,
    response: Response,
    sort: Sort = ItemSort.id_asc,
    count: CountMode | None = None,
    prefer: Annotated[str | None, Header()] = None,
) -> Any:
    """GET /items of the service: numbered pages with a total counted as `count` says."""
    mode = count
    if mode is None and (preferred := preferred_count(prefer)) is not None:
        mode = preferred
        response.headers["Preference-Applied"] = f"count={mode.value}"
    settings: Settings = request.app.state.settings
    params: AbstractParams = resolve_params()
    window = params.to_raw_params().as_limit_offset()
    total, exact = _total(filters, mode or CountMode.estimated, settings.count_threshold)
    statement = _ordered(_filtered(filters), sort)
    statement = statement.limit(window.limit or 0).offset(window.offset or 0)
    items = list(db.session.scalars(statement))
    return create_page(items, total=total, params=params, total_is_exact=exact)


@router.get("/scroll")
def scroll_items(
    filters: Filters,
    secret: Annotated[bytes, Depends(cursor_secret)],
    sort: Sort = ItemSort.id_asc,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ItemScroll:
    """GET /items/scroll of the service: `size` items after the cursor, and the next cursor."""
    after = _position(cursor, sort, secret) if cursor is not None else None
    statement = _ordered(_filtered(filters), sort).limit(size + 1)  # one more: a next page?
    if after is not None:
        statement = statement.where(_follows(sort, after))
    items = list(db.session.scalars(statement))
    page, more = items[:size], len(items) > size
    last = page[-1]
    position = {sort.field: getattr(last, sort.field), "id": last.id}
    next_page = _cursor_after(position, sort, secret) if more else None
    return ItemScroll(items=[ItemOut.model_validate(item) for item in page], next_page=next_page)


def _total(filters: ItemFilters, count: CountMode, threshold: int) -> tuple[int | None, bool]:
    """The total to report and whether it is exact (the service's rules)."""
    if count is CountMode.none:
        return None, False
    if count is CountMode.exact:
        statement = _filtered(filters).with_only_columns(func.count(), maintain_column_froms=True)
        return db.session.scalar(statement) or 0, True
    matching: Select[Any] = _filtered(filters).with_only_columns(
        literal_column("1"), maintain_column_froms=True
    )
    bounded = select(func.count()).select_from(matching.limit(threshold + 1).subquery())
    counted = db.session.scalar(bounded) or 0
    if counted <= threshold:
        return counted, True
    return max(_estimated_count(filters) or 0, threshold), False


def _estimated_count(filters: ItemFilters) -> int | None:
    """The planner's estimate (PostgreSQL's EXPLAIN), None on other databases."""
    connection = db.session.connection()
    if connection.dialect.name != "postgresql":
        return None
    compiled = _filtered(filters).compile(dialect=connection.dialect)
    plan = connection.exec_driver_sql(
        f"EXPLAIN (FORMAT JSON) {compiled.string}", compiled.params
    ).scalar_one()
    return int(plan[0]["Plan"]["Plan Rows"])


def _filtered(filters: ItemFilters) -> Select[tuple[Item]]:
    statement = select(Item)
    if filters.q is not None:
        statement = statement.where(Item.name.icontains(filters.q, autoescape=True))
    if filters.min_price is not None:
        statement = statement.where(Item.price >= filters.min_price)
    if filters.max_price is not None:
        statement = statement.where(Item.price <= filters.max_price)
    if filters.created_after is not None:
        statement = statement.where(Item.created_at >= filters.created_after)
    if filters.created_before is not None:
        statement = statement.where(Item.created_at < filters.created_before)
    return statement


def _ordered(statement: Select[tuple[Item]], sort: ItemSort) -> Select[tuple[Item]]:
    columns = _sort_key(sort)
    return statement.order_by(*(c.desc() if sort.descending else c.asc() for c in columns))


def _sort_key(sort: ItemSort) -> tuple[Any, ...]:
    column = SORT_COLUMNS[sort.field]
    return (Item.id,) if column is Item.id else (column, Item.id)


def _follows(sort: ItemSort, after: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after `after` = (value, id) in `sort` order (a range scan)."""
    columns = _sort_key(sort)
    if len(columns) == 1:
        row, position = columns[0], after[-1]
    else:
        row, position = tuple_(*columns), tuple(after)
    return cast(ColumnElement[bool], row < position if sort.descending else row > position)
