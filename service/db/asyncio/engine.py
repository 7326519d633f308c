"""`create_async_engine`: SQLAlchemy's, with what `service.db.create_engine` adds - statement
accounting, and SQLite (aiosqlite) made savepoint-safe, WAL for files, one shared
connection for `:memory:` - applied to its `sync_engine`, where SQLAlchemy's events live."""

from typing import Any

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
    return engine


def instrument_async(engine: AsyncEngine) -> AsyncEngine:
    """Count `engine`'s statements (`service.db.instrument` on its `sync_engine`)."""
    instrument(engine.sync_engine)
    return engine
