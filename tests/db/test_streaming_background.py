"""Work done after the response started: streaming bodies and BackgroundTasks
(behaviours 6 and 7 of service.db), in both modes."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import Engine, event, func, select
from starlette.background import BackgroundTask
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect

from service.items.models import Item
from tests.conftest import http_scope
from tests.db.conftest import MakeApp, Mode, add_item, client_for, stored_names
from tests.db.test_observer import Recorder

pytestmark = pytest.mark.anyio


async def test_stream_can_read_and_its_writes_are_committed(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/import")
    async def bulk_import() -> StreamingResponse:
        mode.add_item("before-response")

        async def progress() -> AsyncIterator[bytes]:
            for n in range(3):
                mode.add_item(f"streamed-{n}")
                await mode.flush()
                count = await mode.scalar(select(func.count()).select_from(Item))
                yield f"{count}\n".encode()

        return StreamingResponse(progress())

    async with client_for(app) as client:
        response = await client.post("/import")
    assert response.status_code == 200
    # The session stayed usable: each chunk saw the rows written so far.
    assert response.text.split() == ["2", "3", "4"]
    assert stored_names(engine) == {"before-response", "streamed-0", "streamed-1", "streamed-2"}
    assert mode.checked_out() == 0


async def test_sync_stream_writes_are_committed(make_app: MakeApp, engine: Engine) -> None:
    """Sync mode: a sync generator is iterated in the threadpool, with the request's session."""
    app = make_app()

    @app.post("/import")
    def bulk_import() -> StreamingResponse:
        def progress() -> Iterator[bytes]:
            for n in range(3):
                add_item(f"streamed-{n}")
                yield b"."

        return StreamingResponse(progress())

    async with client_for(app) as client:
        response = await client.post("/import")
    assert response.text == "..."
    assert stored_names(engine) == {"streamed-0", "streamed-1", "streamed-2"}


async def send_and_record(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None,
    on_last_part: Any = None, on_each: Any = None,
) -> list[dict[str, Any]]:
    """Run one request through `app` message by message; returns the messages it sent.
    `on_last_part()` runs as the body's last part (`more_body` false) is sent,
    `await on_each(message)` as each message is."""
    sent: list[dict[str, Any]] = []
    received = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if received:
            return received.pop()
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        last = message["type"] == "http.response.body" and not message.get("more_body")
        if last and on_last_part is not None:
            on_last_part()
        if on_each is not None:
            await on_each(message)
        sent.append(message)

    await asyncio.wait_for(app(http_scope(method, path, headers), receive, send), timeout=10)
    return sent


async def test_a_streamed_bodys_writes_are_stored_before_its_last_part_is_sent(
    mode: Mode, engine: Engine
) -> None:
    """A client that has read the whole body and reads again finds what it wrote."""
    app = mode.make_app()

    @app.post("/import")
    async def bulk_import() -> StreamingResponse:
        async def progress() -> AsyncIterator[bytes]:
            for n in range(3):
                mode.add_item(f"streamed-{n}")
                yield b"."

        return StreamingResponse(progress())

    seen_at_the_end: list[set[str]] = []
    sent = await send_and_record(
        app, "POST", "/import", on_last_part=lambda: seen_at_the_end.append(stored_names(engine))
    )
    assert sent[0]["status"] == 200
    assert seen_at_the_end == [{"streamed-0", "streamed-1", "streamed-2"}]
    assert mode.checked_out() == 0


def streaming_import(mode: Mode, names: list[str], content_length: bool) -> FastAPI:
    """POST /import: a body of one part per name, each written as an item as it streams;
    with `content_length`, the response says its length up front (no chunked coding)."""
    app = mode.make_app()

    @app.post("/import")
    async def bulk_import() -> StreamingResponse:
        async def progress() -> AsyncIterator[bytes]:
            for name in names:
                mode.add_item(name)
                yield f"{name}\n".encode()

        length = sum(len(name) + 1 for name in names)
        headers = {"content-length": str(length)} if content_length else None
        return StreamingResponse(progress(), headers=headers)

    return app


