"""`make bench` builds parts of the service by hand (bench/telemetry_layers.py stacks the
telemetry layers without an app): they must keep up with the service, or the benchmark
breaks after a long run. Built and served once here."""

from collections.abc import MutableMapping
from typing import Any

import pytest

from bench.telemetry_layers import observed_chain
from service.config import Settings
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
