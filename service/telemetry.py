"""`RequestTelemetry`: one access line and the HTTP metrics for every request.

Pure ASGI, outside CORS, the body limit and the database session (only the request-id
layer is further out), so it sees every response, whichever layer answered. When the
request is over - body sent, background tasks done - it

- observes `http_request_duration_seconds{method, route, status}` (time to the end of the
  response body) and keeps `http_requests_in_progress`, if given `metrics`;
- logs the access line on the `service.access` logger at INFO: method, route template,
  path, status, duration, database time and statement count (the numbers behind
  Server-Timing, for the whole request), client address. The path only: a query string
  may carry a token, so it is never logged - and neither is any header.

The database numbers reach it through the scope: the app's `SessionObserver`
(`RequestDatabaseStats`) leaves the request's `QueryStats` there when its unit of work ends.
A request the database middleware never saw (a 413, a sessionless path) has none.
"""

import logging
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from prometheus_client import Gauge, Histogram
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.accounting import QueryStats
from service.db.observer import SessionObserver
from service.logs import printable

access_logger = logging.getLogger("service.access")

NOTES = "service.request_notes"  # the scope key of the request's `RequestNotes`
UNMATCHED = "<unmatched>"  # the route label of a path no route matches
CLIENT_CLOSED_REQUEST = 499  # the status of a request whose client left before any answer
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(slots=True)
class RequestNotes:
    """What the layers inside `RequestTelemetry` tell its access line: the request's
    database numbers, and who made it. Kept in the scope as one object, so that a layer
    that passes a copy of the scope on (`HeadAsGet`) still writes to the same notes."""

    db_stats: QueryStats | None = None
    principal: str | None = None  # the authenticated caller's name; None: nobody was asked


def request_notes(scope: Scope) -> RequestNotes | None:
    """The notes of the request, or None outside `RequestTelemetry`."""
    notes: RequestNotes | None = scope.get(NOTES)
    return notes


class RequestDatabaseStats(SessionObserver):
    """Leaves each request's `QueryStats` in its notes, for the access line."""

    def request_ended(self, database: str, scope: Scope, stats: QueryStats) -> None:
        if (notes := request_notes(scope)) is not None:
            notes.db_stats = stats


class RequestTelemetry:
    """Access line and HTTP metrics per request; see the module docstring.

    `templates`: returns the app's routes as (template, methods) pairs in the router's
    order (called once, when first needed), to name the route of a request answered
    before routing (a 401, a 413, a 503 from admission) or of one no route took.
    `duration` and `in_progress`: the metrics to keep, or None.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        templates: Callable[[], Iterable[tuple[str, Collection[str]]]],
        access_log: bool,
        duration: Histogram | None = None,
        in_progress: Gauge | None = None,
    ) -> None:
        self.app = app
        self.templates = templates
        self._patterns: list[tuple[re.Pattern[str], str, frozenset[str]]] | None = None
        # The histogram's children by labels: bounded (methods x routes x statuses), and
        # `labels()` costs more than the observation itself.
        self._children: dict[tuple[str, str, int], Any] = {}
        self.access_log = access_log
        self.duration = duration
        self.in_progress = in_progress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        # A mount (the docs' static files) moves its path into the scope's root_path as the
        # request goes through it: the app's own root path is the one from now.
        root = scope.get("root_path", "")
        status = 0  # no response yet
        finished = 0.0
        gone = False

        async def watch(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = perf_counter()
            await send(message)

        async def listen() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        scope[NOTES] = notes = RequestNotes()
        if self.in_progress is not None:
            self.in_progress.inc()
        try:
            await self.app(scope, listen, watch)
        finally:
            if self.in_progress is not None:
                self.in_progress.dec()
            if not status:
                # No response: the client left before there was one (499, as nginx logs
                # it), or the app failed and the server answers 500.
                status = CLIENT_CLOSED_REQUEST if gone else 500
            seconds = (finished or perf_counter()) - started
            route = self.route_of(scope, root)
            method = scope["method"] if scope["method"] in METHODS else "other"
            if self.duration is not None:
                key = (method, route, status)
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self.duration.labels(method, route, status)
                child.observe(seconds)
            if self.access_log:
                log_access(scope, notes, route, status, seconds)

    def route_of(self, scope: Scope, root: str = "") -> str:
        """The template of the route that served (or would serve) the request; `root`: the
        app's root path (the scope's, unless a mount has changed it since)."""
        route = scope.get("route")
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if isinstance(template, str):
            return template
        # Answered before routing, or by no route: the route the router would pick - the
        # first whose path and method match, else the first whose path does (a 405) - with
        # static templates first, as the router prefers `/items/scroll` to `/items/{item_id}`.
        if self._patterns is None:
            try:
                routes = list(self.templates())
            except Exception:  # never let naming a route fail a request
                access_logger.exception("could not list the route templates")
                routes = []
            ordered = sorted(routes, key=lambda route: "{" in route[0])
            self._patterns = [
                (compile_path(template)[0], template, frozenset(m.upper() for m in methods))
                for template, methods in ordered
            ]
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root):]
        method = scope["method"]
        by_path = None
        for pattern, template, methods in self._patterns:
            if pattern.match(path):
                if method in methods or (method == "HEAD" and "GET" in methods):
                    return template
                by_path = by_path or template
        return by_path or UNMATCHED


def log_access(
    scope: Scope, notes: RequestNotes, route: str, status: int, seconds: float
) -> None:
    """The access line of one request (the method as the client sent it)."""
    stats = notes.db_stats
    db_ms = round(stats.seconds * 1000, 2) if stats else 0.0
    statements = stats.count if stats else 0
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else None
    duration_ms = round(seconds * 1000, 2)
    path = scope["path"]
    principal = notes.principal
    access_logger.info(
        '%s "%s %s" %d %.1f ms (route %s, db %.1f ms, %d %s%s)',
        # The decoded path may hold a line break or other control characters: escaped in the
        # message, so that a text log line cannot be forged (JSON escapes `path` itself).
        address or "-", scope["method"], printable(path),
        status, duration_ms, route, db_ms, statements,
        "statement" if statements == 1 else "statements",
        "" if principal is None else f", by {printable(principal)}",
        extra={
            "method": scope["method"],
            "route": route,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "db_ms": db_ms,
            "db_statements": statements,
            "client": address,
            "principal": principal,
        },
    )

