"""Every error leaves the service as RFC 9457 problem details (`service.problems`)."""

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from service.db import database_unavailable
from service.errors import DomainError
from service.problems import PROBLEM_MEDIA_TYPE, Problem, problem_body

logger = logging.getLogger("service")

# Seconds a client is asked to wait before retrying when the database is away.
RETRY_AFTER_SECONDS = 1


def problem_response(
    status: int, detail: str | None, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail, **extra),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    undecodable = exc.__cause__
    if exc.status_code == 400 and isinstance(undecodable, UnicodeDecodeError):
        # FastAPI answers a JSON body that is not UTF-8 with a bare 400; it is malformed
        # JSON like any other, so it gets the same 422 as a syntax error.
        error = {"loc": ["body", undecodable.start], "msg": "JSON decode error: the body is "
                 "not UTF-8", "type": "json_invalid"}
        return problem_response(422, "The request is not valid; see errors.", errors=[error])
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem_response(exc.status_code, detail, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(part) if not isinstance(part, int) else part for part in error["loc"]],
         "msg": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]
    return problem_response(422, "The request is not valid; see errors.", errors=errors)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return problem_response(exc.status, exc.detail)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """503 when the database is down or the connection broke; any other database error is
    a bug, answered 500 like every unhandled exception."""
    assert isinstance(exc, DBAPIError)
    if not database_unavailable(exc):
        raise exc
    # The driver's first line says why (refused, timed out, terminated); it names host and
    # port, never the password, and stays in the log: the client learns only "try again".
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    logger.warning("%s %s: database unavailable (%s); answering 503",
                   request.method, request.url.path, reason)
    return problem_response(
        503,
        "The database is not available right now; try again shortly.",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception and re-raises it after this response is sent.
    return problem_response(500, "Something went wrong on our side; nothing was stored.")


def install_problem_handlers(app: FastAPI) -> None:
    """Answer HTTP errors, validation errors, domain errors, an unavailable database (503)
    and unhandled exceptions (500) with problem details."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unhandled_error)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the problem body for `statuses`."""
    # `model` registers the schema (FastAPI files it under application/json); the explicit
    # entry puts it under the media type the errors are really sent as.
    schema = {"schema": {"$ref": f"#/components/schemas/{Problem.__name__}"}}
    return {
        status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: schema}} for status in statuses
    }
