"""Many requests at once through the real ASGI stack (behaviours 10 and 14 of service.db).

The writer tests pass because requests wait for a connection slot before they enter the
app (admission, `max_concurrent_sessions`); each has a negative control, the same requests
with admission off, which must fail on PostgreSQL.
"""

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Literal

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import Database, DBSessionMiddleware, create_engine, db
from service.db import asyncio as async_mode
from service.db.admission import pool_capacity
from service.db.testing import isolated
from service.items.models import Item
from tests.db.conftest import (
    MakeApp,
    Mode,
    add_item,
    async_url,
    client_for,
    stored_names,
)

pytestmark = pytest.mark.anyio
REQUESTS = 200


class Written(BaseModel):
    name: str
    own_session: bool
    only_own_rows: bool


@pytest.fixture
def small_pool_engine(migrated_url: str) -> Iterator[Engine]:
    """5 + 5 connections: fewer than the threadpool's 40 workers."""
    engine = create_engine(migrated_url, pool_size=5, max_overflow=5, pool_timeout=5)
    yield engine
    engine.dispose()


@pytest.fixture
def issue_pool_engine(migrated_url: str) -> Iterator[Engine]:
    """10 + 30 connections, the size where the naive design deadlocks."""
    engine = create_engine(migrated_url, pool_size=10, max_overflow=30, pool_timeout=5)
    yield engine
    engine.dispose()


async def all_within(
    seconds: float, requests: list[Coroutine[Any, Any, httpx.Response]]
) -> list[httpx.Response]:
    """All responses; a deadlock fails the test instead of hanging the suite."""
    return await asyncio.wait_for(asyncio.gather(*requests), timeout=seconds)


async def until_the_first_error(
    seconds: float,
    requests: list[Coroutine[Any, Any, httpx.Response]],
    writers_closed: threading.Event,
) -> BaseException | None:
    """Send `requests` at once until the first raises; then close the writers (those not
    yet started answer 503 without touching the database) and wait for every request to
    end by itself, so nothing runs on into the next test. Nothing is cancelled: a request
    cancelled while its sync handler runs leaves the handler running in its worker thread.
    Returns the first error, or None if all succeeded; TimeoutError if they are still
    going after `seconds`."""
    tasks = [asyncio.ensure_future(request) for request in requests]
    try:
        done, pending = await asyncio.wait(
            tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION
        )
    finally:
        writers_closed.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), seconds)
    errors = [task.exception() for task in done if task.exception() is not None]
    if pending and not errors:
        raise TimeoutError(f"{len(pending)} requests still going after {seconds} s")
    return errors[0] if errors else None


def skip_on_sqlite(backend: str) -> None:
    if backend == "sqlite":
        pytest.skip(
            "SQLite admits one request at a time whatever its pool (one writer at a time); "
            "without admission its writers fail on SQLite's own lock ('database is locked') "
            "as much as on the pool, so a failure there would not isolate what admission "
            "prevents"
        )


def pending_names() -> set[str]:
    return {obj.name for obj in db.session.identity_map.values() if isinstance(obj, Item)}


def writer_app(
    engine: Engine,
    backend: str,
    max_concurrent_sessions: int | Literal["auto"] | None = "auto",
    closed: threading.Event | None = None,
) -> FastAPI:
    """Writers that report what they saw; once `closed` is set, those not yet started
    answer 503 without touching the database (how a control ends its flood)."""
    app = FastAPI()
    app.add_middleware(
        DBSessionMiddleware, custom_engine=engine, max_concurrent_sessions=max_concurrent_sessions
    )

    def refuse_when_closed() -> None:
        if closed is not None and closed.is_set():
            raise HTTPException(503, "closed")

    @app.post("/async/{name}")
    async def write_async(name: str) -> Written:
        refuse_when_closed()
        session = db.session
        await asyncio.sleep(0)  # let other requests in between
        item = add_item(name)  # held: the identity map keeps objects only weakly
        db.session.flush()
        if backend != "sqlite":
            # SQLite's single writer lock would stall the loop here; PostgreSQL interleaves.
            await asyncio.sleep(0.001)
        return Written(
            name=item.name,
            own_session=db.session is session,
            only_own_rows=pending_names() == {name},
        )

    @app.post("/sync/{name}")
    def write_sync(name: str) -> Written:
        refuse_when_closed()
        session = db.session
        item = add_item(name)  # held: the identity map keeps objects only weakly
        db.session.flush()
        time.sleep(0.001)  # other threads run meanwhile
        return Written(
            name=item.name,
            own_session=db.session is session,
            only_own_rows=pending_names() == {name},
        )

    return app


