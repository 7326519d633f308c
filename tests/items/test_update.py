"""PATCH /items/{id}: partial updates under optimistic concurrency.

A client names the version it read - `If-Match: "<id>-<version>"` or `"version": n` in the
body. No precondition: 428. A stale one: 412. Either way nothing changes.
"""

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, Engine, event, update
from sqlalchemy.orm import Mapper

from service.db.asyncio import db as async_db
from service.items import dao, service
from service.items.models import Item
from service.items.schemas import ItemUpdate
from service.items.service import ANY_VERSION
from service.principal import acting_as
from tests.conftest import AUTH
from tests.items.conftest import CreateItem
from tests.items.helpers import stored

pytestmark = pytest.mark.anyio


async def test_patch_with_if_match_changes_only_the_sent_fields_and_bumps_the_version(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="10.00", description="Brass.")

    response = await client.patch(
        f"/items/{item['id']}", json={"price": "12.5"}, headers={"If-Match": f'"{item["id"]}-1"'}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["price"] == "12.50"
    assert body["version"] == 2
    assert response.headers["etag"] == f'"{item["id"]}-2"'
    assert (body["name"], body["description"]) == ("Lamp", "Brass.")
    assert body["created_at"] == item["created_at"]
    assert body["updated_at"] > item["updated_at"]
    row = stored(engine)[item["id"]]
    assert (row["price"], row["version"], row["description"]) == (Decimal("12.50"), 2, "Brass.")


async def test_patch_with_the_version_in_the_body_updates(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")

    response = await client.patch(
        f"/items/{item['id']}", json={"name": " Floor lamp ", "version": 1}
    )

    assert response.status_code == 200
    assert response.json()["name"] == "Floor lamp"
    assert response.json()["version"] == 2
    assert stored(engine)[item["id"]]["name"] == "Floor lamp"


async def test_each_update_bumps_the_version_and_the_etag_follows(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    etag = f'"{item["id"]}-1"'

    for price in ("2", "3", "4"):
        response = await client.patch(
            f"/items/{item['id']}", json={"price": price}, headers={"If-Match": etag}
        )
        assert response.status_code == 200
        etag = response.headers["etag"]

    assert etag == f'"{item["id"]}-4"'
    assert (await client.get(f"/items/{item['id']}")).headers["etag"] == etag


async def test_patch_with_stale_if_match_returns_412_and_changes_nothing(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="10.00")
    first = await client.patch(
        f"/items/{item['id']}", json={"price": "11"}, headers={"If-Match": f'"{item["id"]}-1"'}
    )
    assert first.status_code == 200

    response = await client.patch(
        f"/items/{item['id']}", json={"price": "99"}, headers={"If-Match": f'"{item["id"]}-1"'}
    )

    assert response.status_code == 412
    assert response.headers["content-type"] == "application/problem+json"
    assert "version 2" in response.json()["detail"]
    row = stored(engine)[item["id"]]
    assert (row["price"], row["version"]) == (Decimal("11.00"), 2)


async def test_patch_with_stale_body_version_returns_412_and_changes_nothing(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="10.00")
    first = await client.patch(f"/items/{item['id']}", json={"price": "11", "version": 1})
    assert first.status_code == 200

    response = await client.patch(f"/items/{item['id']}", json={"name": "Other", "version": 1})

    assert response.status_code == 412
    row = stored(engine)[item["id"]]
    assert (row["name"], row["price"], row["version"]) == ("Lamp", Decimal("11.00"), 2)


async def test_patch_without_a_precondition_returns_428_and_changes_nothing(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="10.00")

    response = await client.patch(f"/items/{item['id']}", json={"price": "99"})

    assert response.status_code == 428
    assert response.json()["title"] == "Precondition Required"
    assert "If-Match" in response.json()["detail"]
    assert stored(engine)[item["id"]]["price"] == Decimal("10.00")


async def test_patch_with_if_match_star_updates_whatever_the_version(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    await client.patch(f"/items/{item['id']}", json={"price": "2", "version": 1})

    response = await client.patch(
        f"/items/{item['id']}", json={"price": "3"}, headers={"If-Match": "*"}
    )

    assert response.status_code == 200
    assert response.json()["version"] == 3


async def test_patch_with_a_list_of_etags_updates_if_one_is_current(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    tags = f'"{item["id"]}-7", "{item["id"]}-1"'

    response = await client.patch(
        f"/items/{item['id']}", json={"price": "3"}, headers={"If-Match": tags}
    )

    assert response.status_code == 200


async def test_if_match_sent_on_two_lines_is_one_list(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    """RFC 9110 5.3: the lines joined; FastAPI alone reads the last line only."""
    item = await create_item("Lamp")
    current, stale = f'"{item["id"]}-1"', f'"{item["id"]}-7"'

    response = await client.patch(
        f"/items/{item['id']}", json={"price": "3"},
        headers=[("If-Match", current), ("If-Match", stale)],
    )

    assert response.status_code == 200


@pytest.mark.parametrize(
    "if_match",
    ['W/"{id}-1"', '"{other}-1"', "{id}-1", "garbage", '""', '"0{id}-1"', '"{id}-01"'],
    # An entity tag is compared as a string: "047-001" is not "47-1".
    ids=["weak", "other item", "unquoted", "garbage", "empty", "zero-id", "zero-version"],
)
async def test_patch_with_an_if_match_that_is_not_this_items_etag_returns_412(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem, if_match: str
) -> None:
    item = await create_item("Lamp", price="10.00")
    header = if_match.format(id=item["id"], other=item["id"] + 1)

    response = await client.patch(
        f"/items/{item['id']}", json={"price": "99"}, headers={"If-Match": header}
    )

    assert response.status_code == 412
    assert stored(engine)[item["id"]]["price"] == Decimal("10.00")


async def test_patch_with_current_if_match_but_stale_body_version_returns_412(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="10.00")
    await client.patch(f"/items/{item['id']}", json={"price": "11", "version": 1})

    response = await client.patch(
        f"/items/{item['id']}",
        json={"price": "99", "version": 1},
        headers={"If-Match": f'"{item["id"]}-2"'},
    )

    assert response.status_code == 412
    assert stored(engine)[item["id"]]["price"] == Decimal("11.00")


@pytest.mark.parametrize("new_name", ["Teapot", "TEAPOT", " teapot "])
async def test_patch_renaming_to_a_taken_name_returns_409_and_changes_nothing(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem, new_name: str
) -> None:
    await create_item("Teapot")
    lamp = await create_item("Lamp", price="10.00")

    response = await client.patch(
        f"/items/{lamp['id']}", json={"name": new_name, "price": "5", "version": 1}
    )

    assert response.status_code == 409
    assert "exists already" in response.json()["detail"]
    row = stored(engine)[lamp["id"]]
    assert (row["name"], row["price"], row["version"]) == ("Lamp", Decimal("10.00"), 1)


async def test_patch_may_change_the_case_of_the_items_own_name(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("lamp")

    response = await client.patch(f"/items/{item['id']}", json={"name": "LAMP", "version": 1})

    assert response.status_code == 200
    assert response.json()["name"] == "LAMP"


async def test_patch_with_description_null_clears_it(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", description="Brass.")

    response = await client.patch(
        f"/items/{item['id']}", json={"description": None, "version": 1}
    )

    assert response.status_code == 200
    assert response.json()["description"] is None
    assert stored(engine)[item["id"]]["description"] is None


async def test_patch_with_only_a_precondition_changes_nothing_and_keeps_the_version(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")

    response = await client.patch(f"/items/{item['id']}", json={"version": 1})

    assert response.status_code == 200
    assert response.json() == item
    assert response.headers["etag"] == f'"{item["id"]}-1"'


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": None}, "name"),
        ({"name": ""}, "name"),
        ({"price": None}, "price"),
        ({"price": "1.999"}, "price"),
        ({"price": "-1"}, "price"),
        ({"price": "NaN"}, "price"),
        ({"version": 0}, "version"),
        ({"version": "one"}, "version"),
        ({"version": True}, "version"),
        ({"version": "1"}, "version"),
        ({"name": "\u200b"}, "name"),
        ({"price": "1_0"}, "price"),
        ({"id": 5}, "id"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_patch_with_invalid_input_returns_422_and_changes_nothing(
    client: httpx.AsyncClient,
    engine: Engine,
    create_item: CreateItem,
    body: dict[str, Any],
    field: str,
) -> None:
    item = await create_item("Lamp", price="10.00")

    response = await client.patch(
        f"/items/{item['id']}", json=body, headers={"If-Match": f'"{item["id"]}-1"'}
    )

    assert response.status_code == 422
    assert ["body", field] in [error["loc"] for error in response.json()["errors"]]
    row = stored(engine)[item["id"]]
    assert (row["name"], row["price"], row["version"]) == ("Lamp", Decimal("10.00"), 1)


async def test_patch_of_an_unknown_item_returns_404(client: httpx.AsyncClient) -> None:
    response = await client.patch("/items/424242", json={"price": "1", "version": 1})

    assert response.status_code == 404


async def test_patch_is_two_queries(
    client: httpx.AsyncClient, create_item: CreateItem, assert_max_queries: Any
) -> None:
    item = await create_item("Lamp")

    with assert_max_queries(2) as statements:  # SELECT, UPDATE ... WHERE version = 1
        response = await client.patch(f"/items/{item['id']}", json={"price": "2", "version": 1})

    assert response.status_code == 200
    assert "version" in statements[-1] and statements[-1].startswith("UPDATE")


@contextmanager
def another_writer_between_check_and_update() -> Iterator[None]:
    """Another writer bumps the item's version after the PATCH checked it and before its
    UPDATE runs (on the PATCH's own transaction, so it is deterministic on any backend)."""

    def bump(mapper: Mapper[Item], connection: Connection, target: Item) -> None:
        table = Item.__table__
        connection.execute(
            update(table)
            .where(table.c.id == target.id)
            .values(version=table.c.version + 1, price=Decimal("77.00"))
        )

    event.listen(Item, "before_update", bump)
    try:
        yield
    finally:
        event.remove(Item, "before_update", bump)


async def test_patch_that_loses_the_race_after_its_check_returns_412_and_changes_nothing(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="10.00")

    with another_writer_between_check_and_update():
        response = await client.patch(
            f"/items/{item['id']}", json={"price": "20", "version": 1}
        )

    assert response.status_code == 412
    assert "changed by another request" in response.json()["detail"]
    row = stored(engine)[item["id"]]
    assert (row["price"], row["version"]) == (Decimal("10.00"), 1)


async def ten_concurrent_patches(
    app: FastAPI, if_match: Callable[[dict[str, Any]], str]
) -> list[httpx.Response]:
    """A new item, then ten PATCHes of its price (10.00 .. 19.00) sent at once, each with
    the header `if_match(item)`."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=AUTH
    ) as client:
        item = (await client.post("/items", json={"name": "Lamp", "price": "1"})).json()
        return await asyncio.gather(
            *(
                client.patch(
                    f"/items/{item['id']}",
                    json={"price": f"{n}.00"},
                    headers={"If-Match": if_match(item)},
                )
                for n in range(10, 20)
            )
        )


async def test_ten_concurrent_patches_with_the_same_version_exactly_one_wins(
    app: FastAPI, engine: Engine
) -> None:
    responses = await ten_concurrent_patches(app, lambda item: f'"{item["id"]}-1"')

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [412] * 9
    winner = next(response.json() for response in responses if response.status_code == 200)
    row = stored(engine)[winner["id"]]
    assert (row["price"], row["version"]) == (Decimal(winner["price"]), 2)


async def test_ten_concurrent_patches_with_if_match_star_all_apply(
    app: FastAPI, engine: Engine
) -> None:
    responses = await ten_concurrent_patches(app, lambda item: "*")

    assert [response.status_code for response in responses] == [200] * 10
    # Each one applied on top of the one before it: ten versions after the first.
    assert sorted(response.json()["version"] for response in responses) == list(range(2, 12))
    last = max((response.json() for response in responses), key=lambda body: body["version"])
    row = stored(engine)[last["id"]]
    assert (row["price"], row["version"]) == (Decimal(last["price"]), 11)


async def test_if_match_star_applies_over_a_copy_the_session_already_holds(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem
) -> None:
    item = await create_item("Lamp", price="1.00")
    async with async_db():  # e.g. a job that read the item earlier in its session
        held = await dao.get(item["id"])
        assert held is not None and held.version == 1
        await async_db.session.commit()  # the copy stays, as read (expire_on_commit=False)
        with engine.begin() as connection:  # someone else updates it meanwhile
            table = Item.__table__
            connection.execute(
                update(table).where(table.c.id == item["id"]).values(version=table.c.version + 1)
            )

        with acting_as("job"):
            changed = await service.update_item(
                item["id"], ItemUpdate(price=Decimal("3.00")), ANY_VERSION
            )

    assert changed.version == 3
    row = stored(engine)[item["id"]]
    assert (row["price"], row["version"]) == (Decimal("3.00"), 3)
