import threading

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
from sqlalchemy import text

from service.config import Settings
from service.db.asyncio import db
from service.main import close_engines, create_app

pytestmark = pytest.mark.anyio


async def test_live_answers_200(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_live_answers_while_every_worker_thread_is_busy(client: httpx.AsyncClient) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    saved, limiter.total_tokens = limiter.total_tokens, 1
    taken = anyio.Event()
    release = threading.Event()

    def occupy_the_only_thread() -> None:
        anyio.from_thread.run_sync(taken.set)
        release.wait(10)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(anyio.to_thread.run_sync, occupy_the_only_thread)
            try:
                with anyio.fail_after(5):
                    await taken.wait()
                with anyio.fail_after(2):
                    response = await client.get("/health/live")
            finally:
                release.set()
    finally:
        limiter.total_tokens = saved
    assert response.status_code == 200


async def test_ready_answers_200_when_the_database_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200


async def test_unknown_path_is_a_problem_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/no-such-thing")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


async def test_ready_answers_at_once_while_every_connection_slot_is_taken(
    settings: Settings,
) -> None:
    """A pool busy with requests is no outage: the probe has a connection of its own and
    never waits for a slot (it waited the pool timeout, then said 503)."""
    app = create_app(settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 5}
    ))
    inside, release = anyio.Event(), anyio.Event()

    async def hold_the_only_slot() -> dict[str, str]:
        await db.session.execute(text("SELECT 1"))
        inside.set()
        await release.wait()
        return {}

    app.add_api_route("/hold", hold_the_only_slot)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(client.get, "/hold")
        with anyio.fail_after(5):
            await inside.wait()
        try:
            with anyio.fail_after(2):
                ready = await client.get("/health/ready")
        finally:
            release.set()
    await close_engines(app)
    assert ready.status_code == 200
