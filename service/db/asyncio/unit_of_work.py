"""`AsyncUnitOfWork`: one `AsyncSession`, and what happens when its work ends - the sync
`UnitOfWork`'s decisions (`UnitOfWorkBase`), awaited."""

import inspect

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.unit_of_work import UnitOfWorkBase, hook_failed


class AsyncUnitOfWork(UnitOfWorkBase[AsyncSession, async_sessionmaker[AsyncSession]]):
    """A unit of work on an `AsyncSession`."""

    __slots__ = ()

    async def commit(self) -> None:
        """Commit, then run the on-commit hooks (awaiting those that return an awaitable).
        If the commit fails, roll back and re-raise."""
        try:
            with self.stats.timing():
                await self.session.commit()
        except BaseException:
            self._forget_hooks()
            await self.session.rollback()
            raise
        for hook in self._take_hooks():
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                hook_failed(hook)

    async def rollback(self) -> None:
        """Roll back and forget the on-commit hooks."""
        self._forget_hooks()
        with self.stats.timing():
            await self.session.rollback()

    async def end(self, commit: bool, abandoned: bool = False) -> None:
        """Commit (if asked and there is work) or roll back, and always close.

        `abandoned`: the task using the session was cancelled, possibly in the middle of a
        statement; its connection may be mid-protocol (asyncpg: "another operation is in
        progress"), so it is invalidated - closed, never put back in the pool - instead.
        """
        try:
            if abandoned:
                self._forget_hooks()
                await self.session.invalidate()
            elif commit and self.has_work():
                await self.commit()
            elif self.has_work():
                await self.rollback()
        finally:
            self._forget_hooks()
            await self.session.close()
