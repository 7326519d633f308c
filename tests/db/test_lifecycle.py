"""Where the session is visible, and that every request gives its connection back
(behaviours 1, 2 and 5 of service.db), in both modes."""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only
from starlette.middleware.base import BaseHTTPMiddleware

from service.db import DBSessionMiddleware, MissingSessionError, create_engine, db
from service.db import asyncio as async_mode
from service.items.models import Item
from tests.conftest import http_scope
from tests.db.conftest import MakeApp, Mode, add_item, async_url, client_for, stored_names

pytestmark = pytest.mark.anyio


async def test_middleware_is_pure_asgi(mode: Mode) -> None:
    middleware = mode.middleware(FastAPI(), custom_engine=mode.engine)
    assert not isinstance(middleware, BaseHTTPMiddleware)


async def test_lifespan_passes_through_without_a_session(mode: Mode) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            mode.database.session  # noqa: B018 - the point is that it raises
        except MissingSessionError:
            events.append("startup without session")
        yield
        events.append("shutdown")

    app = mode.make_app()
    app.router.lifespan_context = lifespan
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert events == ["startup without session", "shutdown"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_session_is_visible_in_routes_and_dependencies(mode: Mode) -> None:
    app = mode.make_app()

    async def async_dependency() -> Any:
        return mode.database.session

    def sync_dependency() -> Iterator[Any]:  # run in the threadpool, on a copy of the context
        yield mode.database.session

    @app.get("/async")
    async def in_async_route(
        a: Any = Depends(async_dependency), s: Any = Depends(sync_dependency)
    ) -> dict[str, bool]:
        return {"same": a is s is mode.database.session}

    async with client_for(app) as client:
        assert (await client.get("/async")).json() == {"same": True}


async def test_session_is_visible_in_sync_routes(make_app: MakeApp) -> None:
    """Sync mode: `def` routes and dependencies run in the threadpool."""
    app = make_app()

    async def async_dependency() -> Session:
        return db.session

    def sync_dependency() -> Iterator[Session]:
        yield db.session

    @app.get("/sync")
    def in_sync_route(
        a: Session = Depends(async_dependency), s: Session = Depends(sync_dependency)
    ) -> dict[str, bool]:
        return {"same": a is s is db.session}

    async with client_for(app) as client:
        assert (await client.get("/sync")).json() == {"same": True}


async def test_each_request_gets_a_new_session(mode: Mode) -> None:
    app = mode.make_app()
    sessions: list[Any] = []

    @app.get("/")
    async def remember() -> None:
        sessions.append(mode.database.session)

    async with client_for(app) as client:
        await client.get("/")
        await client.get("/")
    assert sessions[0] is not sessions[1]


async def test_in_memory_sqlite_url_works_with_sync_routes() -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db_url="sqlite://")

    @app.post("/setup")
    def setup() -> None:
        db.session.execute(text("CREATE TABLE notes (body TEXT)"))

    @app.post("/notes/{body}")
    def write(body: str) -> None:
        db.session.execute(text("INSERT INTO notes VALUES (:b)"), {"b": body})

    @app.get("/notes")
    def read() -> list[str]:
        return list(db.session.scalars(text("SELECT body FROM notes ORDER BY body")))

    async with client_for(app) as client:
        assert (await client.post("/setup")).status_code == 200
        await asyncio.gather(*(client.post(f"/notes/n{i}") for i in range(10)))
        response = await client.get("/notes")
    assert response.status_code == 200
    assert response.json() == sorted(f"n{i}" for i in range(10))


async def test_in_memory_aiosqlite_url_works_with_concurrent_requests() -> None:
    app = FastAPI()
    app.add_middleware(async_mode.DBSessionMiddleware, db_url="sqlite+aiosqlite://")
    adb = async_mode.db

    @app.post("/setup")
    async def setup() -> None:
        await adb.session.execute(text("CREATE TABLE notes (body TEXT)"))

    @app.post("/notes/{body}")
    async def write(body: str) -> None:
        await adb.session.execute(text("INSERT INTO notes VALUES (:b)"), {"b": body})

    @app.get("/notes")
    async def read() -> list[str]:
        return list(await adb.session.scalars(text("SELECT body FROM notes ORDER BY body")))

    async with client_for(app) as client:
        assert (await client.post("/setup")).status_code == 200
        await asyncio.gather(*(client.post(f"/notes/n{i}") for i in range(10)))
        response = await client.get("/notes")
    assert response.status_code == 200
    assert response.json() == sorted(f"n{i}" for i in range(10))
    # Closed while this test's event loop runs: aiosqlite's thread, closed later by the
    # garbage collector, would answer to a loop that is gone (a warning in another test).
    layer: Any = app.middleware_stack
    while not isinstance(layer, async_mode.DBSessionMiddleware):
        layer = layer.app
    await layer.engine.dispose()


