"""The rules of items: unique names, optimistic concurrency, stable scrolling.

Raises domain errors (`service.domain_errors`), which the app answers as problem documents:
404 unknown item, 409 name taken, 412 stale version, 428 update without a precondition,
400 bad cursor.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from pydantic import TypeAdapter
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from service.cursors import InvalidCursor, read_cursor, sign_cursor
from service.domain_errors import Conflict, NotFound, PreconditionFailed, PreconditionRequired
from service.items import dao
from service.items.dao import ItemRow
from service.items.models import Item
from service.items.schemas import (
    CENT,
    CURSOR_MAX_LENGTH,
    CountMode,
    ItemCreate,
    ItemFilters,
    ItemPage,
    ItemScroll,
    ItemSort,
    ItemUpdate,
    PageParams,
    one_line,
)
from service.principal import current_principal


@dataclass(frozen=True)
class VersionMatch:
    """The versions of an item a client agrees to overwrite (from If-Match or the body);
    `versions=None` means any version (`If-Match: *`)."""

    versions: frozenset[int] | None

    def accepts(self, version: int) -> bool:
        return self.versions is None or version in self.versions


ANY_VERSION = VersionMatch(None)


async def create_item(data: ItemCreate) -> Item:
    """Store a new item, created (and so last changed) by the current principal."""
    who = current_principal().name
    item = Item(
        name=data.name,
        description=data.description,
        price=data.price,
        created_by=who,
        updated_by=who,
    )
    try:
        await dao.add(item)
    except IntegrityError as error:
        if dao.is_name_taken_error(error):
            raise _name_taken(item.name) from None
        raise
    return item


async def get_item(item_id: int, *, for_update: bool = False) -> Item:
    item = await dao.get(item_id, for_update=for_update)
    if item is None:
        raise NotFound(f"There is no item {item_id}.")
    return item


async def update_item(
    item_id: int, update: ItemUpdate, if_match: VersionMatch | None
) -> Item:
    """Apply `update` if every precondition sent (If-Match, body `version`) accepts the
    item's current version; one is required. Bumps the version, and records the current
    principal as `updated_by`, if anything changed."""
    # `If-Match: *` accepts any version, so a concurrent update must not make it fail: the
    # row is locked as it is read, and the versioned UPDATE below finds the version read.
    item = await get_item(item_id, for_update=if_match is ANY_VERSION)
    preconditions = [if_match] if if_match is not None else []
    if update.version is not None:
        preconditions.append(VersionMatch(frozenset({update.version})))
    if not preconditions:
        raise PreconditionRequired(
            "Updating an item needs a precondition, so that no one's change is lost: send "
            "the ETag you got as If-Match, or the `version` you read in the body."
        )
    if not all(precondition.accepts(item.version) for precondition in preconditions):
        raise _changed_since_read(item)
    changes = update.changes()
    for field, value in changes.items():
        setattr(item, field, value)
    if dao.is_modified(item):  # an update that changes nothing records nobody
        item.updated_by = current_principal().name
    try:
        # The UPDATE says `WHERE version = <read version>`: a request that changed the item
        # since we read it makes it match no row.
        await dao.save_changes()
    except StaleDataError:
        raise PreconditionFailed(
            f"Item {item_id} was changed by another request meanwhile; GET it again and "
            "re-apply your change."
        ) from None
    except IntegrityError as error:
        if dao.is_name_taken_error(error):
            raise _name_taken(changes["name"]) from None
        raise
    return item


async def delete_item(item_id: int, if_match: VersionMatch | None) -> None:
    """Delete the item; if `if_match` is given, only at a version it accepts."""
    versions = if_match.versions if if_match is not None else None
    if not await dao.delete_item(item_id, versions):
        raise _changed_since_read(await get_item(item_id))  # or NotFound, if it is not there


async def list_items(
    filters: ItemFilters, sort: ItemSort, paging: PageParams, count: CountMode, threshold: int
) -> ItemPage:
    """The page `paging` asks for, with a total counted as `count` says:

    - exact: every matching item (`count(*)`), in the statement that reads the page
      (1 statement);
    - estimated: exact up to `threshold` matching items, counted in the page's statement by
      a count that stops there; above it, on PostgreSQL, the planner's estimate of the same
      filtered query, asked for by that statement (`dao.counted_page`), else the threshold
      itself as a lower bound (1 statement); never less than the rows up to the end of
      this page;
    - none: no total and no page count (1 statement).
    """
    window = paging.to_raw_params().as_limit_offset()
    limit, offset = window.limit or 0, window.offset or 0
    if count is CountMode.none:
        items = await dao.page_rows(filters, sort, limit=limit, offset=offset)
        return _page(items, paging, total=None, exact=False)
    bounded = count is CountMode.estimated
    counted, estimate, items = await dao.counted_page(
        filters,
        sort,
        limit=limit,
        offset=offset,
        count_up_to=threshold + 1 if bounded else None,
        estimate=bounded,
    )
    if not bounded or counted <= threshold:
        return _page(items, paging, total=counted, exact=True)
    # More than the threshold: never report fewer than the rows known to be there - the
    # threshold, and every row up to the end of this page (so `pages` reaches this page).
    # (An empty page, past the end, knows nothing of where the rows end.)
    known = max(threshold, offset + len(items)) if items else threshold
    return _page(items, paging, total=max(estimate or 0, known), exact=False)


def _page(
    items: Sequence[ItemRow], paging: PageParams, total: int | None, exact: bool
) -> ItemPage:
    # Validated from the rows' dicts in one go, like the scroll page.
    return ItemPage.create(cast(Sequence[Any], items), paging, total=total, total_is_exact=exact)


async def scroll_items(
    filters: ItemFilters, sort: ItemSort, cursor: str | None, size: int, secret: bytes
) -> ItemScroll:
    """`size` items after the cursor's position (from the start without one) and the cursor
    of the next page. Rows inserted or deleted meanwhile never shift the position."""
    after = _position(cursor, sort, secret) if cursor is not None else None
    # One more than asked for: is there a next page?
    items = await dao.items_after(filters, sort, after, limit=size + 1)
    page, more = items[:size], len(items) > size
    next_page = _cursor_after(page[-1], sort, secret) if more else None
    # Validated from the rows' dicts in one go: several times cheaper than item by item
    # from attributes, or from row mappings (read key by key through Python).
    return _SCROLL.validate_python({"items": page, "next_page": next_page})


_SCROLL = TypeAdapter(ItemScroll)


# -- cursors: {"sort": "-price", "after": ["12.50", 4711]}, signed (service.cursors) ------


def _cursor_after(item: ItemRow, sort: ItemSort, secret: bytes) -> str:
    value = item[sort.field]
    if isinstance(value, Decimal | datetime):
        value = value.isoformat() if isinstance(value, datetime) else str(value)
    return sign_cursor({"sort": sort.value, "after": [value, item["id"]]}, secret)


def _position(cursor: str, sort: ItemSort, secret: bytes) -> tuple[Any, int]:
    payload = read_cursor(cursor, secret, max_length=CURSOR_MAX_LENGTH)
    if payload.get("sort") != sort.value:
        made_for = payload.get("sort")
        raise InvalidCursor(
            f"This cursor continues a scroll sorted by {made_for!r}, not {sort.value!r}; "
            f"repeat sort={made_for} or start again without a cursor."
        )
    after = payload.get("after")
    if not isinstance(after, list) or len(after) != 2 or not _is_id(after[1]):
        raise InvalidCursor("The cursor does not name a position; start again without one.")
    try:
        return _sort_value(sort.field, after[0]), after[1]
    except (TypeError, ValueError, InvalidOperation, OverflowError):
        raise InvalidCursor(
            "The cursor does not name a position; start again without one."
        ) from None


def _is_id(raw: object) -> bool:
    return type(raw) is int and -(2**63) <= raw < 2**63  # a BIGINT


_PRICE_LIMIT = Decimal("1e10")  # NUMERIC(12, 2)


def _sort_value(field: str, raw: object) -> Any:
    """The cursor's JSON value of `field` as the Python value the column compares with; a
    value no row can hold is refused (ValueError, OverflowError) rather than sent to the
    database, which would fail on it. (A signed cursor holds what a page ended on; this is
    for one signed with a leaked secret, or by an older release.)"""
    if field == "id" and _is_id(raw):
        return raw
    if field == "name" and isinstance(raw, str):
        return one_line(raw)  # as names are: no NUL, no lone surrogate
    if field == "price" and isinstance(raw, str):
        price = Decimal(raw)
        if abs(price) < _PRICE_LIMIT and price == price.quantize(CENT):
            return price.quantize(CENT)  # "1E-16384" is no price; "0E-20000" is 0.00
    if field == "created_at" and isinstance(raw, str):
        moment = datetime.fromisoformat(raw)
        if moment.tzinfo is not None:
            return moment.astimezone(UTC)  # OverflowError past the year 9999 in UTC
    raise ValueError(f"not a {field} value: {raw!r}")


def _changed_since_read(item: Item) -> PreconditionFailed:
    return PreconditionFailed(
        f"Item {item.id} is at version {item.version}, not the one your precondition names; "
        "GET it again and re-apply your change."
    )


def _name_taken(name: str) -> Conflict:
    return Conflict(f"An item named {name!r} exists already (names ignore case).")
