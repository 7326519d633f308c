"""Prometheus metrics at GET /metrics: the HTTP and database metrics move as requests are
served, labels stay bounded (route templates, never raw paths), the endpoint can be switched
off or guarded by a token, is not in the public OpenAPI, never waits for a database slot -
and with several worker processes every scrape adds up all of them."""

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from pydantic import SecretStr
from sqlalchemy import Engine

from bench.harness import free_port
from service.config import Settings
from service.main import create_app, static_file_paths
from service.metrics import prepare_multiprocess_dir
from tests.conftest import AUTH, TEST_TOKEN, http_scope
from tests.faults.test_commit_failures import DEFERRED_FOREIGN_KEY, injected
from tests.items.helpers import stored

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
ITEM = {"name": "Lamp", "price": "12.50"}
METRIC_NAMES = [
    "http_request_duration_seconds",
    "http_requests_in_progress",
    "db_pool_connections",
    "db_admission_wait_seconds",
    "db_admission_rejected_total",
    "db_transactions_total",
    "db_statements_per_request",
]


def sample(name: str, **labels: str) -> float:
    """The current value of one sample in this process's registry (0 if absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests_of(route: str, status: str, method: str = "GET") -> float:
    return sample("http_request_duration_seconds_count", method=method, route=route,
                  status=status)


def series(exposition: str) -> set[str]:
    """The series (name and labels, without values) of a text exposition."""
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines()
            if line and not line.startswith("#")}


@asynccontextmanager
async def serving(settings: Settings, **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update=changes))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=AUTH
    ) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client
    await app.state.engine.dispose()


# -- the endpoint ----------------------------------------------------------------------------


async def test_metrics_are_served_in_prometheus_text_format(client: httpx.AsyncClient) -> None:
    await client.post("/items", json=ITEM)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    for name in METRIC_NAMES:  # each has samples from the start
        assert re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", response.text, re.MULTILINE)
    assert re.search(
        r'^http_request_duration_seconds_count\{method="POST",route="/items",status="201"\} ',
        response.text, re.MULTILINE,
    )


async def test_metrics_are_not_in_the_public_openapi(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "/metrics" not in schema["paths"]


async def test_metrics_can_be_switched_off(settings: Settings) -> None:
    async with serving(settings, metrics_enabled=False) as client:
        before = requests_of("/items", "200")
        assert (await client.get("/items")).status_code == 200
        response = await client.get("/metrics")
    assert response.status_code == 404
    assert requests_of("/items", "200") == before  # and nothing is recorded


async def test_a_metrics_token_guards_the_endpoint(settings: Settings) -> None:
    token = "metrics-token-0123456789"
    async with serving(settings, metrics_token=SecretStr(token)) as client:
        missing = await client.get("/metrics", headers={"Authorization": ""})
        api_token = await client.get("/metrics")  # the API token is not the metrics token
        right = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    for refused in (missing, api_token):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["request_id"] == refused.headers["x-request-id"]
        assert "http_request" not in refused.text
    assert right.status_code == 200 and "http_request_duration_seconds" in right.text
    assert TEST_TOKEN not in right.text and token not in right.text


def test_a_short_metrics_token_is_refused(settings: Settings) -> None:
    # As API tokens are: a short token guards nothing.
    with pytest.raises(ValueError, match="METRICS_TOKEN must be at least 16") as refused:
        Settings(database_url=settings.database_url, api_tokens=TEST_TOKEN,
                 metrics_token="short")  # type: ignore[arg-type]
    assert "short" not in str(refused.value).replace("METRICS_TOKEN", "")
    Settings(database_url=settings.database_url, api_tokens=TEST_TOKEN, metrics_token="")  # type: ignore[arg-type]
    padded = Settings(database_url=settings.database_url, api_tokens=TEST_TOKEN,
                      metrics_token=" metrics-token-0123456789\n")  # type: ignore[arg-type]
    assert padded.metrics_token.get_secret_value() == "metrics-token-0123456789"


@asynccontextmanager
async def a_request_holding_a_slot(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """For the block, a request to the client's app is inside its route, holding one
    database slot (GET /hold, added for it)."""
    entered, release = asyncio.Event(), asyncio.Event()

    @client.app.get("/hold")  # type: ignore[attr-defined]
    async def hold() -> dict[str, str]:
        entered.set()
        await release.wait()
        return {}

    holder = asyncio.ensure_future(client.get("/hold"))
    await entered.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def test_metrics_answer_while_every_database_slot_is_taken(settings: Settings) -> None:
    """/metrics is a sessionless path: it never queues behind the database work."""
    async with (
        serving(settings, db_pool_size=1, db_max_overflow=0, db_pool_timeout=10) as client,
        a_request_holding_a_slot(client),
    ):
        started = time.perf_counter()
        response = await client.get("/metrics")
        waited = time.perf_counter() - started
    assert response.status_code == 200
    # Waiting for the slot would take the pool timeout (10 s); a busy CI machine has taken
    # over a second to answer a scrape that did not wait.
    assert waited < 3.0
    assert 'http_requests_in_progress 2.0' in response.text  # /hold and this scrape


# -- HTTP metrics ----------------------------------------------------------------------------


async def test_requests_are_counted_by_method_route_template_and_status(
    client: httpx.AsyncClient,
) -> None:
    before = {key: requests_of(*key) for key in [
        ("/items/{item_id}", "200"), ("/items/{item_id}", "404"), ("/items", "201", "POST"),
        ("<unmatched>", "404"), ("/items", "413", "POST"),
    ]}
    item_id = (await client.post("/items", json=ITEM)).json()["id"]
    for _ in range(3):
        await client.get(f"/items/{item_id}")
    await client.get("/items/424242")
    await client.get("/nothing/here")
    await client.post("/items", content=b"x" * (2 * 1024 * 1024))
    after = {key: requests_of(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("/items/{item_id}", "200"): 3,
        ("/items/{item_id}", "404"): 1,
        ("/items", "201", "POST"): 1,
        ("<unmatched>", "404"): 1,
        ("/items", "413", "POST"): 1,  # answered by the body limit, before routing
    }
    # No series is ever named after a raw path.
    assert f"/items/{item_id}\"" not in (await client.get("/metrics")).text


async def test_a_client_gone_before_its_upload_ended_is_counted_499_not_500(
    app: FastAPI, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    before = {status: requests_of("/items", status, "POST") for status in ("499", "500")}
    upload = [{"type": "http.request", "body": b'{"name": "Hal', "more_body": True}]

    async def receive() -> dict[str, Any]:
        return upload.pop() if upload else {"type": "http.disconnect"}  # hangs up

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("POST", "/items", [
        (b"host", b"test"),
        (b"content-type", b"application/json"),
        (b"content-length", b"100"),
        (b"authorization", AUTH["Authorization"].encode()),
    ])
    with caplog.at_level("INFO", logger="service.access"):
        await app(scope, receive, send)

    assert sent == []  # nobody to answer
    after = {status: requests_of("/items", status, "POST") for status in before}
    assert {status: after[status] - before[status] for status in before} == {"499": 1, "500": 0}
    access = [r for r in caplog.records if r.name == "service.access"]
    assert [r.status for r in access] == [499]  # type: ignore[attr-defined]
    assert stored(engine) == {}
    await app.state.engine.dispose()


async def test_a_scan_of_10000_random_paths_adds_no_series(settings: Settings) -> None:
    async with serving(settings, access_log=False) as client:  # 10,000 lines spared
        await scan_random_paths(client)


async def scan_random_paths(client: httpx.AsyncClient) -> None:
    rng = random.Random(15)

    def word() -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits + "-._~", k=12))

    kinds = [
        lambda: f"/{word()}",
        lambda: f"/{word()}/{word()}/{word()}",
        lambda: f"/items/{rng.randrange(10**6, 10**9)}",
        lambda: f"/items/{word()}x",
        lambda: f"/items/{word()}/{word()}",
        lambda: f"/health/{word()}",
    ]
    methods = ["GET", "DELETE", "PROPFIND", word().upper()]

    async def scan(paths: int) -> None:
        for n in range(paths):
            await client.request(methods[n % len(methods)], kinds[n % len(kinds)]())

    await scan(len(kinds) * len(methods))  # each kind of request once, with each method
    before = series((await client.get("/metrics")).text)
    await scan(10_000)
    after = series((await client.get("/metrics")).text)
    assert after == before
    assert not [s for s in after if "PROPFIND" in s]  # unknown methods count as "other"


# -- database metrics ------------------------------------------------------------------------


async def test_transactions_are_counted_by_outcome(
    client: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    def outcomes() -> dict[str, float]:
        return {outcome: sample("db_transactions_total", database="db", outcome=outcome)
                for outcome in ("commit", "rollback", "commit_failed")}

    before = outcomes()
    assert (await client.post("/items", json=ITEM)).status_code == 201
    assert (await client.post("/items", json=ITEM)).status_code == 409  # a duplicate name
    with injected(engine, DEFERRED_FOREIGN_KEY[backend]):
        assert (await client.post("/items", json={**ITEM, "name": "Desk"})).status_code == 409
    after = outcomes()
    assert {k: after[k] - before[k] for k in after} == {
        "commit": 1, "rollback": 1, "commit_failed": 1,
    }


async def test_statements_per_request_and_admission_waits_are_observed(
    client: httpx.AsyncClient,
) -> None:
    count, total = "db_statements_per_request_count", "db_statements_per_request_sum"
    waits = "db_admission_wait_seconds_count"
    before = (sample(count, database="db"), sample(total, database="db"),
              sample(waits, database="db"))
    response = await client.get("/items/scroll?size=5")
    statements = int(re.search(r'desc="(\d+) quer', response.headers["server-timing"])[1])  # type: ignore[index]
    await client.get("/health/live")  # sessionless: no slot, no unit of work
    after = (sample(count, database="db"), sample(total, database="db"),
             sample(waits, database="db"))
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == statements >= 1
    assert after[2] - before[2] == 1


async def test_admission_rejections_are_counted(settings: Settings) -> None:
    async with serving(settings, db_pool_size=1, db_max_overflow=0,
                       db_pool_timeout=0.2) as client:
        before = sample("db_admission_rejected_total", database="db")
        async with a_request_holding_a_slot(client):
            waits = sample("db_admission_wait_seconds_sum", database="db")
            busy = await client.get("/items")
    assert busy.status_code == 503
    assert sample("db_admission_rejected_total", database="db") - before == 1
    # Its wait counts among the waits: the longest ones are the ones that ended in a 503.
    assert sample("db_admission_wait_seconds_sum", database="db") - waits >= 0.2
    assert sample("db_admission_wait_seconds_bucket", database="db", le="+Inf") > 0


async def test_pool_connections_are_reported(client: httpx.AsyncClient) -> None:
    await client.post("/items", json=ITEM)
    pool = pool_gauges((await client.get("/metrics")).text)
    assert pool == {"checked_out": 0.0, "idle": 1.0, "overflow": 0.0}


async def test_a_docs_asset_is_labelled_with_its_mount_not_unmatched(settings: Settings) -> None:
    async with serving(settings) as client:
        asset = sorted(static_file_paths(client.app))[0]  # type: ignore[attr-defined]
        route = asset.rsplit("/", 1)[0] + "/{path:path}"
        before = requests_of(route, "200")
        assert (await client.get(asset)).status_code == 200
    assert requests_of(route, "200") - before == 1


def pool_gauges(exposition: str) -> dict[str, float]:
    return {state: float(re.search(  # type: ignore[index]
        rf'^db_pool_connections\{{database="db",state="{state}"\}} (\S+)$', exposition, re.M)[1])
        for state in ("checked_out", "idle", "overflow")}


async def test_an_invalidated_connection_is_not_counted_as_idle(settings: Settings) -> None:
    # What a lost connection or a database restart leaves: a pool slot without a connection.
    async with serving(settings) as client:
        assert (await client.post("/items", json=ITEM)).status_code == 201
        assert pool_gauges((await client.get("/metrics")).text)["idle"] == 1
        async with client.app.state.engine.connect() as connection:  # type: ignore[attr-defined]
            await connection.invalidate()
        assert pool_gauges((await client.get("/metrics")).text) == {
            "checked_out": 0.0, "idle": 0.0, "overflow": 0.0}
        assert (await client.get("/items")).status_code == 200  # opens one again
        assert pool_gauges((await client.get("/metrics")).text)["idle"] == 1


# -- several worker processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(
    migrated_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """`python -m service serve --workers 2` on a free loopback port (one for the tests of
    this module: starting it takes seconds), its metrics files in a temporary directory;
    yields its base URL and that directory."""
    tmp_path = tmp_path_factory.mktemp("two-workers")
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    (metrics_dir).mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # a previous run's leftovers
    env = {**os.environ, "DATABASE_URL": migrated_url, "API_TOKENS": TEST_TOKEN,
           "CURSOR_SECRET": "two-workers-share-this-cursor-secret",  # serve needs it for 2
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "LOG_FORMAT": "json",
           "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "stderr.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # Both workers have started (each logs it) and the socket answers.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            started = (tmp_path / "stderr.log").read_text().count("Application startup complete")
            try:
                answers = httpx.get(f"{base}/health/live", timeout=1).status_code == 200
            except httpx.TransportError:
                answers = False
            if started == 2 and answers:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server did not start: " + (tmp_path / "stderr.log").read_text())
        yield base, metrics_dir
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


ITEMS_COUNT = re.compile(
    r'^http_request_duration_seconds_count\{method="GET",route="/items",status="200"\} (\S+)$',
    re.MULTILINE,
)


def per_worker(
    metrics_dir: Path, scratch: Path, files: str, sample: re.Pattern[str]
) -> dict[str, float]:
    """The value `sample` finds in each worker's own metric files (`files`, a glob), read
    alone, by file stem (`histogram_<pid>`, `gauge_livesum_<pid>`)."""
    values = {}
    for path in metrics_dir.glob(files):
        alone = scratch / path.stem
        alone.mkdir(exist_ok=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        found = sample.search(generate_latest(registry).decode())
        values[path.stem] = float(found[1]) if found else 0.0
    return values


def items_served_by_each_worker(metrics_dir: Path, scratch: Path) -> dict[str, float]:
    """GET /items requests each worker counted, read from its own files alone."""
    return per_worker(metrics_dir, scratch, "histogram_*.db", ITEMS_COUNT)


def test_with_two_workers_every_scrape_counts_the_requests_of_both(
    two_workers: tuple[str, Path], tmp_path: Path
) -> None:
    base, metrics_dir = two_workers
    assert not (metrics_dir / "counter_999999.db").exists()  # stale files were removed

    def get_items(_: int) -> int:  # a new connection each, 8 at once
        return httpx.get(f"{base}/items", timeout=10).status_code

    # Until both workers have served some (the second may still be starting at first).
    served, deadline = 0, time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while True:
            assert set(pool.map(get_items, range(16))) == {200}
            served += 16
            per_worker = items_served_by_each_worker(metrics_dir, tmp_path)
            if len([n for n in per_worker.values() if n]) == 2 or time.monotonic() > deadline:
                break
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    # A worker records a request's duration just after its last byte is sent: the last
    # responses may be in before their counts are.
    settle = time.monotonic() + 5
    while sum(per_worker.values()) < served and time.monotonic() < settle:
        time.sleep(0.05)
        per_worker = items_served_by_each_worker(metrics_dir, tmp_path)
    assert sum(per_worker.values()) == served
    for _ in range(6):  # whichever worker answers the scrape, it counts both
        text = httpx.get(f"{base}/metrics", timeout=10).text
        assert float(ITEMS_COUNT.search(text)[1]) == served  # type: ignore[index]
        assert re.search(r"^http_requests_in_progress 1\.0$", text, re.MULTILINE)


def test_serve_writes_every_line_as_json_and_one_access_line_per_request(
    two_workers: tuple[str, Path],
) -> None:
    """`serve` with LOG_FORMAT=json: uvicorn's own lines too, and no uvicorn access log."""
    base, metrics_dir = two_workers
    ids = [f"serve-{n}" for n in range(5)]
    for request_id in ids:
        response = httpx.get(f"{base}/items/scroll?size=3",
                             headers={"X-Request-ID": request_id})
        assert response.headers["x-request-id"] == request_id
    time.sleep(0.5)  # the access line is written once the request is over
    lines = [json.loads(line) for line in
             (metrics_dir.parent / "stderr.log").read_text().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "service.access"]
    assert [line["request_id"] for line in access if line["path"] == "/items/scroll"] == ids
    assert {line["logger"] for line in lines} >= {"uvicorn.error", "service.access"}
    assert "uvicorn.access" not in {line["logger"] for line in lines}
    assert not [line for line in lines if "color_message" in line]


