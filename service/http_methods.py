"""HEAD for every GET route, and an `Allow` header that names every method of a path.

FastAPI's routes answer only the methods they declare: HEAD on a GET route is a 405, while
HTTP has every GET resource answer HEAD (RFC 9110 9.3.2). `HeadAsGet` serves a HEAD as the
GET it asks about - the same status and headers, `Content-Length` included - and sends no
body. The OpenAPI description is unchanged: HEAD is implied by GET.

On a 405, Starlette names the methods of the first route whose path matched; a path that
several routes serve (`GET /items/{id}` for reads, `PATCH`/`DELETE` in the write router)
lost the others. `allowed_methods` names them all.
"""

import functools
import re
from collections.abc import Collection, Iterable

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Answer HEAD requests as GET, without the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def allowed_methods(templates: Iterable[tuple[str, Collection[str]]], path: str) -> list[str]:
    """The methods the routes `templates` lists - (path template, methods) - answer for
    `path` (HEAD wherever GET is), sorted; empty if no route has that path. Where a fixed
    path matches, only the routes of fixed paths count."""
    matching = [(template, answered) for template, answered in templates
                if _pattern(template).match(path)]
    # A path of its own (`/items/scroll`) is its own resource, not one of `/items/{id}`.
    if any("{" not in template for template, _ in matching):
        matching = [(template, answered) for template, answered in matching
                    if "{" not in template]
    methods = {method.upper() for _, answered in matching for method in answered}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    return compile_path(template)[0]
