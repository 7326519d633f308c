"""What the client hears for each kind of database failure: one mapping
(`service.db.failures`), used for failed statements in routes and for failed COMMITs alike,
and the error body the middleware sends unless the app gives it its own."""

import contextlib
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, event, text, update
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    SAWarning,
    SQLAlchemyError,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.responses import JSONResponse

from service.db import Failure
from service.db.aborted import TransactionAborted
from service.items.models import Item
from service.problems import install_problem_handlers
from tests.db.conftest import Mode, client_for, stored_names

pytestmark = pytest.mark.anyio


def one_item(engine: Engine, name: str = "lamp") -> int:
    """Commit one item on a connection of its own; its id."""
    with engine.begin() as connection:
        return connection.execute(
            Item.__table__.insert().values(name=name, price=Decimal("1.00"), version=1)
        ).inserted_primary_key[0]


async def bump_version_behind_the_orms_back(mode: Mode, item_id: int) -> None:
    """The item's version moves on without the session's loaded copy knowing, as when
    another request changed it meanwhile (a second connection cannot do it on SQLite: its
    commit would make this transaction's write fail as locked)."""
    statement = update(Item).where(Item.id == item_id).values(version=Item.version + 1)
    await mode.run(
        lambda session: session.execute(
            statement, execution_options={"synchronize_session": False}
        )
    )


# -- raised by a statement of the route, not handled there -----------------------------------


async def test_constraint_violation_in_a_route_answers_409(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    one_item(engine, "lamp")

    @app.post("/duplicate")
    async def duplicate() -> None:
        mode.add_item("LAMP")
        await mode.flush()  # the unique index refuses it here, inside the route

    async with client_for(app) as client:
        response = await client.post("/duplicate")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == (
        "The change conflicts with data already stored; nothing was saved."
    )
    assert stored_names(engine) == {"lamp"}


async def test_stale_row_in_a_route_answers_409(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    item_id = one_item(engine)

    @app.patch("/items/{item_id}")
    async def rename(item_id: int) -> None:
        item = await mode.run(lambda session: session.get_one(Item, item_id))
        await bump_version_behind_the_orms_back(mode, item_id)
        item.name = "renamed"
        await mode.flush()  # UPDATE ... WHERE version = <read version>: no row matches

    async with client_for(app) as client:
        response = await client.patch(f"/items/{item_id}")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "The record was changed or deleted meanwhile; nothing was saved."
    )
    assert stored_names(engine) == {"lamp"}


# -- raised by the COMMIT after the route returned 2xx -----------------------------------


async def test_stale_row_at_commit_answers_409(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    item_id = one_item(engine)

    @app.patch("/items/{item_id}")
    async def rename(item_id: int) -> dict[str, str]:
        item = await mode.run(lambda session: session.get_one(Item, item_id))
        await bump_version_behind_the_orms_back(mode, item_id)
        item.name = "renamed"  # unflushed: the UPDATE runs at COMMIT, and matches no row
        return {"status": "renamed"}

    async with client_for(app) as client:
        response = await client.patch(f"/items/{item_id}")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "The record was changed or deleted meanwhile; nothing was saved."
    )
    assert "renamed" not in response.text
    assert stored_names(engine) == {"lamp"}
    assert mode.checked_out() == 0


def failing_commit(exc: Exception) -> Callable[[object], None]:
    def refuse(session: object) -> None:
        raise exc

    return refuse


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (OperationalError("COMMIT", {}, Exception("server closed the connection")), 503, "1"),
        (DataError("COMMIT", {}, Exception("terminating connection"),
                   connection_invalidated=True), 503, "1"),
        (DataError("COMMIT", {}, Exception("value too long")), 500, None),
    ],
    ids=["connection-lost", "invalidated", "other"],
)
async def test_failed_commit_status_follows_the_one_mapping(
    mode: Mode, engine: Engine, exc: Exception, status: int, retry_after: str | None
) -> None:
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        await mode.run(lambda session: event.listen(session, "before_commit", failing_commit(exc)))
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.json()["status"] == status
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_commit_on_a_connection_the_server_dropped_answers_503(
    mode: Mode, engine: Engine, backend: str
) -> None:
    """A real lost connection: the server ends the request's backend before its COMMIT
    (psycopg2 and asyncpg each report it their own way; both are 503)."""
    if backend != "postgresql":
        pytest.skip("needs a server that can end another session: PostgreSQL")
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str, drop: bool = False) -> dict[str, str]:
        mode.add_item(name)
        await mode.flush()
        if drop:
            pid = await mode.scalar(text("SELECT pg_backend_pid()"))
            with engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/lamp?drop=true")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "created" not in response.text
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0
    async with client_for(app) as client:  # the pool recovers: the next request is served
        assert (await client.post("/items/next")).status_code == 200
    assert stored_names(engine) == {"next"}


