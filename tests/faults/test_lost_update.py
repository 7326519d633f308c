"""The lost-update race: many clients update the same item from the same version at once.
Optimistic concurrency must let exactly one through; the others get 412 and change nothing."""

import asyncio
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import Engine

from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio

CLIENTS = 50


@pytest.mark.parametrize("precondition", ["If-Match", "body version"])
async def test_fifty_concurrent_patches_of_one_version_exactly_one_wins(
    client: httpx.AsyncClient, engine: Engine, precondition: str
) -> None:
    [lamp] = insert_items(engine, {"name": "Lamp", "price": Decimal("1.00")})

    def patch(n: int) -> "asyncio.Future[httpx.Response]":
        price = f"{100 + n}.00"
        if precondition == "If-Match":
            request = client.patch(
                f"/items/{lamp}", json={"price": price}, headers={"If-Match": f'"{lamp}-1"'}
            )
        else:
            request = client.patch(f"/items/{lamp}", json={"price": price, "version": 1})
        return asyncio.ensure_future(request)

    responses = await asyncio.gather(*(patch(n) for n in range(CLIENTS)))

    statuses = [response.status_code for response in responses]
    assert sorted(statuses) == [200] + [412] * (CLIENTS - 1)
    [winner] = [response.json() for response in responses if response.status_code == 200]
    for response in responses:
        if response.status_code == 412:
            assert response.json()["status"] == 412
    row = stored(engine)[lamp]
    assert (row["price"], row["version"]) == (Decimal(winner["price"]), 2)
    assert winner["version"] == 2
