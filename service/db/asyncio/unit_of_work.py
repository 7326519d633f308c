"""`AsyncUnitOfWork`: one `AsyncSession`, and what happens when its work ends - the sync
`UnitOfWork`'s decisions (`UnitOfWorkBase`), awaited."""

import inspect

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from service.db.unit_of_work import HOOK_ROUNDS, UnitOfWorkBase, hook_failed


class AsyncUnitOfWork(UnitOfWorkBase[AsyncSession, async_sessionmaker[AsyncSession]]):
    """A unit of work on an `AsyncSession`."""

    __slots__ = ()

    def _sync_session(self) -> Session:
        return self.session.sync_session

    async def commit(self) -> None:
        """Commit (if a transaction is open), then run the hooks due, awaiting those that
        return an awaitable. If the commit fails, roll back, run the hooks due from an
        earlier commit made by hand, and re-raise."""
        if self.has_work():
            try:
                with self.stats.timing():
                    await self.session.commit()
            except BaseException as error:
                self._forget_hooks()
                await self.session.rollback()
                if isinstance(error, Exception):
                    await self._run_due_hooks()
                raise
        else:
            self._nothing_to_commit()
        await self._run_due_hooks()

    async def rollback(self) -> None:
        """Roll back, dropping the hooks that waited for it; run those due from an earlier
        commit."""
        self._forget_hooks()
        if self.has_work():
            with self.stats.timing():
                await self.session.rollback()
        await self._run_due_hooks()

    async def end(self, commit: bool, abandoned: bool = False) -> None:
        """Commit (if asked) or roll back, run the hooks due, and always close.

        `abandoned`: the task using the session was cancelled, possibly in the middle of a
        statement; its connection may be mid-protocol (asyncpg: "another operation is in
        progress"), so it is invalidated - closed, never put back in the pool - instead.
        """
        self.ended = True
        try:
            if abandoned:
                self._forget_hooks()
                await self.session.invalidate()
                await self._run_due_hooks()  # their commit happened before
            elif commit:
                await self.commit()
                for _ in range(HOOK_ROUNDS):
                    if not self.has_hooks() and not self.has_work():
                        break
                    await self.commit()  # what the hooks registered (and did)
            else:
                await self.rollback()
        finally:
            self._forget_hooks()
            await self.session.close()

    async def _run_due_hooks(self) -> None:
        for hook in self._take_due():
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                hook_failed(hook)