@pytest.fixture
def collides_at_commit(engine: Engine, backend: str) -> Iterator[None]:
    """PostgreSQL: an item named "collide" makes the COMMIT fail with a serialization
    failure (SQLSTATE 40001), as SERIALIZABLE transactions do when they clash: a deferred
    constraint trigger raises it at COMMIT."""
    if backend != "postgresql":
        pytest.skip("SQLSTATE 40001 at COMMIT: PostgreSQL")
    with engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION collide() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.name = 'collide' THEN RAISE EXCEPTION 'could not serialize access' "
            "USING ERRCODE = '40001'; END IF; RETURN NULL; END $$"
        ))
        connection.execute(text(
            "CREATE CONSTRAINT TRIGGER collide AFTER INSERT ON items "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION collide()"
        ))
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER collide ON items"))
            connection.execute(text("DROP FUNCTION collide()"))


async def test_a_serialization_failure_says_nothing_was_stored_and_asks_for_a_retry(
    mode: Mode, engine: Engine, collides_at_commit: None
) -> None:
    """The server rolled the transaction back: "may not have been stored" (what a
    connection lost during COMMIT answers) would be wrong; trying again may succeed."""
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str, in_route: bool = False) -> dict[str, str]:
        if in_route:  # the same failure from a statement of the route
            await mode.run(lambda session: session.execute(text(
                "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; "
                "END $$"
            )))
        mode.add_item(name)
        return {"status": "created"}

    async with client_for(app) as client:
        at_commit = await client.post("/items/collide")
        in_route = await client.post("/items/lamp?in_route=true")
    for response in (at_commit, in_route):
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["detail"] == (
            "The change collided with concurrent changes and was not stored; try again."
        )
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


# -- an error the route caught --------------------------------------------------------------


def insert_again(name: str, *, savepoint: bool) -> Callable[[Session], bool]:
    """A DAO that inserts `name` once more and treats the unique violation as "already
    there": caught bare (wrong on PostgreSQL), or after a savepoint (right everywhere)."""

    def insert(session: Session) -> bool:
        block = session.begin_nested() if savepoint else contextlib.nullcontext()
        try:
            with block:
                session.execute(insert_statement.values(name=name, price=Decimal("1.00")))
        except IntegrityError:
            return False
        return True

    return insert


insert_statement = Item.__table__.insert()


async def test_a_caught_error_without_a_savepoint_never_answers_2xx_for_lost_work(
    mode: Mode, engine: Engine, backend: str
) -> None:
    """PostgreSQL aborts the transaction at the failed statement and answers its COMMIT with
    a ROLLBACK, which the drivers do not report: the route's 2xx would be a lie (nothing is
    stored). It is a failed COMMIT instead: 500. SQLite aborts only the statement: the rest
    of the work is stored, and the route's answer stands."""
    app = mode.make_app()
    one_item(engine, "lamp")

    @app.post("/items/{name}")
    async def create(name: str, again: bool = True) -> dict[str, str]:
        mode.add_item(name)
        await mode.flush()
        if again:
            await mode.run(insert_again("lamp", savepoint=False))  # refused, and caught
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/desk")
    if backend == "postgresql":
        assert response.status_code == 500
        assert response.json()["detail"] == (
            "The change could not be saved; nothing was stored."
        )
        assert stored_names(engine) == {"lamp"}
    else:
        assert response.status_code == 200
        assert stored_names(engine) == {"lamp", "desk"}
    assert mode.checked_out() == 0
    async with client_for(app) as client:  # the connection went back clean
        assert (await client.post("/items/chair?again=false")).status_code == 200
    assert "chair" in stored_names(engine)


