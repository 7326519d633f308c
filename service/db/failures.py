"""What a database failure means for the client: the one mapping from exceptions to statuses.

`service.db` decides the status, the explanation and whether to ask for a retry; the app
decides what the error body looks like (`DBSessionMiddleware(error_response=...)`).

| exception                                    | by a statement    | by the COMMIT      |
| -------------------------------------------- | ----------------- | ------------------ |
| `IntegrityError`: a constraint refused data  | 409               | 409                |
| `StaleDataError`: a versioned row changed    | 409               | 409                |
| a serialization failure or deadlock          | 503 + Retry-After | 503 + Retry-After, |
| (SQLSTATE 40001, 40P01): rolled back         |                   | nothing stored     |
| `statement_timeout`, `lock_timeout` (57014,  | 503 + Retry-After | 503 + Retry-After, |
| 55P03): the server gave up on the statement  |                   | nothing stored     |
| unavailable (`database_unavailable`)         | 503 + Retry-After | 503 + Retry-After, |
|                                              |                   | outcome unknown    |
| anything else                                | 500               | 500                |

No connection slot within the pool's timeout is `BUSY`: 503 + Retry-After - at admission,
and when a request needs a second connection and the pool has none to spare within its
timeout (`sqlalchemy.exc.TimeoutError`: an `independent=True` block). A domain may give
a failure a more precise meaning before it gets here (the items service answers a stale
version 412, since its updates carry a precondition); what reaches `service.db` gets the
statuses above.
"""

from dataclasses import dataclass

from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.exc import StaleDataError

# Seconds a client is asked to wait before retrying when the database is away or busy.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True, slots=True)
class Failure:
    """The response a database failure becomes: a status, a sentence for the client (never
    the driver's own words: those name hosts and tables, and go to the log) and, for
    failures worth retrying, the seconds to wait."""

    status: int
    detail: str
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        """`Retry-After` when the failure asks for a retry; nothing otherwise."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


BUSY = Failure(503, "The database is busy; try again shortly.", RETRY_AFTER_SECONDS)


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not serve the request right now - it is down,
    unreachable, restarting, or the connection broke - rather than that the request was
    wrong; trying again later may succeed.

    True for a DBAPI error that invalidated its connection (SQLAlchemy's disconnect
    detection), and for every `OperationalError` (connection refused or lost, timeouts,
    lock and serialisation failures) and `InterfaceError` (connection already closed).
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def driver_reason(exc: BaseException) -> str:
    """The first line of what the driver said about `exc` (it names host and port, never a
    password), for logs; the error's type when it says nothing (a timeout)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def failure_of_statement(exc: BaseException) -> Failure:
    """What `exc`, raised by a statement of the route (and not handled there), answers."""
    return _classify(exc, unavailable=_UNAVAILABLE, other=_BUG)


def failure_of_commit(exc: BaseException) -> Failure:
    """What a COMMIT that raised `exc` answers instead of the route's own status."""
    return _classify(exc, unavailable=_LOST_DURING_COMMIT, other=_NOT_SAVED)


def _classify(exc: BaseException, *, unavailable: Failure, other: Failure) -> Failure:
    if isinstance(exc, IntegrityError):
        return _CONFLICT
    if isinstance(exc, StaleDataError):
        return _STALE
    if isinstance(exc, PoolTimeout):
        return BUSY
    code = sqlstate(exc)
    if code in _ROLLED_BACK_BY_THE_SERVER:
        return _COLLIDED
    if code in _GAVE_UP_WAITING:
        return _TIMED_OUT
    return unavailable if database_unavailable(exc) else other


# The server rolled the transaction back to resolve a clash with concurrent ones: nothing
# was stored (not "may have been"), and the same request may well succeed if repeated.
_ROLLED_BACK_BY_THE_SERVER = frozenset({"40001", "40P01"})  # serialization, deadlock
# The server gave up on the statement: `statement_timeout` (query_canceled) or
# `lock_timeout` (lock_not_available). psycopg2 raises these as OperationalError, asyncpg's
# adapter as a plain DBAPIError: one status for both.
_GAVE_UP_WAITING = frozenset({"57014", "55P03"})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a DBAPI error: psycopg2's `pgcode`, SQLAlchemy's asyncpg adapter's
    `pgcode` (or asyncpg's own `sqlstate`)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


_CONFLICT = Failure(409, "The change conflicts with data already stored; nothing was saved.")
_STALE = Failure(409, "The record was changed or deleted meanwhile; nothing was saved.")
_UNAVAILABLE = Failure(
    503, "The database is not available right now; try again shortly.", RETRY_AFTER_SECONDS
)
# The connection broke during COMMIT: whether the server committed is unknown.
_LOST_DURING_COMMIT = Failure(
    503,
    "The database became unavailable while saving; the change may not have been stored. "
    "Check before repeating it.",
    RETRY_AFTER_SECONDS,
)
_COLLIDED = Failure(
    503,
    "The change collided with concurrent changes and was not stored; try again.",
    RETRY_AFTER_SECONDS,
)
_TIMED_OUT = Failure(
    503,
    "The database did not answer in time; nothing was stored. Try again shortly.",
    RETRY_AFTER_SECONDS,
)
_BUG = Failure(500, "Something went wrong on our side; nothing was stored.")
_NOT_SAVED = Failure(500, "The change could not be saved; nothing was stored.")
