"""`RoutingSession`: which server each statement of a request runs on - a read replica or the
primary - decided in `Session.get_bind()`, SQLAlchemy's documented hook, so one class serves
both modes (an `AsyncSession` runs it as its `sync_session_class`).

The rules, per request (`Route`, set by `ConsistencyMiddleware` for each HTTP request):

- a request whose method only reads (GET, HEAD, OPTIONS) reads from a replica; every other
  request, and everything outside requests (`with db():` in scripts), uses the primary;
- a statement that writes (INSERT, UPDATE, DELETE, a flush) or locks (`with_for_update`) runs
  on the primary, and so does every later statement of that request: it reads its own writes;
  so does raw SQL (`text()`) that is not plainly a query (a SELECT naming no write, lock,
  sequence or `INTO`; see `_plain_query`), unless `replica()` chose otherwise;
- a request that sent a consistency token reads only from a replica that has replayed that
  position (`Replicas.choose`), else from the primary;
- a request keeps the replica it was given, so its reads never go back in time;
- a replica read that fails because the replica is unavailable (stopped, connection lost,
  or no answer within the driver's timeout - asyncpg's `command_timeout`) marks the replica
  down and runs again on the primary, once: the client never sees it;
- `with primary():` / `with replica():` (also `db.primary()` / `db.replica()`) choose
  explicitly for the statements inside; after a write the request stays on the primary.

A session without `replicas` (no replicas configured) routes nothing: every statement goes
to its bind, as before. A session bound to a connection (test isolation) routes nothing.
"""

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select, TextualSelect

from service.db.failures import database_unavailable, driver_reason, sqlstate
from service.db.replicas import Replicas, ReplicaState

logger = logging.getLogger("service.db")

Choice = Literal["primary", "replica"]


class Route:
    """Where one request reads, and what it has done so far."""

    __slots__ = ("commit_position", "min_position", "on_primary", "reads_from_replica",
                 "replica")

    def __init__(self, reads_from_replica: bool, min_position: int = 0) -> None:
        self.reads_from_replica = reads_from_replica
        self.min_position = min_position  # from the client's consistency token
        self.on_primary = False  # wrote, locked, or a replica failed: primary from now on
        self.replica: ReplicaState | None = None  # the replica this request reads from
        # The primary's WAL position after this request's last COMMIT that wrote.
        self.commit_position: int | None = None


_route: ContextVar[Route | None] = ContextVar("service_db_route", default=None)
_choice: ContextVar[Choice | None] = ContextVar("service_db_route_choice", default=None)


def current_route() -> Route | None:
    """The route of the request being served in this context, if any."""
    return _route.get()


@contextmanager
def routed(route: Route) -> Iterator[Route]:
    """Make `route` the current request's route for the block (the middleware's job)."""
    token = _route.set(route)
    try:
        yield route
    finally:
        _route.reset(token)


@contextmanager
def primary() -> Iterator[None]:
    """Run the statements of the block on the primary (a read that must be fresh, a check
    before a write)."""
    token = _choice.set("primary")
    try:
        yield
    finally:
        _choice.reset(token)


@contextmanager
def replica() -> Iterator[None]:
    """Run the reads of the block on a replica, even in a request that may write (reports,
    exports). Still the primary once the request has written, when no replica is usable, or
    when the request's consistency token asks for more than any replica has."""
    token = _choice.set("replica")
    try:
        yield
    finally:
        _choice.reset(token)


