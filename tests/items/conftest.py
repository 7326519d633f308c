"""Fixtures of the items API tests."""

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from tests.items.helpers import day, insert_items

CreateItem = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def create_item(client: httpx.AsyncClient) -> CreateItem:
    """`await create_item("Lamp", price="9.90")`: POST /items, assert 201, return the body."""

    async def create(name: str, price: str = "1.00", **fields: Any) -> dict[str, Any]:
        response = await client.post("/items", json={"name": name, "price": price, **fields})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    return create


@pytest.fixture
def shop(engine: Engine) -> list[dict[str, Any]]:
    """Ten items with repeated prices and creation times, so sorts need their tie-breaker.
    Names are lower case: their order is the same under every collation."""
    rows = [
        {"name": name, "price": Decimal(price), "created_at": day(created)}
        for name, price, created in [
            ("kettle", "30.00", 3),
            ("armchair", "250.00", 1),
            ("lamp", "30.00", 2),
            ("rug", "120.00", 3),
            ("teapot", "18.50", 1),
            ("vase", "30.00", 4),
            ("mirror", "120.00", 2),
            ("blanket", "45.00", 3),
            ("stool", "18.50", 4),
            ("clock", "0.00", 5),
        ]
    ]
    for row, item_id in zip(rows, insert_items(engine, *rows), strict=True):
        row["id"] = item_id
    return rows
