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
from sqlalchemy.pool import AssertionPool, Pool, QueuePool, StaticPool

DEFAULT_WAIT = 30.0  # seconds, where the pool names no timeout of its own


def pool_capacity(engine: Engine) -> int | None:
    """How many requests may hold a session of `engine` at once; None if there is no limit.

    SQLite gets 1: it has one writer at a time, and a transaction that has read and then
    writes after another one committed fails at once ("database is locked") instead of
    waiting, so requests on SQLite take turns - in the event loop, not in the threadpool.
    """
    if engine.dialect.name == "sqlite":
        return 1
    pool = engine.pool
    if isinstance(pool, QueuePool):
        overflow: int = pool._max_overflow
        return None if overflow < 0 else pool.size() + overflow
    if isinstance(pool, StaticPool | AssertionPool):
        return 1  # one shared connection: requests must take turns
    return None


def pool_wait(engine: Engine) -> float:
    """How long a request may wait for a slot: the pool's own checkout timeout."""
    pool = engine.pool
    return pool.timeout() if isinstance(pool, QueuePool) else DEFAULT_WAIT


_SHARED: "WeakKeyDictionary[Pool, dict[int | None, ConnectionSlots]]" = WeakKeyDictionary()


def slots_of(engine: Engine, limit: int | None) -> "ConnectionSlots":
    """The slots of `engine`'s connection pool, `limit` of them: one set for every
    middleware on that pool that names the same limit (two apps, or two mounted sub-apps,
    given one engine must not let in twice as many requests as it has connections). A
    middleware naming another limit counts its own: that limit was chosen for it."""
    by_limit = _SHARED.setdefault(engine.pool, {})
    slots = by_limit.get(limit)
    if slots is None:
        slots = by_limit[limit] = ConnectionSlots(limit, pool_wait(engine))
    return slots


class NoSlot(Exception):
    """No slot came free within the wait; the caller answers 503."""


class ConnectionSlots:
    """At most `limit` holders at once (no limit if None), each waiting at most `wait`
    seconds; one semaphore per event loop (tests and servers may run several)."""

    def __init__(self, limit: int | None, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self._semaphores: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            WeakKeyDictionary()
        )

    async def acquire(self) -> asyncio.Semaphore | None:
        """Wait for a slot; returns what `release` needs. Raises `NoSlot` after `wait`."""
        if self.limit is None:
            return None
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.limit)
        if not semaphore.locked():  # a slot is free and nobody queues: no timer, no task
            await semaphore.acquire()
            return semaphore
        try:
            await asyncio.wait_for(semaphore.acquire(), self.wait)
        except TimeoutError:
            raise NoSlot from None
        return semaphore

    @staticmethod
    def release(semaphore: asyncio.Semaphore | None) -> None:
        if semaphore is not None:
            semaphore.release()
