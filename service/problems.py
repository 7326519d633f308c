"""The one error body of the service: RFC 9457 problem details, and the handlers that
produce it.

Every 4xx/5xx response - raised by a router, by validation, by the body limit or by the
database session middleware - is built by `problem_response` and sent as
`application/problem+json`. Which status a database failure gets is decided in one place,
`service.db.failures`; this module only renders it.
"""

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException

from service.db.failures import Failure, driver_reason, failure_of_statement
from service.db.middleware_base import printable, route_path
from service.domain_errors import DomainError
from service.http_methods import allowed_methods
from service.request_ids import HEADER as REQUEST_ID_HEADER
from service.request_ids import current_request_id

PROBLEM_MEDIA_TYPE = "application/problem+json"

logger = logging.getLogger("service")


class FieldError(BaseModel):
    """One invalid input field."""

    loc: list[str | int] = Field(description="Where the error is, e.g. ['body', 'price'].")
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="Machine-readable error kind.")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field("about:blank", description="URI identifying the problem kind.")
    title: str = Field(description="Short summary of the problem kind (the HTTP reason).")
    status: int = Field(description="HTTP status code.")
    detail: str | None = Field(None, description="What went wrong in this occurrence.")
    request_id: str | None = Field(
        None,
        description="The request's id, as in its `X-Request-ID` response header and in "
        "every log line of the request: quote it when reporting the problem.",
    )
    errors: list[FieldError] | None = Field(
        None, description="Field errors, for validation problems (422) only."
    )


def problem_response(
    status: int, detail: str | None, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """A problem-details response for `status`, with `title` taken from the HTTP reason and
    `request_id` from the request being served."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": current_request_id(),
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def failure_problem(failure: Failure) -> JSONResponse:
    """A database failure (`service.db.failures`) as a problem response; what
    `DBSessionMiddleware(error_response=...)` sends for a failed COMMIT or a busy pool."""
    return problem_response(failure.status, failure.detail, headers=failure.headers)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the problem body for `statuses`."""
    # `model` registers the schema (FastAPI files it under application/json); the explicit
    # entry puts it under the media type the errors are really sent as.
    schema = {"schema": {"$ref": f"#/components/schemas/{Problem.__name__}"}}
    return {
        status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: schema}} for status in statuses
    }


def install_problem_handlers(app: FastAPI) -> None:
    """Answer HTTP errors, validation errors, domain errors, database failures (409, 503)
    and unhandled exceptions (500) with problem details."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(StaleDataError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)  # no connection to spare
    app.add_exception_handler(Exception, _unhandled_error)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    unparsable = exc.__cause__
    if exc.detail == _UNPARSABLE_BODY and unparsable is not None:
        # FastAPI answers JSON that Python's parser gives up on - not UTF-8, nested deeper
        # than its recursion limit, an integer of more digits than it converts - with a
        # bare 400; it is malformed JSON like any other: the same 422 as a syntax error.
        where: list[str | int] = ["body"]
        if isinstance(unparsable, UnicodeDecodeError):
            where.append(unparsable.start)
        error = {"loc": where, "msg": f"JSON decode error: {_why(unparsable)}",
                 "type": "json_invalid"}
        return problem_response(422, "The request is not valid; see errors.", errors=[error])
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = exc.headers
    templates = getattr(request.app.state, "route_templates", None)
    if exc.status_code == 405 and templates is not None:
        # Every method of the path, not only those of the first route that matched it.
        # Within a mount (the docs' static files) `root_path` ends with the mount's path;
        # Starlette keeps the app's own as `app_root_path`.
        scope = request.scope
        app_scope = {**scope, "root_path": scope.get("app_root_path", scope.get("root_path", ""))}
        allowed = allowed_methods(templates(), route_path(app_scope))
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return problem_response(exc.status_code, detail, headers=headers)


_UNPARSABLE_BODY = "There was an error parsing the body"  # FastAPI's 400


def _why(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "the body is not UTF-8"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, ValueError) and "digits" in str(error):
        return "a number has too many digits"
    return "the body could not be parsed"


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
    """A database failure the route did not handle, answered as `service.db.failures` says;
    one it cannot explain (500) is a bug and goes the way of every unhandled exception."""
    failure = failure_of_statement(exc)
    if failure.status == 500:
        raise exc
    if failure.status == 503:
        # The driver's first line says why (refused, timed out, terminated); it names host
        # and port, never the password, and stays in the log.
        what = ("no database connection to spare within the pool timeout"
                if isinstance(exc, PoolTimeout) else "database unavailable")
        logger.warning("%s %s: %s (%s); answering 503",
                       request.method, printable(request.url.path), what, driver_reason(exc))
    return failure_problem(failure)


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception and re-raises it after this response is sent - from its
    # outermost layer, past the one that adds X-Request-ID to every other response.
    failure = failure_of_statement(exc)
    headers = dict(failure.headers)
    if (request_id := current_request_id()) is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return problem_response(failure.status, failure.detail, headers=headers)
