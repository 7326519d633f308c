"""The one error body of the service: RFC 9457 problem details.

Every 4xx/5xx response, whether raised by a router, by validation or by the database
session middleware, is a `Problem` serialised as `application/problem+json`.
"""

import json
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field

PROBLEM_MEDIA_TYPE = "application/problem+json"


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
    errors: list[FieldError] | None = Field(
        None, description="Field errors, for validation problems (422) only."
    )


def problem_body(status: int, detail: str | None = None, **extra: Any) -> dict[str, Any]:
    """A problem-details document for `status`, with `title` taken from the HTTP reason."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return body


def problem_bytes(status: int, detail: str | None = None) -> bytes:
    """`problem_body` encoded for the wire, for code that speaks raw ASGI."""
    return json.dumps(problem_body(status, detail)).encode()
