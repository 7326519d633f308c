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
    event.listen(engine, "handle_error", _failed)
    event.listen(engine, "after_cursor_execute", _ran)
    event.listen(engine, "begin", _clear)
    event.listen(engine, "rollback", _clear)
    event.listen(engine, "commit", _commit)


def _failed(context: ExceptionContext) -> None:
    connection = context.connection
    original = context.original_exception
    reported = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    if (
        connection is None
        or not reported  # not the server's answer: connecting, a client-side error
        or context.is_disconnect  # the connection is gone: the COMMIT fails by itself
        or connection.invalidated
        or not connection.in_transaction()
        or getattr(connection.connection.dbapi_connection, "autocommit", False)
    ):
        return
    info = connection.info
    info.setdefault(_ABORTED, info.get(_SAVEPOINTS, 0))


def _ran(
    connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any,
    many: bool,
) -> None:
    # Savepoints as they really ran (a SAVEPOINT the server refused never counts).
    if statement.startswith("SAVEPOINT "):
        connection.info[_SAVEPOINTS] = connection.info.get(_SAVEPOINTS, 0) + 1
    elif statement.startswith("RELEASE SAVEPOINT "):
        connection.info[_SAVEPOINTS] = max(connection.info.get(_SAVEPOINTS, 0) - 1, 0)
    elif statement.startswith("ROLLBACK TO SAVEPOINT "):
        info = connection.info
        depth = info.get(_SAVEPOINTS, 0)
        if depth and depth <= info.get(_ABORTED, -1):
            del info[_ABORTED]  # that savepoint was open when the server refused
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
