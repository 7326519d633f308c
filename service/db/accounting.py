"""Counting SQL statements and database time, per unit of work and per test block.

Listeners sit only on the engines `service.db` works with (`instrument`: every engine made
by `service.db.create_engine`, given to a `DBSessionMiddleware` or to `db.configure`), so other
engines in the process pay nothing. A statement is charged to the current unit of work of
the database whose engine ran it, in the context that ran it - the innermost unit of its
mode (sync or async) on an engine no single database claims (`Server-Timing`) - and to
every `assert_max_queries` block open in the process (tests run one at a time, and the app
under test may run in another thread). Transaction control (SAVEPOINT, RELEASE, ROLLBACK TO) is
not a query and is not counted.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import perf_counter
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext

from service.db.aborted import guard_aborted_transactions

_TRANSACTION_CONTROL = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")


class QueryStats:
    """Statements run and seconds spent in the database by one unit of work."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Add the time of the block (e.g. a COMMIT) to `seconds` without counting a query."""
        started = perf_counter()
        try:
            yield
        finally:
            self.seconds += perf_counter() - started

    def server_timing(self) -> str:
        """The `Server-Timing` header value, e.g. `db;dur=1.8;desc="3 queries"`."""
        noun = "query" if self.count == 1 else "queries"
        return f'db;dur={self.seconds * 1000:.1f};desc="{self.count} {noun}"'


class QueryLog(list[str]):
    """The SQL statements run inside one `assert_max_queries` block, in order."""


# The innermost open unit of work of each mode. A statement is charged to the current unit
# of the database its engine serves (`charge_engine_to`); on an engine no database or two
# databases claim (a replica's, one engine given to two), to the innermost unit of its mode:
# a sync statement to the sync unit, an async one (an `AsyncEngine`'s) to the async unit.
current_stats: ContextVar[QueryStats | None] = ContextVar("service_db_stats", default=None)
current_async_stats: ContextVar[QueryStats | None] = ContextVar(
    "service_db_async_stats", default=None
)
StatsVar = ContextVar[QueryStats | None]
_by_engine: "WeakKeyDictionary[Engine, StatsVar | None]" = WeakKeyDictionary()
_started: ContextVar[float] = ContextVar("service_db_statement_started", default=0.0)
_logs: list[QueryLog] = []


@contextmanager
def assert_max_queries(limit: int) -> Iterator[QueryLog]:
    """Fail if the block runs more than `limit` SQL statements, listing them all.

    The N+1 guard for DAO code: counts the statements of every instrumented engine (see the
    module docstring), including those run by an app under test in another thread. Yields
    the `QueryLog` so a test can also assert on the statements themselves.
    """
    log = QueryLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)
    if len(log) > limit:
        listing = "\n".join(f"{n}. {sql}" for n, sql in enumerate(log, start=1))
        raise AssertionError(
            f"expected at most {limit} SQL statement(s), {len(log)} ran:\n{listing}"
        )


def instrument(engine: Engine) -> Engine:
    """Count `engine`'s statements from now on (idempotent); returns the engine. A statement
    the database refused (a constraint, a lock timeout, a lost connection) counts too.
    (Every engine `service.db` works with passes here: it also gets the PostgreSQL guard of
    `service.db.aborted`.)"""
    guard_aborted_transactions(engine)
    if not event.contains(engine, "after_cursor_execute", _after):
        event.listen(engine, "before_cursor_execute", _before)
        event.listen(engine, "after_cursor_execute", _after)
        event.listen(engine, "handle_error", _failed)
    return engine


def charge_engine_to(engine: Engine, stats: StatsVar) -> None:
    """Charge the statements run on `engine` to the current unit of work in `stats`, a
    database's (`DatabaseBase.stats_var`). An engine claimed for two databases is charged
    by mode."""
    claimed = _by_engine.get(engine, stats)
    _by_engine[engine] = stats if claimed is stats else None


def _stats_of(engine: Engine | None, dialect: Any) -> StatsVar:
    stats = _by_engine.get(engine) if engine is not None else None
    if stats is not None:
        return stats
    return current_async_stats if dialect.is_async else current_stats


def _before(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    if _stats_of(conn.engine, conn.dialect).get() is not None or _logs:
        _started.set(perf_counter())


def _after(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    _charge(statement, _stats_of(conn.engine, conn.dialect))


def _failed(context: ExceptionContext) -> None:
    # Also called for errors outside a statement (connecting, fetching rows of one already
    # counted): only a statement `_before` started and `_after` never saw is charged.
    if context.statement is not None and _started.get():
        _charge(context.statement, _stats_of(context.engine, context.dialect))


def _charge(statement: str, current: StatsVar) -> None:
    started = _started.get()
    if started:
        _started.set(0.0)
    stats = current.get()
    if (stats is None and not _logs) or statement.startswith(_TRANSACTION_CONTROL):
        return
    if stats is not None:
        stats.count += 1
        if started:
            stats.seconds += perf_counter() - started
    for log in _logs:
        log.append(statement)
