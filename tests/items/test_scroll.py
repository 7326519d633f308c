"""GET /items/scroll: keyset pagination with signed cursors."""

import base64
import json
import string
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, delete

from service import cursors
from service.config import Settings
from service.cursors import sign_cursor
from service.items.models import Item
from service.items.schemas import CURSOR_MAX_LENGTH
from tests.items.helpers import SORTS, expected_order, insert_items

pytestmark = pytest.mark.anyio


async def scroll(
    client: httpx.AsyncClient, **params: Any
) -> tuple[list[dict[str, Any]], str | None]:
    response = await client.get("/items/scroll", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"items", "next_page"}
    return body["items"], body["next_page"]


async def scroll_all(client: httpx.AsyncClient, **params: Any) -> list[list[int]]:
    pages, cursor = [], None
    while True:
        items, cursor = await scroll(client, **params, **({"cursor": cursor} if cursor else {}))
        pages.append([item["id"] for item in items])
        if cursor is None:
            return pages


def alter_payload(cursor: str, change: dict[str, Any]) -> str:
    payload, signature = cursor.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    altered = json.dumps({**data, **change}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(altered.encode()).rstrip(b"=").decode() + "." + signature


@pytest.mark.parametrize("sort", SORTS)
async def test_scrolling_to_the_end_visits_every_item_once_in_sort_order(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], sort: str
) -> None:
    pages = await scroll_all(client, sort=sort, size=3)

    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [item_id for page in pages for item_id in page] == expected_order(shop, sort)


