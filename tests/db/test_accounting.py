"""Query accounting: the Server-Timing header and the N+1 guard (behaviour 12)."""

import asyncio
import contextlib
import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import sqlalchemy
from fastapi import FastAPI
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from service.db import Database, DBSessionMiddleware, QueryLog, assert_max_queries, db
from service.db import asyncio as async_mode
from service.items.models import Item
from tests.db.conftest import Mode, client_for

pytestmark = pytest.mark.anyio

SERVER_TIMING = re.compile(r'^db;dur=(\d+\.\d);desc="(\d+) quer(y|ies)"$')


async def test_server_timing_counts_the_requests_statements(mode: Mode) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.flush()  # INSERT
        await mode.run(lambda session: session.scalars(select(Item)).all())  # SELECT
        await mode.run(
            lambda session: session.scalars(select(Item).where(Item.name == name)).all()
        )  # SELECT

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    match = SERVER_TIMING.match(response.headers["server-timing"])
    assert match is not None, response.headers["server-timing"]
    assert match.group(2) == "3"
    assert float(match.group(1)) > 0


async def test_a_statement_the_database_refuses_is_counted_and_timed(
    mode: Mode, assert_max_queries: Callable[[int], AbstractContextManager[QueryLog]]
) -> None:
    """A failed INSERT (a unique violation) is a statement the request ran, and its time is
    database time: an on-call engineer reading "0 queries" would look elsewhere."""
    app = mode.make_app()

    @app.post("/twice/{name}")
    async def twice(name: str) -> str:
        mode.add_item(name)
        await mode.flush()  # INSERT

        def insert_again(session: Session) -> None:  # the same name again: refused
            with contextlib.suppress(sqlalchemy.exc.IntegrityError), session.begin_nested():
                session.execute(sqlalchemy.insert(Item).values(name=name, price=1))

        await mode.run(insert_again)
        return "done"

    async with client_for(app) as client:
        with assert_max_queries(10) as log:
            response = await client.post("/twice/lamp")
    assert response.status_code == 200
    match = SERVER_TIMING.match(response.headers["server-timing"])
    assert match is not None, response.headers["server-timing"]
    assert match.group(2) == "2"
    assert [statement.split()[0] for statement in log] == ["INSERT", "INSERT"]
    assert float(match.group(1)) > 0


async def test_server_timing_of_a_request_without_sql(mode: Mode) -> None:
    app = mode.make_app()

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    async with client_for(app) as client:
        response = await client.get("/ping")
    assert response.headers["server-timing"] == 'db;dur=0.0;desc="0 queries"'


async def test_server_timing_can_be_switched_off(mode: Mode) -> None:
    app = mode.make_app(server_timing=False)

    @app.get("/items")
    async def items() -> int:
        return len(await mode.run(lambda session: session.scalars(select(Item)).all()))

    async with client_for(app) as client:
        response = await client.get("/items")
    assert response.status_code == 200
    assert "server-timing" not in response.headers


async def test_concurrent_requests_are_counted_separately(mode: Mode) -> None:
    """Each request's header counts its own statements only, while others run meanwhile
    (interleaved on PostgreSQL; SQLite admits one request at a time)."""
    app = mode.make_app()

    @app.get("/queries/{n}")
    async def run(n: int) -> None:
        for _ in range(n):
            await mode.run(lambda session: session.scalars(select(Item)).all())
            await asyncio.sleep(0)

    async with client_for(app) as client:
        responses = await asyncio.gather(*(client.get(f"/queries/{n}") for n in (1, 2, 3, 4)))
    counts = [SERVER_TIMING.match(r.headers["server-timing"]).group(2) for r in responses]  # type: ignore[union-attr]
    assert counts == ["1", "2", "3", "4"]


async def test_with_both_modes_in_one_request_each_counts_its_own_statements(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    """Both middlewares on one app: each Server-Timing entry counts its own session's
    statements - the inner (here the async) unit must not take the sync one's."""
    app = FastAPI()
    app.add_middleware(async_mode.DBSessionMiddleware, custom_engine=async_engine)
    app.add_middleware(DBSessionMiddleware, custom_engine=engine)

    @app.get("/both")
    async def both() -> None:
        await async_mode.db.session.execute(select(Item.id))
        db.session.execute(select(Item.id))
        db.session.execute(select(Item.name))

    async with client_for(app) as client:
        response = await client.get("/both")
    assert response.status_code == 200
    counts = sorted(
        int(SERVER_TIMING.match(entry).group(2))  # type: ignore[union-attr]
        for entry in response.headers.get_list("server-timing")
    )
    assert counts == [1, 2]


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
    mode: Mode, assert_max_queries: Callable[[int], AbstractContextManager[QueryLog]]
) -> None:
    app = mode.make_app()

    @app.post("/seed/{n}")
    async def seed(n: int) -> None:
        for i in range(n):
            mode.add_item(f"item-{i}")

    @app.get("/names")
    async def names() -> list[str]:
        def one_select_per_row(session: Session) -> list[str]:  # N+1
            ids = session.scalars(select(Item.id)).all()
            return [session.get_one(Item, i).name for i in ids]

        return await mode.run(one_select_per_row)

    async with client_for(app) as client:
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
