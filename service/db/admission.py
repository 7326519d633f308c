"""Admission control: a request waits in the event loop for a connection slot.

Why: sync routes run in a bounded threadpool. If more requests run than the pool has
connections, the surplus handler threads block inside the pool's checkout while holding
every worker thread; the requests that *do* hold connections then need a worker thread
(FastAPI validates a sync route's response in the threadpool) before they can reach their
commit and give the connection back - a deadlock that ends in `QueuePool limit ... timed
out`. Letting at most as many requests in as there are connections means no handler ever
blocks on checkout, so threads always come free.
"""

import asyncio
from weakref import WeakKeyDictionary

from sqlalchemy import Engine
from sqlalchemy.pool import AssertionPool, QueuePool, StaticPool


def pool_capacity(engine: Engine) -> int | None:
    """How many connections `engine` can hand out at once; None if it has no limit."""
    pool = engine.pool
    if isinstance(pool, QueuePool):
        overflow: int = pool._max_overflow
        return None if overflow < 0 else pool.size() + overflow
    if isinstance(pool, StaticPool | AssertionPool):
        return 1  # one shared connection: requests must take turns
    return None


class ConnectionSlots:
    """At most `limit` holders at once (no limit if None); one semaphore per event loop."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._semaphores: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            WeakKeyDictionary()
        )

    async def acquire(self) -> asyncio.Semaphore | None:
        """Wait for a slot; returns what `release` needs."""
        if self.limit is None:
            return None
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.limit)
        await semaphore.acquire()
        return semaphore

    @staticmethod
    def release(semaphore: asyncio.Semaphore | None) -> None:
        if semaphore is not None:
            semaphore.release()
