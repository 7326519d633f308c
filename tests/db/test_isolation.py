"""Test isolation shipped for users: `db_isolation` and `async_db_isolation` (behaviour 13
of service.db), in both modes.

Each test here checks its own rows are gone once the isolation has rolled back: the
`*_isolation_engine` fixtures below are dependencies of the isolation fixtures, so pytest
tears them down - and runs their check - after the rollback. (The suite's tidy-up fixture
skips tests that use `db_isolation`, so only the isolation itself can keep the rows from
staying.)
"""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.items.models import Item
from tests.db.conftest import Mode, client_for, stored_names

pytestmark = pytest.mark.anyio
ROW = "committed under isolation"


def nothing_left(engine: Engine, before: set[str]) -> None:
    left = stored_names(engine) - before
    assert not left, f"the isolation left committed rows behind: {left}"


@pytest.fixture
def db_isolation_engine(engine: Engine) -> Iterator[Engine]:
    """The test engine; after `db_isolation` has rolled back, the rows are as before."""
    before = stored_names(engine)
    yield engine
    nothing_left(engine, before)


@pytest.fixture
async def async_db_isolation_engine(
    async_engine: AsyncEngine, engine: Engine
) -> AsyncIterator[AsyncEngine]:
    """The async test engine; after `async_db_isolation` has rolled back, the rows are as
    before."""
    before = stored_names(engine)
    yield async_engine
    nothing_left(engine, before)


@pytest.fixture
def isolation(mode: Mode, request: pytest.FixtureRequest) -> Any:
    """The mode's shipped fixture: `db_isolation` or `async_db_isolation`."""
    name = "db_isolation" if mode.name == "sync" else "async_db_isolation"
    return request.getfixturevalue(name)


async def count_items(mode: Mode) -> int:
    return int(await mode.scalar(select(func.count()).select_from(Item)) or 0)


async def test_isolation_lets_the_test_see_what_the_app_and_a_script_commit(
    mode: Mode, isolation: Any
) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)

    @app.get("/items/count")
    async def count() -> int:
        return await count_items(mode)

    async with client_for(app) as client:
        assert (await client.post(f"/items/{ROW}")).status_code == 200
        async with mode.block():
            mode.add_item("written by with db()")
        # Committed as far as the test can see: later requests and scopes read both rows.
        assert (await client.get("/items/count")).json() == 2
    async with mode.block():
        assert await count_items(mode) == 2


async def test_isolation_rolls_back_a_failed_request_only_to_its_savepoint(
    mode: Mode, isolation: Any
) -> None:
    app = mode.make_app()

    @app.post("/pair/{name}")
    async def create_pair(name: str) -> None:
        mode.add_item(name)
        mode.add_item(name.upper())  # unique violation at commit

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)

    async with client_for(app) as client:
        assert (await client.post("/items/kept")).status_code == 200
        assert (await client.post("/pair/twin")).status_code == 409
    # The earlier request's row survived the failed one; the test goes on normally.
    async with mode.block():
        names = set(await mode.run(lambda session: session.scalars(select(Item.name)).all()))
    assert names == {"kept"}


async def test_on_commit_hooks_run_under_isolation_as_without_it(
    mode: Mode, isolation: Any
) -> None:
    app = mode.make_app()
    calls: list[str] = []

    @app.post("/pair/{name}")
    async def create_pair(name: str) -> None:
        mode.add_item(name)
        mode.add_item(name.upper())  # unique violation at commit
        mode.database.on_commit(lambda: calls.append(f"pair {name}"))

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.database.on_commit(lambda: calls.append(name))

    async with client_for(app) as client:
        assert (await client.post("/items/kept")).status_code == 200
        assert (await client.post("/pair/twin")).status_code == 409
    async with mode.block(commit_on_exit=False):
        mode.add_item("by hand")
        mode.database.on_commit(lambda: calls.append("by hand"))
        await mode.commit()
    assert calls == ["kept", "by hand"]
