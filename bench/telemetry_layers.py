"""The CPU cost of the operability layers alone, measured in this process: request ids
(asgi-correlation-id), `RequestTelemetry` (access line + HTTP metrics) and the database
observer's calls, around an ASGI app that answers a constant 20-item page at once.

Why besides the end-to-end rows: a difference of ~0.1 ms in 2-3 ms of server CPU per
request is within the noise of a shared 2-core machine between wrk runs seconds apart;
here the same requests run through both chains in alternation, in one process, and
`time.process_time` counts only this process's CPU.
"""

import asyncio
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.db.accounting import QueryStats
from service.logs import configure_logging
from service.metrics import IN_PROGRESS, REQUEST_DURATION, DatabaseMetrics
from service.request_ids import add_request_ids
from service.telemetry import RequestTelemetry

BODY = b'{"items":[' + b",".join([b'{"id":1,"name":"Item","price":"1.00"}'] * 20) + b"]}"
ROUTE = APIRoute("/items/scroll", lambda: None)


@dataclass
class LayerCost:
    bare_us: float  # CPU microseconds per request without the layers
    observed_us: float  # with request ids, access line (JSON, INFO, to a file), metrics
    rounds: int
    requests: int

    @property
    def cost_ms(self) -> float:
        return (self.observed_us - self.bare_us) / 1000


def page_app(observer: DatabaseMetrics | None) -> ASGIApp:
    """Answers 200 with BODY; with `observer`, makes the calls DBSessionMiddleware makes
    for an autocommit GET (admitted, request_ended with 2 statements)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if observer is not None:
            observer.admitted("db", scope, 0.0)
        scope["route"] = ROUTE
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": BODY})
        if observer is not None:
            stats = QueryStats()
            stats.count, stats.seconds = 2, 0.0008
            observer.request_ended("db", scope, stats)

    return app


def observed_chain(settings: Settings) -> ASGIApp:
    """The layers as `create_app` stacks them: request ids, telemetry, the observer."""

    class Stack:  # what add_middleware needs, without a FastAPI app
        def __init__(self) -> None:
            # A real pool, so the pool gauges are refreshed as in the service.
            pool = create_engine("sqlite://", poolclass=QueuePool).pool
            self.app: Any = page_app(DatabaseMetrics({"db": pool}))

        def add_middleware(self, cls: Any, **kwargs: Any) -> None:
            self.app = cls(self.app, **kwargs)

        # add_request_ids also declares the header in the OpenAPI document.
        openapi_schema = None

        def openapi(self) -> dict[str, Any]:
            return {}

    stack = Stack()
    stack.add_middleware(
        RequestTelemetry, templates=lambda: [("/items/scroll", {"GET"})],
        access_log=settings.access_log,
        duration=REQUEST_DURATION, in_progress=IN_PROGRESS,
    )
    add_request_ids(stack)  # type: ignore[arg-type]
    return stack.app  # type: ignore[no-any-return]


def measure(rounds: int = 7, requests: int = 5000) -> LayerCost:
    settings = Settings(api_tokens="benchmark-only-api-token", log_level="INFO",
                        log_format="json")
    configure_logging(settings)
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "service" and isinstance(handler, logging.StreamHandler):
            handler.setStream(tempfile.TemporaryFile("w"))  # noqa: SIM115 - for the run
    chains = {"bare": page_app(None), "observed": observed_chain(settings)}

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    async def run(app: ASGIApp) -> float:
        started = time.process_time()
        for _ in range(requests):
            scope = {"type": "http", "method": "GET", "path": "/items/scroll",
                     "query_string": b"size=20", "root_path": "",
                     "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
                     "client": ("127.0.0.1", 50000)}
            await app(scope, receive, send)
        return (time.process_time() - started) / requests * 1e6

    async def rounds_of() -> dict[str, list[float]]:
        for app in chains.values():  # warm-up
            await run(app)
        results: dict[str, list[float]] = {name: [] for name in chains}
        for _ in range(rounds):
            for name, app in chains.items():
                results[name].append(await run(app))
        return results

    results = asyncio.run(rounds_of())
    return LayerCost(statistics.median(results["bare"]), statistics.median(results["observed"]),
                     rounds, requests)


if __name__ == "__main__":
    cost = measure()
    print(f"bare {cost.bare_us:.1f} us, observed {cost.observed_us:.1f} us: "
          f"+{cost.cost_ms * 1000:.1f} us CPU per request")