class RoutingSession(Session):
    """A `Session` that sends reads to `replicas` as the module docstring says.

    Make one with `sessionmaker(class_=RoutingSession, replicas=...)`, or
    `async_sessionmaker(sync_session_class=RoutingSession, replicas=...)` - which is what
    `Replicas.session_args()` returns.
    """

    def __init__(self, *args: Any, replicas: Replicas | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replicas = replicas
        self._reading_from: ReplicaState | None = None  # the replica of the last statement
        # The primary engine with a transaction of ours, whose COMMIT earns a token.
        self._primary_in_transaction: Engine | None = None
        # The primary engine in autocommit (a GET's) that a statement wrote through: each
        # statement committed on its own, and the request's end earns a token all the same.
        self._wrote_on_autocommit: Engine | None = None
        self._written = False  # wrote or locked since the last COMMIT/ROLLBACK

    def get_bind(self, mapper: Any = None, *, clause: Any = None, **kwargs: Any) -> Any:
        """The primary or a replica engine for this statement (see the module docstring);
        a bind given explicitly (`bind_arguments={"bind": ...}`) is used as it is."""
        bind = super().get_bind(mapper, clause=clause, **kwargs)
        self._reading_from = None
        if self.replicas is None or isinstance(bind, Connection) or kwargs.get("bind"):
            return bind
        route = _route.get()
        if self._flushing or _writes_or_locks(clause):
            self._written = True
            if route is not None:
                route.on_primary = True
            return self._on_primary(bind)
        choice = _choice.get()
        on_primary = route.on_primary if route is not None else self._written
        wants_replica = choice == "replica" or (
            choice is None and route is not None and route.reads_from_replica
        )
        if on_primary or not wants_replica:
            return self._on_primary(bind)
        chosen = self._replica_for(route)
        if chosen is None:
            return self._on_primary(bind)
        self._reading_from = chosen
        return chosen.engine

    def _replica_for(self, route: Route | None) -> ReplicaState | None:
        assert self.replicas is not None
        if route is None:
            return self.replicas.choose()
        if route.replica is None:
            route.replica = self.replicas.choose(route.min_position)
        elif not route.replica.up:
            # Its replica went away: another one may be further behind, the primary is not.
            route.on_primary, route.replica = True, None
        return route.replica

    def _on_primary(self, bind: Engine) -> Engine:
        if bind.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            self._primary_in_transaction = bind
        elif self._written:
            self._wrote_on_autocommit = bind
        return bind

    def _execute_internal(self, *args: Any, **kwargs: Any) -> Any:
        # Every execution of the Session (execute, scalars, get, ...) passes here: a replica
        # that broke under a read is retried on the primary, once, before anyone sees it.
        try:
            return super()._execute_internal(*args, **kwargs)
        except (DBAPIError, TimeoutError) as exc:
            failed = self._reading_from
            if (
                failed is None
                or self.replicas is None
                or self._primary_in_transaction is not None  # work a rollback would lose
            ):
                raise
            # The replica answered, but cancelled the read: its statement_timeout (a read
            # slower than REPLICA_READ_TIMEOUT), or a conflict with the WAL it replays
            # (40001 on a hot standby). It stays in use; this read runs on the primary.
            # Or it refused a statement that writes, which the router cannot see in a
            # SELECT (a data-modifying CTE, a function that writes): that runs there too.
            code = sqlstate(exc)
            writes = code == _READ_ONLY_TRANSACTION
            gave_up = writes or code in _REPLICA_CANCELLED
            if not gave_up and not (isinstance(exc, TimeoutError) or database_unavailable(exc)):
                raise
            if writes:
                logger.info("replica %s refused a statement that writes (%s); running it "
                            "on the primary", failed.name, driver_reason(exc))
            elif gave_up:
                logger.info("replica %s cancelled a read (%s); running it on the primary",
                            failed.name, driver_reason(exc))
            else:
                self.replicas.mark_down(failed, driver_reason(exc))
            route = _route.get()
            if route is not None:
                route.on_primary = True
                route.replica = None
            # The replica's connection leaves the session, closed (it may be mid-statement:
            # a read timed out); it only ever read, so nothing is lost (objects loaded
            # before are expired, as by any rollback).
            transaction = self._transaction
            entry = transaction._connections.get(failed.engine) if transaction else None
            if entry is not None and not gave_up:
                entry[0].invalidate()
            self.rollback()
            # A write: the rest of the request stays on the primary, and earns a token.
            self._written = self._written or writes
            with primary():
                return super()._execute_internal(*args, **kwargs)


# A replica cancelled the statement: statement_timeout (57014), or a recovery conflict
# ("canceling statement due to conflict with recovery", 40001).
_REPLICA_CANCELLED = frozenset({"57014", "40001"})
# "cannot execute ... in a read-only transaction": the statement writes.
_READ_ONLY_TRANSACTION = "25006"


@event.listens_for(RoutingSession, "after_commit")
def _note_commit_position(session: Session) -> None:
    """After a COMMIT on the primary, note the primary's WAL position on the request's
    route: its response carries it as a consistency token. Read on the connection that
    committed, before the session gives it back (a second connection could wait for a
    pool slot that this very request holds)."""
    assert isinstance(session, RoutingSession)
    bind = session._primary_in_transaction or session._wrote_on_autocommit
    session._primary_in_transaction = session._wrote_on_autocommit = None
    written, session._written = session._written, False
    # Only a transaction that wrote needs a token: a read on the primary (in a
    # transaction, as behind PgBouncer) would cost a round trip for nothing.
    if bind is not None and written:
        _note_position(session, bind)


@event.listens_for(RoutingSession, "after_rollback")
def _forget_writes(session: Session) -> None:
    """A ROLLBACK undoes the transaction's writes - but not those that ran in autocommit (a
    GET's): each committed on its own, and still earns the response its token."""
    assert isinstance(session, RoutingSession)
    if _to_a_savepoint(session):
        return  # the transaction goes on, with the writes made before the savepoint
    stored = session._wrote_on_autocommit
    session._primary_in_transaction = session._wrote_on_autocommit = None
    session._written = False
    if stored is not None:
        _note_position(session, stored)


def _to_a_savepoint(session: Session) -> bool:
    """Whether the rollback under way undoes a savepoint only (`begin_nested()`, or a
    flush inside one), not the transaction: the first transaction up from the current one
    that is a savepoint or the outermost is the one rolled back."""
    transaction = session._transaction
    while transaction is not None and not transaction.nested and transaction._parent:
        transaction = transaction._parent
    return transaction is not None and transaction.nested


def _note_position(session: RoutingSession, bind: Engine) -> None:
    """Note on the request's route the primary's WAL position, read on the session's
    connection to `bind` (the primary's engine) as its transaction ends."""
    route = _route.get()
    if route is None or session.replicas is None:
        return
    # Still the transaction that ended, its connections held - or, in a flush that failed,
    # the flush's own, whose connections are its parent's.
    transaction, entry = session._transaction, None
    while transaction is not None and entry is None:
        entry = transaction._connections.get(bind)
        transaction = transaction._parent
    if entry is None:
        return
    position = session.replicas.position_on(entry[0])
    if position is not None:
        route.commit_position = max(route.commit_position or 0, position)


def _writes_or_locks(clause: Any) -> bool:
    """Whether `clause` may write or lock: INSERT/UPDATE/DELETE, SELECT ... FOR UPDATE or
    SHARE - and raw SQL (`text()`) unless it reads as a plain query (`_plain_query`), unless
    the caller chose a replica for it (`replica()`)."""
    if isinstance(clause, UpdateBase):
        return True
    text = _raw_sql(clause)
    if text is not None:
        return _choice.get() != "replica" and not _plain_query(text)
    return isinstance(clause, Select) and clause._for_update_arg is not None


def _raw_sql(clause: Any) -> str | None:
    """The SQL text of a raw statement: `text()`, `text().columns()` (a TextualSelect) or
    `select(Model).from_statement(text(...))`; None for anything else."""
    while isinstance(clause, TextualSelect | FromStatement):
        clause = clause.element
    return clause.text if isinstance(clause, TextClause) else None


# Raw SQL a replica may run: it starts as a query, and names nothing that writes or locks
# (DML, SELECT ... INTO, row locks, sequences, advisory locks). What it cannot see - a
# function that writes - needs `primary()`; anything it is unsure of goes to the primary.
_QUERY_START = re.compile(r"\s*\(*\s*(SELECT|WITH|VALUES|TABLE|SHOW)\b", re.IGNORECASE)
_WRITES_OR_LOCKS = re.compile(
    r"\b(INSERT|UPDATE|DELETE|MERGE|INTO|LOCK|COPY|CALL|NEXTVAL|SETVAL|PG_\w*ADVISORY\w*|"
    r"FOR\s+(NO\s+KEY\s+)?UPDATE|FOR\s+(KEY\s+)?SHARE)\b",
    re.IGNORECASE,
)


def _plain_query(sql: str) -> bool:
    return bool(_QUERY_START.match(sql)) and not _WRITES_OR_LOCKS.search(sql)
