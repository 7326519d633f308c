"""Request ids: `X-Request-ID` is kept when sane and made up otherwise, comes back on every
response - whichever layer answered it - and in every problem document, and is carried by
every log line of the request, of its streaming body and of its background tasks."""

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine

from service.config import Settings
from service.db.asyncio import db
from service.items.models import Item
from service.main import create_app
from tests.conftest import AUTH
from tests.faults.test_commit_failures import DEFERRED_FOREIGN_KEY, injected

pytestmark = pytest.mark.anyio

GENERATED = re.compile(r"^[0-9a-f]{32}$")
ITEM = {"name": "Lamp", "price": "12.50"}


def assert_echoed(response: httpx.Response, sent: str | None = None) -> str:
    """The response's request id - `sent` if given - in its header and, for a problem, in
    its body."""
    request_id = response.headers["x-request-id"]
    if sent is not None:
        assert request_id == sent
    assert len(response.headers.get_list("x-request-id")) == 1
    if response.headers.get("content-type") == "application/problem+json":
        assert response.json()["request_id"] == request_id
    return request_id


# -- which id --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "a" * 128, "req 42 (retry)"]
)
async def test_a_sane_request_id_is_kept_and_echoed(client: httpx.AsyncClient, sent: str) -> None:
    response = await client.get("/items", headers={"X-Request-ID": sent})
    assert response.status_code == 200
    assert_echoed(response, sent)


@pytest.mark.parametrize(
    "sent",
    ["a" * 129, "", "   ", "tab\there", "caf\u00e9", "bell\x07", "del\x7f"],
    ids=["129-chars", "empty", "blank", "tab", "non-ascii", "control", "del"],
)
async def test_an_insane_request_id_is_replaced_by_a_generated_one(
    client: httpx.AsyncClient, sent: str
) -> None:
    response = await client.get(
        "/items", headers=[(b"X-Request-ID", sent.encode("latin-1"))]
    )
    assert response.status_code == 200
    assert GENERATED.match(assert_echoed(response))


async def test_each_request_without_an_id_gets_its_own(client: httpx.AsyncClient) -> None:
    ids = {assert_echoed(await client.get("/items")) for _ in range(5)}
    assert len(ids) == 5
    assert all(GENERATED.match(request_id) for request_id in ids)


# -- echoed by every layer -----------------------------------------------------------------


async def test_a_404_problem_carries_the_request_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/424242", headers={"X-Request-ID": "find-me"})
    assert response.status_code == 404
    assert_echoed(response, "find-me")


async def test_a_401_from_the_token_check_carries_the_request_id(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/items", json=ITEM, headers={"Authorization": "", "X-Request-ID": "no-token"}
    )
    assert response.status_code == 401
    assert_echoed(response, "no-token")


async def test_a_413_from_the_body_limit_carries_the_request_id(
    migrated_url: str, settings: Settings
) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": 100}))
    async with client_of(app) as client:
        response = await client.post(
            "/items", content=b"x" * 101, headers={**AUTH, "X-Request-ID": "too-big"}
        )
    assert response.status_code == 413
    assert_echoed(response, "too-big")


async def test_a_422_from_validation_carries_the_request_id(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"name": ""}, headers={"X-Request-ID": "bad"})
    assert response.status_code == 422
    assert_echoed(response, "bad")


async def test_a_503_from_admission_carries_the_request_id(settings: Settings) -> None:
    """The one connection slot is held by a slow request; the next one waits 0.3 s, then
    gets 503 from the database middleware before it reaches any route."""
    app = create_app(
        settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0,
                                    "db_pool_timeout": 0.3})
    )
    entered, release = asyncio.Event(), asyncio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        entered.set()
        await release.wait()
        return {"status": "done"}

    async with client_of(app) as client:
        holder = asyncio.ensure_future(client.get("/slow"))
        await entered.wait()
        response = await client.get("/items", headers={"X-Request-ID": "busy"})
        release.set()
        assert (await holder).status_code == 200
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert_echoed(response, "busy")


async def test_a_failed_commit_problem_carries_the_request_id(
    client: httpx.AsyncClient, engine: Engine, backend: str
) -> None:
    with injected(engine, DEFERRED_FOREIGN_KEY[backend]):
        response = await client.post("/items", json=ITEM, headers={"X-Request-ID": "unsaved"})
    assert response.status_code == 409  # instead of the route's 201: the COMMIT failed
    assert_echoed(response, "unsaved")