async def test_a_caught_error_rolled_back_to_its_savepoint_keeps_the_rest_of_the_work(
    mode: Mode, engine: Engine
) -> None:
    app = mode.make_app()
    one_item(engine, "lamp")

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, bool]:
        mode.add_item(name)
        await mode.flush()
        inserted = await mode.run(insert_again("lamp", savepoint=True))
        mode.add_item(name + "-2")  # the transaction goes on after the savepoint
        await mode.flush()
        return {"inserted": inserted}

    async with client_for(app) as client:
        response = await client.post("/items/desk")
    assert (response.status_code, response.json()) == (200, {"inserted": False})
    assert stored_names(engine) == {"lamp", "desk", "desk-2"}


async def test_a_savepoint_opened_after_the_error_does_not_undo_it(
    mode: Mode, engine: Engine, backend: str
) -> None:
    """Only rolling back to a savepoint that was open when the statement failed makes the
    transaction usable again."""
    if backend != "postgresql":
        pytest.skip("a statement error aborts the whole transaction on PostgreSQL only")
    one_item(engine, "lamp")

    def fail_then_savepoint(session: Session) -> None:
        insert_again("lamp", savepoint=False)(session)
        # Refused too: the transaction is aborted.
        with contextlib.suppress(DBAPIError), session.begin_nested():
            session.execute(text("SELECT 1"))

    with pytest.raises(TransactionAborted, match="savepoint"):
        async with mode.block():
            mode.add_item("desk")
            await mode.flush()
            await mode.run(fail_then_savepoint)
    assert stored_names(engine) == {"lamp"}


BAD = "SELECT 1 / (SELECT count(*) - count(*) FROM items)"  # division by zero, on both


def failed_savepoint_then_outer_undone(session: Session) -> None:
    """A caught error inside savepoint 1, then a SAVEPOINT that itself fails (caught),
    then savepoint 1 rolled back on purpose: the transaction is healthy again."""

    class Undo(Exception):
        pass

    with contextlib.suppress(Undo), session.begin_nested():
        with contextlib.suppress(DBAPIError):
            session.execute(text(BAD))
        with contextlib.suppress(DBAPIError), session.begin_nested():
            session.execute(text("SELECT 1"))
        raise Undo


def outer_savepoint_exit_refused(session: Session) -> None:
    """A savepoint opened by hand inside a `with` savepoint; the error caught; the outer
    block's ROLLBACK TO is refused by SQLAlchemy (never sent), and that is caught too: the
    transaction stays aborted on PostgreSQL."""
    with contextlib.suppress(SQLAlchemyError), session.begin_nested():
        session.begin_nested()
        with contextlib.suppress(DBAPIError):
            session.execute(text(BAD))


def error_while_fetching(session: Session) -> None:
    """The error comes while rows are fetched (a streamed result), not at the statement."""
    statement = text(
        "SELECT 1 / (1000 - n) FROM generate_series(1, 2000) AS n"
    ).execution_options(yield_per=100)
    # (Through asyncpg's server-side cursor the driver's own error comes out unwrapped.)
    with contextlib.suppress(Exception):
        for _ in session.execute(statement):
            pass


def savepoints_written_by_hand(session: Session) -> None:
    """Savepoints in raw SQL, as PostgreSQL takes them: any case, SAVEPOINT optional."""
    session.execute(text("savepoint s1"))
    with contextlib.suppress(DBAPIError):
        session.execute(text(BAD))
    session.execute(text("rollback to s1"))
    session.execute(text("release s1"))


def a_parameter_the_driver_refuses(session: Session) -> None:
    """A value that cannot be sent as the parameter's type: asyncpg refuses it before
    anything reaches the server (psycopg2 sends it, and the server refuses it)."""
    with contextlib.suppress(DBAPIError):
        session.execute(text("SELECT CAST(:x AS integer) + 1"), {"x": "abc"})


