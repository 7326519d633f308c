"""`UnitOfWork`: one session, and what happens when its work ends (commit or roll back,
on-commit hooks, close). Opened by the request middleware and by `with db():`."""

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from service.db.accounting import QueryStats

logger = logging.getLogger("service.db")


class UnitOfWork:
    """One session and what happens when its unit of work ends."""

    __slots__ = ("_hooks", "commit_on_exit", "factory", "session", "stats")

    def __init__(self, factory: sessionmaker[Session], session: Session, commit_on_exit: bool):
        self.factory = factory
        self.session = session
        self.commit_on_exit = commit_on_exit
        self.stats = QueryStats()
        self._hooks: list[Callable[[], object]] = []

    def has_work(self) -> bool:
        """Whether ending the scope needs the database (a transaction or unflushed changes)."""
        session = self.session
        return session.in_transaction() or bool(session.new or session.deleted or session.dirty)

    def on_commit(self, hook: Callable[[], object]) -> None:
        """Run `hook()` after this scope's next successful commit."""
        self._hooks.append(hook)

    def commit(self) -> None:
        """Commit, then run the on-commit hooks. If the commit fails, roll back and re-raise."""
        try:
            with self.stats.timing():
                self.session.commit()
        except BaseException:
            self._hooks.clear()
            self.session.rollback()
            raise
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                logger.exception("on_commit hook %r failed; the commit stands", hook)

    def rollback(self) -> None:
        """Roll back and forget the on-commit hooks."""
        self._hooks.clear()
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
            self._hooks.clear()
            self.session.close()