IN_PROGRESS = re.compile(r"^http_requests_in_progress (\S+)$", re.MULTILINE)


def in_progress_by_worker(metrics_dir: Path, scratch: Path) -> dict[int, float]:
    """`http_requests_in_progress` of each worker (by pid), read from its own file alone."""
    values = per_worker(metrics_dir, scratch, "gauge_livesum_*.db", IN_PROGRESS)
    return {int(stem.rsplit("_", 1)[1]): value for stem, value in values.items()}


def test_a_worker_killed_mid_request_leaves_no_gauge_behind(
    two_workers: tuple[str, Path], tmp_path: Path
) -> None:
    """A worker that dies without a clean shutdown (killed, crashed, stopped by uvicorn's
    supervisor) never runs its exit hook: its live gauges must still drop out of the sums.
    (Last of this module's tests of the two workers: uvicorn starts a new one after.)"""
    base, metrics_dir = two_workers
    port = int(base.rsplit(":", 1)[1])
    uploads = []  # requests in progress: bodies that never arrive, spread over both workers
    try:
        busy: dict[int, float] = {}
        deadline = time.monotonic() + 30
        while not busy and time.monotonic() < deadline:
            upload = socket.create_connection(("127.0.0.1", port))
            upload.sendall(
                b"POST /items HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + TEST_TOKEN.encode() + b"\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            uploads.append(upload)
            time.sleep(0.2)
            busy = {pid: n for pid, n in in_progress_by_worker(metrics_dir, tmp_path).items()
                    if n > 0}
        assert busy, "no upload reached a worker"
        victim = next(iter(busy))
        os.kill(victim, signal.SIGKILL)
    finally:
        for upload in uploads:
            upload.close()
    # The surviving worker's uploads end (client gone); the victim's count must go too.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        if IN_PROGRESS.search(text)[1] == "1.0":  # type: ignore[index]
            break  # the scrape itself
        time.sleep(0.2)
    assert IN_PROGRESS.search(text)[1] == "1.0", text  # type: ignore[index]
    assert not list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))


def test_the_multiprocess_directory_is_prepared_only_for_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # setenv first, so that the variable prepare_multiprocess_dir sets is undone after.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert prepare_multiprocess_dir(1) is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ

    made = prepare_multiprocess_dir(2)
    assert made is not None and made.is_dir() and not list(made.iterdir())
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(made)
    shutil.rmtree(made)

    given = tmp_path / "metrics"
    given.mkdir()
    for name in ("counter_1.db", "histogram_2.db", "gauge_livesum_3.db", "notes.txt"):
        (given / name).write_text("x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    assert prepare_multiprocess_dir(1) == given  # set by the operator: used even for one
    assert [p.name for p in given.iterdir()] == ["notes.txt"]  # only metric files go
