"""GET /items `count=exact | estimated | none` and `Prefer: count=...` (bounded-cost totals).

The threshold is lowered to 5 so both sides of it fit in a test; the production default is
10,000 (COUNT_THRESHOLD).
"""

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, contextmanager
from math import ceil
from typing import Any, Protocol

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import Engine, text

from service.config import Settings
from service.db import QueryLog
from service.main import create_app
from tests.items.helpers import insert_items

pytestmark = pytest.mark.anyio
THRESHOLD = 5


class MaxQueries(Protocol):
    def __call__(self, limit: int) -> AbstractContextManager[QueryLog]: ...


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings.model_copy(update={"count_threshold": THRESHOLD}))


@pytest.fixture
async def reader(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def add(engine: Engine, names: list[str], backend: str) -> None:
    insert_items(engine, *({"name": name, "price": "1.00"} for name in names))
    if backend == "postgresql":
        with engine.begin() as connection:  # fresh statistics for the planner's estimate
            connection.execute(text("ANALYZE items"))


def totals(body: dict[str, Any]) -> tuple[Any, Any, Any]:
    return body["total"], body["pages"], body["total_is_exact"]


async def test_default_is_estimated_and_exact_below_the_threshold(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries
) -> None:
    add(engine, [f"lamp {n}" for n in range(THRESHOLD)], backend)
    with assert_max_queries(1):  # the bounded count and the rows, in one statement
        response = await reader.get("/items", params={"size": 2})
    assert response.status_code == 200
    assert totals(response.json()) == (THRESHOLD, 3, True)
    assert "preference-applied" not in response.headers


async def test_estimated_above_the_threshold_is_not_exact(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries
) -> None:
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    # Above the threshold: the bounded count, the planner's estimate (PostgreSQL) and the
    # rows, in one statement.
    with assert_max_queries(1):
        response = await reader.get("/items", params={"size": 5})
    total, pages, exact = totals(response.json())
    assert exact is False
    assert len(response.json()["items"]) == 5
    if backend == "postgresql":
        assert total == 12  # freshly analysed: the planner knows
    else:
        assert total == THRESHOLD  # no estimate on SQLite: the threshold, a lower bound
    assert pages == ceil(total / 5)


async def test_an_estimate_never_says_there_are_fewer_rows_than_the_page_shows(
    reader: httpx.AsyncClient, engine: Engine
) -> None:
    """Deep pages of an estimated total: on SQLite (the threshold is the lower bound) and on
    PostgreSQL with statistics that predate the rows, `total` and `pages` still cover every
    page that has items, so a client that stops at `pages` misses none."""
    insert_items(engine, *({"name": f"lamp {n}", "price": "1.00"} for n in range(23)))
    seen = 0
    for page in range(1, 6):
        body = (await reader.get("/items", params={"size": 5, "page": page})).json()
        seen += len(body["items"])
        assert body["total_is_exact"] is False
        assert body["total"] >= seen
        assert body["pages"] >= page
    assert seen == 23
    # Past the end the page shows nothing: no row is known beyond the threshold.
    beyond = (await reader.get("/items", params={"size": 5, "page": 1000})).json()
    assert beyond["items"] == []
    assert beyond["total"] < 1000 * 5


async def test_the_estimate_is_served_again_and_again_on_one_app(
    reader: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    """The same estimated count on the same app, several times: the second goes through
    SQLAlchemy's statement cache (a cached EXPLAIN once failed there with a 500)."""
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    responses = [await reader.get("/items", params={"size": 5}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert len({totals(r.json()) for r in responses}) == 1


async def test_estimated_applies_to_the_filtered_query_on_both_sides(
    reader: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    # 3 lamps and 40 stools at 1.00, 9 chairs at 100.00: 52 rows, of which the filters
    # below match 3 (under the threshold) and 9 (over it).
    insert_items(
        engine,
        *({"name": f"lamp {n}", "price": "1.00"} for n in range(3)),
        *({"name": f"stool {n}", "price": "1.00"} for n in range(40)),
        *({"name": f"chair {n}", "price": "100.00"} for n in range(9)),
    )
    if backend == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("ANALYZE items"))

    lamps = (await reader.get("/items", params={"q": "lamp"})).json()
    assert totals(lamps) == (3, 1, True)

    chairs = (await reader.get("/items", params={"min_price": "50", "size": 4})).json()
    total, pages, exact = totals(chairs)
    assert exact is False
    if backend == "postgresql":
        # The planner's estimate for `price >= 50` (two prices: its statistics are exact),
        # not for the whole table (52).
        assert total == 9
    else:
        assert total == THRESHOLD  # no estimate on SQLite: the threshold, a lower bound
    assert pages == ceil(total / 4)
    assert [item["name"] for item in chairs["items"]] == [f"chair {n}" for n in range(4)]


async def test_exactly_the_threshold_is_still_exact(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries
) -> None:
    # THRESHOLD lamps among other items: `q=lamp` matches exactly the threshold.
    add(engine, [f"lamp {n}" for n in range(THRESHOLD)] + ["chair", "stool"], backend)
    with assert_max_queries(1):  # the bounded count and the rows: no estimate
        at = (await reader.get("/items", params={"q": "lamp", "size": 2})).json()
    assert totals(at) == (THRESHOLD, 3, True)

    add(engine, ["lamp one more"], backend)
    above = (await reader.get("/items", params={"q": "lamp", "size": 2})).json()
    assert totals(above)[2] is False


async def test_count_exact_counts_every_row_in_two_statements(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries
) -> None:
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    with assert_max_queries(2):
        response = await reader.get("/items", params={"count": "exact", "size": 5})
    assert totals(response.json()) == (12, 3, True)


async def test_count_none_runs_one_statement_and_reports_no_total(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries
) -> None:
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    with assert_max_queries(1):
        response = await reader.get("/items", params={"count": "none", "size": 5, "page": 2})
    body = response.json()
    assert totals(body) == (None, None, False)
    assert (body["page"], body["size"]) == (2, 5)
    assert [item["name"] for item in body["items"]] == [f"lamp {n}" for n in range(5, 10)]


@pytest.mark.parametrize(("mode", "lamps"), [("exact", 12), ("estimated", THRESHOLD - 1)])
@pytest.mark.parametrize("page", [2, 50])  # a page of the list, one past its end
async def test_an_exact_total_and_its_page_are_read_in_one_statement(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries,
    mode: str, lamps: int, page: int,
) -> None:
    add(engine, [f"lamp {n:02}" for n in range(lamps)], backend)
    with assert_max_queries(1):
        response = await reader.get("/items", params={"count": mode, "size": 2, "page": page})
    body = response.json()
    assert response.status_code == 200
    assert totals(body) == (lamps, ceil(lamps / 2), True)
    expected = [f"lamp {n:02}" for n in range(lamps)][(page - 1) * 2:page * 2]
    assert [item["name"] for item in body["items"]] == expected


@pytest.mark.parametrize("mode", ["exact", "estimated"])
async def test_an_empty_table_counts_zero_in_one_statement(
    reader: httpx.AsyncClient, assert_max_queries: MaxQueries, mode: str
) -> None:
    with assert_max_queries(1):
        response = await reader.get("/items", params={"count": mode})
    assert response.status_code == 200
    assert totals(response.json()) == (0, 0, True)
    assert response.json()["items"] == []


async def test_above_the_threshold_the_estimate_comes_with_the_page_in_one_statement(
    reader: httpx.AsyncClient, engine: Engine, backend: str, assert_max_queries: MaxQueries
) -> None:
    add(engine, [f"lamp {n:02}" for n in range(12)], backend)
    with assert_max_queries(1) as statements:
        response = await reader.get("/items", params={"size": 5, "page": 3, "sort": "-name"})
    body = response.json()
    # PostgreSQL's estimate; on SQLite every row up to the end of this (last) page.
    assert totals(body) == (12, 3, False)
    assert [item["name"] for item in body["items"]] == ["lamp 01", "lamp 00"]
    if backend == "postgresql":
        assert "items_estimated_count(" in statements[0]


async def test_the_estimate_takes_every_filter_and_is_exact_again_below_the_threshold(
    reader: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    """All five filters at once - text, prices, timestamps: each reaches the planner's
    estimate with its own type - and the same query once most rows are gone."""
    add(engine, [f"lamp {n:02}" for n in range(12)] + ["chair"], backend)
    every_filter = {
        "q": "LAMP", "min_price": "0.50", "max_price": "2", "size": 5,
        "created_after": "2000-01-01T00:00:00Z", "created_before": "2100-01-01T00:00:00+02:00",
    }
    above = await reader.get("/items", params=every_filter)
    assert above.status_code == 200
    total, _, exact = totals(above.json())
    assert exact is False
    assert total >= THRESHOLD  # never fewer than the rows known to be there
    assert [item["name"] for item in above.json()["items"]] == [f"lamp {n:02}" for n in range(5)]

    with engine.begin() as connection:
        connection.execute(text("DELETE FROM items WHERE name >= 'lamp 03'"))
    below = await reader.get("/items", params=every_filter)
    assert totals(below.json()) == (3, 1, True)


_ESTIMATE_SIGNATURE = (
    "items_estimated_count(text, text, numeric, numeric, timestamptz, timestamptz)"
)


@contextmanager
def estimate_fails(engine: Engine) -> Iterator[None]:
    """`items_estimated_count` replaced by one that raises, for the block: a page that asks
    for the estimate fails; the real one is back afterwards."""
    with engine.begin() as connection:
        connection.execute(text(f"ALTER FUNCTION {_ESTIMATE_SIGNATURE} RENAME TO real_estimate"))
        connection.execute(text(
            f"CREATE FUNCTION {_ESTIMATE_SIGNATURE} "
            "RETURNS bigint LANGUAGE plpgsql VOLATILE AS "
            "$$ BEGIN RAISE EXCEPTION 'the estimate was asked for'; END $$"
        ))
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP FUNCTION {_ESTIMATE_SIGNATURE}"))
            connection.execute(text(
                "ALTER FUNCTION real_estimate(text, text, numeric, numeric, timestamptz, "
                "timestamptz) RENAME TO items_estimated_count"
            ))


async def test_the_estimate_is_asked_for_only_above_the_threshold(
    app: FastAPI, engine: Engine, backend: str
) -> None:
    """The page's statement names the estimate on every `count=estimated` page; PostgreSQL
    runs it only when the count reached the threshold (the CASE around it)."""
    if backend != "postgresql":
        pytest.skip("SQLite has no planner estimate: its statement does not name one")
    add(engine, [f"lamp {n}" for n in range(THRESHOLD)], backend)
    with estimate_fails(engine):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            at = await client.get("/items", params={"size": 2})
            assert at.status_code == 200
            assert totals(at.json()) == (THRESHOLD, 3, True)
            add(engine, ["lamp one more"], backend)
            above = await client.get("/items", params={"size": 2})
            assert above.status_code == 500  # the estimate ran, and failed
        await app.state.engine.dispose()


@pytest.mark.parametrize("mode", ["exact", "none"])
@pytest.mark.parametrize("parameters", ["", "; strict", ' ; x="a;b"', '; x="a, count=none"'])
async def test_prefer_header_chooses_the_mode_and_is_acknowledged(
    reader: httpx.AsyncClient, engine: Engine, backend: str, mode: str, parameters: str
) -> None:
    """Parameters of the preference (RFC 7240 2) are ignored, not the preference."""
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    response = await reader.get(
        "/items", headers={"Prefer": f"return=minimal, count={mode}{parameters}"}
    )
    assert response.headers["preference-applied"] == f"count={mode}"
    assert response.json()["total"] == (12 if mode == "exact" else None)


async def test_a_comma_in_a_quoted_value_does_not_start_a_preference(
    reader: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    response = await reader.get(
        "/items", headers={"Prefer": 'foo="a,count=none", count=exact'}
    )
    assert response.headers["preference-applied"] == "count=exact"
    assert response.json()["total"] == 12


async def test_lists_say_their_body_varies_with_prefer(reader: httpx.AsyncClient) -> None:
    for headers in ({}, {"Prefer": "count=none"}):
        response = await reader.get("/items", headers=headers)
        assert "Prefer" in response.headers["vary"]


async def test_a_count_preference_in_a_second_prefer_header_is_honoured(
    reader: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    # RFC 7240: several Prefer headers mean the same as one listing them all.
    headers = [("Prefer", "return=minimal"), ("Prefer", "count=none")]

    response = await reader.get("/items", headers=headers)

    assert response.headers["preference-applied"] == "count=none"
    assert response.json()["total"] is None


async def test_query_parameter_wins_over_prefer(
    reader: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    add(engine, [f"lamp {n}" for n in range(12)], backend)
    response = await reader.get(
        "/items", params={"count": "exact"}, headers={"Prefer": "count=none"}
    )
    assert totals(response.json())[0::2] == (12, True)
    assert "preference-applied" not in response.headers


async def test_unknown_prefer_value_is_ignored(reader: httpx.AsyncClient) -> None:
    response = await reader.get("/items", headers={"Prefer": "count=planned"})
    assert response.status_code == 200
    assert response.json()["total_is_exact"] is True  # estimated, on an empty table
    assert "preference-applied" not in response.headers


async def test_unknown_count_parameter_is_a_422_listing_the_modes(
    reader: httpx.AsyncClient,
) -> None:
    response = await reader.get("/items", params={"count": "planned"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "exact" in str(response.json()["errors"])


async def test_the_largest_threshold_allowed_counts_exactly(
    settings: Settings, engine: Engine, backend: str
) -> None:
    """COUNT_THRESHOLD as high as it goes ("always exact" by setting): the count query's
    bound is a 32-bit parameter on PostgreSQL (2**31 - 1 answered 500); past it, the
    setting is refused at start."""
    add(engine, ["lamp", "vase"], backend)
    largest = create_app(settings.model_copy(update={"count_threshold": 2**31 - 2}))
    transport = httpx.ASGITransport(app=largest)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/items")
    assert response.status_code == 200
    assert totals(response.json()) == (2, 1, True)
    with pytest.raises(ValidationError, match="count_threshold"):
        Settings(**{**settings.model_dump(), "count_threshold": 2**31 - 1})
