"""`UnitOfWork`: one session, and what happens when its work ends (commit or roll back,
on-commit hooks, close). Opened by the request middleware and by `with db():`.

`UnitOfWorkBase` holds what does no I/O - whether there is work to end, the on-commit
hooks - and is shared with the async twin (`service.db.asyncio`), which only differs in
awaiting the session.
"""

import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.exc import IllegalStateChangeError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from service.db.accounting import QueryStats
from service.db.statement_gate import close_gate

logger = logging.getLogger("service.db")

SessionT = TypeVar("SessionT")
FactoryT = TypeVar("FactoryT")
CommitHook = Callable[[], Any]
# After how long an abandoned unit still waiting for its route's thread to let go of the
# session says so (it goes on waiting: the connection must come back clean).
ABANDONED_PATIENCE = 60.0


class UnitOfWorkBase(Generic[SessionT, FactoryT]):
    """One session (sync or async) and its on-commit hooks.

    A hook waits for the transaction it was registered in: the session's, or the innermost
    savepoint (`begin_nested()`), which hands it on to the one around it when released and
    drops it when rolled back. Once the session's transaction commits - this unit's commit,
    or one made by hand with `session.commit()` - the hook is due, and runs the next time
    the unit ends a transaction (right after its own commit, or at its rollback or end),
    whether or not that succeeds. A transaction that ends otherwise - rolled back, or closed
    with `session.close()` - drops the hooks still waiting for it. A hook registered by a
    hook waits for the next commit; at the end of a unit that commits, that is the end
    itself (one that rolls back drops it). The session's `after_commit` /
    `after_transaction_end` events tell, listened to from the first hook on.
    """

    __slots__ = ("_due", "_hooks", "_watching", "closed", "commit_on_exit", "ended", "factory",
                 "session", "stats")

    def __init__(self, factory: FactoryT, session: SessionT, commit_on_exit: bool) -> None:
        self.factory = factory
        self.session = session
        self.commit_on_exit = commit_on_exit
        self.stats = QueryStats()
        self.ended = False  # set as its end begins: from then on no block joins it
        self.closed = False  # set once its request has ended: from then on it is no scope
        # Waiting hooks, each with the savepoint it waits for (None: the transaction).
        self._hooks: list[tuple[CommitHook, SessionTransaction | None]] = []
        self._due: list[CommitHook] = []  # their transaction committed: to run
        self._watching = False

    def has_work(self) -> bool:
        """Whether ending the unit needs the database (a transaction or unflushed changes)."""
        session: Any = self.session  # Session and AsyncSession answer these alike, without I/O
        return session.in_transaction() or bool(session.new or session.deleted or session.dirty)

    def has_hooks(self) -> bool:
        """Whether an on-commit hook waits or is due."""
        return bool(self._hooks or self._due)

    def on_commit(self, hook: CommitHook) -> None:
        """Run `hook()` once the current transaction (or savepoint, up to the transaction)
        has committed; see the class docstring."""
        session = self._sync_session()
        if not self._watching:
            event.listen(session, "after_commit", self._committed)
            event.listen(session, "after_transaction_end", self._ended)
            self._watching = True
        self._hooks.append((hook, session.get_nested_transaction()))

    def _sync_session(self) -> Session:
        raise NotImplementedError

    def _committed(self, session: Session) -> None:
        released = session.get_nested_transaction()
        if released is None:  # the transaction
            self._nothing_to_commit()
            return
        outer = _enclosing_savepoint(released)
        self._hooks = [
            (hook, outer if savepoint is released else savepoint)
            for hook, savepoint in self._hooks
        ]

    def _ended(self, session: Session, transaction: SessionTransaction) -> None:
        # A released savepoint or a committed transaction handed its hooks on already
        # (`_committed`): whatever still waits for the one that ended was not committed.
        if transaction.nested:
            self._hooks = [
                (hook, savepoint)
                for hook, savepoint in self._hooks
                if not _within(savepoint, transaction)
            ]
        elif transaction.parent is None:
            self._hooks.clear()

    def _nothing_to_commit(self) -> None:
        """Every waiting hook is due: their transaction committed, or the unit commits with
        none open (what they wait for stands)."""
        self._due.extend(hook for hook, _ in self._hooks)
        self._hooks.clear()

    def _take_due(self) -> list[CommitHook]:
        hooks, self._due = self._due, []
        return hooks

    def _forget_hooks(self) -> None:
        """Drop the hooks still waiting (their work was not committed)."""
        self._hooks.clear()


# How long a running statement of an abandoned unit may take to end by itself before the
# driver is asked to interrupt it.
_GRACE = 0.05


def _interrupt(connection: Connection) -> None:
    """Ask the driver to stop the statement running on `connection` (from another thread):
    psycopg's and psycopg2's `cancel()`, sqlite3's `interrupt()`. The statement then fails
    in the route's thread; a driver without either is waited for."""
    try:
        # Not `connection.connection`: on a connection invalidated meanwhile, that would
        # connect again, from this thread.
        pooled = connection._dbapi_connection
        driver = pooled.driver_connection if pooled is not None else None
        stop = getattr(driver, "cancel", None) or getattr(driver, "interrupt", None)
        if stop is not None:
            stop()
    except Exception:  # the statement may have ended, and the connection with it
        logger.debug("could not interrupt a statement of a cancelled request", exc_info=True)


