"""Test isolation shipped for users: `db_isolation` (behaviour 13 of service.db).

Each test here checks its own rows are gone once `db_isolation` has rolled back: the
`db_isolation_engine` below is a dependency of `db_isolation`, so pytest tears it down -
and runs its check - after the rollback. (The suite's tidy-up fixture skips tests that use
`db_isolation`, so only the isolation itself can keep the rows from staying.)
"""

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, Engine, func, select

from service.db import db
from service.items.models import Item
from tests.db.conftest import add_item, stored_names

pytestmark = pytest.mark.anyio
ROW = "committed under isolation"


@pytest.fixture
def db_isolation_engine(engine: Engine) -> Iterator[Engine]:
    """The test engine; after `db_isolation` has rolled back, the rows are as before."""
    before = stored_names(engine)
    yield engine
    left = stored_names(engine) - before
    assert not left, f"db_isolation left committed rows behind: {left}"


async def test_isolation_lets_the_test_see_what_the_app_and_a_script_commit(
    app_client: tuple[FastAPI, httpx.AsyncClient], db_isolation: Connection
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)

    @app.get("/items/count")
    def count() -> int:
        return db.session.scalar(select(func.count()).select_from(Item)) or 0

    assert (await client.post(f"/items/{ROW}")).status_code == 200
    with db():
        add_item("written by with db()")
    # Committed as far as the test can see: later requests and scopes read both rows.
    assert (await client.get("/items/count")).json() == 2
    with db():
        assert db.session.scalar(select(func.count()).select_from(Item)) == 2


async def test_isolation_rolls_back_a_failed_request_only_to_its_savepoint(
    app_client: tuple[FastAPI, httpx.AsyncClient], db_isolation: Connection
) -> None:
    app, client = app_client

    @app.post("/pair/{name}")
    def create_pair(name: str) -> None:
        add_item(name)
        add_item(name.upper())  # unique violation at commit

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)

    assert (await client.post("/items/kept")).status_code == 200
    assert (await client.post("/pair/twin")).status_code == 409
    # The earlier request's row survived the failed one; the test goes on normally.
    with db():
        names = set(db.session.scalars(select(Item.name)))
    assert names == {"kept"}
