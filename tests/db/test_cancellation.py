"""Requests cancelled at random points - while they wait for a slot, run statements, or
commit - never leave a connection checked out, never put one back in the pool in the
middle of a statement, and never make a later request fail. In both modes."""

import asyncio
import gc
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, event, func, insert, select, text
from starlette.responses import JSONResponse, PlainTextResponse

from service.db import DBSessionMiddleware, create_engine, db
from service.db.testing import isolated
from service.items.models import Item
from tests.db.conftest import Mode, client_for, stored_names
from tests.db.test_observer import Recorder

pytestmark = pytest.mark.anyio

CANCELLED = 150
AFTERWARDS = 100


def busy_app(mode: Mode) -> FastAPI:
    """A route that writes, reads a few times (yielding to the loop between statements)
    and commits: many places for a cancellation to land."""
    app = mode.make_app()

    @app.post("/work/{n}")
    async def work(n: str) -> dict[str, str]:
        mode.add_item(f"work-{n}")
        await mode.flush()
        for _ in range(3):
            await mode.scalar(select(func.count()).select_from(Item))
            await asyncio.sleep(0)
        return {"n": n}

    return app


@contextmanager
def asyncpg_cancel_request_noise_ignored() -> Iterator[None]:
    """Let through the one error asyncpg leaks when a query is cancelled: it sends the
    server a CancelRequest on a new connection, first asking for TLS (sslmode=prefer, its
    default); when the cancelled connection is closed before that exchange ends, the
    future waiting for the server's TLS answer fails with "unexpected connection_lost()
    call" and nobody retrieves it (asyncpg issues #1211, #1310), so asyncio logs it. No
    request sees it. Every other error reaching the event loop still fails the test."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, ConnectionError) and str(error) == (
            "unexpected connection_lost() call"
        ):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
        gc.collect()  # futures nobody retrieved report when they are collected
    finally:
        loop.set_exception_handler(previous)


async def wait_until_returned(mode: Mode, seconds: float = 10) -> int:
    """Checked-out connections once the cancelled requests' shielded jobs have finished."""
    deadline = time.monotonic() + seconds
    while mode.checked_out() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return mode.checked_out()


async def test_random_cancellations_leave_no_connection_and_no_later_failure(
    mode: Mode, engine: object
) -> None:
    rng = random.Random(1234)
    app = busy_app(mode)
    with asyncpg_cancel_request_noise_ignored():
        await cancel_at_random(app, mode, rng)
    names = stored_names(engine)  # type: ignore[arg-type]
    assert {f"work-{CANCELLED + n}" for n in range(AFTERWARDS)} <= names
    assert mode.checked_out() == 0


async def cancel_at_random(app: FastAPI, mode: Mode, rng: random.Random) -> None:
    async with client_for(app) as client:
        tasks = []
        for n in range(CANCELLED):
            task = asyncio.create_task(client.post(f"/work/{n}"))
            tasks.append(task)
            # Cancel after 0-5 ms: some before admission, some mid-statement, some
            # mid-commit, some after the response; and again 0-2 ms later, as when a
            # client hangs up and then the server shuts down, so clean-up is interrupted too.
            first = rng.uniform(0, 0.005)
            loop = asyncio.get_running_loop()
            loop.call_later(first, task.cancel)
            loop.call_later(first + rng.uniform(0, 0.002), task.cancel)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=60
        )
        cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert cancelled > CANCELLED // 3, f"only {cancelled} requests were cancelled"
        assert await wait_until_returned(mode) == 0

        statuses = [(await client.post(f"/work/{CANCELLED + n}")).status_code
                    for n in range(AFTERWARDS)]
    assert statuses == [200] * AFTERWARDS


