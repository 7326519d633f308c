"""service.db through PgBouncer in transaction pooling mode (1.18: no prepared statements of
its own), in both modes: many clients share two server connections, so consecutive
transactions of one client land on different server connections. psycopg2 works as it is;
asyncpg needs `DATABASE_PGBOUNCER=true` (no statement cache, unique statement names)."""

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from service.config import Settings
from service.db import create_engine
from service.db.asyncio import create_async_engine
from service.items.models import Item
from tests.conftest import TEST_TOKEN
from tests.db.conftest import Mode, client_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_pool_url(pgbouncer_url: str) -> str:
    """PgBouncer's alias of the test database with only 2 server connections."""
    return os.environ["TEST_PGBOUNCER_SMALL_POOL_URL"]


@pytest.fixture
async def bounced_engine(mode: Mode, small_pool_url: str) -> AsyncIterator[Any]:
    """An engine of `mode` through PgBouncer, configured as the service configures it."""
    settings = Settings(
        database_url=small_pool_url, database_pgbouncer=True, db_pool_size=8,
        db_max_overflow=0, api_tokens=TEST_TOKEN,
    )
    if mode.name == "sync":
        engine: Any = create_engine(settings.sync_database_url(), **settings.engine_args())
    else:
        engine = create_async_engine(settings.async_database_url(), **settings.async_engine_args())
    yield engine
    await mode.dispose(engine)


async def test_many_clients_on_two_server_connections(mode: Mode, bounced_engine: Any) -> None:
    app = mode.make_app(custom_engine=bounced_engine)

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, Any]:
        item = mode.add_item(name)
        await mode.flush()
        count = await mode.scalar(select(func.count()).select_from(Item))
        return {"id": item.id, "count": count}

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return {"name": await mode.scalar(select(Item.name).where(Item.id == item_id))}

    statuses: list[int] = []
    names: list[str | None] = []

    async def client_session(worker: int) -> None:
        for n in range(15):
            created = await client.post(f"/items/b{worker}-{n}")
            statuses.append(created.status_code)
            if created.status_code == 200:
                read = await client.get(f"/items/{created.json()['id']}")
                statuses.append(read.status_code)
                names.append(read.json().get("name"))

    async with client_for(app) as client, anyio.create_task_group() as tasks:
        for worker in range(8):
            tasks.start_soon(client_session, worker)
    assert set(statuses) == {200}
    assert len(names) == 8 * 15 and all(names)
