"""`UnitOfWork`: one session, and what happens when its work ends (commit or roll back,
on-commit hooks, close). Opened by the request middleware and by `with db():`.

`UnitOfWorkBase` holds what does no I/O - whether there is work to end, the on-commit
hooks - and is shared with the async twin (`service.db.asyncio`), which only differs in
awaiting the session.
"""

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from service.db.accounting import QueryStats

logger = logging.getLogger("service.db")

SessionT = TypeVar("SessionT")
FactoryT = TypeVar("FactoryT")
CommitHook = Callable[[], Any]


class UnitOfWorkBase(Generic[SessionT, FactoryT]):
    """One session (sync or async) and its on-commit hooks."""

    __slots__ = ("_hooks", "commit_on_exit", "factory", "session", "stats")

    def __init__(self, factory: FactoryT, session: SessionT, commit_on_exit: bool) -> None:
        self.factory = factory
        self.session = session
        self.commit_on_exit = commit_on_exit
        self.stats = QueryStats()
        self._hooks: list[CommitHook] = []

    def has_work(self) -> bool:
        """Whether ending the unit needs the database (a transaction or unflushed changes)."""
        session: Any = self.session  # Session and AsyncSession answer these alike, without I/O
        return session.in_transaction() or bool(session.new or session.deleted or session.dirty)

    def on_commit(self, hook: CommitHook) -> None:
        """Run `hook()` after this unit's next successful commit."""
        self._hooks.append(hook)

    def _take_hooks(self) -> list[CommitHook]:
        hooks, self._hooks = self._hooks, []
        return hooks

    def _forget_hooks(self) -> None:
        self._hooks.clear()


def hook_failed(hook: CommitHook) -> None:
    """Log a failing on-commit hook (called from an `except` block): the commit stands."""
    logger.exception("on_commit hook %r failed; the commit stands", hook)


class UnitOfWork(UnitOfWorkBase[Session, sessionmaker[Session]]):
    """A unit of work on a sync `Session`."""

    __slots__ = ()

    def commit(self) -> None:
        """Commit, then run the on-commit hooks. If the commit fails, roll back and re-raise."""
        try:
            with self.stats.timing():
                self.session.commit()
        except BaseException:
            self._forget_hooks()
            self.session.rollback()
            raise
        for hook in self._take_hooks():
            try:
                hook()
            except Exception:
                hook_failed(hook)

    def rollback(self) -> None:
        """Roll back and forget the on-commit hooks."""
        self._forget_hooks()
        with self.stats.timing():
            self.session.rollback()

    def end(self, commit: bool) -> None:
        """Commit (if asked and there is work) or roll back, and always close."""
        try:
            if commit and self.has_work():
                self.commit()
            elif self.has_work():
                self.rollback()
        finally:
            self._forget_hooks()
            self.session.close()