async def test_with_a_content_length_the_writes_are_stored_before_the_bodys_last_byte(
    mode: Mode, engine: Engine
) -> None:
    """By Content-Length a client has the whole body with the part that completes it,
    before the empty end of the stream: that part waits for the COMMIT."""
    app = streaming_import(mode, ["a", "b", "c"], content_length=True)
    seen: list[set[str]] = []
    received = [b""]

    async def body_parts(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received[0] += message["body"]
            if received[0] == b"a\nb\nc\n":
                seen.append(stored_names(engine))

    await send_and_record(app, "POST", "/import", on_each=body_parts)
    assert seen == [{"a", "b", "c"}]


async def test_with_a_content_length_a_failed_commit_withholds_the_bodys_last_part(
    mode: Mode, engine: Engine
) -> None:
    app = streaming_import(mode, ["twin", "TWIN"], content_length=True)  # refused at COMMIT

    sent = await send_and_record(app, "POST", "/import")
    assert sent[0]["status"] == 200
    # The client got fewer bytes than the Content-Length said: a cut-off response.
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"twin\n"
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_a_client_leaving_during_the_final_commit_is_told_what_was_stored(
    mode: Mode, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The client hangs up while the stream's COMMIT runs (Starlette then cancels the
    body): the COMMIT goes on and stores the work - which the logs and the observer must
    say, not "rolled back"."""
    recorder = Recorder()
    app = mode.make_app(observer=recorder)

    @app.post("/import")
    async def bulk_import() -> StreamingResponse:
        async def progress() -> AsyncIterator[bytes]:
            mode.add_item("streamed")
            yield b"."

        return StreamingResponse(progress())

    loop = asyncio.get_running_loop()
    committing = asyncio.Event()

    def on_commit(connection: Any) -> None:  # on whichever thread runs the COMMIT
        loop.call_soon_threadsafe(committing.set)
        if mode.name == "sync":
            time.sleep(0.2)  # the client is gone meanwhile

    event.listen(mode.pool_engine, "commit", on_commit)
    try:
        async def receive() -> dict[str, Any]:
            if not started:
                started.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await committing.wait()
            return {"type": "http.disconnect"}

        started: list[bool] = []

        async def send(message: dict[str, Any]) -> None:
            await asyncio.sleep(0)

        with caplog.at_level(logging.WARNING, logger="service.db"):
            await asyncio.wait_for(
                app(http_scope("POST", "/import"), receive, send), timeout=10
            )
    finally:
        event.remove(mode.pool_engine, "commit", on_commit)
    assert stored_names(engine) == {"streamed"}
    assert [outcome for _, outcome in recorder.of("transaction")] == ["commit"]
    assert "rolled back" not in caplog.text
    assert mode.checked_out() == 0


async def test_a_failed_commit_of_a_streamed_body_cuts_the_body_off_and_is_logged_at_error(
    mode: Mode, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = mode.make_app()
    followed_up: list[str] = []

    @app.post("/import")
    async def bulk_import() -> StreamingResponse:
        async def progress() -> AsyncIterator[bytes]:
            mode.add_item("twin")
            mode.add_item("TWIN")  # the unique violation surfaces at the final commit
            yield b"done"

        return StreamingResponse(
            progress(), background=BackgroundTask(lambda: followed_up.append("ran"))
        )

    with caplog.at_level(logging.ERROR, logger="service.db"):
        sent = await send_and_record(app, "POST", "/import", [(b"x-request-id", b"import-7")])
    assert sent[0]["status"] == 200  # already on the wire when the commit failed
    # The body never ends: the server closes the connection, and the client sees a cut-off
    # response rather than a whole one for work that was not stored.
    assert [m.get("body") for m in sent[1:]] == [b"done"]
    assert all(m.get("more_body") for m in sent[1:])
    assert followed_up == []  # the response's background tasks did not run
    assert stored_names(engine) == set()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("POST /import" in r.getMessage() and "import-7" in r.getMessage() for r in errors)
    assert not [r for r in caplog.records if "ResponseReplaced" in (r.exc_text or "")]
    assert mode.checked_out() == 0
    async with client_for(app) as client:
        assert (await client.get("/nothing")).status_code == 404  # the next request is served


async def test_stream_of_an_error_response_commits_nothing(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/import")
    async def bulk_import() -> StreamingResponse:
        async def progress() -> AsyncIterator[bytes]:
            mode.add_item("late")
            yield b"error report"

        return StreamingResponse(progress(), status_code=400)

    async with client_for(app) as client:
        assert (await client.post("/import")).status_code == 400
    assert stored_names(engine) == set()


async def test_background_task_writes_are_committed(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    seen_by_task: list[set[str]] = []

    async def audit(name: str) -> None:
        seen_by_task.append(stored_names(engine))
        mode.add_item(f"audit-{name}")

    @app.post("/items/{name}")
    async def create(name: str, tasks: BackgroundTasks) -> None:
        mode.add_item(name)
        tasks.add_task(audit, name)

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 200
    # The task ran after the request's own transaction was committed ...
    assert seen_by_task == [{"lamp"}]
    # ... and what it wrote was committed in a transaction of its own.
    assert stored_names(engine) == {"lamp", "audit-lamp"}
    assert mode.checked_out() == 0


async def test_sync_background_task_writes_are_committed(
    make_app: MakeApp, engine: Engine
) -> None:
    """Sync mode: a sync task runs in the threadpool, with the request's session."""
    app = make_app()

    def audit(name: str) -> None:
        add_item(f"audit-{name}")

    @app.post("/items/{name}")
    def create(name: str, tasks: BackgroundTasks) -> None:
        add_item(name)
        tasks.add_task(audit, name)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp", "audit-lamp"}
    assert engine.pool.checkedout() == 0


async def test_failing_background_task_is_logged_and_rolled_back(
    mode: Mode, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = mode.make_app()

    async def broken_task() -> None:
        mode.add_item("half-done")
        await mode.flush()
        raise RuntimeError("task bug")

    @app.post("/items/{name}")
    async def create(name: str, tasks: BackgroundTasks) -> None:
        mode.add_item(name)
        tasks.add_task(broken_task)

    with caplog.at_level(logging.ERROR, logger="service.db"), pytest.raises(RuntimeError):
        async with client_for(app) as client:
            await client.post("/items/lamp")
    # The request's own work stands; the task's is rolled back and the failure logged.
    assert stored_names(engine) == {"lamp"}
    assert any("POST /items/lamp" in r.getMessage() for r in caplog.records)
    assert mode.checked_out() == 0


async def test_background_task_of_a_rolled_back_request_writes_nothing(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()

    async def audit() -> None:
        mode.add_item("audit")

    @app.post("/items/{name}")
    async def create(name: str, tasks: BackgroundTasks) -> Response:
        mode.add_item(name)
        tasks.add_task(audit)
        return JSONResponse({}, status_code=400, background=tasks)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 400
    # An error response rolls back the whole unit of work, work done after it included.
    assert stored_names(engine) == set()


async def test_background_task_can_keep_its_work_with_an_independent_scope(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()

    async def audit() -> None:
        async with mode.block(independent=True):
            mode.add_item("audit")

    @app.post("/items/{name}")
    async def create(name: str, tasks: BackgroundTasks) -> Response:
        mode.add_item(name)
        tasks.add_task(audit)
        return JSONResponse({}, status_code=400, background=tasks)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 400
    assert stored_names(engine) == {"audit"}


async def test_background_task_reads_the_requests_objects_after_the_commit(
    mode: Mode, engine: Engine
) -> None:
    """The request's objects stay readable after its COMMIT (async: no implicit lazy load
    is possible, so sessions keep them unexpired)."""
    app = mode.make_app()
    read: list[str] = []

    async def audit(item: Item) -> None:
        read.append(item.name)  # after the COMMIT
        mode.add_item(f"audit-{item.name}")

    @app.post("/items/{name}")
    async def create(name: str, tasks: BackgroundTasks) -> None:
        item = mode.add_item(name)
        await mode.flush()
        tasks.add_task(audit, item)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert read == ["lamp"]
    assert stored_names(engine) == {"lamp", "audit-lamp"}


# How the server tells a streaming body that the client left: before ASGI 2.4 (uvicorn) it
# sends http.disconnect and Starlette cancels the body; from 2.4 on `send` raises OSError
# and Starlette raises ClientDisconnect out of the app.
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_stream_cut_off_by_a_disconnect_commits_none_of_its_writes(
    mode: Mode, engine: Engine, caplog: pytest.LogCaptureFixture, spec_version: str
) -> None:
    app = mode.make_app()

    @app.post("/export/{run}")
    async def export(run: str) -> StreamingResponse:
        mode.add_item(f"{run}-before-response")

        async def parts() -> AsyncIterator[bytes]:
            for n in range(20):
                mode.add_item(f"{run}-part-{n}")
                await mode.flush()
                yield b"part\n"

        return StreamingResponse(parts())

    received = [{"type": "http.request", "body": b"", "more_body": False}]
    two_parts = asyncio.Event()
    parts_sent = 0

    async def receive() -> dict[str, Any]:
        if received:
            return received.pop()
        await two_parts.wait()
        if spec_version == "2.4":
            await asyncio.Event().wait()  # told through `send` instead
        return {"type": "http.disconnect"}  # the client hangs up after two parts

    async def send(message: dict[str, Any]) -> None:
        nonlocal parts_sent
        if message["type"] == "http.response.body" and message.get("body"):
            if spec_version == "2.4" and two_parts.is_set():
                raise OSError("the client closed the connection")
            parts_sent += 1
            if parts_sent == 2:
                two_parts.set()
            await asyncio.sleep(0)  # as a socket write would, let the disconnect through

    asgi = {"version": "3.0", "spec_version": spec_version}
    scope = http_scope("POST", "/export/cut", asgi=asgi)
    with caplog.at_level(logging.WARNING, logger="service.db"):
        if spec_version == "2.4":
            with pytest.raises(ClientDisconnect):
                await asyncio.wait_for(app(scope, receive, send), timeout=10)
        else:
            await asyncio.wait_for(app(scope, receive, send), timeout=10)

    assert 2 <= parts_sent < 20
    # The status's own work was committed before the response started; the cut-off body's
    # was not.
    assert stored_names(engine) == {"cut-before-response"}
    assert "response body was not completed" in caplog.text
    assert mode.checked_out() == 0
    async with client_for(app) as client:
        assert (await client.post("/export/whole")).status_code == 200
    assert len(stored_names(engine)) == 1 + 1 + 20


async def test_background_tasks_do_not_run_when_the_commit_failed(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()
    sent: list[str] = []

    @app.post("/pair/{name}")
    async def create_pair(name: str, tasks: BackgroundTasks) -> dict[str, str]:
        mode.add_item(name)
        mode.add_item(name.upper())  # refused at COMMIT: names are unique ignoring case
        tasks.add_task(lambda: sent.append(f"confirmation for {name}"))
        return {"created": name}

    async with client_for(app) as client:
        response = await client.post("/pair/lamp")
        assert response.status_code == 409
        # The task followed up work that was not stored; it never ran.
        assert sent == []
        assert stored_names(engine) == set()
        assert mode.checked_out() == 0
        assert (await client.post("/pair/rug")).status_code == 409
    assert sent == []


@pytest.mark.parametrize("inside", ["gzip", "base_http", None])
async def test_middleware_that_must_wrap_the_session_middleware_is_named_if_inside_it(
    mode: Mode, caplog: pytest.LogCaptureFixture, inside: str | None
) -> None:
    app = FastAPI()
    if inside == "gzip":
        app.add_middleware(GZipMiddleware)
    elif inside == "base_http":

        async def passing(request: Any, call_next: Any) -> Any:
            return await call_next(request)

        app.add_middleware(BaseHTTPMiddleware, dispatch=passing)
    app.add_middleware(mode.middleware, custom_engine=mode.engine)  # added last: outermost
    app.add_middleware(GZipMiddleware)  # outside it: fine

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    with caplog.at_level(logging.WARNING, logger="service.db"):
        async with client_for(app) as client:  # Starlette builds the stack at the first call
            assert (await client.get("/ping")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "inside DBSessionMiddleware" in
                r.getMessage()]
    expected = {"gzip": "GZipMiddleware", "base_http": "BaseHTTPMiddleware"}.get(inside or "")
    assert [w.split()[0] for w in warnings] == ([expected] if expected else [])


class SentFromATaskGroup(JSONResponse):
    """A response sent from a task of an asyncio.TaskGroup, which wraps what it raises in
    an exception group (as some streaming libraries do)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(super().__call__(scope, receive, send))


async def test_a_failed_commit_stops_a_response_sent_from_a_task_group_quietly(
    mode: Mode, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = mode.make_app()
    sent: list[str] = []

    @app.post("/pair/{name}")
    async def create_pair(name: str) -> JSONResponse:
        mode.add_item(name)
        mode.add_item(name.upper())  # refused at COMMIT
        return SentFromATaskGroup(
            {"created": name}, background=BackgroundTask(lambda: sent.append(name))
        )

    with caplog.at_level(logging.WARNING):
        async with client_for(app) as client:
            response = await client.post("/pair/lamp")
            assert response.status_code == 409
            assert (await client.post("/pair/rug")).status_code == 409  # the next one too
    assert sent == []
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0
    # Nothing escaped to the server, and no connection was thrown away as if cancelled.
    assert not [r for r in caplog.records if "ResponseReplaced" in (r.exc_text or "")]
