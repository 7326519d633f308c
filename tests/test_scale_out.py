"""The service past one process and one server (issue #14): read replicas with
read-your-writes, `serve --workers N`, on the real primary and streaming standby that
`scripts/with-postgres.sh --replica` starts. Which server answered is read from the servers'
own statistics (`pg_stat_user_tables`: each server counts the scans of `items` it ran)."""

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, make_url, text

from bench.harness import ServerProcess, free_port
from service.config import Settings
from service.db.asyncio import db
from service.db.consistency import HEADER
from service.db.replicas import poll_url
from service.main import close_engines, create_app
from tests.conftest import AUTH, ROOT, TEST_TOKEN, starlette_client
from tests.items.helpers import insert_items
from tests.standby import Standby

pytestmark = pytest.mark.anyio

CURSOR_SECRET = "scale-out-test-secret-0123456789abcdef"


def items_scans(engine: Engine) -> int:
    """Scans of the items table the server behind `engine` has counted (its own statistics,
    read on a new connection so the snapshot is fresh)."""
    with engine.connect() as connection:
        return int(connection.scalar(text(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE relname = 'items'"
        )))


def wait_for_scans(engine: Engine, at_least: int, timeout: float = 15.0) -> int:
    """Statistics reach the server when its backends report them (at the latest when they
    exit): wait until `engine`'s server counts `at_least` scans; returns its count."""
    deadline = time.monotonic() + timeout
    while (scans := items_scans(engine)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return scans


def settled_scans(engine: Engine, quiet: float = 0.5, timeout: float = 15.0) -> int:
    """`items_scans` once it has stopped changing for `quiet` seconds: the backends that
    exited just before have reported theirs."""
    deadline = time.monotonic() + timeout
    scans = items_scans(engine)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if (now := items_scans(engine)) == scans:
            break
        scans = now
    return scans


def replicated_settings(migrated_url: str, standby: Standby, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": migrated_url,
        "database_replica_urls": [standby.url],
        "replica_poll_interval": 0.1,
        "db_pool_size": 5,
        "db_max_overflow": 10,
        "api_tokens": TEST_TOKEN,
        "cursor_secret": CURSOR_SECRET,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def replicated_app(migrated_url: str, standby: Standby) -> AsyncIterator[FastAPI]:
    # A paused standby stays usable for a long time: the token alone must keep reads fresh.
    app = create_app(replicated_settings(migrated_url, standby, replica_max_lag=300))
    assert app.state.replicas.wait_until_polled()
    yield app
    await close_engines(app)


@pytest.fixture
async def replicated_client(replicated_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=replicated_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 headers=AUTH) as client:
        yield client


async def test_items_are_read_from_the_replica_and_written_on_the_primary(
    replicated_app: FastAPI, replicated_client: httpx.AsyncClient, standby: Standby,
    engine: Engine,
) -> None:
    created = await replicated_client.post("/items", json={"name": "replicated", "price": "2"})
    assert created.status_code == 201
    assert created.headers[HEADER]
    standby.catch_up(engine)
    time.sleep(0.3)  # the poller sees the standby caught up
    # The POST's backend reports its own scans when it exits: let it, before the baseline.
    # Idle backends of earlier tests (PgBouncer's among them) report theirs up to 10 s
    # after their last work (PostgreSQL's PGSTAT_IDLE_INTERVAL): a count unchanged for 11 s
    # holds them all (35 late scans once landed in the window with a 0.5 s wait).
    await replicated_app.state.engine.dispose()
    on_primary, on_standby = settled_scans(engine, quiet=11, timeout=60), items_scans(
        standby.engine
    )
    item = f"/items/{created.json()['id']}"
    for _ in range(20):
        assert (await replicated_client.get(item)).status_code == 200
        assert (await replicated_client.get("/items/scroll?size=5")).status_code == 200
    await close_engines(replicated_app)  # the backends exit and report their statistics
    assert wait_for_scans(standby.engine, on_standby + 40) >= on_standby + 40
    # Reads on the primary would add 40 scans there. Other backends of this test run report
    # their statistics late (an idle one up to 10 s after its work), so a few scans of
    # earlier tests can land in this window: allow them, well below the 40.
    assert items_scans(engine) - on_primary < 20


async def test_the_replicas_pools_are_in_the_pool_metrics(
    replicated_client: httpx.AsyncClient, standby: Standby
) -> None:
    """`db_pool_connections` shows each replica's pool beside the primary's (the replica's
    `database` label is `db@host:port/database`): reads open connections there."""
    assert (await replicated_client.get("/items/scroll?size=5")).status_code == 200
    metrics = (await replicated_client.get("/metrics")).text
    replica = make_url(standby.url)
    label = f"db@{replica.host}:{replica.port}/{replica.database}"
    idle = re.search(
        rf'^db_pool_connections{{database="{re.escape(label)}",state="idle"}} (\S+)$',
        metrics, re.MULTILINE,
    )
    assert idle is not None, metrics
    assert float(idle[1]) >= 1
    assert re.search(r'^db_pool_connections{database="db",state="idle"}', metrics, re.M)


async def test_a_writer_reads_its_write_with_its_token_while_replay_is_paused(
    replicated_client: httpx.AsyncClient, standby: Standby
) -> None:
    standby.pause_replay()
    stale = 0
    for n in range(200):
        created = await replicated_client.post("/items", json={"name": f"p{n}", "price": "1"})
        assert created.status_code == 201
        read = await replicated_client.get(
            created.headers["Location"], headers={HEADER: created.headers[HEADER]}
        )
        stale += read.status_code == 404
    without_token = await replicated_client.get(created.headers["Location"])
    assert stale == 0
    assert without_token.status_code == 404  # the paused replica answered: it lacks the item


async def test_a_forged_token_is_a_400_problem(replicated_client: httpx.AsyncClient) -> None:
    created = await replicated_client.post("/items", json={"name": "forged", "price": "1"})
    token = created.headers[HEADER]
    position, _, signature = token.partition(".")
    forged = f"{int(position, 16) + 1:x}.{signature}"
    for bad in (forged, "not-a-token", token + "x"):
        response = await replicated_client.get("/items", headers={HEADER: bad})
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 400
    # An empty header is no token, not a malformed one.
    for empty in ("", " "):
        assert (await replicated_client.get("/items", headers={HEADER: empty})).status_code == 200


async def test_probes_metrics_and_docs_never_read_the_token(
    replicated_client: httpx.AsyncClient,
) -> None:
    # A client's stale or broken token must not make the service look down to its probes.
    for path in ("/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs"):
        response = await replicated_client.get(path, headers={HEADER: "not-a-token"})
        assert response.status_code == 200, path
    refused = await replicated_client.get("/items", headers={HEADER: "not-a-token"})
    assert refused.status_code == 400


async def test_ready_reports_the_replicas_and_a_replica_down_is_degraded_not_unready(
    replicated_client: httpx.AsyncClient, standby: Standby
) -> None:
    ready = await replicated_client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ok"
    assert ready.json()["primary"] == "ok"
    assert [r["state"] for r in ready.json()["replicas"]] == ["ok"]
    standby.stop()
    deadline = time.monotonic() + 2
    while (ready := await replicated_client.get("/health/ready")).json()["status"] == "ok":
        assert time.monotonic() < deadline, "a stopped replica still reported ok after 2 s"
        time.sleep(0.05)
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert [r["state"] for r in ready.json()["replicas"]] == ["down"]
    items = await replicated_client.get("/items")  # reads go on, on the primary
    assert items.status_code == 200


async def test_a_replica_stopped_under_load_costs_no_error_and_is_used_again_after(
    replicated_app: FastAPI, replicated_client: httpx.AsyncClient, standby: Standby,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    statuses: list[int] = []
    slow_after_the_stop: list[float] = []
    stop_load = anyio.Event()
    stopped_at = float("inf")

    async def reader() -> None:
        while not stop_load.is_set():
            started = time.monotonic()
            response = await replicated_client.get("/items/scroll?size=5")
            statuses.append(response.status_code)
            if started > stopped_at + 2:
                slow_after_the_stop.append(time.monotonic() - started)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tasks:
        for _ in range(4):
            tasks.start_soon(reader)
        await anyio.sleep(0.5)
        stopped_at = time.monotonic()
        await anyio.to_thread.run_sync(standby.stop)
        await anyio.sleep(3)
        stop_load.set()
    assert set(statuses) == {200}
    assert slow_after_the_stop and max(slow_after_the_stop) < 1.0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []

    await anyio.to_thread.run_sync(standby.start)
    deadline = time.monotonic() + 10
    while replicated_app.state.replicas.status()["replicas"][0]["state"] != "ok":
        assert time.monotonic() < deadline, "the restarted replica was not used again"
        await anyio.sleep(0.1)
    # Read from again: with its replay paused, it lacks a new item (no token sent), so a
    # 404 can only come from it. A replica read may still be given up on now and then, and
    # rerun on the primary (a 200): slower than REPLICA_READ_TIMEOUT on a freshly started
    # server, or waiting for a lock that replay, paused, holds. Replay goes on between tries.
    caplog.set_level(logging.INFO)
    reads = []
    for attempt in range(5):
        standby.pause_replay()
        created = await replicated_client.post("/items", json={"name": f"after{attempt}",
                                                               "price": "1"})
        reads.append((await replicated_client.get(created.headers["Location"])).status_code)
        if reads[-1] == 404:
            break
        standby.resume_replay()
    assert reads[-1] == 404, (reads, [r.getMessage() for r in caplog.records])


async def test_a_replica_that_hangs_is_left_for_the_primary_without_errors(
    replicated_app: FastAPI, replicated_client: httpx.AsyncClient, standby: Standby,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    statuses: list[int] = []
    slow_after_the_freeze: list[float] = []
    stop = anyio.Event()

    async def reader() -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = await replicated_client.get("/items/scroll?size=5")
            statuses.append(response.status_code)
            if started > frozen_at + 2.5:  # by then the poller has given up on the replica
                slow_after_the_freeze.append(time.monotonic() - started)
            await anyio.sleep(0.01)

    async def in_flight_at_the_freeze() -> None:  # started as the replica stopped answering
        started = time.monotonic()
        response = await replicated_client.get("/items/scroll?size=5")
        statuses.append(response.status_code)
        waited_in_flight.append(time.monotonic() - started)

    waited_in_flight: list[float] = []
    states: list[str] = []
    frozen_at = float("inf")
    async with anyio.create_task_group() as tasks:
        for _ in range(4):
            tasks.start_soon(reader)
        await anyio.sleep(0.5)
        with standby.frozen():
            frozen_at = time.monotonic()
            for _ in range(4):
                tasks.start_soon(in_flight_at_the_freeze)
            await anyio.sleep(5)
            states.append(replicated_app.state.replicas.status()["replicas"][0]["state"])
            stop.set()
    assert set(statuses) == {200}
    # A read the replica never answers is given up after REPLICA_READ_TIMEOUT (2 s), not
    # after that and asyncpg's graceful close of the connection (another timeout).
    timeout = replicated_app.state.settings.replica_read_timeout
    assert len(waited_in_flight) == 4 and max(waited_in_flight) < timeout + 1.0
    # Nothing issued after the replica was given up on waited for it: the primary served.
    assert slow_after_the_freeze and max(slow_after_the_freeze) < 1.0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    # Reported as not answering (not "lagging", behind by 0 s), and said so in the log.
    assert states == ["down"]
    assert any("is not answering" in r.getMessage() or "failed a read" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    deadline = time.monotonic() + 5
    while replicated_app.state.replicas.status()["replicas"][0]["state"] != "ok":
        assert time.monotonic() < deadline, "the thawed replica was not used again"
        await anyio.sleep(0.1)


async def test_a_read_slower_than_the_replica_timeout_runs_on_the_primary_and_keeps_the_replica(
    migrated_url: str, standby: Standby, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica cancels it itself (its statement_timeout): nothing of it keeps running
    there, and the replica - which answered - stays in use."""
    app = create_app(replicated_settings(migrated_url, standby, replica_read_timeout=0.5))

    @app.get("/report")
    async def report() -> dict[str, bool]:
        in_recovery = await db.session.scalar(text("SELECT pg_is_in_recovery() FROM pg_sleep(1)"))
        return {"on_a_replica": bool(in_recovery)}

    @app.get("/quick")
    async def quick() -> dict[str, bool]:
        return {"on_a_replica": bool(await db.session.scalar(text("SELECT pg_is_in_recovery()")))}

    assert app.state.replicas.wait_until_polled()
    caplog.set_level(logging.INFO, logger="service.db")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/quick")).json() == {"on_a_replica": True}
            slow = await client.get("/report")
            assert (slow.status_code, slow.json()) == (200, {"on_a_replica": False})
            assert app.state.replicas.status()["replicas"][0]["state"] == "ok"
            assert (await client.get("/quick")).json() == {"on_a_replica": True}
    finally:
        await close_engines(app)
    with standby.engine.connect() as connection:
        assert connection.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%FROM pg_sleep(1)%' "
            "AND state = 'active' AND pid <> pg_backend_pid()")) == 0
    assert any("cancelled a read" in r.getMessage() for r in caplog.records)
    assert not any("failed a read" in r.getMessage() for r in caplog.records)


async def test_without_replicas_there_is_no_token(client: httpx.AsyncClient) -> None:
    created = await client.post("/items", json={"name": "single", "price": "1"})
    assert created.status_code == 201
    assert HEADER not in created.headers
    assert (await client.get("/health/ready")).json() == {"status": "ok"}


# -- many processes -----------------------------------------------------------------------


def serve_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("how", ["--workers", "WEB_CONCURRENCY"])
def test_several_workers_without_a_cursor_secret_refuse_to_start(
    migrated_url: str, how: str
) -> None:
    env = {"DATABASE_URL": migrated_url}
    args: tuple[str, ...] = ()
    if how == "--workers":
        args = ("--workers", "2")
    else:
        env["WEB_CONCURRENCY"] = "2"
    result = serve_cli(env, *args)
    assert result.returncode == 2
    assert "CURSOR_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "secret", ["", "short", " " * 20, "  short padded  " + " " * 10],
    ids=["empty", "short", "spaces", "short-padded"],
)
def test_an_empty_or_short_cursor_secret_is_a_configuration_error(
    migrated_url: str, secret: str
) -> None:
    """An empty key signs cursors and consistency tokens anyone can forge: refused, in one
    line, as every other setting (with replicas it was a traceback)."""
    result = serve_cli({"DATABASE_URL": migrated_url, "CURSOR_SECRET": secret},
                       "--workers", "2")
    assert result.returncode == 2
    assert "CURSOR_SECRET must be at least 16 bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_web_concurrency_is_explained(migrated_url: str) -> None:
    result = serve_cli({"DATABASE_URL": migrated_url, "WEB_CONCURRENCY": "many"})
    assert result.returncode == 2
    assert "WEB_CONCURRENCY" in result.stderr


def worker_pids(supervisor: int) -> list[int]:
    """The uvicorn worker processes of the supervisor `supervisor`."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid) for pid in children
        if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    ]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def two_workers(migrated_url: str, standby: Standby, engine: Engine) -> Iterator[ServerProcess]:
    """`python -m service serve --workers 2` on a loopback port, with the standby as replica."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": migrated_url,
        "DATABASE_REPLICA_URLS": standby.url,
        "REPLICA_MAX_LAG": "300",
        "REPLICA_POLL_INTERVAL": "0.1",
        "CURSOR_SECRET": CURSOR_SECRET,
        "API_TOKENS": TEST_TOKEN,
        "DB_POOL_SIZE": "3",
        "DB_MAX_OVERFLOW": "2",
    }
    server = ServerProcess(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "2",
         "--no-access-log"],
        port, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        server.wait_until_answers("/health/ready", timeout=60)
        # The workers polled the replica before they took requests: not "down" at first.
        first = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).json()
        assert [replica["state"] for replica in first["replicas"]] == ["ok"], first
        deadline = time.monotonic() + 30
        while len(worker_pids(server.process.pid)) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def test_cursors_and_consistency_tokens_work_across_two_workers(
    two_workers: ServerProcess, standby: Standby, engine: Engine
) -> None:
    insert_items(engine, *({"name": f"w{n:02}", "price": "1"} for n in range(30)))
    standby.catch_up(engine)
    time.sleep(0.5)
    workers = worker_pids(two_workers.process.pid)
    cpu_before = [cpu_seconds(pid) for pid in workers]
    # A new connection per request: the kernel hands each one to either worker.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=two_workers.url(), headers=AUTH, limits=no_keepalive,
                      timeout=10) as client:
        for _ in range(30):
            first = client.get("/items/scroll", params={"size": 5})
            assert first.status_code == 200
            second = client.get("/items/scroll", params={"size": 5,
                                                          "cursor": first.json()["next_page"]})
            assert second.status_code == 200, second.text
            assert [i["name"] for i in second.json()["items"]] == [
                f"w{n:02}" for n in range(5, 10)
            ]
        standby.pause_replay()
        for n in range(30):
            created = client.post("/items", json={"name": f"t{n}", "price": "1"})
            assert created.status_code == 201
            read = client.get(created.headers["Location"],
                              headers={HEADER: created.headers[HEADER]})
            assert read.status_code == 200, read.text
    # Both workers served a good share of the requests (their own CPU time says so), so
    # cursors and tokens made by one were honoured by the other.
    used = [cpu_seconds(pid) - before for pid, before in zip(workers, cpu_before, strict=True)]
    assert min(used) > 0.1 * max(used), f"CPU seconds per worker: {used}"


def test_replicas_need_postgresql_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}",
                 database_replica_urls="postgresql://replica/service")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="postgresql"):
        Settings(database_url="postgresql://primary/service",
                 database_replica_urls="sqlite:///replica.db")  # type: ignore[arg-type]
    settings = Settings(database_url="postgresql://primary/service",
                        database_replica_urls=" postgresql://r1/service, postgresql://r2/service",  # type: ignore[arg-type]
                        cursor_secret=CURSOR_SECRET)  # type: ignore[arg-type]
    assert settings.async_replica_urls() == [
        "postgresql+asyncpg://r1/service", "postgresql+asyncpg://r2/service"
    ]


def test_replica_urls_take_what_database_url_takes() -> None:
    # libpq's sslmode becomes asyncpg's ssl, connect_timeout is DB_CONNECT_TIMEOUT's: a
    # replica whose every connect failed was passed over for ever, while its poller
    # (psycopg2) found it fine.
    settings = Settings(
        database_url="postgresql://primary/service", cursor_secret=CURSOR_SECRET,  # type: ignore[arg-type]
        database_replica_urls="postgresql://u:pw@r1/service?sslmode=require&connect_timeout=3",  # type: ignore[arg-type]
    )
    assert settings.async_replica_urls() == ["postgresql+asyncpg://u:pw@r1/service?ssl=require"]
    with pytest.raises(ValueError, match="r1:None has application_name") as refused:
        Settings(database_url="postgresql://primary/service", cursor_secret=CURSOR_SECRET,  # type: ignore[arg-type]
                 database_replica_urls="postgresql://u:pw@r1/service?application_name=x")  # type: ignore[arg-type]
    assert "pw" not in str(refused.value)


async def test_replicas_are_used_with_sslmode_in_the_urls(
    migrated_url: str, standby: Standby
) -> None:
    # The requests connect with asyncpg's `ssl`, the poller (psycopg2) with libpq's
    # `sslmode`: both must understand what they are given, or the replica is never used.
    app = create_app(replicated_settings(
        migrated_url, standby, database_url=f"{migrated_url}?sslmode=disable",
        database_replica_urls=[f"{standby.url}?sslmode=disable&connect_timeout=3"]))

    @app.get("/where")
    async def where() -> dict[str, bool]:
        return {"on_a_replica": bool(await db.session.scalar(text("SELECT pg_is_in_recovery()")))}

    try:
        assert app.state.replicas.wait_until_polled()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ready = (await client.get("/health/ready")).json()
            assert (ready["status"], ready["replicas"][0]["state"]) == ("ok", "ok"), ready
            assert (await client.get("/where")).json() == {"on_a_replica": True}
    finally:
        await close_engines(app)


def test_the_poller_speaks_libpq() -> None:
    url = make_url("postgresql+asyncpg://u:pw@db/app?ssl=require&command_timeout=5"
                   "&prepared_statement_cache_size=0&application_name=svc")
    assert poll_url(url).render_as_string(hide_password=False) == (
        "postgresql+psycopg2://u:pw@db/app?application_name=svc&sslmode=require")
    assert poll_url(make_url("postgresql+asyncpg://db/app?ssl=true")).query == {
        "sslmode": "require"}
    assert poll_url(make_url("postgresql+psycopg2://db/app?sslmode=verify-full")).query == {
        "sslmode": "verify-full"}


def test_replicas_need_a_cursor_secret(migrated_url: str, standby: Standby) -> None:
    # The consistency tokens clients send back would be refused (400) after a restart, and
    # by every other worker, if each process made up its own key.
    with pytest.raises(ValueError, match="needs CURSOR_SECRET"):
        Settings(database_url=migrated_url, database_replica_urls=standby.url)  # type: ignore[arg-type]
    result = serve_cli({"DATABASE_URL": migrated_url, "DATABASE_REPLICA_URLS": standby.url,
                        "API_TOKENS": TEST_TOKEN})
    assert result.returncode == 2
    assert "CURSOR_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


async def test_replicas_and_tokens_with_the_primary_behind_pgbouncer(
    pgbouncer_url: str, migrated_url: str, standby: Standby
) -> None:
    app = create_app(replicated_settings(
        migrated_url, standby, database_url=pgbouncer_url, database_pgbouncer=True,
        replica_max_lag=300,
    ))
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers=AUTH) as client:
            standby.pause_replay()
            for n in range(20):
                created = await client.post("/items", json={"name": f"pb{n}", "price": "1"})
                assert created.status_code == 201
                read = await client.get(created.headers["Location"],
                                        headers={HEADER: created.headers[HEADER]})
                assert read.status_code == 200
                # Served by the primary (the replica has not replayed the write) inside a
                # transaction, as PgBouncer needs: it wrote nothing, so no new token.
                assert HEADER not in read.headers
            assert (await client.get(created.headers["Location"])).status_code == 404
    finally:
        await close_engines(app)


async def test_openapi_documents_the_token_and_its_400(
    replicated_client: httpx.AsyncClient,
) -> None:
    schema = (await replicated_client.get("/openapi.json")).json()
    listing = schema["paths"]["/items"]["get"]
    assert HEADER in [p["name"] for p in listing["parameters"] if p["in"] == "header"]
    assert "application/problem+json" in listing["responses"]["400"]["content"]
    assert HEADER in schema["paths"]["/items"]["post"]["responses"]["201"]["headers"]


def test_an_app_started_again_in_one_process_polls_its_replicas_afresh(
    migrated_url: str, standby: Standby
) -> None:
    """Its lifespan, run a second and third time (as tests run it): the replicas are
    polled again, not left with what the first run saw until they look down."""
    def pollers() -> int:
        return sum(t.name.startswith("replicas-poll") for t in threading.enumerate())

    before = pollers()
    app = create_app(replicated_settings(migrated_url, standby))
    for _ in range(3):
        with starlette_client(app) as client:
            time.sleep(1.2)  # longer than a poll may be late before a replica is "down"
            ready = client.get("/health/ready").json()
            assert [r["state"] for r in ready["replicas"]] == ["ok"], ready
            assert pollers() == before + 2  # the primary's and the replica's, once
    assert pollers() == before  # and none left behind
