"""`make bench` builds parts of the service by hand (bench/telemetry_layers.py stacks the
telemetry layers without an app): they must keep up with the service, or the benchmark
breaks after a long run. Built and served once here."""

from collections.abc import MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI

from bench import apps
from bench.telemetry_layers import observed_chain
from service.config import Settings, get_settings
from service.request_ids import HEADER

pytestmark = pytest.mark.anyio


async def test_the_telemetry_layers_of_the_benchmark_serve_a_request() -> None:
    chain = observed_chain(Settings(api_tokens="benchmark-only-api-token"))
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/bench/layers", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1)}
    await chain(scope, receive, send)

    start = sent[0]
    assert start["status"] == 200
    assert HEADER.lower().encode() in dict(start["headers"])


FACTORIES = ["ours", "peer", "depends", "constant", "service", "service_unobserved",
             "service_observed", "service_sync", "ours_async", "ours_async_autocommit",
             "peer_async", "depends_async", "raw_asyncpg", "reference_async", "memory_async"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_every_benchmark_app_builds(
    factory: str, migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each server `make bench` starts is built from the service's parts (the sync items
    router once broke on a change to the page parameters, found only 10 minutes into a
    benchmark run)."""
    if factory == "peer_async":
        pytest.importorskip("fastapi_async_sqlalchemy", reason="the bench extra's")
    monkeypatch.setenv("DATABASE_URL", migrated_url)
    monkeypatch.setenv("API_TOKENS", "benchmark-only-api-token")
    get_settings.cache_clear()
    try:
        app = getattr(apps, factory)()
    finally:
        get_settings.cache_clear()
    assert isinstance(app, FastAPI)
    assert app.openapi()["paths"]
