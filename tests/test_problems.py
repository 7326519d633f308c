"""Errors raised inside routes become problem documents: a database that is away is 503
(with Retry-After), any other database error or bug is 500 - never a bare traceback."""

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from service.problems import install_problem_handlers

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
