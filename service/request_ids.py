"""Request ids: every request has one, and every trace it leaves carries it.

`X-Request-ID` is taken from the request when it is a sane value - 1 to 128 printable ASCII
characters, so it can go into a log line or a header as it is - and otherwise made up (32
hex digits). asgi-correlation-id does the generic part: it runs outermost, keeps the id in
a `ContextVar` (which follows the request into sync routes, streaming bodies and background
tasks), writes the chosen id back into the request's headers and adds it to every response
that passes through it - including the 401, 413, 422 and 503 answers of the inner layers
and a failed COMMIT's problem. The only response that does not pass through it is a 500
from an unhandled exception (Starlette sends it from its outermost layer), which
`service.problems` gives the header itself.
"""

import logging
from typing import Any
from uuid import uuid4

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
from asgi_correlation_id.middleware import FAILED_VALIDATION_MESSAGE
from fastapi import FastAPI

from service.openapi import extend_openapi, operations

HEADER = "X-Request-ID"
MAX_LENGTH = 128


def is_sane(value: str) -> bool:
    """Whether a client's request id is used as it is: 1-128 printable ASCII characters."""
    return (
        0 < len(value) <= MAX_LENGTH
        and value.isascii()
        and value.isprintable()
        and not value.isspace()
    )


def new_request_id() -> str:
    """A fresh request id: a random UUID as 32 hex digits."""
    return uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being served in this context; None outside requests."""
    return correlation_id.get()


def add_request_ids(app: FastAPI) -> None:
    """Give `app` request ids; call it after every other `add_middleware`, so that it runs
    first and sees every response - and after every other OpenAPI addition, so that the
    header is declared on every response, the added ones too."""
    app.add_middleware(
        CorrelationIdMiddleware,
        header_name=HEADER,
        validator=is_sane,
        generator=new_request_id,
        transformer=None,
    )
    refused_logger = logging.getLogger("asgi_correlation_id")
    if not any(isinstance(f, _RefusedIdLine) for f in refused_logger.filters):
        refused_logger.addFilter(_RefusedIdLine())
    extend_openapi(app, _declare_request_id)


class _RefusedIdLine(logging.Filter):
    """asgi-correlation-id's line about a refused `X-Request-ID`, made a line of its request:
    logged before the library makes the new id current, it would carry no id (the new one
    is its argument). At INFO, not WARNING: a client's malformed header is not the
    service's problem, and any client could make one warning per request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == FAILED_VALIDATION_MESSAGE and record.args:
            record.request_id = record.args[0]  # type: ignore[index]
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


def _declare_request_id(schema: dict[str, Any]) -> None:
    """Every response of every operation carries X-Request-ID. (The request header is not
    declared as a parameter of each operation: it is optional everywhere, and generated
    clients would grow an argument on every method for it.)"""
    for operation in operations(schema):
        for response in operation.get("responses", {}).values():
            response.setdefault("headers", {})[HEADER] = {
                "description": "The request's id: the client's own X-Request-ID if it was "
                "1-128 printable ASCII characters, else one the service made up. Also in "
                "problem documents and in the service's logs.",
                "schema": {"type": "string"},
            }
