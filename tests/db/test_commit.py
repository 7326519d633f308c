"""When the request's work is committed, and what the client hears when it can't be
(behaviours 3, 4 and 11 of service.db), in both modes."""

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import Engine, event
from sqlalchemy.exc import IntegrityError, OperationalError

from service.items.models import Item
from tests.db.conftest import MakeApp, Mode, add_item, client_for, stored_names

pytestmark = pytest.mark.anyio


class OutOfStock(Exception):
    pass


def on_before_commit(mode: Mode, listener: Callable[[Any], None]) -> Any:
    """Listen to the request session's `before_commit` (on the sync session in both modes)."""
    return mode.run(lambda session: event.listen(session, "before_commit", listener))


async def test_commit_when_handler_returns_200(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        return {"name": name}

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 200
    assert stored_names(engine) == {"lamp"}


async def test_commit_when_a_sync_route_returns_200(make_app: MakeApp, engine: Engine) -> None:
    """Sync mode: a `def` route, run in the threadpool, with the request's session."""
    app = make_app()

    @app.post("/items/{name}")
    def create(name: str) -> dict[str, str]:
        add_item(name)
        return {"name": name}

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp"}


@pytest.mark.parametrize("status", [201, 204, 302])
async def test_commit_when_handler_returns_2xx_or_3xx(
    mode: Mode, engine: Engine, status: int
) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> Response:
        mode.add_item(name)
        if status == 302:
            return RedirectResponse("/elsewhere", status_code=302)
        return JSONResponse(None if status == 204 else {}, status_code=status)

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == status
    assert stored_names(engine) == {"lamp"}


async def test_commit_happens_before_the_response_is_sent(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    seen_on_start: list[set[str]] = []

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
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


async def test_rollback_when_handler_raises_http_exception(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        raise HTTPException(status_code=404, detail="no such shelf")

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 404
    assert stored_names(engine) == set()


async def test_rollback_when_handler_returns_409(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> JSONResponse:
        mode.add_item(name)
        await mode.flush()
        return JSONResponse({"detail": "conflict"}, status_code=409)

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 409
    assert stored_names(engine) == set()


async def test_rollback_when_a_custom_exception_handler_answers_4xx(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()

    @app.exception_handler(OutOfStock)
    async def out_of_stock(request: Request, exc: OutOfStock) -> JSONResponse:
        return JSONResponse({"detail": "out of stock"}, status_code=422)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        raise OutOfStock

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 422
    assert stored_names(engine) == set()


async def test_unhandled_exception_rolls_back_and_propagates(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError, match="handler bug"):
        async with client_for(app) as client:
            await client.post("/items/lamp")
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_unhandled_exception_gives_500_to_the_client(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        raise RuntimeError("handler bug")

    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 500
    assert stored_names(engine) == set()


async def test_commit_policy_is_configurable(mode: Mode, engine: Engine) -> None:
    # A service that wants to keep work done before a 404, but never after a 5xx.
    app = mode.make_app(commit_policy=lambda status: status < 500)

    @app.post("/items/{name}")
    async def create(name: str) -> JSONResponse:
        mode.add_item(name)
        return JSONResponse({}, status_code=404 if name == "kept" else 503)

    async with client_for(app) as client:
        assert (await client.post("/items/kept")).status_code == 404
        assert (await client.post("/items/dropped")).status_code == 503
    assert stored_names(engine) == {"kept"}


async def test_failed_commit_on_duplicate_answers_409_not_2xx(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/pair/{name}")
    async def create_pair(name: str) -> dict[str, str]:
        # Unflushed: the unique violation surfaces only at COMMIT, after the handler.
        mode.add_item(name)
        mode.add_item(name.upper())
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/pair/lamp")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 409 and body["title"] == "Conflict"
    assert "created" not in response.text
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_failed_commit_for_other_reasons_answers_500(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    def refuse(session: object) -> None:
        raise OSError("disk full")

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        await on_before_commit(mode, refuse)
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 500
    assert response.json()["status"] == 500
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_failed_commit_is_logged_with_the_request(
    mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    app = mode.make_app()

    @app.post("/pair/{name}")
    async def create_pair(name: str) -> None:
        mode.add_item(name)
        mode.add_item(name.upper())

    with caplog.at_level(logging.ERROR, logger="service.db"):
        async with client_for(app) as client:
            assert (
                await client.post("/pair/lamp", headers={"x-request-id": "req-42"})
            ).status_code == 409
    assert any(
        "POST /pair/lamp" in r.getMessage() and "req-42" in r.getMessage()
        for r in caplog.records
    )


async def test_commit_on_exit_false_commits_only_what_the_handler_commits(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app(commit_on_exit=False)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.commit()
        mode.add_item(name + "-uncommitted")

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp"}
    assert mode.checked_out() == 0


async def test_on_commit_hooks_run_in_order_after_the_commit(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    calls: list[tuple[str, set[str]]] = []

    async def awaited_hook() -> None:  # async mode awaits a hook's awaitable
        calls.append(("third", stored_names(engine)))

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.database.on_commit(lambda: calls.append(("first", stored_names(engine))))
        mode.database.on_commit(lambda: calls.append(("second", stored_names(engine))))
        if mode.name == "async":
            mode.database.on_commit(awaited_hook)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    expected = [("first", {"lamp"}), ("second", {"lamp"})]
    if mode.name == "async":
        expected.append(("third", {"lamp"}))
    assert calls == expected


async def test_on_commit_hooks_are_dropped_on_rollback(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    calls: list[str] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.database.on_commit(lambda: calls.append("sent email"))
        raise HTTPException(status_code=400)

    # The 400 is the handler's own: it ran and registered the hook, then rolled back.
    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 400
    assert stored_names(engine) == set()
    assert calls == []


async def test_on_commit_hooks_are_dropped_when_the_commit_fails(mode: Mode) -> None:
    app = mode.make_app()
    calls: list[str] = []

    @app.post("/pair/{name}")
    async def create_pair(name: str) -> None:
        mode.add_item(name)
        mode.add_item(name.upper())
        mode.database.on_commit(lambda: calls.append("sent email"))

    async with client_for(app) as client:
        assert (await client.post("/pair/lamp")).status_code == 409
    assert calls == []


async def test_failing_on_commit_hook_is_logged_and_changes_nothing(
    mode: Mode, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = mode.make_app()
    calls: list[str] = []

    def broken_hook() -> None:
        raise ValueError("mail server down")

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        mode.database.on_commit(broken_hook)
        mode.database.on_commit(lambda: calls.append("second hook ran"))
        return {"status": "created"}

    with caplog.at_level(logging.ERROR, logger="service.db"):
        async with client_for(app) as client:
            response = await client.post("/items/lamp")
    assert response.status_code == 200
    assert response.json() == {"status": "created"}
    assert stored_names(engine) == {"lamp"}
    assert calls == ["second hook ran"]
    assert any("mail server down" in (r.exc_text or "") for r in caplog.records)


async def test_on_commit_hook_runs_after_a_commit_made_by_hand(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app(commit_on_exit=False)
    calls: list[set[str]] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.database.on_commit(lambda: calls.append(stored_names(engine)))
        await mode.commit()

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert calls == [{"lamp"}]


async def test_a_hook_whose_work_was_committed_by_hand_runs_though_the_rest_rolls_back(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()
    calls: list[str] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.database.on_commit(lambda: calls.append(f"{name} stored"))
        await mode.commit()
        mode.add_item("rug")
        mode.database.on_commit(lambda: calls.append("rug stored"))
        raise HTTPException(status_code=400)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 400
    assert stored_names(engine) == {"lamp"}
    assert calls == ["lamp stored"]


async def test_a_hook_after_the_last_commit_by_hand_is_dropped_if_nothing_commits_it(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app(commit_on_exit=False)
    calls: list[str] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.commit()
        mode.add_item("rug")
        mode.database.on_commit(lambda: calls.append("rug stored"))

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp"}
    assert calls == []


@pytest.mark.parametrize(("status", "runs"), [(200, True), (400, False)])
async def test_a_hook_of_a_request_that_ran_no_sql_follows_the_commit_policy(
    mode: Mode, status: int, runs: bool
) -> None:
    app = mode.make_app()
    calls: list[str] = []

    @app.post("/notify")
    async def notify() -> Response:
        mode.database.on_commit(lambda: calls.append("notified"))
        return Response(status_code=status)

    async with client_for(app) as client:
        assert (await client.post("/notify")).status_code == status
    assert calls == (["notified"] if runs else [])


@pytest.mark.parametrize(("status", "expected"), [(200, ["lamp", "vase"]), (400, [])])
async def test_a_hook_waits_for_its_savepoint_and_then_for_the_transaction(
    mode: Mode, engine: Engine, status: int, expected: list[str]
) -> None:
    app = mode.make_app()
    calls: list[str] = []

    def work(session: Any) -> None:
        session.add(Item(name="lamp", price=Decimal("1.00")))
        mode.database.on_commit(lambda: calls.append("lamp"))
        undone = session.begin_nested()
        session.add(Item(name="rug", price=Decimal("1.00")))
        mode.database.on_commit(lambda: calls.append("rug"))
        undone.rollback()  # drops the rug and its hook
        released = session.begin_nested()
        session.add(Item(name="vase", price=Decimal("1.00")))
        mode.database.on_commit(lambda: calls.append("vase"))
        released.commit()  # a RELEASE: the vase's hook now waits for the transaction
        assert calls == []

    @app.post("/work")
    async def post_work() -> Response:
        await mode.run(work)
        return Response(status_code=status)

    async with client_for(app) as client:
        assert (await client.post("/work")).status_code == status
    assert calls == expected
    assert stored_names(engine) == set(expected)


async def test_a_hook_in_a_block_committed_by_hand_runs(mode: Mode, engine: Engine) -> None:
    jobs = mode.own_database("jobs")
    calls: list[set[str]] = []

    async with mode.block(jobs, commit_on_exit=False):
        mode.add_item("lamp", jobs)
        jobs.on_commit(lambda: calls.append(stored_names(engine)))
        await mode.commit(jobs)
    assert calls == [{"lamp"}]


async def test_a_hook_of_a_commit_by_hand_runs_though_the_blocks_own_commit_fails(
    mode: Mode, engine: Engine
) -> None:
    jobs = mode.own_database("jobs")
    calls: list[str] = []

    with pytest.raises(IntegrityError):
        async with mode.block(jobs):
            mode.add_item("lamp", jobs)
            jobs.on_commit(lambda: calls.append("lamp stored"))
            await mode.commit(jobs)
            mode.add_item("LAMP", jobs)  # refused at the block's COMMIT: one name
            jobs.on_commit(lambda: calls.append("LAMP stored"))
    assert stored_names(engine) == {"lamp"}
    assert calls == ["lamp stored"]


async def test_a_hook_registered_by_a_hook_runs_at_the_blocks_end(mode: Mode) -> None:
    jobs = mode.own_database("jobs")
    calls: list[str] = []

    def outer() -> None:
        calls.append("outer")
        jobs.on_commit(lambda: calls.append("inner"))

    async with mode.block(jobs):
        mode.add_item("lamp", jobs)
        jobs.on_commit(outer)
    assert calls == ["outer", "inner"]


async def test_a_hook_registered_by_a_hook_that_commits_it_by_hand_runs(
    mode: Mode, engine: Engine
) -> None:
    jobs = mode.own_database("jobs")
    calls: list[str] = []

    def write_rug() -> None:
        calls.append("outer")
        mode.add_item("rug", jobs)
        jobs.on_commit(lambda: calls.append("rug stored"))

    def outer() -> None:
        write_rug()
        jobs.session.commit()

    async def outer_awaited() -> None:
        write_rug()
        await jobs.session.commit()

    async with mode.block(jobs):
        mode.add_item("lamp", jobs)
        jobs.on_commit(outer_awaited if mode.name == "async" else outer)
    assert stored_names(engine) == {"lamp", "rug"}
    assert calls == ["outer", "rug stored"]


async def test_what_a_hook_writes_at_the_blocks_end_is_committed(
    mode: Mode, engine: Engine
) -> None:
    """A hook that writes through the session and leaves the commit to the scope: the
    scope's end commits it, as the hooks it registers are run (it was closed away)."""
    jobs = mode.own_database("jobs")

    async with mode.block(jobs):
        mode.add_item("lamp", jobs)
        jobs.on_commit(lambda: mode.add_item("audit of lamp", jobs))
    assert stored_names(engine) == {"lamp", "audit of lamp"}


async def test_what_a_hook_of_a_background_task_writes_is_committed(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()

    def later() -> None:
        mode.add_item("background")
        mode.database.on_commit(lambda: mode.add_item("audit of background"))

    @app.post("/items/{name}")
    async def create(name: str, tasks: BackgroundTasks) -> None:
        mode.add_item(name)
        tasks.add_task(later)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp", "background", "audit of background"}


async def test_a_hook_that_keeps_registering_itself_does_not_hang_the_scope(
    mode: Mode,
) -> None:
    jobs = mode.own_database("jobs")
    calls: list[str] = []

    def again() -> None:
        calls.append("again")
        jobs.on_commit(again)

    async with mode.block(jobs):
        jobs.on_commit(again)
    assert 1 < len(calls) <= 20


async def test_a_session_closed_by_hand_drops_the_hooks_of_the_work_it_discarded(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()
    calls: list[str] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        mode.database.on_commit(lambda: calls.append(f"{name} stored"))
        await mode.run(lambda session: session.close())  # the INSERT is discarded

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == set()
    assert calls == []


async def test_on_commit_outside_a_scope_raises(mode: Mode) -> None:
    from service.db import MissingSessionError

    fresh = mode.database_class("orders")
    fresh.configure(mode.engine)
    with pytest.raises(MissingSessionError):
        fresh.on_commit(lambda: None)


async def test_price_check_violation_at_commit_answers_409(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.database.session.add(Item(name=name, price=Decimal("-1.00")))

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 409
    assert stored_names(engine) == set()


async def test_failed_commit_because_the_database_went_away_answers_503(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()

    def connection_lost(session: object) -> None:
        raise OperationalError(
            "COMMIT", {}, Exception("server closed the connection unexpectedly"),
            connection_invalidated=True,
        )

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        await on_before_commit(mode, connection_lost)
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 503
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0
