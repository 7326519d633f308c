"""Statements of an abandoned sync unit are stopped at a gate, so its end never overlaps one.

A cancellation cannot stop a thread: a sync route may go on running statements after its
request was cancelled, on the connection its session holds. Ending the unit meanwhile -
rolling back, giving the connection back to the pool - would let that statement run on a
connection another request already uses (and commits), or close a connection under a running
statement (which crashes sqlite3). So every statement of an engine the sync middleware works
with passes a gate (`before_cursor_execute` to `after_cursor_execute` / `handle_error`), and
so does every COMMIT: `close_gate(connection)` closes the gate at once - a later statement
or COMMIT of that connection raises `StatementRefused` before it reaches the driver - and
waits until the statement running on it, if any, is over. Each `Connection` is one checkout,
so the gate closes for the abandoned unit only, never for the next user of the same pooled
connection.
"""

import threading
import time
import weakref
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext

_lock = threading.Lock()
_running: dict[int, int] = {}  # id(Connection) -> statements running on it now
_closed: "weakref.WeakSet[Connection]" = weakref.WeakSet()


class StatementRefused(RuntimeError):
    """A statement of a request that was cancelled (its unit of work has ended)."""


def guard_statements(engine: Engine) -> None:
    """Put `engine`'s statements (and COMMITs) behind the gate (idempotent)."""
    if event.contains(engine, "before_cursor_execute", _enter):
        return
    event.listen(engine, "before_cursor_execute", _enter)
    event.listen(engine, "after_cursor_execute", _leave)
    event.listen(engine, "handle_error", _failed)
    event.listen(engine, "commit", _refuse_if_closed)


def close_gate(connection: Connection, patience: float) -> bool:
    """Refuse `connection`'s later statements and COMMITs from now on, then wait (at most
    `patience` s) until the one running, if any, is over; whether it was in time."""
    with _lock:
        _closed.add(connection)
    deadline = time.monotonic() + patience
    while True:
        with _lock:
            if not _running.get(id(connection)):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def _refuse_if_closed(connection: Connection) -> None:
    if connection in _closed:
        raise StatementRefused(
            "the request this COMMIT belongs to was cancelled, and its work rolled back"
        )


def _enter(connection: Connection, *args: Any) -> None:
    with _lock:
        if connection in _closed:
            raise StatementRefused(
                "the request this statement belongs to was cancelled, and its work rolled back"
            )
        key = id(connection)
        _running[key] = _running.get(key, 0) + 1


def _leave(connection: Connection, *args: Any) -> None:
    _done(connection)


def _failed(context: ExceptionContext) -> None:
    if context.connection is not None and context.statement is not None:
        _done(context.connection)


def _done(connection: Connection) -> None:
    with _lock:
        key = id(connection)
        count = _running.get(key, 0) - 1
        if count > 0:
            _running[key] = count
        else:
            _running.pop(key, None)
