"""One async app or configured `db` used from several event loops, one after the other: what
test suites do (each test on a loop of its own, one module-level app; `TestClient(app)`
without `with`, a loop per request) and scripts that call `asyncio.run()` more than once.
An asyncpg connection works only on the loop that made it: pooled on one and handed out on
the next, it failed, and then stayed in the pool broken for every later request."""

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from service.db.asyncio import Database, DBSessionMiddleware
from service.items.models import Item
from tests.conftest import starlette_client
from tests.db.conftest import async_url, client_for, stored_names

APP_NAME = "service-event-loops-test"  # the shutdown test's app only

def loop_app(url: str, database: Database, backend: str, name: str = "") -> FastAPI:
    app = FastAPI()
    # On PostgreSQL the app's sessions can carry a name, to be counted.
    engine_args: dict[str, Any] = (
        {"connect_args": {"server_settings": {"application_name": name}}}
        if backend == "postgresql" and name else {}
    )
    app.add_middleware(DBSessionMiddleware, db_url=url, engine_args=engine_args,
                       database=database)

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, int]:
        database.session.add(Item(name=name, price=Decimal("1.00")))
        count = await database.session.scalar(select(func.count()).select_from(Item))
        return {"count": count or 0}

    return app


def session_middleware(app: FastAPI) -> DBSessionMiddleware:
    """The middleware instance in the stack Starlette built at the first call."""
    layer: Any = app.middleware_stack
    while not isinstance(layer, DBSessionMiddleware):
        layer = layer.app
    return layer


def sessions_of_the_app(engine: Engine, backend: str) -> int | None:
    """The app's sessions on the server (None on SQLite, which has no server)."""
    if backend != "postgresql":
        return None
    with engine.connect() as connection:
        return int(connection.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": APP_NAME},
        ))


def test_one_app_serves_requests_on_one_event_loop_after_another(
    migrated_url: str, engine: Engine, backend: str
) -> None:
    app = loop_app(async_url(migrated_url), Database("loops"), backend)

    async def post(name: str) -> int:
        async with client_for(app) as client:
            return (await client.post(f"/items/{name}")).status_code

    statuses = [asyncio.run(post(f"loop-{n}")) for n in range(4)]
    assert statuses == [200] * 4
    assert stored_names(engine) == {f"loop-{n}" for n in range(4)}


def test_testclient_without_with_runs_each_request_on_a_new_loop(
    migrated_url: str, engine: Engine, backend: str
) -> None:
    client = starlette_client(loop_app(async_url(migrated_url), Database("loops"), backend))
    assert [client.post(f"/items/tc-{n}").status_code for n in range(4)] == [200] * 4
    assert stored_names(engine) == {f"tc-{n}" for n in range(4)}


@pytest.mark.parametrize("runner", ["asyncio", "uvloop"])
def test_a_configured_db_works_in_one_run_after_another(migrated_url: str, runner: str) -> None:
    """`asyncio.run()`, and uvloop's (uvicorn's, with uvicorn[standard]), whose sockets
    have no `shutdown()`."""
    run = asyncio.run if runner == "asyncio" else pytest.importorskip("uvloop").run
    database = Database("loops")
    database.configure(async_url(migrated_url))

    async def job(n: int) -> int:
        async with database():
            return int(await database.session.scalar(text(f"SELECT {n}")))

    assert [run(job(n)) for n in range(4)] == [0, 1, 2, 3]


def test_the_engine_made_from_db_url_closes_its_connections_at_shutdown(
    migrated_url: str, engine: Engine, backend: str
) -> None:
    app = loop_app(async_url(migrated_url), Database("loops"), backend, APP_NAME)
    for round_ in range(2):  # and a second start, on a new loop, works
        with starlette_client(app) as client:
            assert client.post(f"/items/started-{round_}").json() == {"count": round_ + 1}
            assert sessions_of_the_app(engine, backend) in (1, None)
        assert session_middleware(app).engine.sync_engine.pool.checkedin() == 0
        deadline = time.monotonic() + 5
        while sessions_of_the_app(engine, backend) not in (0, None):
            assert time.monotonic() < deadline, "the app's sessions outlived its shutdown"
            time.sleep(0.05)


def test_an_engine_made_with_sqlalchemys_own_function_serves_loop_after_loop(
    migrated_url: str, engine: Engine, backend: str
) -> None:
    """A `custom_engine` from `sqlalchemy.ext.asyncio.create_async_engine`, as users of
    fastapi-async-sqlalchemy pass one."""
    if backend != "postgresql":
        pytest.skip("asyncpg's; the schema's SQLite functions need the service's engine")
    database = Database("loops")
    app = FastAPI()
    custom = create_async_engine(async_url(migrated_url))
    app.add_middleware(DBSessionMiddleware, custom_engine=custom, database=database)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        database.session.add(Item(name=name, price=Decimal("1.00")))

    client = starlette_client(app)
    assert [client.post(f"/items/custom-{n}").status_code for n in range(3)] == [200] * 3
    assert stored_names(engine) == {f"custom-{n}" for n in range(3)}


def test_a_shutdown_is_not_held_up_by_a_server_that_hangs(
    migrated_url: str, engine: Engine, backend: str
) -> None:
    """Closing a pooled connection waits for the server's goodbye: a frozen server (a VM
    paused, a network partition) must not keep the app from shutting down - at all (it
    waited for ever), nor for a wait per pooled connection (10 of them here)."""
    if backend != "postgresql":
        pytest.skip("a server process to freeze: PostgreSQL")
    database, app = Database("loops"), FastAPI()
    app.add_middleware(DBSessionMiddleware, db_url=async_url(migrated_url), database=database,
                       engine_args={"pool_size": 10, "connect_args": {
                           "server_settings": {"application_name": APP_NAME}}})

    @app.get("/held")
    async def held() -> None:  # holds its connection a moment: ten at once need ten
        await database.session.execute(text("SELECT pg_sleep(0.3)"))

    frozen: list[int] = []

    def serve_then_shut_down() -> None:
        with starlette_client(app) as client:
            with ThreadPoolExecutor(10) as requests:
                statuses = list(requests.map(lambda _: client.get("/held").status_code,
                                             range(10)))
            assert statuses == [200] * 10
            with engine.connect() as connection:
                frozen.extend(connection.scalars(text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
                ), {"name": APP_NAME}))
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
        # Leaving the block shuts the app down.

    lifetime = threading.Thread(target=serve_then_shut_down, daemon=True)
    try:
        lifetime.start()
        # One close waits 1 s for the frozen server, the other nine abort at once; one
        # wait each would take 10 s.
        lifetime.join(timeout=6)
        assert len(frozen) == 10 and not lifetime.is_alive(), (
            "the shutdown waited for a frozen server"
        )
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        lifetime.join()
