"""Who may write: bearer tokens from API_TOKENS (service.auth); JWTs: tests/test_jwt.py.

Writes without a token, or with a wrong one, get 401 with `WWW-Authenticate: Bearer
error="invalid_token"` as a problem document and change nothing - decided before the body
is read, so neither an oversized nor a malformed body changes the answer, and no database
connection is taken; reads stay public unless READ_REQUIRES_TOKEN=true; the app refuses to
start without a token; only SHA-256 digests of the tokens are kept, and a presented token
is compared with every one of them in constant time; no token reaches a log line or a
response body; a labelled token writes as `token:<label>`, an unlabelled one as
`token:<position>`; OpenAPI declares what each operation needs.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy import Engine, event, text

from bench.harness import free_port
from service.auth import NoApiTokens, TokenCheck
from service.config import Settings
from service.db.asyncio import db as async_db
from service.main import create_app
from tests.conftest import ROOT, TEST_TOKEN, http_scope
from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio

OTHER_TOKEN = "second-token-fedcba9876543210"
THIRD_TOKEN = "third-token-00112233445566778899"
WRONG_TOKEN = "wrong-token-0000000000000000"


WRITES = [
    ("POST", "/items", {"name": "Lamp", "price": "9.90"}),
    ("PATCH", "/items/{id}", {"price": "1.00", "version": 1}),
    ("DELETE", "/items/{id}", None),
]


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["title"]) == (401, "Unauthorized")


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
@pytest.mark.parametrize(
    "authorization",
    ["", f"Bearer {WRONG_TOKEN}", f"Basic {TEST_TOKEN}", f"Bearer {TEST_TOKEN}x", "Bearer"],
    ids=["missing", "wrong", "not-bearer", "extended", "empty"],
)
async def test_write_without_a_valid_token_answers_401_and_changes_nothing(
    client: httpx.AsyncClient,
    engine: Engine,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    authorization: str,
) -> None:
    [item_id] = insert_items(engine, {"name": "Kettle", "price": Decimal("5.00")})
    before = stored(engine)

    response = await client.request(
        method,
        path.format(id=item_id),
        json=body,
        headers={"Authorization": authorization, "If-Match": "*"},
    )

    assert_unauthorized(response)
    assert stored(engine) == before


@pytest.mark.parametrize("token", [TEST_TOKEN, OTHER_TOKEN])
async def test_every_configured_token_may_write(
    settings: Settings, engine: Engine, token: str
) -> None:
    app = create_app(settings.model_copy(update={"api_tokens": _secret(TEST_TOKEN, OTHER_TOKEN)}))
    async with _client(app) as client:
        response = await client.post(
            "/items",
            json={"name": "Lamp", "price": "9.90"},
            headers={"Authorization": f"bearer {token}"},  # the scheme ignores case
        )
    assert response.status_code == 201, response.text
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]


async def test_reads_are_public_by_default(client: httpx.AsyncClient, engine: Engine) -> None:
    [item_id] = insert_items(engine, {"name": "Kettle", "price": Decimal("5.00")})
    for path in ("/items", "/items/scroll", f"/items/{item_id}", "/health/live"):
        response = await client.get(path, headers={"Authorization": ""})
        assert response.status_code == 200, (path, response.text)


async def test_reads_need_a_token_when_read_requires_token(
    settings: Settings, engine: Engine
) -> None:
    [item_id] = insert_items(engine, {"name": "Kettle", "price": Decimal("5.00")})
    app = create_app(settings.model_copy(update={"read_requires_token": True}))
    async with _client(app) as client:
        for path in ("/items", "/items/scroll", f"/items/{item_id}"):
            assert_unauthorized(await client.get(path))
            wrong = await client.get(path, headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
            assert_unauthorized(wrong)
            allowed = await client.get(path, headers={"Authorization": f"Bearer {TEST_TOKEN}"})
            assert allowed.status_code == 200, allowed.text
            # HEAD asks what GET would answer: the same token, the same status.
            refused = await client.head(path)
            assert (refused.status_code, refused.content) == (401, b"")
            assert refused.headers["www-authenticate"].startswith("Bearer")
            head = await client.head(path, headers={"Authorization": f"Bearer {TEST_TOKEN}"})
            assert head.status_code == 200
        # Probes stay open: an orchestrator has no token.
        assert (await client.get("/health/live")).status_code == 200


def test_the_app_refuses_to_start_without_a_token(migrated_url: str) -> None:
    for tokens in ("", " , "):
        with pytest.raises(NoApiTokens, match="API_TOKENS"):
            create_app(Settings(database_url=migrated_url, api_tokens=tokens))  # type: ignore[arg-type]


def test_short_tokens_are_refused_without_being_shown() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(api_tokens=f"{TEST_TOKEN},short-secret")  # type: ignore[arg-type]
    assert "at least 16 characters" in str(refused.value)
    assert "short-secret" not in str(refused.value)
    assert TEST_TOKEN not in str(refused.value)


def test_the_app_keeps_only_sha256_digests_of_the_tokens(settings: Settings) -> None:
    kept = vars(create_app(settings).state.authenticator.api_tokens)
    assert TEST_TOKEN not in repr(kept)
    assert [len(digest) for digest in kept["_digests"]] == [32]
    assert TEST_TOKEN not in repr(settings) and TEST_TOKEN not in str(settings.model_dump())


def _sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@pytest.mark.parametrize(
    "presented",
    [TEST_TOKEN, THIRD_TOKEN, WRONG_TOKEN, "x"],
    ids=["matches-the-first", "matches-the-last", "matches-none", "short"],
)
def test_a_token_is_compared_in_constant_time_with_every_configured_digest(
    monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    configured = [TEST_TOKEN, OTHER_TOKEN, THIRD_TOKEN]
    check = TokenCheck(configured)
    compared: list[tuple[bytes, ...]] = []
    constant_time = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append(tuple(sorted((a, b))))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)

    assert check.accepts(presented) is (presented in configured)
    # One constant-time comparison per configured token, whichever matches (no early
    # exit), each of two 32-byte SHA-256 digests (the presented token's length is hidden).
    assert len(compared) == len(configured)
    expected = [tuple(sorted((_sha256(token), _sha256(presented)))) for token in configured]
    assert sorted(compared) == sorted(expected)


async def test_tokens_never_appear_in_logs_or_error_bodies(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        responses = [
            await client.post("/items", json={"name": "Lamp", "price": "9.90"}),
            await client.post("/items", json={"name": "Lamp", "price": "9.90"}),  # 409
            await client.post("/items", json={"name": 5}),  # 422
            await client.post(
                "/items",
                json={"name": "Rug", "price": "1"},
                headers={"Authorization": f"Bearer {WRONG_TOKEN}"},
            ),
        ]
    assert [r.status_code for r in responses] == [201, 409, 422, 401]
    for response in responses:
        assert TEST_TOKEN not in response.text and WRONG_TOKEN not in response.text
    logged = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert TEST_TOKEN not in logged and WRONG_TOKEN not in logged


def test_serve_without_tokens_generates_one_prints_it_once_and_requires_it(
    migrated_url: str, engine: Engine
) -> None:
    """`make run` is `python -m service migrate` then `python -m service serve`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"API_TOKENS", "READ_REQUIRES_TOKEN"}}
    env["DATABASE_URL"] = migrated_url
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--no-access-log"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        output = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            output.append(line)
            if "Application startup complete" in line or server.poll() is not None:
                break
        printed = "".join(output)
        assert "generated a development token" in printed, printed
        [token] = re.findall(r"Authorization: Bearer (\S+)", printed)

        base = f"http://127.0.0.1:{port}"
        item = {"name": "Lamp", "price": "9.90"}
        assert httpx.post(f"{base}/items", json=item, timeout=5).status_code == 401
        wrong = httpx.post(f"{base}/items", json=item, headers={"Authorization": "Bearer x" * 3})
        assert wrong.status_code == 401
        allowed = httpx.post(
            f"{base}/items", json=item, headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert allowed.status_code == 201, allowed.text
    finally:
        server.send_signal(signal.SIGTERM)
        rest, _ = server.communicate(timeout=15)
    assert printed.count(token) + rest.count(token) == 1  # printed once, never logged
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]


