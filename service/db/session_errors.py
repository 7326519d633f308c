"""What `service.db` raises when a session is asked for where there is none, or is given an
object of the other mode."""

from types import UnionType

from sqlalchemy.engine import URL, make_url


class MissingSessionError(Exception):
    """`db.session` was read where no session scope is open."""

    def __init__(self, name: str = "db", block: str = "with", module: str = "service.db") -> None:
        # `block`, `module`: how a scope is opened in the caller's mode - "with" or "async
        # with" - and the package of its middleware.
        super().__init__(
            f"No database session is open here. Inside a request, add {module}."
            f"DBSessionMiddleware to the app (the other mode's middleware opens no session "
            f"for this `{name}`; requests to its `sessionless_paths` get none); anywhere else "
            f"(scripts, jobs, tests) open one with `{block} {name}():`."
        )


class SessionNotInitialisedError(Exception):
    """A session was asked for before any engine was configured."""

    def __init__(self, name: str = "db", module: str = "service.db") -> None:
        super().__init__(
            f"No database engine is configured for `{name}` ({module}). Call "
            f"`{name}.configure(url_or_engine)` first, or add {module}.DBSessionMiddleware("
            f"app, db_url=...) to the app and let it serve a request."
        )


def require_mode(what: str, value: object, expected: type | UnionType, belongs: str) -> None:
    """`TypeError` unless `value` is an `expected`: an object of the other mode (an
    `AsyncEngine` given to the sync middleware, a sync `Database` to the async one) fails
    where it is passed, not at the first request. `belongs`: where such objects go."""
    if not isinstance(value, expected):
        kinds = expected.__args__ if isinstance(expected, UnionType) else (expected,)
        names = " or ".join(f"{kind.__module__}.{kind.__qualname__}" for kind in kinds)
        raise TypeError(
            f"{what} must be a {names}, not {type(value).__module__}."
            f"{type(value).__qualname__} (the other mode's objects go to {belongs})"
        )


def require_async_driver(url: str | URL) -> None:
    """`ValueError` if `url` names a sync driver (psycopg2, pysqlite), which an async engine
    cannot use."""
    url = make_url(url)
    if not url.get_dialect().is_async:
        raise ValueError(
            f"{url.drivername} is not an async driver: give this URL to service.db, or name "
            "an async driver (postgresql+asyncpg://, sqlite+aiosqlite://)"
        )


def require_sync_driver(url: str | URL) -> None:
    """`ValueError` if `url` names an async driver (asyncpg, aiosqlite), which a sync
    engine cannot use: its first statement would fail."""
    url = make_url(url)
    if url.get_dialect().is_async:
        raise ValueError(
            f"{url.drivername} is an async driver: give this URL to service.db.asyncio, or "
            "name a sync driver (postgresql+psycopg2://, sqlite://)"
        )
