"""What `service.db` raises when it is used outside a unit of work, and how it tells a
database that is away from a statement that is wrong."""

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError


class MissingSessionError(Exception):
    """`db.session` was read where no session scope is open."""

    def __init__(self, name: str = "db") -> None:
        super().__init__(
            f"No database session is open here. Inside a request, add DBSessionMiddleware to "
            f"the app; anywhere else (scripts, jobs, tests) open one with `with {name}():`."
        )


class SessionNotInitialisedError(Exception):
    """A session was asked for before any engine was configured."""

    def __init__(self, name: str = "db") -> None:
        super().__init__(
            f"No database engine is configured for `{name}`. Call "
            f"`{name}.configure(url_or_engine)` first, or add DBSessionMiddleware(app, "
            f"db_url=...) to the app and let it serve a request."
        )


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
