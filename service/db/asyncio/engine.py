"""`create_async_engine`: SQLAlchemy's, with what `service.db.create_engine` adds - statement
accounting, and SQLite (aiosqlite) made savepoint-safe, WAL for files, one shared
connection for `:memory:` - applied to its `sync_engine`, where SQLAlchemy's events live.

One more fix: a failed connect is an `OperationalError`, as with psycopg2. asyncpg lets
`ConnectionRefusedError`, a connect `TimeoutError` or "the database system is starting up"
out as they are, which would make an unreachable database a 500 instead of a 503.
"""

from typing import Any

from sqlalchemy import Dialect, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext import asyncio as sqlalchemy_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.accounting import instrument
from service.db.engine import backend_args, prepared


def create_async_engine(url: str | URL, **engine_args: Any) -> AsyncEngine:
    """Create an async engine for `url` (e.g. `postgresql+asyncpg://...`,
    `sqlite+aiosqlite:///file.db`), instrumented, with the SQLite fixes where relevant."""
    url = make_url(url)
    engine = sqlalchemy_asyncio.create_async_engine(url, **backend_args(url, engine_args))
    prepared(engine.sync_engine)
    event.listen(engine.sync_engine, "do_connect", _connect_failures_are_operational)
    return engine


def _connect_failures_are_operational(
    dialect: Dialect, connection_record: Any, cargs: Any, cparams: Any
) -> Any:
    dbapi = dialect.loaded_dbapi
    try:
        return dialect.connect(*cargs, **cparams)
    except dbapi.OperationalError:
        raise
    except Exception as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise dbapi.OperationalError(f"cannot connect: {reason}", exc) from exc


def instrument_async(engine: AsyncEngine) -> AsyncEngine:
    """Count `engine`'s statements (`service.db.instrument` on its `sync_engine`)."""
    instrument(engine.sync_engine)
    return engine
