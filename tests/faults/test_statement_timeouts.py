"""A statement that waits on PostgreSQL - a lock held elsewhere - is bounded: after
`DB_STATEMENT_TIMEOUT` the server cancels it, the request answers 503 with Retry-After and
gives its connection back, and no backend stays behind waiting for the lock; the server's
own `statement_timeout` / `lock_timeout` set elsewhere answer the same 503."""

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, Engine, text

from service.config import Settings
from service.main import create_app
from tests.conftest import AUTH
from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _postgresql_only(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("statement timeouts: PostgreSQL (asyncpg's command_timeout)")


@contextmanager
def items_locked(engine: Engine) -> Iterator[Connection]:
    """`items` locked against every reader and writer until the block ends."""
    with engine.connect() as connection:
        connection.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
        yield connection
        connection.rollback()


def waiting_for_a_lock(holder: Connection) -> int:
    """Backends of the server, other than `holder`, waiting for a lock."""
    return int(holder.scalar(text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )))


async def client_of(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as c:
        yield c
    await app.state.engine.dispose()


@pytest.fixture
def timed_app(settings: Settings) -> FastAPI:
    return create_app(settings.model_copy(update={"db_statement_timeout": 0.5}))


@pytest.fixture
async def timed_client(timed_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_of(timed_app):
        yield client


async def test_a_statement_that_waits_past_the_timeout_answers_503_and_frees_its_connection(
    timed_app: FastAPI, timed_client: httpx.AsyncClient, engine: Engine
) -> None:
    [item_id] = insert_items(engine, {"name": "Lamp", "price": "1.00"})
    before = stored(engine)
    requests = [
        ("GET", "/items", {}),
        ("GET", f"/items/{item_id}", {}),
        ("GET", "/items/scroll", {}),
        ("POST", "/items", {"json": {"name": "New", "price": "2"}}),
        ("PATCH", f"/items/{item_id}", {"json": {"price": "3"}, "headers": {"If-Match": "*"}}),
        ("DELETE", f"/items/{item_id}", {}),
    ]
    with items_locked(engine) as holder:
        for method, path, kwargs in requests:
            started = time.monotonic()
            with anyio.fail_after(10):  # unbounded, it would wait for the lock for ever
                response = await timed_client.request(method, path, **kwargs)
            took = time.monotonic() - started
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "1"
            assert "did not answer in time" in response.json()["detail"]
            assert took < 3, f"{method} {path} took {took:.1f} s"
        # The server cancelled each statement: no backend is left waiting behind the lock
        # (a client that only gave up left one per request, until max_connections).
        assert waiting_for_a_lock(holder) == 0
    assert timed_app.state.engine.sync_engine.pool.checkedout() == 0
    assert stored(engine) == before
    # The lock gone, the same app serves again: no broken connection is handed out.
    assert (await timed_client.get(f"/items/{item_id}")).status_code == 200
    created = await timed_client.post("/items", json={"name": "After", "price": "1"})
    assert created.status_code == 201


@pytest.mark.parametrize("setting", ["statement_timeout", "lock_timeout"])
async def test_the_servers_own_timeouts_answer_503_not_500(
    settings: Settings, engine: Engine, setting: str
) -> None:
    """An operator's `ALTER ROLE ... SET statement_timeout` (or lock_timeout) ends the wait on
    the server: the same 503 as our own timeout (asyncpg's error is no OperationalError)."""
    with engine.connect() as connection:
        user = connection.scalar(text("SELECT current_user"))
        connection.execute(text(f'ALTER ROLE "{user}" SET {setting} = 300'))
        connection.commit()
    try:
        app = create_app(settings.model_copy(update={"db_statement_timeout": 0}))
        async for client in client_of(app):
            with items_locked(engine), anyio.fail_after(10):
                reads = await client.get("/items")
                writes = await client.post("/items", json={"name": "Blocked", "price": "2"})
            for response in (reads, writes):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert "did not answer in time" in response.json()["detail"]
            assert app.state.engine.sync_engine.pool.checkedout() == 0
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'ALTER ROLE "{user}" RESET {setting}'))
            connection.commit()
        engine.dispose()  # no connection made meanwhile keeps the setting for later tests
    assert stored(engine) == {}
