"""`DBSessionMiddleware(observer=...)`: what the middleware tells a `SessionObserver` - the
same calls in both modes: admission waits and 503s, each transaction's outcome (the
response's and the later work's), and each request's statements."""

import asyncio
import re
from typing import Any

import pytest
from fastapi import BackgroundTasks, HTTPException
from sqlalchemy import Engine, select
from starlette.types import Scope

from service.db import QueryStats, SessionObserver, create_engine
from service.db import asyncio as async_mode
from service.db.observer import Outcome
from service.items.models import Item
from tests.db.conftest import Mode, async_url, client_for, stored_names

pytestmark = pytest.mark.anyio


class Recorder(SessionObserver):
    """Keeps every call, as (call, path, detail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def admitted(self, database: str, scope: Scope, waited: float) -> None:
        self.calls.append(("admitted", scope["path"], waited))

    def rejected(self, database: str, scope: Scope, waited: float) -> None:
        self.calls.append(("rejected", scope["path"], (database, waited)))

    def transaction_ended(self, database: str, scope: Scope, outcome: Outcome) -> None:
        self.calls.append(("transaction", scope["path"], outcome))

    def request_ended(self, database: str, scope: Scope, stats: QueryStats) -> None:
        self.calls.append(("ended", scope["path"], stats.count))

    def of(self, call: str) -> list[tuple[str, Any]]:
        return [(path, detail) for name, path, detail in self.calls if name == call]


def statements_in(server_timing: str) -> int:
    return int(re.search(r'desc="(\d+) quer', server_timing)[1])  # type: ignore[index]


async def test_outcomes_and_statements_of_each_request(mode: Mode, engine: Engine) -> None:
    recorder = Recorder()
    app = mode.make_app(observer=recorder, sessionless_paths={"/live"})

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        await mode.flush()
        return {}

    @app.post("/refused/{name}")
    async def refused(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        raise HTTPException(400, "no")

    @app.post("/duplicate")
    async def duplicate() -> dict[str, str]:
        mode.add_item("lamp")  # unflushed: the unique name fails at COMMIT
        return {}

    @app.get("/live")
    async def live() -> dict[str, str]:
        return {}

    async with client_for(app) as client:
        created = await client.post("/items/lamp")
        assert (await client.post("/refused/desk")).status_code == 400
        assert (await client.post("/duplicate")).status_code == 409
        assert (await client.get("/live")).status_code == 200

    assert recorder.of("transaction") == [
        ("/items/lamp", "commit"), ("/refused/desk", "rollback"), ("/duplicate", "commit_failed"),
    ]
    ended = recorder.of("ended")
    assert [path for path, _ in ended] == ["/items/lamp", "/refused/desk", "/duplicate"]
    assert ended[0][1] == statements_in(created.headers["server-timing"]) >= 1
    # Each admitted at once; the sessionless path is not seen at all.
    assert [path for path, _ in recorder.of("admitted")] == [path for path, _ in ended]
    assert all(waited < 0.5 for _, waited in recorder.of("admitted"))
    assert stored_names(engine) == {"lamp"}


async def test_later_work_is_a_transaction_of_its_own(mode: Mode, engine: Engine) -> None:
    """A background task's write is committed in a transaction of its own, reported as
    such; its statements are counted for the request."""
    recorder = Recorder()
    app = mode.make_app(observer=recorder)

    async def write_later() -> None:
        mode.add_item("late")
        await mode.flush()

    @app.post("/later")
    async def later(tasks: BackgroundTasks) -> dict[str, str]:
        await mode.scalar(select(Item.id).limit(1))
        tasks.add_task(write_later)
        return {}

    async with client_for(app) as client:
        response = await client.post("/later")
    assert response.status_code == 200
    # The response's (its SELECT), then the background task's.
    assert recorder.of("transaction") == [("/later", "commit"), ("/later", "commit")]
    assert stored_names(engine) == {"late"}
    [(_, statements)] = recorder.of("ended")
    assert statements > statements_in(response.headers["server-timing"])


def holding_app(mode: Mode, recorder: Recorder, **middleware_args: Any) -> Any:
    """An app with one connection slot, `/hold` keeping it until `app.state.release`."""
    app = mode.make_app(observer=recorder, max_concurrent_sessions=1, **middleware_args)
    app.state.entered, app.state.release = asyncio.Event(), asyncio.Event()

    @app.get("/hold")
    async def hold() -> dict[str, str]:
        app.state.entered.set()
        await app.state.release.wait()
        return {}

    @app.get("/other")
    async def other() -> dict[str, str]:
        return {}

    return app


async def test_a_request_that_waited_for_a_slot_reports_its_wait(mode: Mode) -> None:
    recorder = Recorder()
    app = holding_app(mode, recorder)
    async with client_for(app) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await app.state.entered.wait()
        waiting = asyncio.ensure_future(client.get("/other"))
        await asyncio.sleep(0.2)
        app.state.release.set()
        assert (await holder).status_code == 200
        assert (await waiting).status_code == 200
    admitted = dict(recorder.of("admitted"))
    assert admitted["/hold"] < 0.1
    assert admitted["/other"] >= 0.15  # it waited for /hold's slot
    assert recorder.of("rejected") == []


async def test_a_request_that_finds_no_slot_is_reported_rejected(
    mode: Mode, migrated_url: str
) -> None:
    """The slot wait is the pool's timeout, here 0.2 s."""
    recorder = Recorder()
    if mode.name == "sync":
        engine: Any = create_engine(migrated_url, pool_timeout=0.2)
    else:
        engine = async_mode.create_async_engine(async_url(migrated_url), pool_timeout=0.2)
    app = holding_app(mode, recorder, custom_engine=engine)
    try:
        async with client_for(app) as client:
            holder = asyncio.ensure_future(client.get("/hold"))
            await app.state.entered.wait()
            busy = await client.get("/other")
            app.state.release.set()
            assert (await holder).status_code == 200
    finally:
        await mode.dispose(engine)
    assert busy.status_code == 503
    [(path, (database, waited))] = recorder.of("rejected")
    assert (path, database) == ("/other", "db")
    assert 0.2 <= waited < 5
    assert [path for path, _ in recorder.of("admitted")] == ["/hold"]
    assert [path for path, _ in recorder.of("ended")] == ["/hold"]
