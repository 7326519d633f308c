"""Who changed what: every item says who created it and who changed it last
(`created_by`, `updated_by`) - the principal of the request that did it, a JWT's `sub` or
`token:<label>`, taken by the service from `service.principal`, never from the client."""

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import Engine

from service.config import Settings
from service.db.asyncio import db as async_db
from service.items import service
from service.items.schemas import ItemCreate
from service.main import create_app
from service.principal import NoPrincipal, acting_as
from tests.conftest import AUTH
from tests.identity_provider import AUDIENCE, HS256_SECRET, ISSUER, hs256_token
from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio

BOB = {"Authorization": f"Bearer {hs256_token(sub='bob')}"}


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """API tokens (the client's default, `token:1`) and HS256 JWTs (`BOB`) side by side."""
    return create_app(settings.model_copy(update={
        "jwt_secret": SecretStr(HS256_SECRET), "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE,
    }))


@pytest.fixture
async def lamp(client: httpx.AsyncClient) -> AsyncIterator[dict[str, Any]]:
    response = await client.post("/items", json={"name": "Lamp", "price": "10.00"})
    assert response.status_code == 201, response.text
    yield response.json()


async def test_a_new_item_was_created_and_last_changed_by_its_creator(
    client: httpx.AsyncClient, engine: Engine, lamp: dict[str, Any]
) -> None:
    assert (lamp["created_by"], lamp["updated_by"]) == ("token:1", "token:1")
    row = stored(engine)[lamp["id"]]
    assert (row["created_by"], row["updated_by"]) == ("token:1", "token:1")
    # Every way of reading it says so.
    got = (await client.get(f"/items/{lamp['id']}")).json()
    [listed] = (await client.get("/items")).json()["items"]
    [scrolled] = (await client.get("/items/scroll")).json()["items"]
    for item in (got, listed, scrolled):
        assert (item["created_by"], item["updated_by"]) == ("token:1", "token:1")


async def test_an_update_records_who_made_it(
    client: httpx.AsyncClient, engine: Engine, lamp: dict[str, Any]
) -> None:
    response = await client.patch(
        f"/items/{lamp['id']}", json={"price": "12.00", "version": 1}, headers=BOB
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["created_by"], body["updated_by"], body["version"]) == ("token:1", "bob", 2)
    row = stored(engine)[lamp["id"]]
    assert (row["created_by"], row["updated_by"]) == ("token:1", "bob")


async def test_an_update_that_changes_nothing_records_nobody(
    client: httpx.AsyncClient, engine: Engine, lamp: dict[str, Any]
) -> None:
    response = await client.patch(
        f"/items/{lamp['id']}", json={"price": "10.00", "name": "Lamp", "version": 1},
        headers=BOB,
    )

    assert response.status_code == 200, response.text
    assert (response.json()["updated_by"], response.json()["version"]) == ("token:1", 1)
    assert stored(engine)[lamp["id"]]["updated_by"] == "token:1"


async def test_a_refused_update_records_nobody(
    client: httpx.AsyncClient, engine: Engine, lamp: dict[str, Any]
) -> None:
    stale = await client.patch(
        f"/items/{lamp['id']}", json={"price": "1.00", "version": 7}, headers=BOB
    )
    assert stale.status_code == 412
    assert stored(engine)[lamp["id"]]["updated_by"] == "token:1"


@pytest.mark.parametrize("field", ["created_by", "updated_by"])
async def test_a_client_cannot_say_who_it_is_in_the_body(
    client: httpx.AsyncClient, engine: Engine, field: str
) -> None:
    response = await client.post(
        "/items", json={"name": "Lamp", "price": "1", field: "mallory"}, headers=AUTH
    )
    assert response.status_code == 422
    assert stored(engine) == {}


async def test_rows_written_outside_the_service_say_unknown(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    [item_id] = insert_items(engine, {"name": "Kettle", "price": Decimal("5.00")})
    body = (await client.get(f"/items/{item_id}")).json()
    assert (body["created_by"], body["updated_by"]) == ("unknown", "unknown")


async def test_outside_a_request_a_write_must_say_who_makes_it(
    app: FastAPI, engine: Engine
) -> None:
    async with async_db():
        with pytest.raises(NoPrincipal):
            await service.create_item(ItemCreate(name="Lamp", price=Decimal("1")))
    assert stored(engine) == {}

    with acting_as("script:import"):
        async with async_db():
            await service.create_item(ItemCreate(name="Lamp", price=Decimal("1")))
    [row] = stored(engine).values()
    assert (row["created_by"], row["updated_by"]) == ("script:import", "script:import")
    await app.state.engine.dispose()
