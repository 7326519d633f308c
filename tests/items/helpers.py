"""What the items tests look at besides HTTP responses: the rows really committed."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import Engine, select

from service.items.models import Item


def stored(engine: Engine) -> dict[int, dict[str, Any]]:
    """Every committed item by id, read on a connection of its own."""
    with engine.connect() as connection:
        rows = connection.execute(select(Item.__table__)).mappings()
        return {row["id"]: dict(row) for row in rows}


def stored_prices(engine: Engine) -> dict[str, Decimal]:
    """Price of every committed item, by name."""
    return {row["name"]: row["price"] for row in stored(engine).values()}


def insert_items(engine: Engine, *rows: dict[str, Any]) -> list[int]:
    """Commit rows (name, price, optional created_at, ...) directly; returns their ids in
    order. For data a client cannot make, such as creation times in the past."""
    ids = []
    with engine.begin() as connection:
        for row in rows:
            values = {"version": 1, **row}
            values.setdefault("updated_at", values.get("created_at"))
            values = {key: value for key, value in values.items() if value is not None}
            result = connection.execute(Item.__table__.insert().values(**values))
            ids.append(result.inserted_primary_key[0])
    return ids


SORTS = ["id", "-id", "name", "-name", "price", "-price", "created_at", "-created_at"]


def day(n: int, hour: int = 0) -> datetime:
    """January `n`, 2026, UTC."""
    return datetime(2026, 1, n, hour, tzinfo=UTC)


def expected_order(rows: list[dict[str, Any]], sort: str) -> list[int]:
    """The ids of `rows` as `sort` should order them: ties broken by id, same direction."""
    field = sort.removeprefix("-")
    ordered = sorted(rows, key=lambda row: (row[field], row["id"]), reverse=sort != field)
    return [row["id"] for row in ordered]


def ids(response: httpx.Response) -> list[int]:
    """The item ids of a successful list response."""
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]
