import threading

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest

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