async def test_one_request_at_a_time_cancelled_mid_way_leaves_nothing_locked(
    mode: Mode, engine: object
) -> None:
    # Alone, each request gets its connection at once, so the cancellation lands inside
    # its own statements (the INSERT, the reads) or its commit far more often than when
    # many wait for a slot. On SQLite a connection closed mid-statement kept the write
    # lock: every later write waited for it and failed.
    rng = random.Random(3)
    app = busy_app(mode)
    with asyncpg_cancel_request_noise_ignored():
        probes = await cancel_one_at_a_time(app, mode, rng)
    assert probes == [200] * (CANCELLED // 10)
    assert mode.checked_out() == 0


async def cancel_one_at_a_time(app: FastAPI, mode: Mode, rng: random.Random) -> list[int]:
    """Each request cancelled after 0-6 ms, alone; every tenth, one that is not, whose
    status is returned."""
    loop = asyncio.get_running_loop()
    probes = []
    async with client_for(app) as client:
        for n in range(CANCELLED):
            task = asyncio.create_task(client.post(f"/work/{n}"))
            loop.call_later(rng.uniform(0, 0.006), task.cancel)
            await asyncio.gather(task, return_exceptions=True)
            if n % 10 == 9:
                assert await wait_until_returned(mode) == 0
                probe = await asyncio.wait_for(client.post(f"/work/probe-{n}"), timeout=10)
                probes.append(probe.status_code)
    return probes


SLOW_STATEMENT = text(
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
    "SELECT count(*) FROM c"
)


class CutOffAfter:
    """A per-request timeout outside the session middleware (the query string is the
    number of seconds): `asyncio.wait_for` cancels the request when it runs out."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["query_string"]:
            await self.app(scope, receive, send)
            return
        await self.cut_off(float(scope["query_string"].decode()), scope, receive, send)

    async def cut_off(self, seconds: float, scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.wait_for(self.app(scope, receive, send), seconds)
        except TimeoutError:
            await PlainTextResponse("timed out", 504)(scope, receive, send)


class AnyioDeadline(CutOffAfter):
    """The same written with anyio (`fail_after`): unlike `asyncio.wait_for` it cannot
    interrupt a sync route's thread, and the cancellation waits for the request's next
    checkpoint once the thread returns."""

    async def cut_off(self, seconds: float, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            with anyio.fail_after(seconds):
                await self.app(scope, receive, watched)
        except TimeoutError:
            if not started:
                await PlainTextResponse("timed out", 504)(scope, receive, send)


async def test_a_sync_route_that_outlived_an_anyio_deadline_stores_nothing(
    migrated_url: str, engine: Engine
) -> None:
    """The deadline runs out while the route's thread runs; the route then returns a 200.
    The client is told 504: none of the request's work - flushed before the deadline or
    added after it - may be committed."""
    pool_engine = create_engine(migrated_url, pool_size=2, max_overflow=0)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=pool_engine)
    app.add_middleware(AnyioDeadline)

    @app.post("/slow/{tag}")
    def slow(tag: str) -> JSONResponse:  # a Response: FastAPI has no checkpoint after it
        db.session.execute(insert(Item).values(name=f"{tag}-early", price=1))
        time.sleep(0.5)  # the deadline runs out meanwhile
        db.session.execute(insert(Item).values(name=f"{tag}-late", price=1))
        return JSONResponse({"tag": tag})

    try:
        async with client_for(app) as client:
            assert (await client.post("/slow/cut?0.1")).status_code == 504
            deadline = time.monotonic() + 10
            while pool_engine.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                await asyncio.sleep(0.05)
            assert pool_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert (await client.post("/slow/kept?5")).status_code == 200
    finally:
        pool_engine.dispose()
    assert stored_names(engine) == {"kept-early", "kept-late"}


async def test_an_anyio_deadline_that_ran_out_while_the_loop_was_blocked_stores_nothing(
    mode: Mode, engine: Engine
) -> None:
    """An `async def` route that blocks the event loop (CPU work, a sync call) past the
    deadline: the deadline's timer has not run when the route returns, and the COMMIT must
    not begin before it has."""
    app = mode.make_app()
    app.add_middleware(AnyioDeadline)

    @app.post("/blocking/{tag}")
    async def blocking(tag: str) -> JSONResponse:
        mode.add_item(tag)
        await mode.flush()
        time.sleep(0.3)  # the loop is blocked: the 0.1 s deadline runs out meanwhile
        return JSONResponse({"tag": tag})

    async with client_for(app) as client:
        assert (await client.post("/blocking/cut?0.1")).status_code == 504
        assert (await client.post("/blocking/kept?5")).status_code == 200
    assert stored_names(engine) == {"kept"}
    assert mode.checked_out() == 0


async def test_a_deadline_running_out_during_the_commit_is_counted_as_the_commit_it_was(
    mode: Mode, engine: Engine
) -> None:
    """Once begun, a COMMIT runs to its end (its connection must come back clean): a
    deadline that runs out meanwhile cannot undo it, and the request is counted as
    committed, not as rolled back with its work stored."""
    recorder = Recorder()
    app = mode.make_app(observer=recorder)
    app.add_middleware(AnyioDeadline)

    @app.post("/write/{tag}")
    async def write(tag: str) -> JSONResponse:
        mode.add_item(tag)
        return JSONResponse({"tag": tag})

    def slow_commit(connection: Any) -> None:
        time.sleep(0.3)  # the 0.1 s deadline runs out meanwhile

    event.listen(mode.pool_engine, "commit", slow_commit)
    try:
        async with client_for(app) as client:
            response = await client.post("/write/late?0.1")
    finally:
        event.remove(mode.pool_engine, "commit", slow_commit)
    # The cancellation comes after the COMMIT, at the next checkpoint: the 200 goes out
    # first here (the test client's `send` never waits); a server whose `send` waits
    # may answer the deadline's 504 instead. Either way the COMMIT stood.
    assert response.status_code in (200, 504)
    assert stored_names(engine) == {"late"}
    assert [outcome for _, outcome in recorder.of("transaction")] == ["commit"]
    assert mode.checked_out() == 0


async def test_a_sync_route_still_running_after_its_cancellation_gives_its_connection_back(
    migrated_url: str,
) -> None:
    """A cancellation cannot stop a thread: a sync route goes on running statements after
    its request was cancelled. Ending its unit must wait for it to let go of the session
    (closing a Session another thread is inside raised, and the connection stayed out
    until the garbage collector found it), and its slot must stay taken until then (or more
    requests run than there are connections)."""
    engine = create_engine(migrated_url, pool_size=2, max_overflow=0, pool_timeout=3)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine)
    app.add_middleware(CutOffAfter)

    @app.get("/work")
    def work() -> dict[str, int]:  # a sync route: it runs in the threadpool
        for _ in range(20):
            db.session.execute(SLOW_STATEMENT)  # a few ms in the database, on both
        return {"done": 20}

    rng = random.Random(7)
    try:
        async with client_for(app) as client:
            for _ in range(5):
                await asyncio.gather(*(
                    client.get(f"/work?{rng.uniform(0.02, 0.2):.3f}") for _ in range(10)
                ))
            deadline = time.monotonic() + 10
            while engine.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                await asyncio.sleep(0.05)
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            statuses = await asyncio.gather(*(client.get("/work") for _ in range(4)))
        assert [response.status_code for response in statuses] == [200] * 4
    finally:
        engine.dispose()


async def test_a_cancelled_sync_routes_statements_never_land_in_another_requests_commit(
    migrated_url: str, engine: Engine
) -> None:
    """After its request was cancelled, a sync route's thread runs on: its statement in
    flight must not end up on the connection once it is back in the pool - where the next
    request's COMMIT would store it. A cancelled request's rows are stored all or not at
    all."""
    pool_engine = create_engine(migrated_url, pool_size=2, max_overflow=0, pool_timeout=30)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=pool_engine)
    app.add_middleware(CutOffAfter)

    @app.post("/rows/{tag}/{count}")
    def rows(tag: str, count: int) -> dict[str, int]:
        for n in range(count):
            db.session.execute(insert(Item).values(name=f"{tag}-{n}", price=1))
        return {"rows": count}

    rng = random.Random(11)
    wanted: dict[str, int] = {}
    try:
        async with client_for(app) as client:
            limit = asyncio.Semaphore(8)

            async def one(n: int) -> None:
                tag, count = f"c{n}", rng.randint(1, 40)
                wanted[tag] = count
                timeout = rng.choice([0.002, 0.005, 0.01, 0.02, 0.05])
                async with limit:
                    await client.post(f"/rows/{tag}/{count}?{timeout}")

            await asyncio.gather(*(one(n) for n in range(400)))
            deadline = time.monotonic() + 10
            while pool_engine.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                await asyncio.sleep(0.05)
    finally:
        pool_engine.dispose()
    stored: dict[str, int] = {}
    for name in stored_names(engine):
        tag = name.rsplit("-", 1)[0]
        stored[tag] = stored.get(tag, 0) + 1
    partial = {tag: f"{n}/{wanted[tag]}" for tag, n in stored.items() if n != wanted[tag]}
    assert partial == {}


LONG_STATEMENT = text(
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1500000) "
    "SELECT count(*) FROM c"
)


async def test_a_cancelled_sync_route_cannot_commit_by_hand_what_came_after(
    migrated_url: str, engine: Engine
) -> None:
    """The gate closes at once: the statements the route runs after its request was
    cancelled - back to back, with no pause to wait for - and its own COMMIT are refused."""
    pool_engine = create_engine(migrated_url, pool_size=2, max_overflow=0)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=pool_engine)
    app.add_middleware(CutOffAfter)
    finished = threading.Event()

    @app.post("/late/{tag}")
    def late(tag: str) -> None:
        try:
            db.session.execute(insert(Item).values(name=f"{tag}-a", price=1))
            db.session.execute(LONG_STATEMENT)  # the request is cancelled meanwhile
            for part in "bcd":
                db.session.execute(insert(Item).values(name=f"{tag}-{part}", price=1))
            db.session.commit()
        finally:
            finished.set()

    try:
        async with client_for(app) as client:
            response = await client.post("/late/x?0.05")
            assert response.status_code == 504
            assert await asyncio.to_thread(finished.wait, 30)
            deadline = time.monotonic() + 10
            while pool_engine.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                await asyncio.sleep(0.05)
            assert (await client.post("/late/y")).status_code == 200
    finally:
        pool_engine.dispose()
    assert stored_names(engine) == {"y-a", "y-b", "y-c", "y-d"}


async def test_a_cancelled_request_under_test_isolation_leaves_the_tests_connection_usable(
    engine: Engine,
) -> None:
    """Under `db_isolation` every session shares the test's connection: a cancelled
    request must not close it for the rest of the test."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine)
    app.add_middleware(CutOffAfter)
    finished = threading.Event()

    @app.get("/slow")
    def slow() -> None:
        try:
            db.session.execute(LONG_STATEMENT)
        finally:
            finished.set()

    @app.get("/count")
    def count() -> int:
        return int(db.session.scalar(select(func.count()).select_from(Item)) or 0)

    with isolated(db, engine):
        async with client_for(app) as client:
            assert (await client.get("/slow?0.05")).status_code == 504
            assert await asyncio.to_thread(finished.wait, 30)
            assert (await client.get("/count")).status_code == 200
