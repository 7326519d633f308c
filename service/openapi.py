"""Additions to the app's OpenAPI document - security, headers every operation shares -
made once, when FastAPI first builds it."""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

Edit = Callable[[dict[str, Any]], None]


def extend_openapi(app: FastAPI, edit: Edit) -> None:
    """Have `edit` change `app`'s OpenAPI document in place when it is first built, after
    the edits registered before it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            edit(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Every operation of the document (one per path and method)."""
    return [operation for path in schema.get("paths", {}).values() for operation in path.values()]
