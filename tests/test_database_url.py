"""One DATABASE_URL configures both modes: libpq's parameters a production URL carries
(`sslmode`, `connect_timeout`) reach the requests' driver (asyncpg) in its own words, and
parameters it does not take stop the start with a line saying what to do, instead of a 503
for every request."""

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from service.config import Settings
from service.main import close_engines, create_app
from tests.conftest import TEST_TOKEN
from tests.test_cli import run_cli

pytestmark = pytest.mark.anyio

URL = "postgresql+psycopg2://app:secret@db.example/service"


def test_sslmode_becomes_asyncpgs_ssl_and_connect_timeout_is_left_to_the_setting() -> None:
    settings = Settings(database_url=f"{URL}?sslmode=require&connect_timeout=5",
                        api_tokens=TEST_TOKEN)
    assert dict(make_url(settings.async_database_url()).query) == {"ssl": "require"}
    assert dict(make_url(settings.sync_database_url()).query) == {
        "sslmode": "require", "connect_timeout": "5"
    }


@pytest.mark.parametrize("parameter", ["application_name=x", "options=-c%20search_path%3Dx"])
def test_a_parameter_asyncpg_does_not_take_is_refused_at_start(parameter: str) -> None:
    with pytest.raises(ValidationError, match="DATABASE_ASYNC_URL"):
        Settings(database_url=f"{URL}?{parameter}", api_tokens=TEST_TOKEN)
    # Given an async URL of its own, the sync one may say what libpq likes.
    Settings(database_url=f"{URL}?{parameter}", api_tokens=TEST_TOKEN,
             database_async_url="postgresql+asyncpg://app:secret@db.example/service")


async def test_requests_are_served_with_sslmode_in_the_url(
    settings: Settings, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("sslmode is a PostgreSQL parameter")
    app = create_app(settings.model_copy(
        update={"database_url": f"{settings.database_url}?sslmode=disable"}
    ))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        listed = await client.get("/items")
        ready = await client.get("/health/ready")
    await close_engines(app)
    assert (listed.status_code, ready.status_code) == (200, 200)


def test_the_sync_parts_get_libpq_s_words_and_psycopg2() -> None:
    def sync_of(url: str) -> str:
        return Settings(database_url=url, api_tokens=TEST_TOKEN).sync_database_url()

    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not installed.
    assert sync_of(f"{URL.replace('+psycopg2', '')}?sslmode=require") == (
        "postgresql+psycopg2://app:secret@db.example/service?sslmode=require")
    # A URL written for asyncpg: its ssl is libpq's sslmode, its own parameters left out.
    assert sync_of("postgresql+asyncpg://app:secret@db.example/service"
                   "?ssl=disable&command_timeout=3") == (
        "postgresql+psycopg2://app:secret@db.example/service?sslmode=disable")


@pytest.mark.parametrize("written_for", ["no driver", "asyncpg"])
def test_migrate_takes_a_url_written_for_either_driver(
    migrated_url: str, backend: str, written_for: str
) -> None:
    if backend != "postgresql":
        pytest.skip("PostgreSQL URLs")
    url = make_url(migrated_url)
    given = url.set(drivername="postgresql") if written_for == "no driver" else url.set(
        drivername="postgresql+asyncpg", query={"ssl": "disable"})
    result = run_cli("migrate", database_url=given.render_as_string(hide_password=False))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