async def test_a_500_from_an_unhandled_exception_carries_the_request_id(app: FastAPI) -> None:
    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    async with client_of(app, raise_app_exceptions=False) as client:
        response = await client.get("/bug", headers={"X-Request-ID": "bug-1"})
    assert response.status_code == 500
    assert_echoed(response, "bug-1")


async def test_cross_origin_clients_may_read_the_request_id(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"cors_origins": ["https://shop.example"]}))
    async with client_of(app) as client:
        response = await client.get("/items", headers={"Origin": "https://shop.example"})
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed


# -- carried by the logs -------------------------------------------------------------------


async def test_every_log_line_of_a_request_carries_its_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines logged by an async route, a sync route (threadpool), a streaming body and
    background tasks (async and sync) all carry the request's id; the access line too."""
    log = logging.getLogger("tests.request_ids")

    def in_thread(where: str) -> None:
        log.info(where)

    async def in_task(where: str) -> None:
        log.info(where)

    @app.get("/async")
    async def async_route(tasks: BackgroundTasks) -> dict[str, str]:
        log.info("async route")
        tasks.add_task(in_task, "async background task")
        tasks.add_task(in_thread, "sync background task")
        return {}

    @app.get("/sync")
    def sync_route() -> dict[str, str]:
        log.info("sync route")
        return {}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            log.info("streaming body")
            yield b"{}"

        return StreamingResponse(body(), media_type="application/json")

    caplog.set_level(logging.INFO)
    async with client_of(app) as client:
        for path in ["/async", "/sync", "/stream"]:
            response = await client.get(path, headers={"X-Request-ID": f"id-of-{path[1:]}"})
            assert response.status_code == 200

    def ids_of(message: str) -> set[str | None]:
        return {getattr(r, "request_id", None) for r in caplog.records if r.message == message}

    assert ids_of("async route") == {"id-of-async"}
    assert ids_of("async background task") == {"id-of-async"}
    assert ids_of("sync background task") == {"id-of-async"}
    assert ids_of("sync route") == {"id-of-sync"}
    assert ids_of("streaming body") == {"id-of-stream"}
    access = [r for r in caplog.records if r.name == "service.access"]
    assert [r.request_id for r in access] == ["id-of-async", "id-of-sync", "id-of-stream"]


async def test_a_failing_background_task_is_logged_at_error_with_the_request_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise RuntimeError("mail server down")

    @app.post("/notify")
    async def notify(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(fails)
        return {"status": "accepted"}

    async with client_of(app, raise_app_exceptions=False) as client:
        response = await client.post("/notify", headers={"X-Request-ID": "notify-1"})
    assert response.status_code == 200
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "the failure was not logged at ERROR"
    assert {r.request_id for r in errors} == {"notify-1"}  # type: ignore[attr-defined]
    assert any("mail server down" in (r.exc_text or "") for r in errors)


async def test_a_commit_failing_after_the_response_started_is_logged_at_error_with_the_id(
    app: FastAPI, engine: Engine, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A background task's write fails at its COMMIT (the status is already sent): the
    client got its 200, the operator gets an ERROR line with the request id."""

    async def write_later() -> None:
        db.session.add(Item(name="Late", price=1))

    @app.post("/later")
    async def later(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(write_later)
        return {"status": "accepted"}

    with injected(engine, DEFERRED_FOREIGN_KEY[backend]):
        async with client_of(app) as client:
            # Two ids: the first is the request's, in the record and in the message alike.
            response = await client.post(
                "/later", headers=[("X-Request-ID", "late-1"), ("X-Request-ID", "late-2")]
            )
    assert response.status_code == 200
    assert_echoed(response, "late-1")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.request_id for r in errors] == ["late-1"]  # type: ignore[attr-defined]
    assert "commit of the work done after the response started failed" in errors[0].message
    assert "(request id late-1)" in errors[0].message


@asynccontextmanager
async def client_of(app: FastAPI, **transport_args: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` sending the test token; disposes of the app's engine after."""
    transport = httpx.ASGITransport(app=app, **transport_args)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=AUTH
    ) as client:
        yield client
    await app.state.engine.dispose()


async def test_every_response_of_every_operation_documents_the_header(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert len(operations) >= 8
    for operation in operations:
        statuses = operation["responses"]
        assert {"422", "500"} <= set(statuses) or operation["operationId"].startswith("check_")
        for status, response in statuses.items():
            assert "X-Request-ID" in response["headers"], (operation["operationId"], status)


async def test_the_problem_schema_documents_the_request_id(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    problem = schema["components"]["schemas"]["Problem"]
    assert "request_id" in problem["properties"]
    assert "X-Request-ID" in problem["properties"]["request_id"]["description"]