async def test_no_connection_is_left_checked_out_after_any_outcome(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()

    @app.get("/read")
    async def read() -> int:
        return await mode.scalar(select(func.count()).select_from(Item)) or 0

    @app.post("/write/{name}")
    async def write(name: str) -> None:
        mode.add_item(name)

    @app.post("/fail/{name}")
    async def fail(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        raise ValueError("boom")

    async with client_for(app) as client:
        await client.get("/read")
        await client.post("/write/a")
        with pytest.raises(ValueError):
            await client.post("/fail/b")
    assert mode.checked_out() == 0
    assert stored_names(engine) == {"a"}


async def test_client_disconnect_mid_stream_returns_the_connection(mode: Mode) -> None:
    app = mode.make_app()
    finished = asyncio.Event()
    more_rows = asyncio.Event()  # never set: the body waits until the disconnect ends it

    @app.get("/export")
    async def export() -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            try:
                # A transaction is open (a connection checked out) while the body streams.
                yield str(await mode.scalar(select(func.count()).select_from(Item))).encode()
                await more_rows.wait()
                yield b"never sent"
            finally:
                finished.set()

        return StreamingResponse(rows())

    requests = iter(
        [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    )
    first_chunk = asyncio.Event()

    async def receive() -> dict[str, Any]:
        message = next(requests)
        if message["type"] == "http.disconnect":
            await first_chunk.wait()
        return message

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = http_scope("GET", "/export")
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    assert finished.is_set()
    assert mode.checked_out() == 0


async def test_cancelled_request_returns_the_connection(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    in_handler = asyncio.Event()
    finish = asyncio.Event()  # never set: the handler waits until it is cancelled

    @app.post("/slow/{name}")
    async def slow(name: str) -> None:
        mode.add_item(name)
        await mode.flush()  # holds a connection and an open transaction
        in_handler.set()
        await finish.wait()

    async with client_for(app) as client:
        task = asyncio.create_task(client.post("/slow/lamp"))
        await asyncio.wait_for(in_handler.wait(), timeout=5)
        assert mode.checked_out() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)
    assert mode.checked_out() == 0
    assert stored_names(engine) == set()


async def test_request_cancelled_while_its_sync_handler_runs_returns_the_connection(
    make_app: MakeApp, engine: Engine
) -> None:
    """Sync mode: a thread cannot be interrupted, so a cancelled request's handler goes on
    after the middleware has ended the request. Its session is closed for good then: the
    handler's next statement fails instead of opening a connection nobody would return.
    (Found by the admission controls: it used to stay checked out until garbage collection.)"""
    app = make_app()
    in_handler = threading.Event()
    request_over = threading.Event()
    handler_done = threading.Event()
    # Held here, so the garbage collector cannot give the connection back: the middleware must.
    sessions: list[Session] = []

    @app.post("/items/{name}")
    def create(name: str) -> None:
        sessions.append(db.session)
        in_handler.set()
        request_over.wait(5)  # goes on once the request is over
        try:
            add_item(name)
            db.session.flush()
        finally:
            handler_done.set()

    async with client_for(app) as client:
        task = asyncio.create_task(client.post("/items/lamp"))
        try:
            assert await asyncio.to_thread(in_handler.wait, 5), "the handler never ran"
            task.add_done_callback(lambda _: request_over.set())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=10)
            assert await asyncio.to_thread(handler_done.wait, 10), "the handler never ended"
            assert engine.pool.checkedout() == 0
            assert stored_names(engine) == set()
        finally:
            for session in sessions:
                session.close()  # the next test needs the database (SQLite's write lock)


async def test_scope_is_reset_after_the_request(mode: Mode) -> None:
    app = mode.make_app()

    @app.get("/")
    async def touch() -> None:
        mode.database.session  # noqa: B018

    async with client_for(app) as client:
        await client.get("/")
    with pytest.raises(MissingSessionError):
        mode.database.session  # noqa: B018


async def test_request_cancelled_during_its_commit_returns_the_connection(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()
    committing = threading.Event()
    finish_commit = threading.Event()
    async_finish = asyncio.Event()

    def slow_commit(session: object) -> None:
        committing.set()
        if mode.name == "async":  # the COMMIT runs in the event loop: wait without blocking it
            await_only(asyncio.wait_for(async_finish.wait(), 5))
        else:  # the COMMIT runs in a lifecycle thread
            finish_commit.wait(5)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.run(lambda session: event.listen(session, "before_commit", slow_commit))

    async with client_for(app) as client:
        task = asyncio.create_task(client.post("/items/lamp"))
        assert await asyncio.to_thread(committing.wait, 5), "the commit never started"
        task.cancel()  # delivered now, while the commit is still under way
        finish_commit.set()
        async_finish.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)
        # The commit ran to its end (shielded), then the session was closed after it.
        for _ in range(500):
            if mode.checked_out() == 0:
                break
            await asyncio.sleep(0.01)
    assert mode.checked_out() == 0
    assert stored_names(engine) == {"lamp"}


async def test_request_that_finds_no_free_connection_gets_503(
    mode: Mode, migrated_url: str
) -> None:
    url = async_url(migrated_url) if mode.name == "async" else migrated_url
    create = async_mode.create_async_engine if mode.name == "async" else create_engine
    engine = create(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    app = FastAPI()
    app.add_middleware(mode.middleware, custom_engine=engine, database=mode.database)
    holding = asyncio.Event()
    release = asyncio.Event()

    @app.get("/hold")
    async def hold() -> None:
        await mode.run(lambda session: session.execute(text("SELECT 1")))
        holding.set()
        await release.wait()

    async with client_for(app) as client:
        holder = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holding.wait(), timeout=5)  # the only connection is taken
        try:
            refused = await asyncio.wait_for(client.get("/hold"), timeout=5)
        finally:
            release.set()
        assert (await asyncio.wait_for(holder, timeout=5)).status_code == 200
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    # The middleware's default error body, as FastAPI answers an HTTPException.
    assert refused.json() == {"detail": "The database is busy; try again shortly."}
    pool_engine = engine.sync_engine if mode.name == "async" else engine
    assert pool_engine.pool.checkedout() == 0
    await mode.dispose(engine)
