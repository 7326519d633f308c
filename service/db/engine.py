"""Engines that behave the same on every backend we support.

`create_engine` is SQLAlchemy's, with statement accounting attached (`accounting`), plus
what SQLite needs to act like a real database:

- in-memory SQLite (`sqlite://`) gets one shared connection (`StaticPool`) usable from any
  thread, so sync routes running in the threadpool see the same database;
- pysqlite's own transaction handling is switched off and SQLAlchemy emits `BEGIN` itself,
  so SAVEPOINT works (SQLAlchemy's SQLite dialect docs, "Serializable isolation /
  Savepoints / Transactional DDL");
- file databases use WAL journaling so readers don't block the writer, and wait for a lock
  instead of failing at once;
- `fold_case(x)`: `lower()` of every letter - PostgreSQL's own `lower()` in a UTF-8
  database; on SQLite, whose `lower()` folds A-Z only, a function of that name registered
  on every connection. A case-insensitive unique index on `fold_case(name)` and searches
  comparing `fold_case()`s then treat "Émile" and "émile" alike on both. (Not an override
  of SQLite's `lower()`: an index built with it would look corrupt to every program
  without it; one on `fold_case()` makes them fail plainly - "no such function".)
"""

import logging
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, String, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from service.db.accounting import instrument

logger = logging.getLogger("service.db")

# Pool sizing makes no sense for a single shared connection.
_POOL_SIZING_ARGS = ("pool_size", "max_overflow", "pool_timeout", "pool_recycle")


def create_engine(url: str | URL, **engine_args: Any) -> Engine:
    """Create an engine for `url`, instrumented, with the SQLite fixes above where relevant."""
    url = make_url(url)
    return prepared(sqlalchemy.create_engine(url, **backend_args(url, engine_args)))


def backend_args(url: URL, engine_args: dict[str, Any]) -> dict[str, Any]:
    """`engine_args` adjusted for the backend: one shared connection, usable from any
    thread, for in-memory SQLite (which has no pool to size). Shared with the async
    `create_async_engine`."""
    if not in_memory_sqlite(url):
        return engine_args
    engine_args = {k: v for k, v in engine_args.items() if k not in _POOL_SIZING_ARGS}
    engine_args.setdefault("poolclass", StaticPool)
    connect_args = dict(engine_args.pop("connect_args", {}))
    connect_args.setdefault("check_same_thread", False)
    engine_args["connect_args"] = connect_args
    return engine_args


def prepared(engine: Engine) -> Engine:
    """`engine` (a sync engine, or an async engine's `sync_engine`) instrumented, with
    SQLite's savepoints and WAL switched on; returns it."""
    if engine.dialect.name == "sqlite":
        enable_sqlite_savepoints(engine, wal=not _is_memory(engine.url))
    return instrument(engine)


def enable_sqlite_savepoints(engine: Engine, *, wal: bool = False) -> None:
    """Make pysqlite honour BEGIN/SAVEPOINT; idempotent, a no-op for other backends."""
    if engine.dialect.name != "sqlite" or event.contains(engine, "connect", _on_connect):
        return
    if wal:
        event.listen(engine, "connect", _use_wal)
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    event.listen(engine, "invalidate", _roll_back_before_closing)


def in_memory_sqlite(url: str | URL) -> bool:
    """Whether `url` is a SQLite database in memory (`sqlite://`, `:memory:`, a
    `mode=memory` URI): one per connection, gone with it."""
    url = make_url(url)
    return url.get_backend_name() == "sqlite" and _is_memory(url)


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
    register_fold_case(dbapi_connection)


def register_fold_case(dbapi_connection: Any) -> None:
    """SQL `fold_case(x)` on this SQLite connection (pysqlite's, or SQLAlchemy's adapter
    around aiosqlite); deterministic, so an index may use it."""
    dbapi_connection.create_function("fold_case", 1, fold_case_text, deterministic=True)


# Where Python's lower() differs from the one-letter-at-a-time mapping PostgreSQL applies:
# "İ" becomes "i" + a combining dot, and a final "Σ" becomes "ς".
_ONE_TO_ONE = str.maketrans({"\u0130": "i", "\u03a3": "\u03c3"})  # capital I with dot, sigma


def fold_case_text(value: Any) -> Any:
    """`value` with every letter in lower case, as PostgreSQL's `lower()` in a UTF-8
    database; None and non-text values as SQLite's `lower()` answers them."""
    if isinstance(value, str):
        return value.lower() if value.isascii() else value.translate(_ONE_TO_ONE).lower()
    if value is None or isinstance(value, bytes):
        return value
    return str(value).lower()


class fold_case(FunctionElement[str]):  # a SQL function, named as in SQL
    """SQL `fold_case(x)`: `lower(x)` on PostgreSQL and elsewhere, the registered Unicode
    one on SQLite (`register_fold_case`)."""

    type = String()
    inherit_cache = True
    name = "fold_case"


@compiles(fold_case)
def _lower(element: fold_case, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(fold_case, "sqlite")
def _fold_case(element: fold_case, compiler: SQLCompiler, **kw: Any) -> str:
    return f"fold_case({compiler.process(element.clauses, **kw)})"


def _roll_back_before_closing(
    dbapi_connection: Any, connection_record: Any, exception: BaseException | None
) -> None:
    # SQLAlchemy invalidates (closes) a connection whose statement was interrupted - in
    # async mode, a cancelled request. aiosqlite runs the statement on a thread of its own,
    # where it finishes anyway; closing a sqlite3 connection whose statement is not
    # finalised leaves a "zombie" that keeps its transaction, and with it SQLite's one
    # write lock, until the garbage collector finalises the statement: every later write
    # would wait and fail with "database is locked". A ROLLBACK first releases the lock
    # (queued on aiosqlite's thread after the interrupted statement).
    try:
        dbapi_connection.rollback()
    except Exception:  # e.g. outside a greenlet, or a connection already closed
        logger.debug("no rollback before closing an invalidated SQLite connection",
                     exc_info=True)


def _on_begin(connection: sqlalchemy.Connection) -> None:
    # Straight to the DBAPI connection (pysqlite's, or SQLAlchemy's adapter around
    # aiosqlite): a BEGIN is not a query, so statement counts stay the same on every backend.
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cursor.execute("BEGIN")
    cursor.close()