def async_mode_writer_app(engine: AsyncEngine, backend: str) -> FastAPI:
    """The writers on service.db.asyncio: an AsyncSession per request."""
    app = FastAPI()
    app.add_middleware(async_mode.DBSessionMiddleware, custom_engine=engine)
    adb = async_mode.db

    @app.post("/asyncio/{name}")
    async def write(name: str) -> Written:
        session = adb.session
        await asyncio.sleep(0)  # let other requests in between
        item = add_item(name, adb)  # held: the identity map keeps objects only weakly
        await adb.session.flush()
        if backend != "sqlite":
            await asyncio.sleep(0.001)
        names = {o.name for o in adb.session.identity_map.values() if isinstance(o, Item)}
        return Written(
            name=item.name, own_session=adb.session is session, only_own_rows=names == {name}
        )

    return app


@pytest.mark.parametrize("kind", ["async", "sync", "asyncio"])
async def test_200_concurrent_writers_each_see_only_their_own_session_and_rows(
    small_pool_engine: Engine, migrated_url: str, backend: str, kind: str
) -> None:
    """`async`/`sync`: async and def routes on service.db; `asyncio`: service.db.asyncio,
    on a pool of 5 + 5 as well."""
    async_engine = async_mode.create_async_engine(
        async_url(migrated_url), pool_size=5, max_overflow=5, pool_timeout=5
    )
    app = (
        async_mode_writer_app(async_engine, backend)
        if kind == "asyncio"
        else writer_app(small_pool_engine, backend)
    )
    async with client_for(app) as client:
        responses = await all_within(
            60, [client.post(f"/{kind}/{kind}-{n}") for n in range(REQUESTS)]
        )
    assert [r.status_code for r in responses] == [200] * REQUESTS
    bodies = [Written.model_validate(r.json()) for r in responses]
    assert all(b.own_session and b.only_own_rows for b in bodies)
    assert stored_names(small_pool_engine) == {f"{kind}-{n}" for n in range(REQUESTS)}
    assert small_pool_engine.pool.checkedout() == 0
    assert async_engine.sync_engine.pool.checkedout() == 0
    await async_engine.dispose()


async def test_control_without_admission_200_sync_writers_deadlock_on_the_pool(
    small_pool_engine: Engine, backend: str
) -> None:
    # The threadpool's 40 workers block in the pool's checkout while the 10 requests that
    # hold connections wait for a worker to finish: each waiter gives up after the pool
    # timeout (5 s).
    skip_on_sqlite(backend)
    closed = threading.Event()
    app = writer_app(small_pool_engine, backend, max_concurrent_sessions=None, closed=closed)
    async with client_for(app) as client:
        error = await until_the_first_error(
            60, [client.post(f"/sync/sync-{n}") for n in range(REQUESTS)], closed
        )
    assert isinstance(error, PoolTimeout), f"the pool never timed out (first error: {error!r})"
    assert "QueuePool limit" in str(error)
    assert small_pool_engine.pool.checkedout() == 0


async def test_control_without_admission_an_async_writer_beyond_the_pool_stalls_and_fails(
    small_pool_engine: Engine, backend: str
) -> None:
    # An async route's first statement checks out on the event loop itself: the writer
    # that finds the pool empty blocks the loop, so the writers holding connections never
    # get back to commit, and it fails after the pool timeout (5 s). With 200 writers that
    # stall repeats for each one beyond the pool (minutes), so one more than the pool holds
    # shows it.
    skip_on_sqlite(backend)
    capacity = pool_capacity(small_pool_engine)
    assert capacity is not None
    closed = threading.Event()
    app = writer_app(small_pool_engine, backend, max_concurrent_sessions=None, closed=closed)
    async with client_for(app) as client:
        error = await until_the_first_error(
            60, [client.post(f"/async/async-{n}") for n in range(capacity + 1)], closed
        )
    assert isinstance(error, PoolTimeout), f"the pool never timed out (first error: {error!r})"
    assert "QueuePool limit" in str(error)
    assert small_pool_engine.pool.checkedout() == 0


