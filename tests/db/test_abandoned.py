"""Sync mode: a request cancelled while its route's thread is inside a statement. A
cancellation cannot stop a thread; the middleware interrupts the statement through the
driver (its work is rolled back anyway), and whatever happens the connection comes back."""

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, text

from service.db import db, unit_of_work
from tests.db.conftest import MakeApp, add_item, client_for, stored_names

pytestmark = pytest.mark.anyio


def sleeping(seconds: float) -> Callable[[], Any]:
    """Run a statement that takes `seconds` on the request's connection (SQLite: a function
    of our own that sleeps, registered on that connection)."""

    def run() -> Any:
        connection = db.session.connection()
        if connection.dialect.name == "postgresql":
            return db.session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
        driver = connection.connection.driver_connection
        driver.create_function("test_sleep", 1, time.sleep)  # type: ignore[union-attr]
        return db.session.execute(text("SELECT test_sleep(:s)"), {"s": seconds})

    return run


def running_long_statement(engine: Engine) -> Callable[[], Any]:
    """A statement that would run for minutes, and that the driver can interrupt (SQLite
    checks for an interrupt between rows, not inside a function call)."""

    def run() -> Any:
        if engine.dialect.name == "postgresql":
            return db.session.execute(text("SELECT pg_sleep(120)"))
        return db.session.execute(text(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            "WHERE x < 10000000000) SELECT count(*) FROM c"))

    return run


async def wait_until_returned(engine: Engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while engine.pool.checkedout() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.pool.checkedout() == 0


def sleeping_backends(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(120)%'")) or 0)


def app_with_a_long_route(
    app: FastAPI, statement: Callable[[], Any], failed: list[str] | None = None
) -> tuple[FastAPI, threading.Event]:
    """`app` with `POST /long/{name}` (writes, then runs `statement`; its error's type goes
    to `failed`) and `POST /items/{name}`; and the event set once the first is about to
    run the statement."""
    in_statement = threading.Event()

    @app.post("/long/{name}")
    def long(name: str) -> None:
        add_item(name)
        db.session.flush()
        in_statement.set()
        try:
            statement()
        except Exception as error:
            if failed is not None:
                failed.append(type(error).__name__)
            raise

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)

    return app, in_statement


async def test_the_statement_of_a_cancelled_request_is_interrupted(
    make_app: MakeApp, engine: Engine
) -> None:
    failed: list[str] = []
    app, in_statement = app_with_a_long_route(make_app(), running_long_statement(engine), failed)
    async with client_for(app) as client:
        task = asyncio.create_task(client.post("/long/lamp"))
        assert await asyncio.to_thread(in_statement.wait, 5), "the route never ran"
        await asyncio.sleep(0.3)  # well inside the statement
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=60)
        # Not held up until the statement would have ended (minutes).
        assert time.monotonic() - cancelled_at < 10
        await wait_until_returned(engine)
        if engine.dialect.name == "postgresql":
            assert sleeping_backends(engine) == 0  # stopped on the server too
        for n in range(5):
            assert (await client.post(f"/items/next-{n}")).status_code == 200
    assert failed  # the statement failed in the route's thread
    assert stored_names(engine) == {f"next-{n}" for n in range(5)}


async def test_a_statement_that_will_not_stop_keeps_its_connection_until_it_ends(
    make_app: MakeApp, engine: Engine, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A driver that cannot interrupt a statement (or one that ignores it): the cancellation
    goes through at once, the unit ends when the statement does - past the patience, with
    an ERROR - and its connection comes back then, never left checked out."""
    monkeypatch.setattr(unit_of_work, "_interrupt", lambda connection: None)
    monkeypatch.setattr(unit_of_work, "ABANDONED_PATIENCE", 0.5)
    app, in_statement = app_with_a_long_route(make_app(max_concurrent_sessions=1), sleeping(2.5))
    async with client_for(app) as client:
        task = asyncio.create_task(client.post("/long/lamp"))
        assert await asyncio.to_thread(in_statement.wait, 5), "the route never ran"
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
        assert time.monotonic() - cancelled_at < 2  # not held until the statement ends
        # The only slot stays taken until the connection is back: the next request waits
        # for it, and then succeeds.
        with caplog.at_level(logging.ERROR, logger="service.db"):
            assert (await client.post("/items/next")).status_code == 200
        assert engine.pool.checkedout() == 0
    assert any("has run for more than" in record.getMessage() for record in caplog.records)
    assert stored_names(engine) == {"next"}
