"""Coming from fastapi-async-sqlalchemy: its API (`SQLAlchemyMiddleware`, `db.session`,
`async with db()`, the two errors) works with the import changed, and where this package
differs on purpose (README, "Coming from fastapi-async-sqlalchemy") the difference is
pinned down. Adapted from the cases of fastapi-async-sqlalchemy's tests/test_session.py."""

import asyncio
from decimal import Decimal

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.middleware.base import BaseHTTPMiddleware

from service.db.asyncio import (
    Database,
    MissingSessionError,
    SessionNotInitialisedError,
    SQLAlchemyMiddleware,
)
from service.items.models import Item
from tests.db.conftest import async_url, client_for, stored_names

pytestmark = pytest.mark.anyio


@pytest.fixture
def fresh_db() -> Database:
    """A database object no middleware or script has touched yet."""
    return Database("compat")


@pytest.fixture
def url(migrated_url: str) -> str:
    return async_url(migrated_url)


def item(name: str) -> Item:
    return Item(name=name, price=Decimal("1.00"))


async def test_init_builds_a_pure_asgi_middleware(url: str, fresh_db: Database) -> None:
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url, database=fresh_db)
    assert not isinstance(middleware, BaseHTTPMiddleware)  # theirs is BaseHTTPMiddleware
    await middleware.engine.dispose()


async def test_init_required_args() -> None:
    with pytest.raises(ValueError) as exc_info:
        SQLAlchemyMiddleware(FastAPI())
    assert exc_info.value.args[0] == "You need to pass a db_url or a custom_engine parameter."


async def test_init_with_a_custom_engine(async_engine: AsyncEngine, fresh_db: Database) -> None:
    middleware = SQLAlchemyMiddleware(FastAPI(), custom_engine=async_engine, database=fresh_db)
    assert middleware.engine is async_engine


async def test_init_applies_engine_args(url: str, fresh_db: Database) -> None:
    SQLAlchemyMiddleware(
        FastAPI(), url, engine_args={"echo": True}, session_args={}, database=fresh_db
    )
    async with fresh_db():
        assert fresh_db.session.bind is not None and fresh_db.session.bind.echo
    await fresh_db.engine.dispose()


async def test_init_refuses_unknown_args(url: str) -> None:
    with pytest.raises(TypeError) as exc_info:
        SQLAlchemyMiddleware(FastAPI(), db_url=url, invalid_args="test")  # type: ignore[call-arg]
    assert "unexpected keyword argument 'invalid_args'" in exc_info.value.args[0]


async def test_inside_route(async_engine: AsyncEngine, fresh_db: Database) -> None:
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, custom_engine=async_engine, database=fresh_db)

    @app.get("/")
    async def route() -> bool:
        return isinstance(fresh_db.session, AsyncSession)

    async with client_for(app) as client:
        assert (await client.get("/")).json() is True


async def test_inside_route_without_middleware_fails(fresh_db: Database) -> None:
    app = FastAPI()

    @app.get("/")
    async def route() -> str:
        try:
            fresh_db.session  # noqa: B018
        except SessionNotInitialisedError:
            return "not initialised"
        return "session"

    async with client_for(app) as client:
        assert (await client.get("/")).json() == "not initialised"


async def test_outside_of_route_needs_configure_before_the_first_request(
    async_engine: AsyncEngine, fresh_db: Database
) -> None:
    """Starlette builds middleware at the first request, so `add_middleware` alone leaves
    scripts without an engine (fastapi-async-sqlalchemy's test assumes otherwise);
    `db.configure(...)` is the way."""
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, custom_engine=async_engine, database=fresh_db)
    with pytest.raises(SessionNotInitialisedError):
        async with fresh_db():
            pass
    fresh_db.configure(async_engine)
    async with fresh_db():
        assert isinstance(fresh_db.session, AsyncSession)


async def test_outside_of_route_without_middleware_fails(fresh_db: Database) -> None:
    with pytest.raises(SessionNotInitialisedError):
        fresh_db.session  # noqa: B018
    with pytest.raises(SessionNotInitialisedError):
        async with fresh_db():
            pass


async def test_outside_of_route_without_context_fails(
    async_engine: AsyncEngine, fresh_db: Database
) -> None:
    fresh_db.configure(async_engine)
    with pytest.raises(MissingSessionError) as exc_info:
        fresh_db.session  # noqa: B018
    # The message says how to open one, in this mode.
    assert f"`async with {fresh_db.name}():`" in str(exc_info.value)


async def test_commit_failure_propagates_and_the_next_block_works(
    async_engine: AsyncEngine, fresh_db: Database, engine: Engine
) -> None:
    fresh_db.configure(async_engine)
    with pytest.raises(IntegrityError):
        async with fresh_db():
            fresh_db.session.add_all([item("twin"), item("TWIN")])  # refused at COMMIT
    async with fresh_db():
        fresh_db.session.add(item("next"))
    assert stored_names(engine) == {"next"}
    assert async_engine.sync_engine.pool.checkedout() == 0


async def test_an_exception_rolls_back(
    async_engine: AsyncEngine, fresh_db: Database, engine: Engine
) -> None:
    fresh_db.configure(async_engine)
    with pytest.raises(RuntimeError):
        async with fresh_db():
            fresh_db.session.add(item("lamp"))
            await fresh_db.session.flush()
            raise RuntimeError
    assert stored_names(engine) == set()


@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_db_context_session_args(
    async_engine: AsyncEngine, fresh_db: Database, engine: Engine, commit_on_exit: bool
) -> None:
    fresh_db.configure(async_engine)
    async with fresh_db(session_args={}, commit_on_exit=commit_on_exit):
        fresh_db.session.add(item("lamp"))
    async with fresh_db(session_args={"expire_on_commit": True}) as opened:
        assert opened.session.sync_session.expire_on_commit is True
    assert stored_names(engine) == ({"lamp"} if commit_on_exit else set())


async def test_multi_sessions_is_refused_with_a_clear_error(
    async_engine: AsyncEngine, fresh_db: Database
) -> None:
    fresh_db.configure(async_engine)
    with pytest.raises(TypeError, match="multi_sessions"):
        fresh_db(multi_sessions=True)  # type: ignore[call-arg]


async def test_parallel_work_uses_independent_blocks(
    async_engine: AsyncEngine, fresh_db: Database, engine: Engine
) -> None:
    """What `multi_sessions=True` is for: concurrent queries, each on a session of its own."""
    fresh_db.configure(async_engine)

    async def insert(name: str) -> None:
        async with fresh_db(independent=True):
            fresh_db.session.add(item(name))

    async def count() -> int:
        async with fresh_db(independent=True):
            return int(await fresh_db.session.scalar(select(func.count(Item.id))) or 0)

    async with fresh_db():
        await asyncio.gather(*(insert(f"value-{i}") for i in range(5)))
        assert await count() == 5
    assert stored_names(engine) == {f"value-{i}" for i in range(5)}
