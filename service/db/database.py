"""`Database` (the global `db`): which unit of work is current, and `with db():`.

The request middleware opens one unit of work (`UnitOfWork`: one session, committed or
rolled back as a whole) per HTTP request; `with db():` opens one anywhere else. The current
one lives in a `ContextVar`, so it follows the request into sync routes (the threadpool
copies the context), background tasks and streaming bodies, and concurrent requests never
see each other's session.

`DatabaseBase` and `BlockBase` hold every decision that needs no I/O (which unit is current,
joining an open unit, the errors outside one) and are shared with the async twin
(`service.db.asyncio`); `Database` and `UnitOfWorkBlock` add the sync engine and session.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from service.db.accounting import QueryStats, charge_engine_to, current_stats, instrument
from service.db.engine import create_engine
from service.db.routing import primary, replica
from service.db.session_errors import (
    MissingSessionError,
    SessionNotInitialisedError,
    require_mode,
    require_sync_driver,
)
from service.db.unit_of_work import CommitHook, UnitOfWork, UnitOfWorkBase

UnitT = TypeVar("UnitT", bound=UnitOfWorkBase[Any, Any])
FactoryT = TypeVar("FactoryT", bound=Callable[..., Any])
ConnectionT = TypeVar("ConnectionT")
DatabaseT = TypeVar("DatabaseT", bound="DatabaseBase[Any, Any, Any]")

# What `activate` returns and `deactivate` takes back.
ActiveTokens = tuple[Token[Any], Token[QueryStats | None], Token[QueryStats | None]]


class DatabaseBase(Generic[UnitT, FactoryT, ConnectionT]):
    """The current unit of work of one database, in a context variable; no I/O here."""

    unit_class: type[UnitT]
    block = "with"  # how a scope is opened, in error messages
    module = "service.db"  # where its middleware is, in error messages
    # The current unit's statement counts, for statements on engines no single database
    # claims (`service.db.accounting`): the innermost unit of the mode.
    mode_stats_var: ContextVar[QueryStats | None] = current_stats

    def __init__(self, name: str = "db") -> None:
        self.name = name
        self._current: ContextVar[UnitT | None] = ContextVar(f"service_db_{name}", default=None)
        # The current unit's statement counts, for the statements on this database's engines.
        self.stats_var: ContextVar[QueryStats | None] = ContextVar(
            f"service_db_stats_{name}", default=None
        )
        self._default: FactoryT | None = None
        self._test_connection: ConnectionT | None = None

    def adopt_default(self, factory: FactoryT) -> None:
        """Use `factory` outside requests unless a default is configured already.

        Called by each middleware when it is built: the first one wins and is never replaced,
        so a second app in the process cannot redirect the first one's scripts.
        """
        if self._default is None:
            self._default = factory

    @property
    def is_configured(self) -> bool:
        """Whether `with db():` has an engine to use outside requests."""
        return self._default is not None

    def _default_factory(self) -> FactoryT:
        if self._default is None:
            raise SessionNotInitialisedError(self.name, self.module)
        return self._default

    def _require_unit(self) -> UnitT:
        """The current unit of work; `MissingSessionError` outside one, or
        `SessionNotInitialisedError` if no engine was ever configured."""
        unit = self._current.get()
        if unit is None or unit.closed:  # closed: a task its request left running
            if self._default is None:
                raise SessionNotInitialisedError(self.name, self.module)
            raise MissingSessionError(self.name, self.block, self.module)
        return unit

    def on_commit(self, hook: CommitHook) -> None:
        """Run `hook()` once the work of the current transaction is committed.

        Hooks run in registration order: after the unit's COMMIT (in a request: before the
        response is sent), or - for a commit made by hand with `session.commit()` - when
        the unit next commits, rolls back or ends, whatever its own outcome. A rollback (or
        `session.close()`) drops the hooks still waiting; one registered inside a savepoint
        waits for the transaction once the savepoint is released, and is dropped if it is
        rolled back. A unit that commits with no transaction open runs its hooks (nothing
        was lost); hooks registered by hooks run at the unit's end, and what hooks write
        through the session is committed then (in a unit that commits). An exception in a hook
        is logged at ERROR and changes nothing else. Raises `MissingSessionError` outside a
        unit of work.
        """
        unit = self._current.get()
        if unit is None or unit.closed:  # closed: a task its request left running
            raise MissingSessionError(self.name, self.block, self.module)
        unit.on_commit(hook)

    def primary(self) -> AbstractContextManager[None]:
        """`with db.primary():` - the statements of the block run on the primary, in a
        session that routes reads to replicas (`service.db.routing`); a no-op without
        replicas."""
        return primary()

    def replica(self) -> AbstractContextManager[None]:
        """`with db.replica():` - the reads of the block run on a replica if one is usable
        and fresh enough for the request (else on the primary), even in a request that may
        write; once the request has written, the primary. A no-op without replicas."""
        return replica()

    # -- used by the middleware, the blocks and the test plugin ---------------------------

    def open_unit(
        self,
        factory: FactoryT,
        commit_on_exit: bool,
        session_args: dict[str, Any] | None = None,
        *,
        session_factory: FactoryT | None = None,
    ) -> UnitT:
        """Open a unit of work on a new session (not yet current; see `activate`).

        The session comes from `session_factory` if given (the middleware's autocommit one
        for reads), else from `factory`; `factory` is what `db(independent=True)` blocks
        inside the unit open their sessions with: always one with transactions.

        Once its unit of work has ended, the session refuses further use (unless the
        session arguments say `close_resets_only`): a sync handler still running in its
        thread after its request was cancelled gets an error at its next statement, instead
        of a connection that nobody would give back.
        """
        make = session_factory if session_factory is not None else factory
        args = dict(session_args or {})
        if "close_resets_only" not in getattr(make, "kw", {}):
            args.setdefault("close_resets_only", False)
        if self._test_connection is not None:
            # Test isolation: every commit becomes a savepoint release on the test's
            # connection, and the test's outer transaction is rolled back at the end.
            args.update(bind=self._test_connection, join_transaction_mode="create_savepoint")
        return self.unit_class(factory, make(**args), commit_on_exit)

    def activate(self, unit: UnitT) -> ActiveTokens:
        """Make `unit` current in this context; undo with `deactivate`."""
        return (self._current.set(unit), self.stats_var.set(unit.stats),
                self.mode_stats_var.set(unit.stats))

    def deactivate(self, tokens: ActiveTokens) -> None:
        """Make current again what was current before `activate` returned `tokens`."""
        self._current.reset(tokens[0])
        self.stats_var.reset(tokens[1])
        self.mode_stats_var.reset(tokens[2])

    def current_unit(self) -> UnitT | None:
        """The unit of work open in this context, if any (no error, unlike `session`)."""
        return self._current.get()

    @contextmanager
    def bound_to(self, connection: ConnectionT) -> Iterator[ConnectionT]:
        """Bind every session this object opens to `connection` (test isolation)."""
        previous, self._test_connection = self._test_connection, connection
        try:
            yield connection
        finally:
            self._test_connection = previous


class Database(DatabaseBase[UnitOfWork, sessionmaker[Session], Connection]):
    """Hands out the current unit of work's sync `Session`; `db` is the default instance.

    Make one more instance per extra database an app talks to (`reports = Database("reports")`)
    and give it to a second `DBSessionMiddleware(..., database=reports)`.
    """

    unit_class = UnitOfWork

    def __init__(self, name: str = "db") -> None:
        super().__init__(name)
        self._owned_engine: Engine | None = None

    def configure(
        self,
        url_or_engine: str | URL | Engine,
        *,
        engine_args: dict[str, Any] | None = None,
        session_args: dict[str, Any] | None = None,
    ) -> Engine:
        """Set the engine that `with db():` uses outside requests; returns it.

        A URL gets an engine from `service.db.create_engine` (SQLite made safe for threads
        and savepoints), which this object owns and disposes of when configured again.
        Calling it again replaces the default; apps already serving keep their own engine.
        """
        if isinstance(url_or_engine, Engine):
            require_sync_driver(url_or_engine.url)
            engine = instrument(url_or_engine)
            owned = None
        else:
            require_mode("url_or_engine", url_or_engine, str | URL, "service.db.asyncio")
            require_sync_driver(url_or_engine)
            engine = owned = create_engine(url_or_engine, **(engine_args or {}))
        if self._owned_engine is not None and self._owned_engine is not engine:
            self._owned_engine.dispose()
        self._owned_engine = owned
        self._default = sessionmaker(bind=engine, **(session_args or {}))
        charge_engine_to(engine, self.stats_var)
        return engine

    @property
    def engine(self) -> Engine:
        """The default engine. Raises `SessionNotInitialisedError` if none is configured."""
        bind = self._default_factory().kw.get("bind")
        if not isinstance(bind, Engine):
            raise SessionNotInitialisedError(self.name, self.module)
        return bind

    @property
    def session(self) -> Session:
        """The current unit of work's session.

        Raises `MissingSessionError` outside a request or `with db():` block, or
        `SessionNotInitialisedError` if no engine was ever configured.
        """
        return self._require_unit().session

    def __call__(
        self,
        session_args: dict[str, Any] | None = None,
        commit_on_exit: bool | None = None,
        *,
        independent: bool = False,
    ) -> "UnitOfWorkBlock":
        """`with db():` - a unit of work outside a request (scripts, CLI, jobs, tests).

        Leaving the block commits (unless `commit_on_exit=False`) or rolls back on an
        exception, then closes the session. Inside an open unit of work (a request, another
        block) the block reuses that session and leaves ending it to the outer one - no
        shadowing, no lost writes; a `commit_on_exit` given there that the open unit does
        not share is a `ValueError` (its work ends with the open unit's). `independent=True`
        opens a separate session with its own transaction instead (e.g. an audit row that
        must survive the request's rollback); it uses the current unit's engine, or the
        default one outside any.
        """
        return UnitOfWorkBlock(self, session_args or {}, commit_on_exit, independent)


class BlockBase(Generic[DatabaseT]):
    """What `with db():` decides on entry - join the open unit or open one - without I/O."""

    __slots__ = ("_asked", "_database", "_independent", "_session_args", "_tokens", "_unit",
                 "commit_on_exit")

    def __init__(
        self,
        database: DatabaseT,
        session_args: dict[str, Any],
        commit_on_exit: bool | None,
        independent: bool,
    ) -> None:
        self._database = database
        self._session_args = session_args
        self._asked = commit_on_exit  # None: not given
        self.commit_on_exit = commit_on_exit is not False
        self._independent = independent
        self._unit: Any = None
        self._tokens: ActiveTokens | None = None

    def _enter(self) -> DatabaseT:
        database = self._database
        outer = database.current_unit()
        # A unit that has ended (the request of a task it left running, `create_task`) is
        # joined by nobody: the block opens its own, on that unit's engine.
        if outer is not None and not outer.ended and not self._independent:
            if self._session_args:
                raise ValueError(
                    "session_args cannot change the session of the unit of work already "
                    "open here; pass independent=True for a separate session"
                )
            # Joined, the block's work ends with the open unit's: a choice the block
            # makes otherwise is refused rather than overruled behind its back.
            if self._asked is False and outer.commit_on_exit:
                raise ValueError(
                    "commit_on_exit=False cannot hold back the work of the unit of work "
                    "already open here, which commits it; pass independent=True for a "
                    "separate session you commit yourself"
                )
            if self._asked and not outer.commit_on_exit:
                raise ValueError(
                    "commit_on_exit=True cannot commit the work of the unit of work already "
                    "open here, which does not commit on exit (commit_on_exit=False): "
                    "commit it with db.session.commit(), or pass independent=True for a "
                    "separate session committed when the block ends"
                )
            return database
        factory = outer.factory if outer is not None else database._default_factory()
        self._unit = database.open_unit(factory, self.commit_on_exit, self._session_args)
        self._tokens = database.activate(self._unit)
        return database

    def _leave(self) -> None:
        if self._tokens is not None:
            self._database.deactivate(self._tokens)
        self._unit = self._tokens = None


class UnitOfWorkBlock(BlockBase[Database]):
    """The context manager returned by `db(...)`."""

    __slots__ = ()

    def __enter__(self) -> Database:
        return self._enter()

    async def __aenter__(self) -> NoReturn:
        raise TypeError(
            f"`{self._database.name}` is service.db's, a sync one: open it with `with "
            f"{self._database.name}():`; `async with` is service.db.asyncio's `db`"
        )

    async def __aexit__(self, *exc_info: object) -> None:
        """Never reached: `__aenter__` refuses."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unit: UnitOfWork | None = self._unit
        if unit is None:
            return  # a reused outer unit of work: the outer one ends it
        try:
            unit.end(commit=exc_type is None and self.commit_on_exit)
        finally:
            self._leave()


db = Database()
"""The default database: `db.session` in routers, services and DAOs."""
