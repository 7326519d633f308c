"""`create_async_engine`: SQLAlchemy's, with what `service.db.create_engine` adds - statement
accounting, and SQLite (aiosqlite) made savepoint-safe, WAL for files, one shared
connection for `:memory:` - applied to its `sync_engine`, where SQLAlchemy's events live.

And fixes:

- a failed connect is an `OperationalError`, as with psycopg2. asyncpg lets
  `ConnectionRefusedError`, a connect `TimeoutError` or "the database system is starting
  up" out as they are, which would make an unreachable database a 500 instead of a 503;
- a statement that timed out (asyncpg's `command_timeout`) aborts its connection at once,
  and raises an `OperationalError` (a 503), not asyncpg's bare `TimeoutError` (a 500).
  SQLAlchemy discards such a connection with asyncpg's graceful close, which waits up to 2 s
  more for the server to acknowledge the cancelled statement - from a server that hangs,
  a read replica's read timeout would take twice as long;
- an asyncpg connection works only on the event loop that made it; pooled on one loop and
  handed out on another (tests that run each on a loop of their own with one app, scripts
  calling `asyncio.run()` twice) it failed, and then stayed in the pool mid-protocol:
  every later checkout failed with "another operation is in progress". It is discarded
  instead, and a new one made on the running loop. Also for engines made with
  SQLAlchemy's own `create_async_engine` and given as `custom_engine` or to `configure`;
- SQLAlchemy closes a connection (at `dispose()`, so at shutdown) by waiting for the
  server's goodbye, for ever: a server that hangs held up a shutdown for good. A close
  waits `CLOSE_TIMEOUT` (1 s), then aborts the connection, and so do the pool's next
  closes at once (`_BoundedClose`);
- `pool_pre_ping=True` costs asyncpg three round trips per checkout (SQLAlchemy pings
  inside BEGIN ... ROLLBACK, for PgBouncer), as many as the request's own BEGIN, query and
  COMMIT. For asyncpg it becomes `discard_closed_connections`: no round trip, the same
  guarantee that connections the server dropped (a restart) are replaced unseen.
"""

import asyncio
import contextlib
import os
import select
import socket
import time
from typing import Any

from sqlalchemy import Dialect, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext import asyncio as sqlalchemy_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util.concurrency import await_only, in_greenlet

from service.db.accounting import instrument
from service.db.engine import backend_args, prepared


def create_async_engine(url: str | URL, **engine_args: Any) -> AsyncEngine:
    """Create an async engine for `url` (e.g. `postgresql+asyncpg://...`,
    `sqlite+aiosqlite:///file.db`), instrumented, with the SQLite fixes where relevant."""
    url = make_url(url)
    engine_args = backend_args(url, engine_args)
    cheap_ping = url.get_driver_name() == "asyncpg" and engine_args.get("pool_pre_ping", False)
    if cheap_ping:
        engine_args = {**engine_args, "pool_pre_ping": False}
    engine = sqlalchemy_asyncio.create_async_engine(url, **engine_args)
    prepared(engine.sync_engine)
    event.listen(engine.sync_engine, "do_connect", _connect_failures_are_operational)
    if url.get_driver_name() == "asyncpg":
        event.listen(engine.sync_engine, "handle_error", _abort_after_a_timeout)
    _guard_asyncpg_pool(engine)
    if cheap_ping:
        connect_timeout = engine_args.get("connect_args", {}).get("timeout") or PING_TIMEOUT
        discard_closed_connections(engine, ping_timeout=min(connect_timeout, PING_TIMEOUT))
    return engine


def _abort_after_a_timeout(context: Any) -> exc.OperationalError | None:
    """A statement that outlived `command_timeout`: abort its connection, and raise the
    timeout as the `OperationalError` psycopg2 raises for one (asyncpg lets its
    `TimeoutError` out unwrapped: an unexplained 500 instead of a 503)."""
    timeout = context.original_exception
    if not isinstance(timeout, TimeoutError):
        return None
    connection = context.connection
    if connection is not None and not connection.invalidated:
        driver = connection.connection.driver_connection
        if driver is not None:
            driver.terminate()  # asyncpg's abort: no waiting; SQLAlchemy then discards it
    return exc.OperationalError(context.statement, context.parameters, timeout)


def _guard_asyncpg_pool(engine: AsyncEngine) -> None:
    """On an asyncpg engine's pool (once): a connection pooled on another event loop is
    replaced at checkout, and a close waits `CLOSE_TIMEOUT` at most (see the module
    docstring)."""
    pool = engine.sync_engine.pool
    if engine.dialect.driver != "asyncpg" or event.contains(
        pool, "checkout", _replace_if_of_another_loop
    ):
        return
    event.listen(pool, "checkout", _replace_if_of_another_loop)
    event.listen(pool, "close", _BoundedClose())


def _replace_if_of_another_loop(
    dbapi_connection: Any, connection_record: Any, proxy: Any
) -> None:
    driver = dbapi_connection.driver_connection
    if _of_another_loop(driver):
        _abandon(driver)
        raise exc.DisconnectionError("a pooled connection made on another event loop")


