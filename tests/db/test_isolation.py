"""Test isolation shipped for users: `db_isolation` (behaviour 13 of service.db).

The two tests named `..._first` and `..._second` run in this order (pytest keeps file
order); the tidy-up fixture of the suite skips tests that use `db_isolation`, so only the
isolation itself can keep the first test's committed row away from the second.
"""

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, Engine, func, select

from service.db import db
from service.items.models import Item
from tests.db.conftest import add_item, stored_names

pytestmark = pytest.mark.anyio
ROW = "committed under isolation"


async def test_isolation_first_commits_through_the_app_and_a_script(
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


async def test_isolation_second_sees_nothing_of_the_first(engine: Engine) -> None:
    assert stored_names(engine) == set()


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


async def test_isolation_leaves_the_database_empty_afterwards(engine: Engine) -> None:
    assert stored_names(engine) == set()
