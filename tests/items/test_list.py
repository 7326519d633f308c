"""GET /items: numbered pages (fastapi-pagination `Page`) with filters and sorts."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from tests.items.helpers import SORTS, day, expected_order, ids, insert_items

pytestmark = pytest.mark.anyio

async def test_list_returns_the_first_page_by_id_with_the_totals(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    response = await client.get("/items")

    body = response.json()
    assert ids(response) == sorted(row["id"] for row in shop)
    assert {key: body[key] for key in ("total", "page", "size", "pages")} == {
        "total": 10, "page": 1, "size": 20, "pages": 1,
    }
    assert body["items"][0]["created_at"].endswith("Z")


async def test_an_empty_list_has_no_pages(client: httpx.AsyncClient) -> None:
    response = await client.get("/items")

    assert response.json() == {
        "items": [], "total": 0, "page": 1, "size": 20, "pages": 0, "total_is_exact": True
    }


async def test_page_and_size_select_a_slice(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    all_ids = sorted(row["id"] for row in shop)

    response = await client.get("/items", params={"page": 3, "size": 4})

    assert ids(response) == all_ids[8:]
    assert response.json()["pages"] == 3
    assert response.json()["total"] == 10


async def test_a_page_past_the_end_is_empty_but_keeps_the_totals(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    response = await client.get("/items", params={"page": 9, "size": 4})

    assert ids(response) == []
    assert response.json()["total"] == 10


@pytest.mark.parametrize("count", ["estimated", "exact", "none"])
async def test_the_last_valid_page_is_empty_not_an_error(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], count: str
) -> None:
    # Its offset, (2**31 - 2) * 100, is far beyond a 32-bit integer.
    params = {"page": 2**31 - 1, "size": 100, "count": count}

    response = await client.get("/items", params=params)

    assert response.status_code == 200, response.text
    assert ids(response) == []
    assert response.json()["total"] == (None if count == "none" else 10)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"size": 0}, "size"),
        ({"size": 101}, "size"),
        ({"size": "ten"}, "size"),
        ({"size": "1_0"}, "size"),
        ({"page": "1_0"}, "page"),  # pydantic alone reads it as 10
        ({"page": "+2"}, "page"),
        ({"page": "2.0"}, "page"),
        ({"page": "01"}, "page"),  # one page, one way to write it
        ({"size": "020"}, "size"),
        ({"page": 0}, "page"),
        ({"page": 2**31}, "page"),
        ({"min_price": "-1"}, "min_price"),
        ({"max_price": "NaN"}, "max_price"),
        ({"max_price": "0.001"}, "max_price"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "0.0"}, "created_after"),  # not a Unix timestamp: ISO 8601 only
        ({"created_before": "1700000000"}, "created_before"),
        ({"created_before": "0001-01-01T00:00:00+05:00"}, "created_before"),
        # Digits are ASCII, the fraction's beyond the microsecond too.
        ({"created_after": "2026-12-01T00:00:00.123456\uff17Z"}, "created_after"),
        ({"q": "x" * 201}, "q"),
    ],
)
async def test_invalid_query_parameters_return_422_naming_them(
    client: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    response = await client.get("/items", params=params)

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["loc"] == ["query", field]


async def test_an_unknown_sort_returns_422_listing_the_allowed_ones(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/items", params={"sort": "description"})

    assert response.status_code == 422
    error = response.json()["errors"][0]
    assert error["loc"] == ["query", "sort"]
    for allowed in SORTS:
        assert f"'{allowed}'" in error["msg"]


@pytest.mark.parametrize("sort", SORTS)
async def test_every_sort_orders_ties_by_id_and_pages_follow_on(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], sort: str
) -> None:
    pages = [
        ids(await client.get("/items", params={"sort": sort, "size": 3, "page": page}))
        for page in (1, 2, 3, 4)
    ]

    assert [item_id for page in pages for item_id in page] == expected_order(shop, sort)
    assert [len(page) for page in pages] == [3, 3, 3, 1]


async def test_q_matches_part_of_the_name_ignoring_case(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    insert_items(
        engine,
        *({"name": name, "price": Decimal(1)} for name in ["Desk lamp", "LAMP shade", "Rug"]),
    )

    response = await client.get("/items", params={"q": "lAmP"})

    assert [item["name"] for item in response.json()["items"]] == ["Desk lamp", "LAMP shade"]


@pytest.mark.parametrize(("q", "matches"), [("café", ["CAFÉ au lait", "Café crème"]),
                                             ("ÉCLAIR", ["éclair"]), ("ωmega", ["ΩMEGA"])])
async def test_q_ignores_the_case_of_every_letter(
    client: httpx.AsyncClient, engine: Engine, q: str, matches: list[str]
) -> None:
    names = ["CAFÉ au lait", "Café crème", "Cafe", "éclair", "ΩMEGA"]
    insert_items(engine, *({"name": name, "price": Decimal(1)} for name in names))

    response = await client.get("/items", params={"q": q, "sort": "name"})

    assert sorted(item["name"] for item in response.json()["items"]) == sorted(matches)


@pytest.mark.parametrize(
    ("q", "matches"),
    [("%", ["100% cotton"]), ("_", ["50_50 blend"]), ("0%", ["100% cotton"]), ("\\", ["a\\b"])],
)
async def test_q_takes_like_wildcards_literally(
    client: httpx.AsyncClient, engine: Engine, q: str, matches: list[str]
) -> None:
    names = ["100% cotton", "100 cotton", "50_50 blend", "5050 blend", "a\\b", "a/b"]
    insert_items(engine, *({"name": name, "price": Decimal(1)} for name in names))

    response = await client.get("/items", params={"q": q})

    assert [item["name"] for item in response.json()["items"]] == matches


async def test_an_empty_q_filters_nothing(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    response = await client.get("/items", params={"q": ""})

    assert response.json()["total"] == 10


@pytest.mark.parametrize("zero", ["0E-20000", "0e-99999999", "0.000"])
async def test_a_zero_written_with_any_exponent_is_a_zero_price_bound(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], zero: str
) -> None:
    # asyncpg cannot send the exponent of 0E-20000; the bound is 0.00 (a 500 on PostgreSQL).
    for path in ("/items", "/items/scroll"):
        response = await client.get(path, params={"min_price": zero, "max_price": "1e3"})
        assert response.status_code == 200, response.text
    assert response.json()["items"]


async def test_price_bounds_are_inclusive(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    response = await client.get("/items", params={"min_price": "30", "max_price": "120.00"})

    prices = sorted(Decimal(item["price"]) for item in response.json()["items"])
    assert prices == [30, 30, 30, 45, 120, 120]


@pytest.mark.parametrize(
    ("params", "days"),
    [
        # created_after is inclusive; a time without offset is UTC.
        ({"created_after": "2026-01-04T00:00:00"}, [4, 4, 5]),
        ({"created_after": "2026-01-04"}, [4, 4, 5]),
        # created_before is exclusive; offsets are converted to UTC.
        ({"created_before": "2026-01-02T01:00:00+01:00"}, [1, 1]),
        ({"created_before": "2026-01-02T19:00:00-05:00"}, [1, 1, 2, 2]),
        ({"created_after": "2026-01-02T00:00:00Z", "created_before": "2026-01-03"}, [2, 2]),
    ],
)
async def test_created_filters_compare_instants_in_utc(
    client: httpx.AsyncClient,
    shop: list[dict[str, Any]],
    params: dict[str, str],
    days: list[int],
) -> None:
    response = await client.get("/items", params={**params, "sort": "created_at"})

    created = [datetime.fromisoformat(item["created_at"]) for item in response.json()["items"]]
    assert [moment.day for moment in created] == days
    assert all(moment == moment.replace(hour=0, minute=0) for moment in created)


@pytest.mark.parametrize(
    ("params", "found"),
    [
        # The item was created at ...:00.000001; times finer than a microsecond (as Go and
        # Java write them) are not cut off, which would move a bound past it.
        ({"created_before": "2026-01-01T00:00:00.000001100Z"}, True),
        ({"created_before": "2026-01-01T00:00:00.000001000Z"}, False),
        ({"created_after": "2026-01-01T00:00:00.000001100Z"}, False),
        ({"created_after": "2026-01-01T00:00:00.0000010Z"}, True),
        ({"created_after": "2026-01-01T00:00:00.000000999+00:00"}, True),
        ({"created_after": "2026-01-01T01:00:00.0000011+01:00"}, False),
        # Rounded up once in UTC: the local time a microsecond on does not exist.
        ({"created_before": "9999-12-31T23:59:59.9999999+01:00"}, True),
    ],
)
async def test_times_finer_than_a_microsecond_are_compared_exactly(
    client: httpx.AsyncClient, engine: Engine, params: dict[str, str], found: bool
) -> None:
    created = datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    insert_items(engine, {"name": "Fine", "price": Decimal(1), "created_at": created})

    response = await client.get("/items", params=params)

    assert response.status_code == 200, response.text
    assert response.json()["total"] == int(found)


async def test_an_unencoded_plus_in_an_offset_is_understood(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    response = await client.get("/items?created_before=2026-01-02T01:00:00+01:00")

    assert response.json()["total"] == 2


async def test_filters_sort_and_pages_combine(
    client: httpx.AsyncClient, shop: list[dict[str, Any]]
) -> None:
    matching = [row for row in shop if row["price"] >= 30 and row["created_at"] < day(4)]

    response = await client.get(
        "/items",
        params={
            "sort": "-price",
            "min_price": "30",
            "created_before": "2026-01-04T00:00:00Z",
            "page": 2,
            "size": 2,
        },
    )

    assert ids(response) == expected_order(matching, "-price")[2:4]
    assert response.json()["total"] == len(matching) == 6
    assert response.json()["pages"] == 3


async def test_a_page_is_at_most_two_queries_count_and_rows(
    client: httpx.AsyncClient, shop: list[dict[str, Any]], assert_max_queries: Any
) -> None:
    with assert_max_queries(2) as statements:
        response = await client.get(
            "/items", params={"sort": "-created_at", "q": "a", "min_price": "1", "page": 2,
                              "size": 2},
        )

    assert response.status_code == 200
    assert len(response.json()["items"]) == 2
    assert "count" in statements[0].lower()
