"""Requests that never touch the database never wait for a connection slot: the liveness
probe answers while every slot is held (`sessionless_paths`)."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, text

from service.config import Settings
from service.db import DBSessionMiddleware, MissingSessionError, create_engine, db
from service.db.asyncio import db as async_db
from service.main import create_app
from tests.db.conftest import add_item, client_for, stored_names

pytestmark = pytest.mark.anyio

# Seconds a request waits for a slot before its 503 (DB_POOL_TIMEOUT in `busy_service`).
SLOT_WAIT = 10.0
# Seconds: a request that waits for nothing answers well within this, even a 1 MB docs
# asset on a slow, shared CI machine (0.24 s seen); one that waits for a slot takes
# SLOT_WAIT.
PROMPT = 1.0


@pytest.fixture
def one_slot_engine(migrated_url: str) -> Iterator[Engine]:
    """One connection, so one request holding it fills the database's admission."""
    engine = create_engine(migrated_url, pool_size=1, max_overflow=0, pool_timeout=5)
    yield engine
    engine.dispose()


class Holder:
    """A route that takes the only slot and keeps it until released (on the app's sync or
    async `db`)."""

    def __init__(self, app: FastAPI, *, on_async_db: bool = False) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

        @app.get("/hold")
        async def hold() -> None:
            if on_async_db:
                await async_db.session.execute(text("SELECT 1"))
            else:
                db.session.execute(text("SELECT 1"))
            self.holding.set()
            await asyncio.wait_for(self.release.wait(), 10)


@pytest.fixture
async def busy_service(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, Holder]]:
    """The real app with one connection slot, which a request is holding."""
    app = create_app(settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": SLOT_WAIT}
    ))
    holder = Holder(app, on_async_db=True)
    async with client_for(app) as client:
        await client.get("/openapi.json")  # built once, on first use: CPU, not waiting
        held = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holder.holding.wait(), 5)
        try:
            yield client, holder
        finally:
            holder.release.set()
            assert (await asyncio.wait_for(held, 10)).status_code == 200
            await app.state.engine.dispose()


async def timed_get(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await asyncio.wait_for(client.get(path), 5)
    return response, time.perf_counter() - started


@pytest.mark.parametrize(
    "path",
    [
        "/health/live", "/health/ready", "/openapi.json", "/docs", "/redoc",
        "/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/redoc.standalone.js",
    ],
)
async def test_probe_and_docs_answer_at_once_while_every_slot_is_held(
    busy_service: tuple[httpx.AsyncClient, Holder], path: str
) -> None:
    client, _ = busy_service
    response, took = await timed_get(client, path)
    assert response.status_code == 200
    assert took < PROMPT, f"{path} took {took:.3f} s"


async def test_database_requests_still_queue_for_the_slot(
    busy_service: tuple[httpx.AsyncClient, Holder],
) -> None:
    """The control: the same app does make database requests wait for the held slot."""
    client, _ = busy_service
    waiting = asyncio.create_task(client.get("/items"))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    waiting.cancel()


async def test_without_sessionless_paths_the_probe_waits_for_a_slot(
    one_slot_engine: Engine,
) -> None:
    """Negative control: the probe queued behind the database work before this design."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=one_slot_engine)
    holder = Holder(app)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    async with client_for(app) as client:
        held = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(holder.holding.wait(), 5)
        probe = asyncio.create_task(client.get("/health/live"))
        await asyncio.sleep(0.3)
        assert not probe.done()  # still waiting for the slot
        holder.release.set()
        assert (await asyncio.wait_for(probe, 5)).status_code == 200
        assert (await asyncio.wait_for(held, 5)).status_code == 200


async def test_a_sessionless_path_has_no_session_but_can_open_one(
    one_slot_engine: Engine, engine: Engine
) -> None:
    app = FastAPI()
    app.add_middleware(
        DBSessionMiddleware, custom_engine=one_slot_engine, sessionless_paths={"/plain"}
    )
    db.configure(engine)  # what `with db():` uses outside a request's session

    @app.post("/plain")
    def plain() -> dict[str, str]:
        try:
            db.session  # noqa: B018 (the read is the test)
        except MissingSessionError as exc:
            refused = str(exc)
        with db():
            add_item("written-by-a-block")
        return {"refused": refused}

    async with client_for(app) as client:
        response = await client.post("/plain")
    assert response.status_code == 200
    assert "sessionless_paths" in response.json()["refused"]
    assert stored_names(engine) == {"written-by-a-block"}
    assert "server-timing" not in response.headers  # no unit of work, nothing to time


@pytest.mark.parametrize("mounted", [False, True], ids=["root-path", "mounted"])
async def test_a_sessionless_path_is_matched_behind_a_root_path_or_a_mount(
    one_slot_engine: Engine, mounted: bool
) -> None:
    """Behind a proxy prefix (`uvicorn --root-path /api`) or in an app mounted at /api, the
    scope's path starts with the prefix: the probe is still `/health/live` to the app."""
    inner = FastAPI()
    inner.add_middleware(
        DBSessionMiddleware, custom_engine=one_slot_engine, sessionless_paths={"/health/live"}
    )
    holder = Holder(inner)

    @inner.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    if mounted:
        app = FastAPI()
        app.mount("/api", inner)
        client = client_for(app)
    else:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=inner, root_path="/api"), base_url="http://test"
        )
    async with client:
        held = asyncio.create_task(client.get("/api/hold"))
        await asyncio.wait_for(holder.holding.wait(), 5)
        try:
            response, took = await timed_get(client, "/api/health/live")
            assert response.status_code == 200
            assert took < PROMPT
        finally:
            holder.release.set()
            assert (await asyncio.wait_for(held, 5)).status_code == 200


async def test_a_line_break_in_a_path_cannot_forge_a_log_line(
    migrated_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """service.db's own lines (here: the busy pool's 503) name the request's path as the
    client sent it: escaped, so that a %0a cannot start a line of its own."""
    engine = create_engine(migrated_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine)
    holder = Holder(app)
    try:
        async with client_for(app) as client:
            held = asyncio.create_task(client.get("/hold"))
            await asyncio.wait_for(holder.holding.wait(), 5)
            with caplog.at_level(logging.WARNING, logger="service.db"):
                busy = await client.get("/x%0a2026-11-30 ERROR service.db forged")
            holder.release.set()
            await asyncio.wait_for(held, 5)
    finally:
        engine.dispose()
    assert busy.status_code == 503
    (line,) = [r.getMessage() for r in caplog.records if r.name == "service.db"]
    assert "\n" not in line and "/x\\n2026-11-30" in line
    assert "within 0.2 s" in line