async def test_the_page_that_ends_exactly_at_the_last_item_has_no_next_page(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    pages = await scroll_all(client, size=5)

    assert [len(page) for page in pages] == [5, 5]


async def test_an_empty_scroll_has_no_items_and_no_next_page(client: httpx.AsyncClient) -> None:
    assert await scroll(client) == ([], None)


async def test_filters_apply_to_every_page(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    matching = [row for row in shop if row["price"] <= 30 and "t" in row["name"]]

    pages = await scroll_all(client, sort="-price", max_price="30", q="T", size=2)

    assert [item_id for page in pages for item_id in page] == expected_order(matching, "-price")


@pytest.mark.parametrize("sort", SORTS)
async def test_each_page_is_one_query(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], assert_max_queries: Any, sort: str
) -> None:
    _, cursor = await scroll(client, sort=sort, size=4)

    with assert_max_queries(1):
        items, _ = await scroll(client, sort=sort, size=4, cursor=cursor, min_price="1")

    assert items


async def test_rows_added_before_the_position_neither_repeat_nor_skip_rows(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    names = ["bench", "desk", "fan", "hook", "jug", "lamp"]
    insert_items(engine, *({"name": name, "price": Decimal(1)} for name in names))

    first, cursor = await scroll(client, sort="name", size=2)
    insert_items(engine, {"name": "armchair", "price": 1}, {"name": "chair", "price": 1})
    second, cursor = await scroll(client, sort="name", size=2, cursor=cursor)
    insert_items(engine, {"name": "apron", "price": 1}, {"name": "easel", "price": 1})
    third, cursor = await scroll(client, sort="name", size=2, cursor=cursor)

    seen = [item["name"] for item in first + second + third]
    assert seen == names
    assert cursor is None


async def test_newer_rows_do_not_shift_a_newest_first_scroll(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    first, cursor = await scroll(client, sort="-id", size=4)
    for n in range(3):
        response = await client.post("/items", json={"name": f"new {n}", "price": "1"})
        assert response.status_code == 201
    rest = [item_id for page in await scroll_rest(client, cursor, sort="-id", size=4)
            for item_id in page]

    assert [item["id"] for item in first] + rest == expected_order(shop, "-id")


async def scroll_rest(client: httpx.AsyncClient, cursor: str | None, **params: Any) -> list[
    list[int]
]:
    pages = []
    while cursor is not None:
        items, cursor = await scroll(client, cursor=cursor, **params)
        pages.append([item["id"] for item in items])
    return pages


async def test_deleting_the_row_a_cursor_points_at_does_not_break_it(
    client: httpx.AsyncClient, engine: Engine, shop: list[dict[str, Any]]
) -> None:
    first, cursor = await scroll(client, sort="price", size=3)
    with engine.begin() as connection:
        connection.execute(delete(Item).where(Item.id == first[-1]["id"]))

    rest = await scroll_rest(client, cursor, sort="price", size=3)

    assert [item_id for page in rest for item_id in page] == expected_order(shop, "price")[3:]


@pytest.mark.parametrize("sort", ["name", "-name"])
async def test_a_page_ending_on_the_longest_name_gives_a_cursor_the_scroll_takes(
    client: httpx.AsyncClient, engine: Engine, sort: str
) -> None:
    """200 characters of 4 UTF-8 bytes each (and of a quote, escaped in JSON), then a page
    boundary right after them: the scroll goes on to the end."""
    names = ["😀" * 200, '"' * 200, "a", "é" * 200]
    insert_items(engine, *({"name": name, "price": "1.00"} for name in names))
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"sort": sort, "size": 1, **({"cursor": cursor} if cursor else {})}
        items, cursor = await scroll(client, **params)
        seen += [item["name"] for item in items]
        assert cursor is None or len(cursor) <= CURSOR_MAX_LENGTH
        if cursor is None:
            break
    assert sorted(seen) == sorted(names)
    assert len(seen) == len(names)


async def test_a_cursor_made_for_another_sort_returns_400_naming_it(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    _, cursor = await scroll(client, sort="-price", size=2)

    response = await client.get("/items/scroll", params={"sort": "price", "cursor": cursor})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "'-price'" in response.json()["detail"]


@pytest.mark.parametrize(
    "cursor",
    ["", "abc", ".", "a.b", "not base64!.x", "eyJ9.eyJ9", "é.é", "a" * 1000,
     "A" * CURSOR_MAX_LENGTH + ".AA"],
    ids=["empty", "no dot", "dot only", "short", "bad alphabet", "fake", "non-ascii", "long",
         "longer than any cursor issued"],
)
async def test_a_malformed_cursor_returns_400(client: httpx.AsyncClient, cursor: str) -> None:
    response = await client.get("/items/scroll", params={"cursor": cursor})

    assert response.status_code == 400
    assert response.json()["title"] == "Bad Request"
    assert "cursor" in response.json()["detail"]


@pytest.mark.parametrize(
    "change",
    [{"after": ["30.00", 1]}, {"sort": "id"}, {"after": "everything"}, {"extra": True}],
)
async def test_a_tampered_but_well_formed_cursor_returns_400(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], change: dict[str, Any]
) -> None:
    _, cursor = await scroll(client, sort="price", size=2)
    assert cursor is not None

    response = await client.get(
        "/items/scroll", params={"sort": "price", "cursor": alter_payload(cursor, change)}
    )

    assert response.status_code == 400
    assert "altered" in response.json()["detail"]


async def test_a_cursor_with_any_other_last_character_returns_400(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    _, cursor = await scroll(client, sort="id", size=2)
    assert cursor is not None
    alphabet = string.ascii_letters + string.digits + "-_"

    # The signature's last character also carries unused bits: the texts that differ only
    # there decode to the same bytes, and must be refused all the same.
    statuses = {
        other: (
            await client.get("/items/scroll", params={"cursor": cursor[:-1] + other})
        ).status_code
        for other in alphabet
        if other != cursor[-1]
    }

    assert set(statuses.values()) == {400}, statuses
    assert (await client.get("/items/scroll", params={"cursor": cursor})).status_code == 200


async def test_a_cursor_signed_with_another_secret_returns_400(
    client: httpx.AsyncClient,
) -> None:
    forged = sign_cursor({"sort": "id", "after": [1, 1]}, b"someone else's secret")

    response = await client.get("/items/scroll", params={"cursor": forged})

    assert response.status_code == 400


@pytest.mark.parametrize(
    ("sort", "after"),
    [
        ("id", ["1", 1]),
        ("id", [1, "1"]),
        ("id", [1, True]),
        ("price", [12.5, 1]),
        ("price", ["twelve", 1]),
        ("created_at", ["2026-01-01T00:00:00", 1]),
        ("created_at", ["not a time", 1]),
        ("name", [None, 1]),
        ("name", ["lamp"]),
        ("name", None),
        # Well typed, but no row can hold it: the database must never see it.
        ("id", [2**63, 2**63]),
        ("-id", [-(2**63) - 1, -(2**63) - 1]),
        ("name", ["lamp", 2**63]),
        ("name", ["lamp\u0000", 1]),
        ("price", ["1E-16384", 1]),  # beyond asyncpg's exponents, and no price
        ("price", ["1e999", 1]),
        ("price", ["-Infinity", 1]),
        ("price", ["NaN", 1]),
        ("price", ["123456789012345.5", 1]),
        ("created_at", ["9999-12-31T23:59:59-14:00", 1]),
    ],
)
async def test_a_signed_cursor_without_a_valid_position_returns_400_not_500(
    client: httpx.AsyncClient, settings: Settings, sort: str, after: Any
) -> None:
    secret = settings.cursor_key()
    cursor = sign_cursor({"sort": sort, "after": after}, secret)

    response = await client.get("/items/scroll", params={"sort": sort, "cursor": cursor})

    assert response.status_code == 400
    assert "position" in response.json()["detail"]


async def test_a_signed_cursor_naming_a_lone_surrogate_returns_400_not_500(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    # JSON can escape a lone surrogate, which no name holds and no driver can send.
    encoded = cursors._b64encode(b'{"after":["\\ud800",1],"sort":"name"}')
    signature = cursors._b64encode(cursors._signature(encoded, settings.cursor_key()))

    response = await client.get(
        "/items/scroll", params={"sort": "name", "cursor": f"{encoded}.{signature}"}
    )

    assert response.status_code == 400
    assert "position" in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"size": 0}, "size"),
        ({"size": 101}, "size"),
        ({"sort": "colour"}, "sort"),
        ({"min_price": "-5"}, "min_price"),
        # A whole number in ASCII digits, nothing else pydantic would read as one.
        ({"size": "1_0"}, "size"),
        ({"size": "+5"}, "size"),
        ({"size": "5.0"}, "size"),
        ({"size": " 5"}, "size"),
        ({"size": "\uff15"}, "size"),  # a full-width 5
    ],
)
async def test_invalid_scroll_parameters_return_422(
    client: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    response = await client.get("/items/scroll", params=params)

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", field]