def _secret(*tokens: str) -> SecretStr:
    return SecretStr(",".join(tokens))


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# -- who a token is -----------------------------------------------------------------------


async def test_a_labelled_token_writes_as_its_label_an_unlabelled_one_as_its_position(
    settings: Settings, engine: Engine
) -> None:
    tokens = SecretStr(f"ci={TEST_TOKEN}, {OTHER_TOKEN}")
    app = create_app(settings.model_copy(update={"api_tokens": tokens}))
    async with _client(app) as client:
        for name, token in (("Lamp", TEST_TOKEN), ("Rug", OTHER_TOKEN)):
            response = await client.post(
                "/items", json={"name": name, "price": "1"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 201, response.text
        refused = await client.post(
            "/items", json={"name": "Vase", "price": "1"},
            headers={"Authorization": f"Bearer ci={TEST_TOKEN}"},  # the label is no part of it
        )
    assert refused.status_code == 401
    by = {row["name"]: row["created_by"] for row in stored(engine).values()}
    assert by == {"Lamp": "token:ci", "Rug": "token:2"}


def test_api_tokens_labels_are_read_without_mistaking_a_token_for_one() -> None:
    base64_token = "QUJDREVGR0hJSktMTU5PUFFS=="  # ends in '=', and is one token
    settings = Settings(api_tokens=f"ci={TEST_TOKEN},{base64_token}, deploy-bot={OTHER_TOKEN}")  # type: ignore[arg-type]
    assert settings.api_token_list() == [TEST_TOKEN, base64_token, OTHER_TOKEN]
    assert settings.api_token_labels() == ["ci", "2", "deploy-bot"]
    with pytest.raises(ValidationError, match="unique") as refused:
        Settings(api_tokens=f"ci={TEST_TOKEN},ci={OTHER_TOKEN}")  # type: ignore[arg-type]
    assert TEST_TOKEN not in str(refused.value)
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(api_tokens="ci=short-token")  # type: ignore[arg-type]


# -- before the body: authentication is the first thing a request meets --------------------


def _item_body(size: int) -> bytes:
    return json.dumps({"name": "Lamp", "price": "1", "description": "x" * size}).encode()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("authorization", [None, f"Bearer {WRONG_TOKEN}"], ids=["none", "wrong"])
async def test_an_oversized_write_without_a_valid_token_gets_401_not_413(
    client: httpx.AsyncClient, engine: Engine, declared: bool, authorization: str | None
) -> None:
    body = _item_body(2 * 1024 * 1024)  # twice MAX_BODY_BYTES

    async def chunks() -> Any:
        yield body

    response = await client.post(
        "/items",
        content=body if declared else chunks(),
        headers={"Authorization": authorization or "", "Content-Type": "application/json"},
    )

    assert_unauthorized(response)
    assert stored(engine) == {}


@pytest.mark.parametrize("authorization", [None, f"Bearer {WRONG_TOKEN}"], ids=["none", "wrong"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_malformed_write_without_a_valid_token_gets_401_not_422(
    client: httpx.AsyncClient, engine: Engine, method: str, authorization: str | None
) -> None:
    [item_id] = insert_items(engine, {"name": "Kettle", "price": Decimal("5.00")})
    before = stored(engine)
    response = await client.request(
        method,
        "/items" if method == "POST" else f"/items/{item_id}",
        content=b'{"name": "Lamp", "price": ',
        headers={"Authorization": authorization or "", "Content-Type": "application/json"},
    )
    assert_unauthorized(response)
    assert stored(engine) == before


async def test_a_refused_write_never_reads_its_body(app: Any) -> None:
    received: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append({})
        return {"type": "http.request", "body": b"{}", "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("POST", "/items", [
        (b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", b"2"),
    ])
    await app(scope, receive, send)

    assert sent[0]["status"] == 401
    assert received == []  # not a byte of the body was asked for


async def test_a_refused_write_takes_no_connection_and_no_slot(settings: Settings) -> None:
    # One connection slot, held by a request in progress: a refused write that waited for
    # it would answer 503 after the pool timeout, not 401 at once.
    app = create_app(settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 3}
    ))
    checkouts: list[object] = []
    event.listen(app.state.engine.sync_engine, "checkout", lambda *args: checkouts.append(args))
    holding, release = asyncio.Event(), asyncio.Event()

    @app.get("/test/hold-the-connection")
    async def hold() -> None:
        await async_db.session.execute(text("SELECT 1"))
        holding.set()
        await release.wait()

    async with _client(app) as client:
        held = asyncio.create_task(client.get("/test/hold-the-connection"))
        await asyncio.wait_for(holding.wait(), timeout=5)
        checkouts.clear()
        started = time.monotonic()
        refused = [
            await client.post("/items", content=_item_body(2 * 1024 * 1024),
                              headers={"Content-Type": "application/json"}),
            await client.post("/items", content=b"{", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {WRONG_TOKEN}"}),
        ]
        elapsed = time.monotonic() - started
        release.set()
        assert (await held).status_code == 200
    await app.state.engine.dispose()

    for response in refused:
        assert_unauthorized(response)
    assert elapsed < 1.0
    assert checkouts == []


# -- OpenAPI --------------------------------------------------------------------------------


async def _openapi(app: Any) -> dict[str, Any]:
    async with _client(app) as client:
        document: dict[str, Any] = (await client.get("/openapi.json")).json()
    return document


READS = [("/items", "get"), ("/items/scroll", "get"), ("/items/{item_id}", "get")]
WRITES_DOCUMENTED = [("/items", "post"), ("/items/{item_id}", "patch"),
                     ("/items/{item_id}", "delete")]


async def test_openapi_declares_the_api_token_scheme_on_writes_only(app: Any) -> None:
    document = await _openapi(app)

    assert document["components"]["securitySchemes"] == {
        "ApiToken": {"type": "http", "scheme": "bearer", "description": ANY_TEXT}
    }
    for path, method in WRITES_DOCUMENTED:
        operation = document["paths"][path][method]
        assert operation["security"] == [{"ApiToken": ["items:write"]}]
        assert {"400", "401"} <= set(operation["responses"])
        assert "403" not in operation["responses"]  # an API token has every scope
    for path, method in READS:
        operation = document["paths"][path][method]
        assert "security" not in operation and "401" not in operation["responses"]
        assert "400" in operation["responses"]  # a token in the URL is refused even here


async def test_openapi_says_reads_need_a_token_when_read_requires_token(
    settings: Settings,
) -> None:
    document = await _openapi(
        create_app(settings.model_copy(update={"read_requires_token": True}))
    )
    for path, method in READS:
        operation = document["paths"][path][method]
        assert operation["security"] == [{"ApiToken": ["items:read"]}]
        assert "401" in operation["responses"]


async def test_openapi_offers_both_token_kinds_when_jwt_is_on(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={
        "jwt_secret": SecretStr("s" * 32), "jwt_issuer": "https://id.example.test/",
        "jwt_audience": "items-api", "read_requires_token": True,
    }))
    document = await _openapi(app)

    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"ApiToken", "Jwt"}
    assert (schemes["Jwt"]["scheme"], schemes["Jwt"]["bearerFormat"]) == ("bearer", "JWT")
    post = document["paths"]["/items"]["post"]
    assert post["security"] == [{"ApiToken": ["items:write"]}, {"Jwt": ["items:write"]}]
    assert {"400", "401", "403"} <= set(post["responses"])
    get = document["paths"]["/items"]["get"]
    assert get["security"] == [{"ApiToken": ["items:read"]}, {"Jwt": ["items:read"]}]
    problem = post["responses"]["403"]["content"]["application/problem+json"]["schema"]
    assert problem == {"$ref": "#/components/schemas/Problem"}


class _AnyText(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    __hash__ = str.__hash__


ANY_TEXT = _AnyText()
