"""fastapi-sqlalchemy 0.2.1's own test suite (tests/test_session.py), ported to service.db.

Each test keeps the intent of the upstream case. Where 0.2.1 behaved wrongly, or relied on
Starlette building middleware eagerly (it has been lazy since 0.24), the comment says what
we do differently and why. A fresh `Database` per test stands in for upstream's trick of
deleting the module from sys.modules to clear its global state.
"""

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.middleware.base import BaseHTTPMiddleware

from service.db import (
    Database,
    DBSessionMiddleware,
    MissingSessionError,
    SessionNotInitialisedError,
)
from tests.db.conftest import add_item, client_for, stored_names

pytestmark = pytest.mark.anyio


@pytest.fixture
def fresh_db() -> Database:
    return Database("db")


def test_init(migrated_url: str) -> None:
    middleware = DBSessionMiddleware(FastAPI(), db_url=migrated_url)
    # Upstream asserted a BaseHTTPMiddleware; ours is pure ASGI on purpose (no extra task,
    # context and streaming stay intact).
    assert not isinstance(middleware, BaseHTTPMiddleware)


def test_init_required_args() -> None:
    with pytest.raises(ValueError) as exc_info:
        DBSessionMiddleware(FastAPI())
    assert exc_info.value.args[0] == "You need to pass a db_url or a custom_engine parameter."


def test_init_required_args_custom_engine(engine: Engine, fresh_db: Database) -> None:
    middleware = DBSessionMiddleware(FastAPI(), custom_engine=engine, database=fresh_db)
    assert middleware.engine is engine


def test_init_correct_optional_args(migrated_url: str, fresh_db: Database) -> None:
    engine_args = {"echo": True}
    session_args = {"expire_on_commit": False}
    DBSessionMiddleware(
        FastAPI(), migrated_url, engine_args=engine_args, session_args=session_args,
        database=fresh_db,
    )
    with fresh_db():
        assert not fresh_db.session.expire_on_commit
        engine = fresh_db.session.bind
        assert isinstance(engine, Engine) and engine.echo


def test_init_incorrect_optional_args(migrated_url: str) -> None:
    with pytest.raises(TypeError) as exc_info:
        DBSessionMiddleware(FastAPI(), db_url=migrated_url, invalid_args="test")  # type: ignore[call-arg]
    assert "__init__() got an unexpected keyword argument 'invalid_args'" in str(exc_info.value)


async def test_inside_route(engine: Engine, fresh_db: Database) -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine, database=fresh_db)

    @app.get("/")
    def test_get() -> bool:
        return isinstance(fresh_db.session, Session)

    async with client_for(app) as client:
        assert (await client.get("/")).json() is True


async def test_inside_route_without_middleware_fails(fresh_db: Database) -> None:
    app = FastAPI()

    @app.get("/")
    def test_get() -> str:
        try:
            fresh_db.session  # noqa: B018
        except SessionNotInitialisedError:
            return "not initialised"
        return "session"

    async with client_for(app) as client:
        assert (await client.get("/")).json() == "not initialised"


async def test_outside_of_route(engine: Engine, fresh_db: Database) -> None:
    # Upstream: `with db():` right after add_middleware. Starlette now builds middleware on
    # the first request, so 0.2.1 raises SessionNotInitialisedError there. We offer
    # `db.configure(...)` for use before any request, and a built middleware still
    # becomes the default of an unconfigured database, as upstream's did.
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine, database=fresh_db)
    async with client_for(app) as client:
        await client.get("/")
    with fresh_db():
        assert isinstance(fresh_db.session, Session)

    configured_first = Database("db")
    configured_first.configure(engine)
    with configured_first():
        assert isinstance(configured_first.session, Session)


def test_outside_of_route_without_middleware_fails(fresh_db: Database) -> None:
    with pytest.raises(SessionNotInitialisedError):
        fresh_db.session  # noqa: B018
    with pytest.raises(SessionNotInitialisedError), fresh_db():
        pass


def test_outside_of_route_without_context_fails(engine: Engine, fresh_db: Database) -> None:
    DBSessionMiddleware(FastAPI(), custom_engine=engine, database=fresh_db)
    with pytest.raises(MissingSessionError) as exc_info:
        fresh_db.session  # noqa: B018
    assert "with db():" in str(exc_info.value)  # the message says how to open one


def test_db_context_temporary_session_args(engine: Engine, fresh_db: Database) -> None:
    fresh_db.configure(engine)
    with fresh_db(session_args={}):
        assert isinstance(fresh_db.session, Session)
        assert fresh_db.session.expire_on_commit
    with fresh_db(session_args={"expire_on_commit": False}):
        assert not fresh_db.session.expire_on_commit


def test_rollback(engine: Engine, fresh_db: Database) -> None:
    # Upstream could only check that no error escaped; we check the row is gone.
    fresh_db.configure(engine)
    with pytest.raises(Exception, match="fail"), fresh_db():
        add_item("lamp", fresh_db)
        fresh_db.session.flush()
        raise Exception("fail")
    assert stored_names(engine) == set()


@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_commit_on_exit(engine: Engine, fresh_db: Database, commit_on_exit: bool) -> None:
    # Upstream defaults commit_on_exit to False; ours defaults to True (the service commits
    # when the handler finishes). Both values keep their meaning.
    app = FastAPI()
    app.add_middleware(
        DBSessionMiddleware, custom_engine=engine, commit_on_exit=commit_on_exit,
        database=fresh_db,
    )

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name, fresh_db)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == ({"lamp"} if commit_on_exit else set())


def test_commit_on_exit_defaults_to_true(engine: Engine) -> None:
    assert DBSessionMiddleware(FastAPI(), custom_engine=engine).commit_on_exit is True


def test_with_db_returns_an_object_with_the_session(engine: Engine, fresh_db: Database) -> None:
    fresh_db.configure(engine)
    with fresh_db() as ctx:
        assert isinstance(ctx.session, Session)