class _BoundedClose:
    """A pool's "close" listener. SQLAlchemy closes a connection (dispose, recycle, a reset
    that failed) by waiting for the server's goodbye without a limit: this closes it first,
    waiting `CLOSE_TIMEOUT`, then aborts it, and SQLAlchemy's close finds it closed. Once a
    close of this pool's has timed out, the next ones for `GIVE_UP_FOR` seconds abort at
    once: a shutdown closing 20 connections to a server that hangs waits 1 s, not 20.
    Outside a greenlet (garbage collection) SQLAlchemy aborts the connection itself."""

    def __init__(self) -> None:
        self.gave_up_at = -GIVE_UP_FOR

    def __call__(self, dbapi_connection: Any, connection_record: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver is None or driver.is_closed() or not in_greenlet():
            return
        if _of_another_loop(driver):
            _abandon(driver)
            return
        if time.monotonic() - self.gave_up_at < GIVE_UP_FOR:
            driver.terminate()
            return
        try:
            await_only(driver.close(timeout=CLOSE_TIMEOUT))
        except Exception:  # timed out or broken: asyncpg has aborted it already
            self.gave_up_at = time.monotonic()
            driver.terminate()


def _of_another_loop(driver: Any) -> bool:
    made_on = getattr(driver, "_loop", None)
    return made_on is not None and made_on is not asyncio.get_running_loop()


def _abandon(driver: Any) -> None:
    """Drop an asyncpg connection of another event loop without touching that loop (it may
    be closed, or running in another thread): its socket is shut down through a duplicate
    of its descriptor (the server ends that session now; uvloop's transport socket has no
    `shutdown`), and the connection marked aborted - its own loop, or the garbage
    collector if that loop is closed, frees the descriptor."""
    transport = getattr(driver, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(RuntimeError):  # that loop is closed
        driver.terminate()


# A connection idle this long is pinged for real before use: it may be half-open (a
# network drop without a FIN), which no local check can see.
PING_AFTER_IDLE = 30.0
# How long a ping waits for its answer at most (less if the engine's connect timeout is).
PING_TIMEOUT = 2.0
# How long closing a connection waits for the server's goodbye before aborting it; after
# one such wait, how long the pool's other closes abort at once.
CLOSE_TIMEOUT = 1.0
GIVE_UP_FOR = 10.0


def discard_closed_connections(engine: AsyncEngine, ping_timeout: float = PING_TIMEOUT) -> None:
    """Before a pooled asyncpg connection is handed out, make sure the server has not
    dropped it, without a round trip: asyncpg knows it is closed if the event loop has seen
    the server hang up; if the loop was busy meanwhile, the server's goodbye (an error
    message, then EOF) is still unread in the socket, which a zero-timeout `select` sees.
    Only then - or after `PING_AFTER_IDLE` seconds idle - is the connection pinged for real,
    waiting `ping_timeout` seconds for the answer (not the connection's statement timeout:
    a server that hangs costs that, then a connect attempt, not the two timeouts). A dead
    one is replaced by a new one, as `pool_pre_ping` does."""
    pool = engine.sync_engine.pool

    def replace_if_dropped(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        _replace_if_dropped(dbapi_connection, connection_record, ping_timeout)

    event.listen(pool, "checkin", _note_idle_since)
    event.listen(pool, "checkout", replace_if_dropped)


def _note_idle_since(dbapi_connection: Any, connection_record: Any) -> None:
    if connection_record is not None:
        connection_record.info["idle_since"] = time.monotonic()


def _replace_if_dropped(dbapi_connection: Any, connection_record: Any, timeout: float) -> None:
    idle_since = connection_record.info.pop("idle_since", None)
    if idle_since is None:
        return  # a new connection
    driver = dbapi_connection.driver_connection
    if driver.is_closed():
        raise exc.DisconnectionError("the server closed this pooled connection")
    if time.monotonic() - idle_since > PING_AFTER_IDLE or _has_unread_input(driver):
        try:
            # An empty query, by the simple query protocol: nothing prepared, no
            # transaction (PgBouncer's transaction mode takes it as it is).
            await_only(driver.execute(";", timeout=timeout))
        except Exception as error:
            # Replaced now, not after asyncpg's graceful close (up to 2 s more, waiting for
            # a server that may hang).
            driver.terminate()
            raise exc.DisconnectionError("a pooled connection failed its ping") from error


def _has_unread_input(driver: Any) -> bool:
    """Whether an idle asyncpg connection's socket holds input nobody asked for (the
    server's goodbye), or cannot be looked at (then: assume so)."""
    transport = getattr(driver, "_transport", None)
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    readable, _, _ = select.select([sock.fileno()], [], [], 0)
    return bool(readable)
def instrument_async(engine: AsyncEngine) -> AsyncEngine:
    """Count `engine`'s statements (`service.db.instrument` on its `sync_engine`); an
    asyncpg engine made elsewhere also gets its pool guarded (`_guard_asyncpg_pool`)."""
    instrument(engine.sync_engine)
    _guard_asyncpg_pool(engine)
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
