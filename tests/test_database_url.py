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
