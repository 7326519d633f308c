"""Every error leaves the service as RFC 9457 problem details (`service.problems`)."""

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import DomainError
from service.problems import PROBLEM_MEDIA_TYPE, Problem, problem_body


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


def install_problem_handlers(app: FastAPI) -> None:
    """Answer HTTP errors, validation errors and domain errors with problem details."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DomainError, _domain_error)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the problem body for `statuses`."""
    # `model` registers the schema (FastAPI files it under application/json); the explicit
    # entry puts it under the media type the errors are really sent as.
    schema = {"schema": {"$ref": f"#/components/schemas/{Problem.__name__}"}}
    return {
        status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: schema}} for status in statuses
    }
