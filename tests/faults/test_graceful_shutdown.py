"""SIGTERM under load: uvicorn stops accepting connections, every request already in flight
is finished and answered - even one whose body is still arriving - and the process exits
with every connection back in the pool. Nothing is half-committed: the rows stored are
exactly the writes that were acknowledged.
"""

import asyncio
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from tests.conftest import AUTH, TEST_TOKEN
from tests.faults.live import served_in_process
from tests.items.helpers import stored

pytestmark = pytest.mark.anyio

WRITERS = 32
SLOW_UPLOADS = 8


class SlowUpload:
    """A POST whose body arrives in two halves, with the SIGTERM in between."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.body = f'{{"name": "{name}", "price": "3.00"}}'.encode()

    async def start(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(
            f"POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TEST_TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n".encode()
            + self.body[:10]
        )
        await self.writer.drain()

    async def finish(self) -> int:
        """Send the rest of the body; the response's status."""
        self.writer.write(self.body[10:])
        await self.writer.drain()
        status_line = await asyncio.wait_for(self.reader.readline(), 30)
        self.writer.close()
        return int(status_line.split()[1])


async def under_load(acknowledged: list[str]) -> None:
    while len(acknowledged) < 100:
        await asyncio.sleep(0.05)


async def test_sigterm_under_load_finishes_in_flight_requests_and_half_commits_nothing(
    migrated_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": migrated_url, "API_TOKENS": TEST_TOKEN, "LOG_LEVEL": "WARNING"}
    acknowledged: list[str] = []
    statuses: list[int] = []
    stop = asyncio.Event()

    async def write(writer: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
            n = 0
            while not stop.is_set():
                name = f"writer {writer} item {n}"
                n += 1
                try:
                    response = await http.post("/items", json={"name": name, "price": "1.00"})
                except httpx.TransportError:
                    return  # the server no longer takes this connection: never processed
                statuses.append(response.status_code)
                if response.status_code == 201:
                    acknowledged.append(name)

    with served_in_process(env, tmp_path / "server.log") as server:
        uploads = [SlowUpload(f"slow upload {n}") for n in range(SLOW_UPLOADS)]
        for upload in uploads:
            await upload.start(server.port)
        writers = [asyncio.create_task(write(n)) for n in range(WRITERS)]
        # Under load - and the half-sent uploads hold up no one (no connection slot).
        await asyncio.wait_for(under_load(acknowledged), 30)

        server.terminate()
        await asyncio.sleep(0.5)  # shutting down, waiting for the in-flight requests
        assert server.process.poll() is None, "exited with requests in flight"
        upload_statuses = [await upload.finish() for upload in uploads]
        acknowledged += [upload.name for upload in uploads]
        stop.set()
        await asyncio.gather(*writers)
        checked_out = await asyncio.to_thread(server.stopped)

    assert upload_statuses == [201] * SLOW_UPLOADS
    assert [status for status in statuses if status != 201] == []
    assert checked_out == 0
    assert sorted(row["name"] for row in stored(engine).values()) == sorted(acknowledged)
