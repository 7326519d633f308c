"""When the request's work is committed, and what the client hears when it can't be
(behaviours 3, 4 and 11 of service.db)."""

import logging
from decimal import Decimal

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from service.db import db
from service.items.models import Item
from tests.db.conftest import MakeApp, add_item, client_for, stored_names

pytestmark = pytest.mark.anyio


class OutOfStock(Exception):
    pass


async def test_commit_when_handler_returns_200(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        add_item(name)
        return {"name": name}

    response = await client.post("/items/lamp")
    assert response.status_code == 200
    assert stored_names(engine) == {"lamp"}


@pytest.mark.parametrize("status", [201, 204, 302])
async def test_commit_when_handler_returns_2xx_or_3xx(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine, status: int
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> Response:
        add_item(name)
        if status == 302:
            return RedirectResponse("/elsewhere", status_code=302)
        return JSONResponse(None if status == 204 else {}, status_code=status)

    response = await client.post("/items/lamp")
    assert response.status_code == status
    assert stored_names(engine) == {"lamp"}


async def test_commit_happens_before_the_response_is_sent(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, _ = app_client
    seen_on_start: list[set[str]] = []

    @app.post("/items/{name}")
    def create(name: str) -> dict[str, str]:
        add_item(name)
        return {}

    inner = app.build_middleware_stack()

    async def watching_app(scope, receive, send):  # type: ignore[no-untyped-def]
        async def watching_send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                seen_on_start.append(stored_names(engine))
            await send(message)

        await inner(scope, receive, watching_send)

    async with client_for(watching_app) as watcher:  # type: ignore[arg-type]
        await watcher.post("/items/lamp")
    assert seen_on_start == [{"lamp"}]


async def test_rollback_when_handler_raises_http_exception(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.session.flush()
        raise HTTPException(status_code=404, detail="no such shelf")

    response = await client.post("/items/lamp")
    assert response.status_code == 404
    assert stored_names(engine) == set()


async def test_rollback_when_handler_returns_409(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    async def create(name: str) -> JSONResponse:
        add_item(name)
        db.session.flush()
        return JSONResponse({"detail": "conflict"}, status_code=409)

    response = await client.post("/items/lamp")
    assert response.status_code == 409
    assert stored_names(engine) == set()


async def test_rollback_when_a_custom_exception_handler_answers_4xx(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.exception_handler(OutOfStock)
    async def out_of_stock(request: Request, exc: OutOfStock) -> JSONResponse:
        return JSONResponse({"detail": "out of stock"}, status_code=422)

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.session.flush()
        raise OutOfStock

    response = await client.post("/items/lamp")
    assert response.status_code == 422
    assert stored_names(engine) == set()


async def test_unhandled_exception_rolls_back_and_propagates(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.session.flush()
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError, match="handler bug"):
        await client.post("/items/lamp")
    assert stored_names(engine) == set()
    assert engine.pool.checkedout() == 0


async def test_unhandled_exception_gives_500_to_the_client(
    make_app: MakeApp, engine: Engine
) -> None:
    app = make_app()

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        raise RuntimeError("handler bug")

    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 500
    assert stored_names(engine) == set()


async def test_commit_policy_is_configurable(make_app: MakeApp, engine: Engine) -> None:
    # A service that wants to keep work done before a 404, but never after a 5xx.
    app = make_app(commit_policy=lambda status: status < 500)

    @app.post("/items/{name}")
    def create(name: str) -> JSONResponse:
        add_item(name)
        return JSONResponse({}, status_code=404 if name == "kept" else 503)

    async with client_for(app) as client:
        assert (await client.post("/items/kept")).status_code == 404
        assert (await client.post("/items/dropped")).status_code == 503
    assert stored_names(engine) == {"kept"}


async def test_failed_commit_on_duplicate_answers_409_not_2xx(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/pair/{name}")
    def create_pair(name: str) -> dict[str, str]:
        # Unflushed: the unique violation surfaces only at COMMIT, after the handler.
        add_item(name)
        add_item(name.upper())
        return {"status": "created"}

    response = await client.post("/pair/lamp")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 409 and body["title"] == "Conflict"
    assert "created" not in response.text
    assert stored_names(engine) == set()
    assert engine.pool.checkedout() == 0


async def test_failed_commit_for_other_reasons_answers_500(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> dict[str, str]:
        add_item(name)

        def refuse(session: object) -> None:
            raise OSError("disk full")

        event.listen(db.session, "before_commit", refuse)
        return {"status": "created"}

    response = await client.post("/items/lamp")
    assert response.status_code == 500
    assert response.json()["status"] == 500
    assert stored_names(engine) == set()
    assert engine.pool.checkedout() == 0


async def test_failed_commit_is_logged_with_the_request(
    app_client: tuple[FastAPI, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    app, client = app_client

    @app.post("/pair/{name}")
    def create_pair(name: str) -> None:
        add_item(name)
        add_item(name.upper())

    with caplog.at_level(logging.ERROR, logger="service.db"):
        await client.post("/pair/lamp", headers={"x-request-id": "req-42"})
    assert any(
        "POST /pair/lamp" in r.getMessage() and "req-42" in r.getMessage()
        for r in caplog.records
    )


async def test_commit_on_exit_false_commits_only_what_the_handler_commits(
    make_app: MakeApp, engine: Engine
) -> None:
    app = make_app(commit_on_exit=False)

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.session.commit()
        add_item(name + "-uncommitted")

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp"}
    assert engine.pool.checkedout() == 0


async def test_on_commit_hooks_run_in_order_after_the_commit(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client
    calls: list[tuple[str, set[str]]] = []

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.on_commit(lambda: calls.append(("first", stored_names(engine))))
        db.on_commit(lambda: calls.append(("second", stored_names(engine))))

    await client.post("/items/lamp")
    assert calls == [("first", {"lamp"}), ("second", {"lamp"})]


async def test_on_commit_hooks_are_dropped_on_rollback(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client
    calls: list[str] = []

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        db.on_commit(lambda: calls.append("sent email"))
        raise HTTPException(status_code=400)

    # The 400 is the handler's own: it ran and registered the hook, then rolled back.
    assert (await client.post("/items/lamp")).status_code == 400
    assert stored_names(engine) == set()
    assert calls == []


async def test_on_commit_hooks_are_dropped_when_the_commit_fails(
    app_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_client
    calls: list[str] = []

    @app.post("/pair/{name}")
    def create_pair(name: str) -> None:
        add_item(name)
        add_item(name.upper())
        db.on_commit(lambda: calls.append("sent email"))

    assert (await client.post("/pair/lamp")).status_code == 409
    assert calls == []


async def test_failing_on_commit_hook_is_logged_and_changes_nothing(
    app_client: tuple[FastAPI, httpx.AsyncClient],
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, client = app_client
    calls: list[str] = []

    def broken_hook() -> None:
        raise ValueError("mail server down")

    @app.post("/items/{name}")
    def create(name: str) -> dict[str, str]:
        add_item(name)
        db.on_commit(broken_hook)
        db.on_commit(lambda: calls.append("second hook ran"))
        return {"status": "created"}

    with caplog.at_level(logging.ERROR, logger="service.db"):
        response = await client.post("/items/lamp")
    assert response.status_code == 200
    assert response.json() == {"status": "created"}
    assert stored_names(engine) == {"lamp"}
    assert calls == ["second hook ran"]
    assert any("mail server down" in (r.exc_text or "") for r in caplog.records)


async def test_on_commit_outside_a_scope_raises() -> None:
    from service.db import Database, MissingSessionError

    fresh = Database("orders")
    fresh.configure("sqlite://")
    with pytest.raises(MissingSessionError):
        fresh.on_commit(lambda: None)


async def test_price_check_violation_at_commit_answers_409(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> None:
        db.session.add(Item(name=name, price=Decimal("-1.00")))

    assert (await client.post("/items/lamp")).status_code == 409
    assert stored_names(engine) == set()


async def test_failed_commit_because_the_database_went_away_answers_503(
    app_client: tuple[FastAPI, httpx.AsyncClient], engine: Engine
) -> None:
    app, client = app_client

    @app.post("/items/{name}")
    def create(name: str) -> dict[str, str]:
        add_item(name)

        def connection_lost(session: object) -> None:
            raise OperationalError(
                "COMMIT", {}, Exception("server closed the connection unexpectedly"),
                connection_invalidated=True,
            )

        event.listen(db.session, "before_commit", connection_lost)
        return {"status": "created"}

    response = await client.post("/items/lamp")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 503
    assert stored_names(engine) == set()
    assert engine.pool.checkedout() == 0
