"""The database goes away while the service runs: every request that needs it fails fast
(503 problem, Retry-After) instead of hanging until the client gives up; the liveness
probe stays up while readiness reports the outage; when the database is back the next
requests succeed, without restarting the service and without a stale connection error.
"""

import logging
import socket
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import Engine

from bench.harness import free_port
from service.config import Settings
from service.db.asyncio import engine as async_engine
from service.main import create_app
from tests.conftest import AUTH, TEST_TOKEN
from tests.faults.conftest import PostgresServer
from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio

FAIL_WITHIN = 2.0  # seconds


def assert_unavailable(response: httpx.Response, elapsed: float) -> None:
    assert response.status_code == 503, response.text
    assert elapsed < FAIL_WITHIN, f"took {elapsed:.2f} s"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert (body["status"], body["title"]) == (503, "Service Unavailable")


async def timed(client: httpx.AsyncClient, method: str, path: str, **kwargs: object) -> tuple[
    httpx.Response, float
]:
    started = time.perf_counter()
    response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    return response, time.perf_counter() - started


def requests_for(item_id: int) -> list[tuple[str, str, dict[str, object]]]:
    """One of every operation that touches the database."""
    return [
        ("GET", "/items", {}),
        ("GET", "/items/scroll", {}),
        ("GET", f"/items/{item_id}", {}),
        ("POST", "/items", {"json": {"name": "Rug", "price": "5"}}),
        ("PATCH", f"/items/{item_id}", {"json": {"price": "2"}, "headers": {"If-Match": "*"}}),
        ("DELETE", f"/items/{item_id}", {}),
    ]


async def test_database_stopped_answers_503_fast_and_recovers_without_a_restart(
    client: httpx.AsyncClient, engine: Engine, postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [lamp] = insert_items(engine, {"name": "Lamp", "price": Decimal("9.90")})
    assert (await client.get("/items")).status_code == 200  # the pool holds connections now

    postgres_server.stop()
    for method, path, kwargs in requests_for(lamp) * 2:
        response, elapsed = await timed(client, method, path, **kwargs)
        assert_unavailable(response, elapsed)
    with caplog.at_level(logging.WARNING, logger="service.health"):
        ready, elapsed = await timed(client, "GET", "/health/ready")
    assert ready.status_code == 503 and elapsed < FAIL_WITHIN
    assert ready.headers["content-type"] == "application/problem+json"
    assert ready.headers["retry-after"] == "1"
    # The on-call engineer reads why, once per failed probe.
    assert any("readiness: the primary did not answer" in r.getMessage() for r in caplog.records)
    assert (await client.get("/health/live")).status_code == 200

    postgres_server.start()
    assert (await client.get("/health/ready")).status_code == 200
    statuses = []
    for method, path, kwargs in requests_for(lamp):
        response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
        statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 201, 200, 204]
    engine.dispose()  # the test's own engine, which has no pre-ping
    assert [row["name"] for row in stored(engine).values()] == ["Rug"]


async def test_database_restarted_between_requests_is_invisible_to_clients(
    client: httpx.AsyncClient, engine: Engine, postgres_server: PostgresServer
) -> None:
    """Every pooled connection dies with the restart; pre-ping replaces them unseen."""
    for n in range(10):
        created = await client.post("/items", json={"name": f"Lamp {n}", "price": "1"})
        assert created.status_code == 201

    postgres_server.stop()
    postgres_server.start()

    responses = [await client.get("/items") for _ in range(10)]
    responses += [
        await client.post("/items", json={"name": f"Rug {n}", "price": "1"}) for n in range(10)
    ]
    assert {r.status_code for r in responses} <= {200, 201}, [r.text for r in responses]
    engine.dispose()  # the test's own engine, which has no pre-ping
    assert len(stored(engine)) == 20


async def test_a_database_that_hangs_fails_an_idle_connections_ping_within_the_connect_timeout(
    client: httpx.AsyncClient, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops answering (a frozen VM, a partition) while a connection sits idle
    in the pool: its ping at checkout waits DB_CONNECT_TIMEOUT, not the statement timeout
    (DB_STATEMENT_TIMEOUT + 2 s = 12 s), then one connect attempt fails the same way: a 503
    in about two connect timeouts, not fourteen seconds."""
    assert (await client.get("/items")).status_code == 200  # a connection, back in the pool
    monkeypatch.setattr(async_engine, "PING_AFTER_IDLE", 0.0)  # idle long enough to ping

    with postgres_server.frozen():
        response, elapsed = await timed(client, "GET", "/items")

    timeout = Settings.model_fields["db_connect_timeout"].default
    statement_timeout = Settings.model_fields["db_statement_timeout"].default
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert elapsed < 2 * timeout + 1.5 < statement_timeout, f"took {elapsed:.2f} s"
    assert (await client.get("/items")).status_code == 200  # going on again: served


# -- an unreachable database: no server of ours needed, so these run in both passes --


SILENT_FOR = 15.0  # seconds; far beyond DB_CONNECT_TIMEOUT


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word: a hung database host.
    It hangs up after SILENT_FOR seconds, so that a client without a timeout of its own
    fails the test (too slow) instead of hanging it: a request blocked in a worker thread
    cannot be cancelled."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    hang_ups: list[threading.Timer] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection = listener.accept()[0]
            except TimeoutError:
                continue
            accepted.append(connection)
            hang_up = threading.Timer(SILENT_FOR, connection.close)
            hang_up.start()
            hang_ups.append(hang_up)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for hang_up in hang_ups:
            hang_up.cancel()
        for connection in accepted:
            connection.close()
        listener.close()


def app_on(url: str) -> httpx.AsyncClient:
    app = create_app(Settings(database_url=url, api_tokens=TEST_TOKEN))  # type: ignore[arg-type]
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH
    )


async def test_unreachable_database_answers_503_fast_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"postgresql+psycopg2://app:s3cret-pw@127.0.0.1:{free_port()}/service"
    with caplog.at_level(logging.DEBUG):
        async with app_on(url) as client:
            for method, path, kwargs in requests_for(1):
                response, elapsed = await timed(client, method, path, **kwargs)
                assert_unavailable(response, elapsed)
                assert "s3cret-pw" not in response.text
            assert (await client.get("/health/ready")).status_code == 503
            assert (await client.get("/health/live")).status_code == 200
    assert "s3cret-pw" not in caplog.text
    assert "database unavailable" in caplog.text  # the operator still learns why


async def test_a_database_host_that_never_answers_gives_503_after_the_connect_timeout(
    silent_server: int,
) -> None:
    """libpq's connect_timeout (DB_CONNECT_TIMEOUT, default 2 s; libpq counts anything
    below 2 as 2) bounds the wait; without it the request would hang for minutes. It is
    that timeout that ends the wait, not a refused connection, which fails in milliseconds:
    libpq 17 waits the full timeout, older ones count whole seconds of the clock and may
    stop up to one second early."""
    timeout = Settings.model_fields["db_connect_timeout"].default
    async with app_on(f"postgresql+psycopg2://app@127.0.0.1:{silent_server}/service") as client:
        response, elapsed = await timed(client, "GET", "/items")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert timeout - 1 <= elapsed < timeout + 1, f"took {elapsed:.2f} s"