def _complain_once(started: float, complained: bool) -> bool:
    if not complained and time.monotonic() - started >= ABANDONED_PATIENCE:
        logger.error(
            "a statement of a cancelled request has run for more than %.0f s; its "
            "connection and slot stay taken until it ends", ABANDONED_PATIENCE,
        )
        return True
    return complained


def _enclosing_savepoint(transaction: SessionTransaction) -> SessionTransaction | None:
    outer = transaction.parent
    while outer is not None and not outer.nested:
        outer = outer.parent
    return outer


def _within(savepoint: SessionTransaction | None, undone: SessionTransaction) -> bool:
    while savepoint is not None:
        if savepoint is undone:
            return True
        savepoint = savepoint.parent
    return False


# Rounds of hooks registered by hooks, and of what hooks wrote, that a unit's end commits;
# a hook that registers itself again would otherwise never let the unit end (what is left
# then is dropped).
HOOK_ROUNDS = 10


def hook_failed(hook: CommitHook) -> None:
    """Log a failing on-commit hook (called from an `except` block): the commit stands."""
    logger.exception("on_commit hook %r failed; the commit stands", hook)


class UnitOfWork(UnitOfWorkBase[Session, sessionmaker[Session]]):
    """A unit of work on a sync `Session`."""

    __slots__ = ()

    def _sync_session(self) -> Session:
        return self.session

    def commit(self) -> None:
        """Commit (if a transaction is open), then run the hooks due. If the commit fails,
        roll back, run the hooks due from an earlier commit made by hand, and re-raise."""
        if self.has_work():
            try:
                with self.stats.timing():
                    self.session.commit()
            except BaseException as error:
                self._forget_hooks()
                self.session.rollback()
                if isinstance(error, Exception):
                    self._run_due_hooks()
                raise
        else:
            self._nothing_to_commit()
        self._run_due_hooks()

    def rollback(self) -> None:
        """Roll back, dropping the hooks that waited for it; run those due from an earlier
        commit."""
        self._forget_hooks()
        if self.has_work():
            with self.stats.timing():
                self.session.rollback()
        self._run_due_hooks()

    def end(self, commit: bool) -> None:
        """Commit (if asked) or roll back, run the hooks due, and always close."""
        self.ended = True
        try:
            if commit:
                self.commit()
                for _ in range(HOOK_ROUNDS):
                    if not self.has_hooks() and not self.has_work():
                        break
                    self.commit()  # what the hooks registered (and did)
            else:
                self.rollback()
        finally:
            self._forget_hooks()
            self.session.close()

    def end_abandoned(self) -> None:
        """End the unit of a request cancelled while its sync route may still run: a
        cancellation cannot stop a thread, and that thread may be in the middle of a
        statement on the session's connection right now.

        First the gate of each of the session's connections is closed
        (`statement_gate`): the route's later statements and COMMITs are refused before
        they reach the driver. A statement running meanwhile is interrupted - its work is
        rolled back anyway - through the driver (psycopg2's `cancel()`, sqlite3's
        `interrupt()`), and waited for: so after the rollback the connection goes back to
        the pool with nothing of the route's still on it. Then the session is rolled back
        and closed; a Session refuses that while another thread is inside one of its own
        calls (IllegalStateChangeError: e.g. checking out a connection), so this tries
        again until the route's thread is out of it. However long that takes, the
        connection comes back: a statement that ignores the interruption is waited for
        (an ERROR is logged after `ABANDONED_PATIENCE` s), as the request's slot is.
        The closed session refuses the route's later work."""
        self.ended = True
        started = time.monotonic()
        complained = False
        while True:
            complained = self._close_gates(started, complained)
            try:
                self.end(commit=False)
                return
            except IllegalStateChangeError:
                complained = _complain_once(started, complained)
                time.sleep(0.005)  # and close the gate of a connection it took meanwhile

    def _close_gates(self, started: float, complained: bool) -> bool:
        transaction = self.session.get_transaction()
        if transaction is None or isinstance(self.session.bind, Connection):
            # Bound to a connection of the caller's (test isolation): not a pooled one,
            # and the rest of the test goes on using it.
            return complained
        while True:
            try:
                connections = [entry[0] for entry in list(transaction._connections.values())]
                break
            except RuntimeError:  # the route's thread took a connection while we copied
                time.sleep(0.001)
        for connection in connections:
            # Asked again each second: a cancel that reached the server before the
            # statement did is lost.
            while not close_gate(connection, patience=_GRACE):
                _interrupt(connection)
                complained = _complain_once(started, complained)
                if close_gate(connection, patience=1.0):
                    break
        return complained

    def _run_due_hooks(self) -> None:
        for hook in self._take_due():
            try:
                hook()
            except Exception:
                hook_failed(hook)
