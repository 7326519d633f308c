"""The async `Database`: `db.session` is the current unit of work's `AsyncSession`, and
`async with db():` opens one outside requests. Every decision (which unit is current,
joining, the errors outside one) is `DatabaseBase`'s, shared with the sync `Database`."""

from types import TracebackType
from typing import Any, NoReturn

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from service.db.accounting import charge_engine_to, current_async_stats
from service.db.asyncio.engine import create_async_engine, instrument_async
from service.db.asyncio.unit_of_work import AsyncUnitOfWork
from service.db.database import BlockBase, DatabaseBase
from service.db.session_errors import (
    SessionNotInitialisedError,
    require_async_driver,
    require_mode,
)

# What an AsyncSession needs unless told otherwise: objects stay readable after COMMIT
# (expiring them would make the next attribute read a lazy load, which cannot be awaited).
ASYNC_SESSION_DEFAULTS: dict[str, Any] = {"expire_on_commit": False}


class Database(
    DatabaseBase[AsyncUnitOfWork, async_sessionmaker[AsyncSession], AsyncConnection]
):
    """Hands out the current unit of work's `AsyncSession`; `db` is the default instance.

    Make one more instance per extra database (`reports = Database("reports")`) and give it
    to a second `DBSessionMiddleware(..., database=reports)`.
    """

    unit_class = AsyncUnitOfWork
    mode_stats_var = current_async_stats
    block = "async with"
    module = "service.db.asyncio"

    def __init__(self, name: str = "db") -> None:
        super().__init__(name)
        self._owned_engine: AsyncEngine | None = None

    def configure(
        self,
        url_or_engine: str | URL | AsyncEngine,
        *,
        engine_args: dict[str, Any] | None = None,
        session_args: dict[str, Any] | None = None,
    ) -> AsyncEngine:
        """Set the engine that `async with db():` uses outside requests; returns it.

        A URL gets an engine from `create_async_engine` (SQLite made savepoint-safe), which
        this object owns; configuring again replaces the default and disposes of the owned
        engine's idle connections (call `await db.dispose()` to close them from async code).
        Apps already serving keep their own engine.
        """
        if isinstance(url_or_engine, AsyncEngine):
            engine = instrument_async(url_or_engine)
            owned = None
        else:
            require_mode("url_or_engine", url_or_engine, str | URL, "service.db")
            require_async_driver(url_or_engine)
            engine = owned = create_async_engine(url_or_engine, **(engine_args or {}))
        if self._owned_engine is not None and self._owned_engine is not engine:
            # Synchronously: close what the pool holds, without awaiting (no loop needed).
            self._owned_engine.sync_engine.dispose(close=False)
        self._owned_engine = owned
        self._default = async_sessionmaker(
            bind=engine, **{**ASYNC_SESSION_DEFAULTS, **(session_args or {})}
        )
        charge_engine_to(engine.sync_engine, self.stats_var)
        return engine

    async def dispose(self) -> None:
        """Close the connections of the engine this object created (if any)."""
        if self._owned_engine is not None:
            await self._owned_engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """The default engine. Raises `SessionNotInitialisedError` if none is configured."""
        bind = self._default_factory().kw.get("bind")
        if not isinstance(bind, AsyncEngine):
            raise SessionNotInitialisedError(self.name, self.module)
        return bind

    @property
    def session(self) -> AsyncSession:
        """The current unit of work's `AsyncSession`.

        Raises `MissingSessionError` outside a request or `async with db():` block, or
        `SessionNotInitialisedError` if no engine was ever configured.
        """
        return self._require_unit().session

    def __call__(
        self,
        session_args: dict[str, Any] | None = None,
        commit_on_exit: bool | None = None,
        *,
        independent: bool = False,
    ) -> "AsyncUnitOfWorkBlock":
        """`async with db():` - a unit of work outside a request (scripts, jobs, tests).

        Leaving the block commits (unless `commit_on_exit=False`) or rolls back on an
        exception, then closes the session. Inside an open unit of work (a request, another
        block) the block reuses that session and leaves ending it to the outer one; a
        `commit_on_exit` given there that the open unit does not share is a `ValueError`.
        `independent=True` opens
        a separate session with its own transaction, on the current unit's engine (the
        request's), or the default one outside any.
        """
        return AsyncUnitOfWorkBlock(self, session_args or {}, commit_on_exit, independent)


class AsyncUnitOfWorkBlock(BlockBase[Database]):
    """The async context manager returned by `db(...)`."""

    __slots__ = ()

    async def __aenter__(self) -> Database:
        return self._enter()

    def __enter__(self) -> NoReturn:
        raise TypeError(
            f"`{self._database.name}` is service.db.asyncio's, an async one: open it with "
            f"`async with {self._database.name}():`; `with` is service.db's `db`"
        )

    def __exit__(self, *exc_info: object) -> None:
        """Never reached: `__enter__` refuses."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unit: AsyncUnitOfWork | None = self._unit
        if unit is None:
            return  # a reused outer unit of work: the outer one ends it
        try:
            await unit.end(
                commit=exc_type is None and self.commit_on_exit,
                abandoned=exc is not None and not isinstance(exc, Exception),
            )
        finally:
            self._leave()


db = Database()
"""The default async database: `await db.session.execute(...)` in async routers and DAOs."""