async def test_sync_routes_do_not_deadlock_when_requests_outnumber_connections(
    issue_pool_engine: Engine, backend: str
) -> None:
    # Without admission control, handler threads blocked in the pool's checkout hold every
    # worker thread, while requests holding connections wait for a thread to validate their
    # response and commit: each waiter fails with "QueuePool limit ... timed out".
    app = writer_app(issue_pool_engine, backend)
    async with client_for(app) as client:
        responses = await all_within(
            60, [client.post(f"/sync/row-{n}") for n in range(REQUESTS)]
        )
    assert [r.status_code for r in responses] == [200] * REQUESTS
    with issue_pool_engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Item)) == REQUESTS
    assert issue_pool_engine.pool.checkedout() == 0


async def test_control_without_admission_sync_routes_deadlock_when_requests_outnumber_connections(
    issue_pool_engine: Engine, backend: str
) -> None:
    skip_on_sqlite(backend)
    closed = threading.Event()
    app = writer_app(issue_pool_engine, backend, max_concurrent_sessions=None, closed=closed)
    async with client_for(app) as client:
        error = await until_the_first_error(
            60, [client.post(f"/sync/row-{n}") for n in range(REQUESTS)], closed
        )
    assert isinstance(error, PoolTimeout), f"the pool never timed out (first error: {error!r})"
    assert "QueuePool limit" in str(error)
    assert issue_pool_engine.pool.checkedout() == 0


