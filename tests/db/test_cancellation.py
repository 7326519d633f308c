"""Requests cancelled at random points - while they wait for a slot, run statements, or
commit - never leave a connection checked out, never put one back in the pool in the
middle of a statement, and never make a later request fail. In both modes."""

import asyncio
import random
import time

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from service.items.models import Item
from tests.db.conftest import Mode, client_for, stored_names

pytestmark = pytest.mark.anyio

CANCELLED = 150
AFTERWARDS = 100


def busy_app(mode: Mode) -> FastAPI:
    """A route that writes, reads a few times (yielding to the loop between statements)
    and commits: many places for a cancellation to land."""
    app = mode.make_app()

    @app.post("/work/{n}")
    async def work(n: int) -> dict[str, int]:
        mode.add_item(f"work-{n}")
        await mode.flush()
        for _ in range(3):
            await mode.scalar(select(func.count()).select_from(Item))
            await asyncio.sleep(0)
        return {"n": n}

    return app


async def wait_until_returned(mode: Mode, seconds: float = 10) -> int:
    """Checked-out connections once the cancelled requests' shielded jobs have finished."""
    deadline = time.monotonic() + seconds
    while mode.checked_out() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return mode.checked_out()


async def test_random_cancellations_leave_no_connection_and_no_later_failure(
    mode: Mode, engine: object
) -> None:
    rng = random.Random(1234)
    app = busy_app(mode)
    async with client_for(app) as client:
        tasks = []
        for n in range(CANCELLED):
            task = asyncio.create_task(client.post(f"/work/{n}"))
            tasks.append(task)
            # Cancel after 0-5 ms: some before admission, some mid-statement, some
            # mid-commit, some after the response; and again 0-2 ms later, as when a
            # client hangs up and then the server shuts down, so clean-up is interrupted too.
            first = rng.uniform(0, 0.005)
            loop = asyncio.get_running_loop()
            loop.call_later(first, task.cancel)
            loop.call_later(first + rng.uniform(0, 0.002), task.cancel)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=60
        )
        cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert cancelled > CANCELLED // 3, f"only {cancelled} requests were cancelled"
        assert await wait_until_returned(mode) == 0

        statuses = [(await client.post(f"/work/{CANCELLED + n}")).status_code
                    for n in range(AFTERWARDS)]
    assert statuses == [200] * AFTERWARDS
    names = stored_names(engine)  # type: ignore[arg-type]
    assert {f"work-{CANCELLED + n}" for n in range(AFTERWARDS)} <= names
    assert mode.checked_out() == 0
