"""Helpers for the tests of service.db: small apps wired with DBSessionMiddleware on the
migrated test database, and a look at what was really committed.

Tests of a behaviour both modes share take the `mode` fixture and run twice: once on
`service.db` (a sync `Session`), once on `service.db.asyncio` (an `AsyncSession` on asyncpg
or aiosqlite). Their routes are `async def` and reach the session through the `Mode` object
(`mode.add_item`, `await mode.flush()`, `await mode.run(fn)`), which is the one place that
knows whether to await. Tests of what only one mode has (sync routes in the threadpool,
fastapi-sqlalchemy's API) stay on their own.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from service.config import ASYNC_DRIVERS
from service.db import DBSessionMiddleware, create_engine, db
from service.db import asyncio as async_mode
from service.items.models import Item
from service.problems import failure_problem, install_problem_handlers

MakeApp = Callable[..., FastAPI]
T = TypeVar("T")


def add_item(name: str, database: Any = db) -> Item:
    """What a DAO does: add a row through the current scope's session."""
    item = Item(name=name, price=Decimal("1.00"))
    database.session.add(item)
    return item


def stored_names(engine: Engine) -> set[str]:
    """Names committed in the database, read on a connection of its own."""
    with engine.connect() as connection:
        return set(connection.scalars(select(Item.name)))


@pytest.fixture
def make_app(engine: Engine) -> MakeApp:
    """`make_app(**middleware_args)`: a FastAPI app with the service's error handlers and
    DBSessionMiddleware on the test engine, answering failures with problem documents as
    the service does (unless the args say otherwise)."""

    def make(**middleware_args: Any) -> FastAPI:
        app = FastAPI()
        install_problem_handlers(app)
        if "db_url" not in middleware_args:
            middleware_args.setdefault("custom_engine", engine)
        middleware_args.setdefault("error_response", failure_problem)
        app.add_middleware(DBSessionMiddleware, **middleware_args)
        return app

    return make


def client_for(app: FastAPI, **transport_args: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **transport_args), base_url="http://test"
    )


@pytest.fixture
async def app_client(make_app: MakeApp) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app with the default middleware, and a client for it."""
    app = make_app()
    async with client_for(app) as client:
        yield app, client


# -- both modes -------------------------------------------------------------------------


def async_url(url: str) -> str:
    """The test database's URL with its backend's async driver."""
    parsed = make_url(url)
    return parsed.set(drivername=ASYNC_DRIVERS[parsed.get_backend_name()]).render_as_string(
        hide_password=False
    )


@pytest.fixture
async def async_engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """The test database on its async driver (asyncpg, aiosqlite); one per test, since
    asyncpg connections belong to the event loop they were made in and each test runs in
    a loop of its own."""
    engine = async_mode.create_async_engine(async_url(migrated_url))
    yield engine
    await engine.dispose()


@dataclass
class Mode:
    """One mode of service.db: its middleware, its global `db` and the engine under test."""

    name: str
    database: Any  # service.db.db or service.db.asyncio.db
    middleware: type[Any]
    engine: Any  # the Engine or AsyncEngine the middleware is given
    pool_engine: Engine  # where the pool of `engine` is

    def make_app(self, **middleware_args: Any) -> FastAPI:
        """An app with the service's error handlers and this mode's middleware on the test
        engine (unless the args say otherwise), answering failures as the service does."""
        app = FastAPI()
        install_problem_handlers(app)
        if "db_url" not in middleware_args:
            middleware_args.setdefault("custom_engine", self.engine)
        middleware_args.setdefault("error_response", failure_problem)
        app.add_middleware(self.middleware, **middleware_args)
        return app

    @property
    def database_class(self) -> type[Any]:
        return self.database.__class__  # type: ignore[no-any-return]

    def own_database(self, name: str) -> Any:
        """A `Database` of this mode of its own, configured with the test engine (what a
        script or job uses for `with db():`)."""
        database = self.database_class(name)
        database.configure(self.engine)
        return database

    def add_item(self, name: str, database: Any = None) -> Item:
        return add_item(name, database or self.database)

    async def run(self, fn: Callable[[Session], T], database: Any = None) -> T:
        """`fn(session)` on the current unit's session (of `database`, default this mode's
        `db`): called (sync) or through `run_sync` (async)."""
        session = (database or self.database).session
        if self.name == "async":
            return await session.run_sync(fn)  # type: ignore[no-any-return]
        return fn(session)

    async def flush(self, database: Any = None) -> None:
        await self.run(lambda session: session.flush(), database)

    async def commit(self, database: Any = None) -> None:
        await self.run(lambda session: session.commit(), database)

    async def scalar(self, statement: Any, database: Any = None) -> Any:
        return await self.run(lambda session: session.scalar(statement), database)

    def block(self, database: Any = None, **args: Any) -> AbstractAsyncContextManager[Any]:
        """`with db(**args):` (sync) or `async with db(**args):` (async), as one async block."""
        opened = (database or self.database)(**args)
        if self.name == "async":
            return opened  # type: ignore[no-any-return]
        return _as_async(opened)

    def engine_for(self, url: str) -> Any:
        """A new engine of this mode on `url` (a sync URL); the caller disposes of it."""
        if self.name == "async":
            return async_mode.create_async_engine(async_url(url))
        return create_engine(url)

    async def dispose(self, engine: Any) -> None:
        result = engine.dispose()
        if self.name == "async":
            await result

    def checked_out(self) -> int:
        return self.pool_engine.pool.checkedout()


@asynccontextmanager
async def _as_async(block: Any) -> AsyncIterator[Any]:
    with block as database:
        yield database


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest, engine: Engine, async_engine: AsyncEngine) -> Mode:
    if request.param == "sync":
        return Mode("sync", db, DBSessionMiddleware, engine, engine)
    return Mode(
        "async", async_mode.db, async_mode.DBSessionMiddleware, async_engine,
        async_engine.sync_engine,
    )
