"""Test helpers for code that uses `db`, shipped as a pytest plugin (loaded automatically
once the package is installed; entry point `service_db`).

Fixtures:

- `db_isolation`: the test runs inside one outer transaction on one connection of
  `db_isolation_engine` (default: `db.engine`; override that fixture in your conftest to
  name your test engine). Every session `db` opens meanwhile - in requests served by
  `DBSessionMiddleware` and in `with db():` - joins it, and each of their commits becomes a
  savepoint release. The outer transaction is rolled back after the test, so nothing a test
  commits is seen by the next. Works on PostgreSQL and SQLite (savepoints switched on
  for pysqlite). Requests of one test share that connection: don't run them concurrently.
- `async_db_isolation`: the same for `service.db.asyncio.db` (async apps, `async with
  db():`), on a connection of `async_db_isolation_engine` (default: that `db.engine`).
- `assert_max_queries`: `with assert_max_queries(2): client.get(...)` fails with the list of
  statements when more ran - the N+1 guard.

Outside pytest, `isolated(database)` / `async with isolated_async(database)` are the same
isolation as context managers.
"""

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import asyncio as async_mode
from service.db.accounting import assert_max_queries as _assert_max_queries
from service.db.database import Database, db
from service.db.engine import enable_sqlite_savepoints
from service.db.session_errors import require_mode, require_sync_driver


@contextmanager
def isolated(database: Database = db, engine: Engine | None = None) -> Iterator[Connection]:
    """Run the block in an outer transaction on a connection of `engine` (default: the
    database's default engine) that is rolled back at the end."""
    require_mode("database", database, Database, "isolated_async")
    engine = engine or database.engine
    require_mode("engine", engine, Engine, "isolated_async")
    require_sync_driver(engine.url)
    enable_sqlite_savepoints(engine)
    with engine.connect() as connection:
        outer = connection.begin()
        try:
            with database.bound_to(connection):
                yield connection
        finally:
            outer.rollback()


@asynccontextmanager
async def isolated_async(
    database: async_mode.Database = async_mode.db, engine: AsyncEngine | None = None
) -> AsyncIterator[AsyncConnection]:
    """`isolated` for the async `Database`: an outer transaction on a connection of
    `engine` (default: the database's default engine), rolled back at the end."""
    require_mode("database", database, async_mode.Database, "isolated")
    engine = engine or database.engine
    require_mode("engine", engine, AsyncEngine, "isolated")
    enable_sqlite_savepoints(engine.sync_engine)
    async with engine.connect() as connection:
        outer = await connection.begin()
        try:
            with database.bound_to(connection):
                yield connection
        finally:
            await outer.rollback()


@pytest.fixture
def db_isolation_engine() -> Engine:
    """The engine whose connection `db_isolation` uses; override it in a conftest."""
    return db.engine


@pytest.fixture
def db_isolation(db_isolation_engine: Engine) -> Iterator[Connection]:
    """Roll back everything the test commits through `db` (see the module docstring)."""
    with isolated(db, db_isolation_engine) as connection:
        yield connection


@pytest.fixture
def async_db_isolation_engine() -> AsyncEngine:
    """The engine whose connection `async_db_isolation` uses; override it in a conftest."""
    return async_mode.db.engine


@pytest.fixture
async def async_db_isolation(
    async_db_isolation_engine: AsyncEngine,
) -> AsyncIterator[AsyncConnection]:
    """Roll back everything the test commits through `service.db.asyncio.db`."""
    async with isolated_async(async_mode.db, async_db_isolation_engine) as connection:
        yield connection


@pytest.fixture
def assert_max_queries() -> type[_assert_max_queries]:  # type: ignore[valid-type]
    """The `assert_max_queries(n)` context manager, as a fixture."""
    return _assert_max_queries  # type: ignore[return-value]