@pytest.mark.parametrize(
    ("pattern", "aborted_on_postgresql"),
    [
        (failed_savepoint_then_outer_undone, False),
        (outer_savepoint_exit_refused, True),
        (error_while_fetching, True),
        (savepoints_written_by_hand, False),
        (a_parameter_the_driver_refuses, "sync"),
    ],
    ids=["failed-savepoint-then-outer-undone", "outer-exit-refused", "error-while-fetching",
         "savepoints-by-hand", "parameter-refused"],
)
async def test_the_guard_follows_what_really_ran(
    mode: Mode, engine: Engine, backend: str,
    pattern: Callable[[Session], None], aborted_on_postgresql: bool | str,
) -> None:
    """The 2xx stands exactly when the transaction can still commit: savepoints count as
    they ran on the server (a refused SAVEPOINT, a ROLLBACK TO never sent), and an error
    while fetching rows aborts the transaction like one of the statement."""
    if backend != "postgresql" and pattern is error_while_fetching:
        pytest.skip("generate_series: PostgreSQL")
    app = mode.make_app()

    def quietly(session: Session) -> None:
        with warnings.catch_warnings():  # SQLAlchemy warns of these odd uses, rightly
            warnings.simplefilter("ignore", SAWarning)
            pattern(session)

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        await mode.flush()
        await mode.run(quietly)
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/desk")
    if isinstance(aborted_on_postgresql, str):  # only in this mode (this driver)
        aborted_on_postgresql = mode.name == aborted_on_postgresql
    aborted = backend == "postgresql" and aborted_on_postgresql
    assert response.status_code == (500 if aborted else 200), response.text
    assert stored_names(engine) == (set() if aborted else {"desk"})


async def test_a_refused_commit_leaves_the_pooled_connection_clean(
    mode: Mode, engine: Engine, backend: str
) -> None:
    """Code of its own on the middleware's engine (a job) that commits an aborted
    transaction gets TransactionAborted - and the connection it gives back is rolled
    back, so the next request on it works."""
    if backend != "postgresql":
        pytest.skip("an aborted transaction: PostgreSQL")
    app = mode.make_app()

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        return {"status": "created"}

    def job(session: Session) -> None:
        with contextlib.suppress(DBAPIError):
            session.execute(text(BAD))
        session.commit()

    with pytest.raises(TransactionAborted):
        if mode.name == "async":
            async with AsyncSession(mode.engine) as session:
                await session.run_sync(job)
        else:
            with Session(mode.engine) as session:
                job(session)
    async with client_for(app) as client:
        assert (await client.post("/items/chair")).status_code == 200
    assert stored_names(engine) == {"chair"}


# -- the error body -----------------------------------------------------------------------


async def test_default_error_body_is_a_detail_object(mode: Mode, engine: Engine) -> None:
    """Without `error_response`, service.db needs nothing of the app: FastAPI's own shape."""
    app = FastAPI()
    app.add_middleware(mode.middleware, custom_engine=mode.engine)

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        mode.add_item(name.upper())  # unflushed: the unique index refuses them at COMMIT
        return {"status": "created"}

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "detail": "The change conflicts with data already stored; nothing was saved."
    }
    assert stored_names(engine) == set()


async def test_the_app_chooses_the_error_body(mode: Mode, engine: Engine) -> None:
    def teapot(failure: Failure) -> JSONResponse:
        return JSONResponse({"was": failure.status, "retry": failure.headers}, 418)

    app = mode.make_app(error_response=teapot)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.add_item(name.upper())

    async with client_for(app) as client:
        response = await client.post("/items/lamp")
    assert response.status_code == 418
    assert response.json() == {"was": 409, "retry": {}}
    assert stored_names(engine) == set()


async def test_problem_handlers_answer_database_failures_without_the_middleware() -> None:
    """The exception handlers use the same mapping when no session middleware is involved."""
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    async with client_for(app) as client:
        response = await client.get("/boom")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"] == (
        "The database is not available right now; try again shortly."
    )
