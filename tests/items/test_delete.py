"""DELETE /items/{id}: 204, 404; If-Match is honoured when sent, not required."""

from decimal import Decimal

import httpx
import pytest
from sqlalchemy import Engine

from tests.items.conftest import CreateItem
from tests.items.helpers import stored

pytestmark = pytest.mark.anyio


async def test_delete_returns_204_and_the_item_is_gone(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    other = await create_item("Rug")

    response = await client.delete(f"/items/{item['id']}")

    assert response.status_code == 204
    assert response.content == b""
    assert list(stored(engine)) == [other["id"]]
    assert (await client.get(f"/items/{item['id']}")).status_code == 404


async def test_a_deleted_items_id_and_etag_never_come_back_on_a_new_item(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    """The newest item deleted, the next one gets a new id: a stale ETag of the deleted
    item is no precondition for someone else's (SQLite would reuse max(id) + 1)."""
    alice = await create_item("Alice chair")
    etag = (await client.get(f"/items/{alice['id']}")).headers["etag"]
    assert (await client.delete(f"/items/{alice['id']}")).status_code == 204

    bob = await create_item("Bob table", price="99.00")

    assert bob["id"] > alice["id"]
    assert (await client.get(f"/items/{alice['id']}")).status_code == 404
    stale = await client.patch(
        f"/items/{alice['id']}", json={"price": "0.01"}, headers={"If-Match": etag}
    )
    assert stale.status_code == 404
    assert [row["price"] for row in stored(engine).values()] == [Decimal("99.00")]


async def test_delete_of_an_unknown_item_returns_404(client: httpx.AsyncClient) -> None:
    response = await client.delete("/items/424242")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_deleting_twice_returns_404_the_second_time(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    await client.delete(f"/items/{item['id']}")

    response = await client.delete(f"/items/{item['id']}")

    assert response.status_code == 404


async def test_delete_with_current_if_match_deletes(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")

    response = await client.delete(
        f"/items/{item['id']}", headers={"If-Match": f'"{item["id"]}-1"'}
    )

    assert response.status_code == 204
    assert stored(engine) == {}


async def test_delete_with_stale_if_match_returns_412_and_keeps_the_item(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    await client.patch(f"/items/{item['id']}", json={"price": "2", "version": 1})

    response = await client.delete(
        f"/items/{item['id']}", headers={"If-Match": f'"{item["id"]}-1"'}
    )

    assert response.status_code == 412
    assert stored(engine)[item["id"]]["version"] == 2


async def test_delete_with_if_match_of_an_unknown_item_returns_404(
    client: httpx.AsyncClient,
) -> None:
    response = await client.delete("/items/424242", headers={"If-Match": '"424242-1"'})

    assert response.status_code == 404


async def test_an_if_match_version_beyond_any_stored_one_is_412_not_an_error(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    beyond = 2**63  # wider than the version column on every database

    response = await client.delete(
        f"/items/{item['id']}", headers={"If-Match": f'"{item["id"]}-{beyond}"'}
    )

    assert response.status_code == 412
    assert list(stored(engine)) == [item["id"]]
