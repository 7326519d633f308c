"""Engines that behave the same on every backend we support.

`create_engine` is SQLAlchemy's, with statement accounting attached (`accounting`), plus
what SQLite needs to act like a real database:

- in-memory SQLite (`sqlite://`) gets one shared connection (`StaticPool`) usable from any
  thread, so sync routes running in the threadpool see the same database;
- pysqlite's own transaction handling is switched off and SQLAlchemy emits `BEGIN` itself,
  so SAVEPOINT works (SQLAlchemy's SQLite dialect docs, "Serializable isolation /
  Savepoints / Transactional DDL");
- file databases use WAL journaling so readers don't block the writer, and wait for a lock
  instead of failing at once.
"""

from typing import Any

import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from service.db.accounting import instrument

# Pool sizing makes no sense for a single shared connection.
_POOL_SIZING_ARGS = ("pool_size", "max_overflow", "pool_timeout", "pool_recycle")


def create_engine(url: str | URL, **engine_args: Any) -> Engine:
    """Create an engine for `url`, instrumented, with the SQLite fixes above where relevant."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return instrument(sqlalchemy.create_engine(url, **engine_args))
    if _is_memory(url):
        for name in _POOL_SIZING_ARGS:
            engine_args.pop(name, None)
        engine_args.setdefault("poolclass", StaticPool)
        connect_args = dict(engine_args.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        engine_args["connect_args"] = connect_args
    engine = sqlalchemy.create_engine(url, **engine_args)
    enable_sqlite_savepoints(engine, wal=not _is_memory(url))
    return instrument(engine)


def enable_sqlite_savepoints(engine: Engine, *, wal: bool = False) -> None:
    """Make pysqlite honour BEGIN/SAVEPOINT; idempotent, a no-op for other backends."""
    if engine.dialect.name != "sqlite" or event.contains(engine, "connect", _on_connect):
        return
    if wal:
        event.listen(engine, "connect", _use_wal)
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or "mode=memory" in str(url)


def _use_wal(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Stop pysqlite from issuing its own BEGIN (and from committing before DDL).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_begin(connection: sqlalchemy.Connection) -> None:
    # Straight to the driver: a BEGIN is not a query, so statement counts stay the same
    # on every backend.
    connection.connection.driver_connection.execute("BEGIN")  # type: ignore[union-attr]