async def test_commit_does_not_block_the_event_loop(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        add_item(name)

        def slow_commit(session: object) -> None:
            time.sleep(0.3)  # a slow COMMIT, as over a bad network

        event.listen(db.session, "before_commit", slow_commit)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    try:
        await client.post("/items/lamp")
    finally:
        ticking.cancel()
    # The loop kept running while the commit slept in another thread (~30 ticks).
    assert ticks >= 10
    assert stored_names(engine) == {"lamp"}


async def test_commit_does_not_wait_for_a_worker_thread(
    make_app: MakeApp, engine: Engine
) -> None:
    # Two slots even on SQLite (which takes one request at a time): the blocker holds one.
    app = make_app(max_concurrent_sessions=2)
    client = client_for(app)
    limiter = anyio.to_thread.current_default_thread_limiter()
    release = threading.Event()
    busy = asyncio.Event()
    loop = asyncio.get_running_loop()

    @app.get("/busy")
    def occupy_the_only_worker() -> None:
        loop.call_soon_threadsafe(busy.set)
        release.wait(10)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        add_item(name)

    saved_tokens, limiter.total_tokens = limiter.total_tokens, 1
    try:
        blocker = asyncio.create_task(client.get("/busy"))
        await busy.wait()
        # Every threadpool worker is taken; the write must still commit and answer.
        response = await asyncio.wait_for(client.post("/items/lamp"), timeout=5)
        assert response.status_code == 200
        assert stored_names(engine) == {"lamp"}
    finally:
        release.set()
        await blocker
        limiter.total_tokens = saved_tokens


async def test_concurrent_read_then_write_requests_all_succeed(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    # On SQLite a transaction that read, then writes after another one committed, fails at
    # once ("database is locked"); the middleware lets SQLite requests take turns.
    app, client = app_client

    @app.post("/items/{name}")
    async def create_after_reading(name: str) -> None:
        db.session.scalar(select(func.count()).select_from(Item))
        await asyncio.sleep(0.001)
        add_item(name)

    responses = await all_within(60, [client.post(f"/items/n{n}") for n in range(20)])
    assert [r.status_code for r in responses] == [200] * 20
    assert len(stored_names(engine)) == 20


@pytest.mark.parametrize(
    ("pool_size", "limits"), [(1, ("auto", "auto")), (2, (2, 2))], ids=["auto", "explicit"],
)
async def test_two_middlewares_on_one_engine_share_its_connection_slots(
    migrated_url: str, pool_size: int, limits: tuple[int | str, int | str]
) -> None:
    """Two mounted apps given the same engine: no more requests run at once than the pool
    has connections (each middleware counting its own would let in twice as many, and the
    surplus would block in the pool's checkout), when they name the same limit."""
    engine = create_engine(migrated_url, pool_size=pool_size, max_overflow=0, pool_timeout=10)
    capacity = limits[0] if isinstance(limits[0], int) else pool_capacity(engine)
    running = {"now": 0, "most": 0}
    app = FastAPI()
    for name, limit in zip(("a", "b"), limits, strict=True):
        sub = FastAPI()
        sub.add_middleware(DBSessionMiddleware, custom_engine=engine,
                           max_concurrent_sessions=limit)

        @sub.get("/work")
        async def work() -> None:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            db.session.execute(text("SELECT 1"))
            await asyncio.sleep(0.05)
            running["now"] -= 1

        app.mount(f"/{name}", sub)
    try:
        async with client_for(app) as client:
            responses = await asyncio.gather(
                *(client.get(f"/{name}/work") for name in "ab" * 4)
            )
        assert [response.status_code for response in responses] == [200] * 8
        assert running["most"] <= capacity
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("argument", "error"),
    [
        ({"sessionless_paths": "/health/live"}, TypeError),
        ({"max_concurrent_sessions": 0}, ValueError),
        ({"max_concurrent_sessions": -1}, ValueError),
        ({"commit_policy": None}, TypeError),
        ({"autocommit_methods": "GET"}, TypeError),
        ({"sessionless_paths": b"/health/live"}, TypeError),
        ({"max_concurrent_sessions": True}, ValueError),
    ],
    ids=["paths-a-string", "no-sessions", "negative-sessions", "policy-not-callable",
         "methods-a-string", "paths-bytes", "sessions-a-bool"],
)
async def test_arguments_that_cannot_work_are_refused_when_the_middleware_is_built(
    mode: Mode, argument: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        mode.middleware(FastAPI(), custom_engine=mode.engine, **argument)


async def test_the_other_modes_objects_are_refused_where_they_are_given(
    mode: Mode, engine: Engine, async_engine: AsyncEngine, backend: str
) -> None:
    """An AsyncEngine given to the sync middleware, a sync Database to the async one: a
    TypeError naming the mix-up when the middleware is built, not a 500 at the first
    request (or, for a Database of the other mode, a COMMIT never awaited and a
    connection held for good)."""
    other_engine, other_database = (
        (async_engine, async_mode.Database("other"))
        if mode.name == "sync"
        else (engine, Database("other"))
    )
    with pytest.raises(TypeError, match="custom_engine must be"):
        mode.middleware(FastAPI(), custom_engine=other_engine)
    with pytest.raises(TypeError, match="database must be"):
        mode.middleware(FastAPI(), custom_engine=mode.engine, database=other_database)
    with pytest.raises(TypeError, match="url_or_engine must be"):
        mode.database_class("configured").configure(other_engine)
    if mode.name == "sync":
        # A URL naming an async driver, which no sync engine can use.
        async_url = async_engine.url.render_as_string(hide_password=False)
        with pytest.raises(ValueError, match="async driver"):
            mode.middleware(FastAPI(), db_url=async_url)
        with pytest.raises(ValueError, match="async driver"):
            mode.middleware(FastAPI(), custom_engine=async_engine.sync_engine)
        with pytest.raises(ValueError, match="async driver"):
            Database("configured").configure(async_url)
        not_sync = isolated(db, async_engine.sync_engine)
        with pytest.raises(ValueError, match="async driver"), not_sync:
            pass
    else:
        # A URL naming a sync driver, which no async engine can use.
        sync_url = engine.url.render_as_string(hide_password=False)
        with pytest.raises(ValueError, match="not an async driver"):
            mode.middleware(FastAPI(), db_url=sync_url)
        with pytest.raises(ValueError, match="not an async driver"):
            async_mode.Database("configured").configure(sync_url)
    assert mode.checked_out() == 0
