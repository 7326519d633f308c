"""Every operation of the app's own OpenAPI document, fuzzed with schemathesis: valid
(positive) and invalid (negative) parameters and bodies - NUL bytes, huge and odd numbers,
strings of every script, wrong types, missing fields. No response may be a 5xx, each must
match what the document declares for it (status code, content type, headers, body schema),
and invalid input must be refused with a 4xx.

In-process (ASGI), a bounded and fixed set of examples per operation (derandomized, so CI
fails only when the app changes), with the test API token so that writes run too; rows
are deleted after each test.
"""

from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.health import router as health_router
from service.items.router import reads, writes
from tests.conftest import AUTH

pytestmark = pytest.mark.anyio

EXAMPLES_PER_OPERATION = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
ITEMS = [(method, route.path) for route in [*reads.routes, *writes.routes]
         if isinstance(route, APIRoute) for method in route.methods]
PROBES = [(method, route.path) for route in health_router.routes
          if isinstance(route, APIRoute) for method in route.methods]
OPERATIONS = sorted(ITEMS + PROBES)
CASES = [
    *((method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS),
    # The probes take no input, so there is nothing to get wrong.
    *((method, path, GenerationMode.NEGATIVE) for method, path in sorted(ITEMS)),
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_never_answers_5xx_or_outside_its_schema(
    app: FastAPI, method: str, path: str, mode: GenerationMode
) -> None:
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operation = api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    call()


async def test_every_documented_operation_is_fuzzed(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    documented = sorted(
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    )
    assert documented == OPERATIONS
