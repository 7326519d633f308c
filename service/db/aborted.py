"""PostgreSQL: a COMMIT of a transaction that an error aborted fails instead of passing.

After a statement fails inside a transaction, PostgreSQL refuses every later statement of it
and answers its COMMIT with a ROLLBACK - which neither psycopg2 nor asyncpg reports as an
error. A route that catches a database error and carries on (`except IntegrityError:
pass`) would then answer 2xx while none of its work was stored; on SQLite, which aborts
only the failed statement, the rest of the work is stored. `guard_aborted_transactions`
makes that COMMIT raise `TransactionAborted` instead, so the middleware answers it like any
failed COMMIT (500, nothing stored) and a script's `with db():` raises.

Catching the error is fine once its savepoint is rolled back: `with session.begin_nested():`
around the statement that may fail (SAVEPOINT ... ROLLBACK TO SAVEPOINT) leaves the
transaction usable, and the guard then stays quiet.

The state is kept per connection, from SQLAlchemy's connection events: a statement that
fails inside a transaction marks the connection with the number of savepoints open at that
moment; rolling back to one of them (SAVEPOINTs nest: the one rolled back is the innermost
open) clears the mark; a new transaction starts clean. Connections in autocommit (no
transaction to abort) are never marked.
"""

from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext

_ABORTED = "service.db.aborted"  # Connection.info: savepoints open when a statement failed
_SAVEPOINTS = "service.db.savepoints"  # Connection.info: savepoints open now


class TransactionAborted(Exception):
    """A COMMIT of a PostgreSQL transaction that an earlier statement's error aborted: the
    server rolled the whole transaction back, so nothing of it was stored."""


def guard_aborted_transactions(engine: Engine) -> None:
    """Make `engine`'s COMMIT of an aborted transaction raise `TransactionAborted`
    (PostgreSQL only; idempotent)."""
    if engine.dialect.name != "postgresql" or event.contains(engine, "commit", _commit):
        return
    event.listen(engine, "handle_error", _failed)
    event.listen(engine, "begin", _clear)
    event.listen(engine, "rollback", _clear)
    event.listen(engine, "savepoint", _savepoint)
    event.listen(engine, "rollback_savepoint", _rollback_savepoint)
    event.listen(engine, "release_savepoint", _release_savepoint)
    event.listen(engine, "commit", _commit)


def _failed(context: ExceptionContext) -> None:
    connection = context.connection
    if (
        connection is None
        or context.statement is None  # not a statement (connecting, COMMIT itself)
        or context.is_disconnect  # the connection is gone: the COMMIT fails by itself
        or not connection.in_transaction()
        or connection.invalidated
        or getattr(connection.connection.dbapi_connection, "autocommit", False)
    ):
        return
    info = connection.info
    if _ABORTED not in info:
        info[_ABORTED] = info.get(_SAVEPOINTS, 0)


def _clear(connection: Connection) -> None:
    if connection.invalidated:  # its DBAPI connection is gone, and its state with it
        return
    connection.info.pop(_ABORTED, None)
    connection.info.pop(_SAVEPOINTS, None)


def _savepoint(connection: Connection, name: str | None) -> None:
    if not connection.invalidated:
        connection.info[_SAVEPOINTS] = connection.info.get(_SAVEPOINTS, 0) + 1


def _rollback_savepoint(connection: Connection, name: str, context: Any) -> None:
    if connection.invalidated:
        return
    info = connection.info
    depth = info.get(_SAVEPOINTS, 0)
    if depth and depth <= info.get(_ABORTED, 0):
        del info[_ABORTED]  # this savepoint was open when the statement failed
    info[_SAVEPOINTS] = max(depth - 1, 0)


def _release_savepoint(connection: Connection, name: str, context: Any) -> None:
    if not connection.invalidated:
        connection.info[_SAVEPOINTS] = max(connection.info.get(_SAVEPOINTS, 0) - 1, 0)


def _commit(connection: Connection) -> None:
    if not connection.invalidated and _ABORTED in connection.info:
        _clear(connection)
        raise TransactionAborted(
            "COMMIT of a transaction that an earlier statement's error aborted: PostgreSQL "
            "rolled all of it back. The error was caught and the work went on; catch it "
            "after a savepoint instead (`with session.begin_nested(): ...`)."
        )
