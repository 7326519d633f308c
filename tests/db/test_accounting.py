"""Query accounting: the Server-Timing header and the N+1 guard (behaviour 12)."""

import asyncio
import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import pytest
import sqlalchemy
from fastapi import FastAPI
from sqlalchemy import Engine, select

from service.db import Database, DBSessionMiddleware, QueryLog, assert_max_queries, db
from service.items.models import Item
from tests.db.conftest import MakeApp, add_item, client_for

pytestmark = pytest.mark.anyio

SERVER_TIMING = re.compile(r'^db;dur=(\d+\.\d);desc="(\d+) quer(y|ies)"$')


async def test_server_timing_counts_the_requests_statements(
    app_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.session.flush()  # INSERT
        db.session.scalars(select(Item)).all()  # SELECT
        db.session.scalars(select(Item).where(Item.name == name)).all()  # SELECT

    response = await client.post("/items/lamp")
    match = SERVER_TIMING.match(response.headers["server-timing"])
    assert match is not None, response.headers["server-timing"]
    assert match.group(2) == "3"
    assert float(match.group(1)) > 0


async def test_server_timing_of_a_request_without_sql(
    app_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_client

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    response = await client.get("/ping")
    assert response.headers["server-timing"] == 'db;dur=0.0;desc="0 queries"'


async def test_server_timing_can_be_switched_off(make_app: MakeApp) -> None:
    app = make_app(server_timing=False)

    @app.get("/items")
    def items() -> int:
        return len(db.session.scalars(select(Item)).all())

    async with client_for(app) as client:
        response = await client.get("/items")
    assert response.status_code == 200
    assert "server-timing" not in response.headers


async def test_concurrent_requests_are_counted_separately(
    app_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_client

    @app.get("/queries/{n}")
    async def run(n: int) -> None:
        for _ in range(n):
            db.session.scalars(select(Item)).all()
            await asyncio.sleep(0)

    responses = await asyncio.gather(*(client.get(f"/queries/{n}") for n in (1, 2, 3, 4)))
    counts = [SERVER_TIMING.match(r.headers["server-timing"]).group(2) for r in responses]  # type: ignore[union-attr]
    assert counts == ["1", "2", "3", "4"]


def test_assert_max_queries_passes_within_the_limit(engine: Engine) -> None:
    with engine.connect() as connection, assert_max_queries(2) as log:
        connection.execute(select(Item)).all()
        connection.execute(select(Item.id)).all()
    assert isinstance(log, QueryLog)
    assert len(log) == 2


def test_assert_max_queries_fails_listing_every_statement(engine: Engine) -> None:
    with (
        pytest.raises(AssertionError) as failure,
        engine.connect() as connection,
        assert_max_queries(1),
    ):
        for _ in range(3):
            connection.execute(select(Item.name)).all()
    message = str(failure.value)
    assert "at most 1 SQL statement(s), 3 ran" in message
    assert message.count("SELECT items.name") == 3
    assert "1. SELECT" in message and "3. SELECT" in message


async def test_assert_max_queries_fixture_catches_an_n_plus_1_in_a_route(
    app_client: tuple[FastAPI, httpx.AsyncClient],
    assert_max_queries: Callable[[int], AbstractContextManager[QueryLog]],
) -> None:
    app, client = app_client

    @app.post("/seed/{n}")
    def seed(n: int) -> None:
        for i in range(n):
            add_item(f"item-{i}")

    @app.get("/names")
    def names() -> list[str]:
        ids = db.session.scalars(select(Item.id)).all()
        return [db.session.get_one(Item, i).name for i in ids]  # one SELECT per row: N+1

    with assert_max_queries(1):
        await client.get("/names")  # empty table: only the SELECT of ids
    await client.post("/seed/3")
    with (
        pytest.raises(AssertionError, match="expected at most 1") as failure,
        assert_max_queries(1),
    ):
        await client.get("/names")
    assert "4 ran" in str(failure.value)


def test_only_engines_service_db_works_with_are_counted(migrated_url: str) -> None:
    """Engines the app never gave to service.db pay nothing and are not counted."""
    by_middleware, by_configure = (sqlalchemy.create_engine(migrated_url) for _ in range(2))
    try:
        with assert_max_queries(0), by_middleware.connect() as connection:
            connection.execute(select(Item.id)).all()  # not ours (yet): not counted

        DBSessionMiddleware(FastAPI(), custom_engine=by_middleware)
        Database("reports").configure(by_configure)
        for engine in (by_middleware, by_configure):
            with assert_max_queries(1) as log, engine.connect() as connection:
                connection.execute(select(Item.id)).all()
            assert log == ["SELECT items.id \nFROM items"]
    finally:
        by_middleware.dispose()
        by_configure.dispose()
