"""PostgreSQL: a COMMIT of a transaction that an error aborted fails instead of passing.

After a statement fails inside a transaction, PostgreSQL refuses every later statement of it
and answers its COMMIT with a ROLLBACK - which neither psycopg2 nor asyncpg reports as an
error. A route that catches a database error and carries on (`except IntegrityError:
pass`) would then answer 2xx while none of its work was stored; on SQLite, which aborts
only the failed statement, the rest of the work is stored. `guard_aborted_transactions`
makes that COMMIT raise `TransactionAborted` instead (after rolling the connection back, so
it returns to the pool clean), so the middleware answers it like any failed COMMIT (500,
nothing stored) and a script's `with db():` raises.

Catching the error is fine once its savepoint is rolled back: `with session.begin_nested():`
around the statement that may fail (SAVEPOINT ... ROLLBACK TO SAVEPOINT) leaves the
transaction usable, and the guard then stays quiet.

Whether the transaction is aborted: psycopg2 says so itself (the server's transaction
status, `connection.info.transaction_status`). For other drivers (asyncpg) it is tracked
per connection from what actually ran: an error the server reported inside a transaction
(it carries a SQLSTATE; a statement's or a fetch's) marks the connection with the number of
savepoints then open; a ROLLBACK TO one of those savepoints, once it has run, clears the
mark; a new transaction starts clean. Connections in autocommit are never marked.
"""

import re
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext

_ABORTED = "service.db.aborted"  # Connection.info: savepoints open when the server refused
_SAVEPOINTS = "service.db.savepoints"  # Connection.info: savepoints open now
_IN_ERROR = 3  # libpq's PQTRANS_INERROR: idle, in a failed transaction


class TransactionAborted(Exception):
    """A COMMIT of a PostgreSQL transaction that an earlier statement's error aborted: the
    server rolled the whole transaction back, so nothing of it was stored."""


def guard_aborted_transactions(engine: Engine) -> None:
    """Make `engine`'s COMMIT of an aborted transaction raise `TransactionAborted`
    (PostgreSQL only; idempotent)."""
    if engine.dialect.name != "postgresql" or event.contains(engine, "commit", _commit):
        return
    event.listen(engine, "commit", _commit)
    if engine.dialect.driver in _REPORT_THEIR_STATUS:
        return  # nothing to track: the driver knows
    event.listen(engine, "handle_error", _failed)
    event.listen(engine, "after_cursor_execute", _ran)
    event.listen(engine, "begin", _clear)
    event.listen(engine, "rollback", _clear)


# Drivers whose connections tell the server's transaction status
# (`connection.info.transaction_status`, libpq's PQtransactionStatus).
_REPORT_THEIR_STATUS = frozenset({"psycopg2", "psycopg"})


def _failed(context: ExceptionContext) -> None:
    connection = context.connection
    if (
        connection is None
        or not _from_the_server(context.original_exception)  # connecting, client-side
        or context.is_disconnect  # the connection is gone: the COMMIT fails by itself
        or connection.invalidated
        or not connection.in_transaction()
        or getattr(connection.connection.dbapi_connection, "autocommit", False)
    ):
        return
    info = connection.info
    info.setdefault(_ABORTED, info.get(_SAVEPOINTS, 0))


def _from_the_server(error: BaseException) -> bool:
    """Whether the server reported `error` (it then aborted the transaction): an error
    with a SQLSTATE - but for asyncpg (the cause of what SQLAlchemy's adapter raises),
    whose client-side errors carry one too (a parameter it could not encode is a
    `DataError`, 22000), only one with the `severity` the server's messages have."""
    cause = error.__cause__
    if type(cause).__module__.startswith("asyncpg"):
        return bool(getattr(cause, "severity", None))
    return bool(getattr(error, "pgcode", None) or getattr(error, "sqlstate", None))


# Savepoint statements as PostgreSQL takes them: any case, SAVEPOINT optional after
# RELEASE and ROLLBACK TO.
_SAVEPOINT_STATEMENT = re.compile(
    r"\s*(SAVEPOINT|RELEASE|ROLLBACK\s+TO)\b", re.IGNORECASE
)


def _ran(
    connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any,
    many: bool,
) -> None:
    # Savepoints as they really ran (a SAVEPOINT the server refused never counts).
    found = _SAVEPOINT_STATEMENT.match(statement)
    if found is None:
        return
    info = connection.info
    depth = info.get(_SAVEPOINTS, 0)
    kind = found[1].upper()
    if kind == "SAVEPOINT":
        info[_SAVEPOINTS] = depth + 1
        return
    if kind != "RELEASE" and depth and depth <= info.get(_ABORTED, -1):
        del info[_ABORTED]  # rolled back to a savepoint open when the server refused
    info[_SAVEPOINTS] = max(depth - 1, 0)


def _clear(connection: Connection) -> None:
    if connection.invalidated:  # its DBAPI connection is gone, and its state with it
        return
    connection.info.pop(_ABORTED, None)
    connection.info.pop(_SAVEPOINTS, None)


def _commit(connection: Connection) -> None:
    if connection.invalidated:
        return
    dbapi_connection = connection.connection.dbapi_connection
    status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    aborted = status == _IN_ERROR if isinstance(status, int) else _ABORTED in connection.info
    if not aborted:
        return
    _clear(connection)
    # SQLAlchemy counts the transaction as ended once this raises, and would give the
    # connection back as it is: roll it back here, so the next user finds it clean.
    dbapi_connection.rollback()  # type: ignore[union-attr]
    raise TransactionAborted(
        "COMMIT of a transaction that an earlier statement's error aborted: PostgreSQL "
        "rolled all of it back. The error was caught and the work went on; catch it "
        "after a savepoint instead (`with session.begin_nested(): ...`)."
    )
