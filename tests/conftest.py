"""Fixtures shared by every test: the database under test (chosen by DATABASE_URL, default a
temporary SQLite file), migrated once per run through Alembic, and the app on top of it.

`make test` runs the suite twice: DATABASE_URL=sqlite:///... and a throwaway PostgreSQL.
Fixtures from the `service.db.testing` plugin (`db_isolation`, `assert_max_queries`) are
available too.
"""

import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from alembic import command
from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench.harness import free_port
from service.config import Settings
from service.db import create_engine
from service.main import create_app

# The standby and PgBouncer of scripts/with-postgres.sh --replica --pgbouncer.
pytest_plugins = ["tests.standby"]

ROOT = Path(__file__).resolve().parent.parent
# The API token of the test apps; `client` sends it, so tests/items/* can write.
TEST_TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def http_scope(
    method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None, **extra: Any
) -> dict[str, Any]:
    """The ASGI scope of one HTTP/1.1 request from 127.0.0.1, for tests that drive the app
    message by message (slow uploads, disconnects); `extra` adds or replaces keys."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers or [], "client": ("127.0.0.1", 1),
        "server": ("test", 80), **extra,
    }


def starlette_client(app: FastAPI) -> Any:
    """FastAPI's `TestClient` for `app` (its docs' pattern; `with` runs the lifespan).
    Starlette 1.10 asks for httpx2 when the module is first imported: not this suite's
    concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    return TestClient(app)


def pytest_report_header() -> str:
    url = os.environ.get("DATABASE_URL")
    shown = make_url(url).render_as_string(hide_password=True) if url else "temporary SQLite"
    return f"database under test: {shown}"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.environ.get("DATABASE_URL") or (
        f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    )


@pytest.fixture(scope="session")
def backend(database_url: str) -> str:
    """'sqlite' or 'postgresql'."""
    return make_url(database_url).get_backend_name()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(scope="session")
def migrated_url(database_url: str) -> str:
    """The database URL, after `alembic upgrade head` (the schema never comes from create_all)."""
    command.upgrade(alembic_config(database_url), "head")
    return database_url


@pytest.fixture(scope="session")
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = create_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_isolation_engine(engine: Engine) -> Engine:
    """The engine `db_isolation` (service.db.testing) opens its outer transaction on."""
    return engine


@pytest.fixture(autouse=True)
def _empty_tables(engine: Engine, request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that commit for real leave empty tables behind for the next one. Tests under
    `db_isolation` are left alone: the isolation alone must keep their rows from leaking."""
    yield
    if {"db_isolation", "async_db_isolation", "isolation"} & set(request.fixturenames):
        return
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM items"))


@pytest.fixture
def settings(migrated_url: str) -> Settings:
    return Settings(
        database_url=migrated_url,
        db_pool_size=5,
        db_max_overflow=10,
        api_tokens=TEST_TOKEN,
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that runs the whole ASGI call, background tasks included, per request, and
    sends the test API token (pass `headers={"Authorization": ...}` to send another)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=AUTH
    ) as client:
        yield client
    await app.state.engine.dispose()  # what the app's lifespan does (not run by ASGITransport)


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """The test app served by uvicorn over real TCP on a loopback port (in a thread of
    this process), for clients that are not Python: a browser, a generated client."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
