"""Errors raised inside routes become problem documents: a database that is away is 503
(with Retry-After), any other database error or bug is 500 - never a bare traceback."""

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from service.config import Settings
from service.db.asyncio import db
from service.main import create_app
from service.problems import install_problem_handlers
from tests.conftest import AUTH

pytestmark = pytest.mark.anyio


def app_raising(exc: Exception) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise exc

    return app


async def call(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/boom")


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("SELECT 1", {}, Exception("connection refused")),
        InterfaceError("SELECT 1", {}, Exception("connection already closed")),
        DataError("SELECT 1", {}, Exception("terminating connection"), connection_invalidated=True),
    ],
    ids=["operational", "interface", "invalidated"],
)
async def test_database_unavailable_in_a_route_answers_503(exc: Exception) -> None:
    response = await call(app_raising(exc))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert "connection" not in response.json()["detail"]  # the driver's words stay in the log


@pytest.mark.parametrize(
    "exc",
    [DataError("SELECT 1", {}, Exception("value too long")), RuntimeError("bug")],
    ids=["data-error", "bug"],
)
async def test_other_errors_in_a_route_answer_500_as_a_problem(exc: Exception) -> None:
    response = await call(app_raising(exc))
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 500
    assert "value too long" not in response.text and "bug" not in response.text


async def test_a_second_connection_the_pool_cannot_spare_answers_503(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # A request holds the only connection and asks for another (an independent block, for
    # an audit row): the pool gives up after its timeout - the database is busy, not broken.
    app = create_app(settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 0.3}))

    @app.post("/audited")
    async def audited() -> None:
        await db.session.execute(text("SELECT 1"))
        async with db(independent=True):
            await db.session.execute(text("SELECT 2"))

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 headers=AUTH) as client:
        response = await client.post("/audited")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        assert (await client.get("/items")).status_code == 200  # and the pool is fine
    await app.state.engine.dispose()
    # The log points at the pool's size, not at an outage.
    assert any("no database connection to spare" in r.getMessage() for r in caplog.records)
