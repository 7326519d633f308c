"""JWTs from an identity provider (service.jwt_check, service.jwt_keys), beside API tokens.

A JWT is accepted only if it is signed by one of the provider's keys (JWKS, selected by
`kid`, or the HS256 JWT_SECRET) with the one algorithm that key verifies, comes from
JWT_ISSUER for JWT_AUDIENCE, has `exp` and `sub`, and is within its validity (30 s of
leeway); its `scope` / `scp` decide what it may do (403 otherwise). Every hostile token
gets 401 (400 in the URL), never a 5xx, and nothing is stored; why goes to the log, the
token never does.
"""

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError
from sqlalchemy import Engine

from service.config import Settings
from service.jwt_keys import InvalidKeySet, KeysUnavailable, RemoteKeys, signing_keys
from service.main import create_app
from tests.conftest import AUTH, ROOT
from tests.identity_provider import (
    AUDIENCE,
    HS256_SECRET,
    ISSUER,
    IdentityProvider,
    JwksServer,
    hs256_token,
)
from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio

ITEM = {"name": "Lamp", "price": "9.90"}


@pytest.fixture(scope="module")
def provider_keys() -> IdentityProvider:
    return IdentityProvider()  # key generation takes a moment: once per module


@pytest.fixture
def provider(provider_keys: IdentityProvider) -> Iterator[IdentityProvider]:
    base = dict(provider_keys.private_keys)
    yield provider_keys
    provider_keys.private_keys = base
    provider_keys.algorithms = {kid: provider_keys.algorithms[kid] for kid in base}
    provider_keys.extra_jwks = []


@pytest.fixture
def jwks_server(provider: IdentityProvider) -> Iterator[JwksServer]:
    with JwksServer(provider).running() as server:
        yield server


def with_jwt(settings: Settings, **jwt: Any) -> Settings:
    return settings.model_copy(
        update={"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, **jwt}
    )


@pytest.fixture
def jwt_settings(settings: Settings, jwks_server: JwksServer) -> Settings:
    return with_jwt(settings, jwt_jwks_url=jwks_server.url)


def client_of(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def jwt_app(jwt_settings: Settings) -> FastAPI:
    return create_app(jwt_settings)


@pytest.fixture
async def client(jwt_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with JWT_JWKS_URL, and a client that sends no token of its own."""
    async with client_of(jwt_app) as client:
        yield client
    await jwt_app.state.engine.dispose()


@pytest.fixture
def clock(jwt_app: FastAPI) -> list[float]:
    """The clock of the app's JWKS cache: `clock[0] += 60` makes a minute pass."""
    now = [1000.0]
    keys = jwt_app.state.authenticator.jwt_check.keys
    assert isinstance(keys, RemoteKeys)
    keys.clock = lambda: now[0]
    return now


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_refused(response: httpx.Response, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# -- accepted ----------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"], ids=["RS256", "ES256", "EdDSA"])
async def test_a_valid_jwt_writes_as_its_subject(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine, kid: str
) -> None:
    response = await client.post("/items", json=ITEM, headers=bearer(provider.token(kid)))

    assert response.status_code == 201, response.text
    assert (response.json()["created_by"], response.json()["updated_by"]) == ("alice", "alice")
    [row] = stored(engine).values()
    assert (row["created_by"], row["updated_by"]) == ("alice", "alice")


async def test_api_tokens_and_jwts_work_side_by_side(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine
) -> None:
    by_jwt = await client.post("/items", json=ITEM, headers=bearer(provider.token()))
    by_api_token = await client.post("/items", json={**ITEM, "name": "Rug"}, headers=AUTH)

    assert (by_jwt.status_code, by_api_token.status_code) == (201, 201)
    assert sorted(row["created_by"] for row in stored(engine).values()) == ["alice", "token:1"]


async def test_scopes_may_come_as_a_scp_list(
    client: httpx.AsyncClient, provider: IdentityProvider
) -> None:
    token = provider.token(without=("scope",), scp=["items:write"])
    response = await client.post("/items", json=ITEM, headers=bearer(token))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "times",
    [{"exp": -10}, {"nbf": 10}, {"iat": 10}],
    ids=["expired-10s-ago", "valid-in-10s", "issued-10s-ahead"],
)
async def test_clock_skew_within_the_leeway_is_tolerated(
    client: httpx.AsyncClient, provider: IdentityProvider, times: dict[str, int]
) -> None:
    now = int(time.time())
    token = provider.token(**{claim: now + delta for claim, delta in times.items()})
    response = await client.post("/items", json=ITEM, headers=bearer(token))
    assert response.status_code == 201, response.text


async def test_an_hs256_token_is_verified_with_jwt_secret(
    settings: Settings, engine: Engine, provider: IdentityProvider
) -> None:
    app = create_app(with_jwt(settings, jwt_secret=SecretStr(HS256_SECRET)))
    async with client_of(app) as client:
        accepted = await client.post("/items", json=ITEM, headers=bearer(hs256_token()))
        other_secret = hs256_token("another-secret-of-at-least-32-bytes!!!")
        refused = [
            await client.post("/items", json={**ITEM, "name": "Rug"}, headers=bearer(token))
            for token in (other_secret, provider.token(), hs256_token(aud="another-api"))
        ]
    assert accepted.status_code == 201, accepted.text
    for response in refused:
        assert_refused(response)
    assert [row["created_by"] for row in stored(engine).values()] == ["bob"]


async def test_a_jwks_file_is_read_at_start(
    settings: Settings, engine: Engine, provider: IdentityProvider, tmp_path: Path
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(provider.jwks()))
    app = create_app(with_jwt(settings, jwt_jwks_file=jwks))
    async with client_of(app) as client:
        response = await client.post("/items", json=ITEM, headers=bearer(provider.token("ed-1")))
        unknown = await client.post(
            "/items", json={**ITEM, "name": "Rug"}, headers=bearer(provider.token(
                headers={"kid": "rsa-2"}))
        )
    assert response.status_code == 201, response.text
    assert_refused(unknown)


def test_an_unusable_jwks_file_stops_the_app_from_starting(
    settings: Settings, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}')
    for path in (empty, tmp_path / "missing.json"):
        with pytest.raises(InvalidKeySet, match=str(path)):
            create_app(with_jwt(settings, jwt_jwks_file=path))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_an_unusable_jwks_file_before_any_worker_starts(
    migrated_url: str, tmp_path: Path, workers: str
) -> None:
    """One line naming the file, exit status 2: each worker would fail at start, and uvicorn
    would start it again, for ever."""
    missing = tmp_path / "missing.json"
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--workers", workers, "--port", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DATABASE_URL": migrated_url, "JWT_JWKS_FILE": str(missing),
             "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE,
             "CURSOR_SECRET": "one-secret-for-every-worker"},
    )
    assert result.returncode == 2, result.stderr
    assert f"JWT_JWKS_FILE {missing}" in result.stderr
    assert "Traceback" not in result.stderr and "Serving on" not in result.stdout


async def test_the_app_serves_with_jwt_alone(
    settings: Settings, jwks_server: JwksServer, provider: IdentityProvider
) -> None:
    only_jwt = with_jwt(settings, jwt_jwks_url=jwks_server.url, api_tokens=SecretStr(""))
    app = create_app(only_jwt)
    async with client_of(app) as client:
        assert (await client.post("/items", json=ITEM, headers=AUTH)).status_code == 401
        created = await client.post("/items", json=ITEM, headers=bearer(provider.token()))
    assert created.status_code == 201, created.text


# -- scopes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "items:read"}, {"scp": ["items:read"]}, {"scope": ""}, {},
        # RFC 6749 3.3: scopes are separated by a space (0x20), nothing else.
        {"scope": "items:read\u2003items:write"}, {"scope": "items:read\u00a0items:write"},
    ],
    ids=["read-scope", "read-scp", "empty-scope", "no-scope-claim", "em-space", "nbsp"],
)
async def test_a_valid_token_without_the_write_scope_gets_403(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine,
    claims: dict[str, Any],
) -> None:
    token = provider.token(without=("scope",), claims=claims)

    response = await client.post("/items", json=ITEM, headers=bearer(token))

    assert_refused(response, 403)
    assert response.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", scope="items:write"'
    )
    assert "items:write" in response.json()["detail"]
    assert stored(engine) == {}


async def test_reads_need_the_read_scope_when_read_requires_token(
    jwt_settings: Settings, provider: IdentityProvider
) -> None:
    app = create_app(jwt_settings.model_copy(update={"read_requires_token": True}))
    write_only = provider.token(scope="items:write")
    read_only = provider.token(scope="items:read")
    async with client_of(app) as client:
        for path in ("/items", "/items/scroll"):
            assert_refused(await client.get(path))
            forbidden = await client.get(path, headers=bearer(write_only))
            assert_refused(forbidden, 403)
            assert 'scope="items:read"' in forbidden.headers["www-authenticate"]
            assert (await client.get(path, headers=bearer(read_only))).status_code == 200
            assert (await client.get(path, headers=AUTH)).status_code == 200  # every scope


async def test_reads_ignore_tokens_when_public(
    client: httpx.AsyncClient, provider: IdentityProvider
) -> None:
    for token in (provider.token(scope=""), "not a token at all"):
        response = await client.get("/items", headers=bearer(token))
        assert response.status_code == 200, response.text


# -- hostile tokens: each refused with 401, nothing stored ----------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed_by_hand(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """A JWT signed with HMAC-SHA256 over `key`, whatever the key is (PyJWT refuses to
    make the classic algorithm-confusion token itself)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300,
            "scope": "items:read items:write", **overrides}


def _bad_signature(provider: IdentityProvider) -> str:
    header, _, signature = provider.token().split(".")
    forged = _b64(json.dumps(_claims()).encode())  # another payload, the old signature
    return f"{header}.{forged}.{signature}"


def _hs256_with_the_rsa_public_key(provider: IdentityProvider) -> str:
    pem = provider.private_keys["rsa-1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _signed_by_hand({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, _claims(), pem)


def _signed_with_a_jwks_hmac_key(provider: IdentityProvider) -> str:
    # The JWKS also lists a symmetric key: it must never be used, not even when named.
    secret = b"a-symmetric-key-in-a-public-key-set"
    provider.extra_jwks.append({"kty": "oct", "kid": "hmac-1", "k": _b64(secret)})
    return jwt.encode(_claims(), secret, algorithm="HS256", headers={"kid": "hmac-1"})


def _alg_none(provider: IdentityProvider) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    return f"{header}.{_b64(json.dumps(_claims()).encode())}."


HOSTILE: dict[str, Callable[[IdentityProvider], str]] = {
    "expired": lambda p: p.token(exp=int(time.time()) - 3600),
    "expired-beyond-the-leeway": lambda p: p.token(exp=int(time.time()) - 45),
    "not-yet-valid": lambda p: p.token(nbf=int(time.time()) + 3600),
    "issued-in-the-future": lambda p: p.token(iat=int(time.time()) + 3600),
    "wrong-issuer": lambda p: p.token(iss="https://evil.example.test/"),
    "wrong-audience": lambda p: p.token(aud="another-api"),
    "no-exp": lambda p: p.token(without=("exp",)),
    # RFC 7519: NumericDates are JSON numbers, not strings of digits or booleans.
    "exp-as-a-string": lambda p: p.token(exp=str(int(time.time()) + 300)),
    "iat-as-a-string": lambda p: p.token(iat=str(int(time.time()))),
    "nbf-as-true": lambda p: p.token(nbf=True),
    "no-sub": lambda p: p.token(without=("sub",)),
    "no-iss": lambda p: p.token(without=("iss",)),
    "bad-signature": _bad_signature,
    "alg-none": _alg_none,
    "hs256-signed-with-the-rsa-public-key": _hs256_with_the_rsa_public_key,
    "unknown-kid": lambda p: p.token(headers={"kid": "nobody"}),
    "no-kid": lambda p: jwt.encode(_claims(), p.private_keys["rsa-1"], algorithm="RS256"),
    "jwks-key-of-the-wrong-type": _signed_with_a_jwks_hmac_key,
    "rs256-naming-an-ec-key": lambda p: p.token(headers={"kid": "ec-1"}),
    "20-kib": lambda p: p.token(claims={"padding": "x" * 20 * 1024}),
    "scp-as-a-string": lambda p: p.token(without=("scope",), scp="items:write"),
    "scope-as-a-list": lambda p: p.token(scope=["items:write"]),
    "sub-not-a-string": lambda p: p.token(sub=42),
    # What would be recorded as who changed what: no database stores a NUL or a lone
    # surrogate (a 500 before), and invisible or blank-edged names pass for others.
    "sub-with-a-nul": lambda p: p.token(sub="a\u0000b"),
    "sub-with-a-lone-surrogate": lambda p: p.token(sub="x\ud800y"),
    "sub-with-a-line-break": lambda p: p.token(sub="alice\n2026-11-30 INFO forged"),
    "sub-with-a-zero-width-space": lambda p: p.token(sub="\u200btoken:ci"),
    "sub-with-a-blank-edge": lambda p: p.token(sub=" alice"),
    "sub-with-a-combining-grapheme-joiner": lambda p: p.token(sub="tok\u034fen:ci"),
    "sub-with-a-variation-selector": lambda p: p.token(sub="unknown\ufe0f"),
    "sub-a-hangul-filler": lambda p: p.token(sub="\u3164"),
    "garbage": lambda p: "not.a.jwt",
    "api-token-with-a-suffix": lambda p: AUTH["Authorization"].split()[1] + "x",
}


@pytest.mark.parametrize("make_token", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_token_is_refused_with_401_and_nothing_is_stored(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine,
    make_token: Callable[[IdentityProvider], str], caplog: pytest.LogCaptureFixture,
) -> None:
    token = make_token(provider)
    [kettle] = insert_items(engine, {"name": "Kettle", "price": Decimal("5.00")})
    before = stored(engine)

    with caplog.at_level(logging.INFO, logger="service.auth"):
        responses = [
            await client.post("/items", json=ITEM, headers=bearer(token)),
            await client.patch(f"/items/{kettle}", json={"price": "1", "version": 1},
                               headers=bearer(token)),
            await client.delete(f"/items/{kettle}", headers=bearer(token)),
        ]

    for response in responses:
        assert_refused(response)
        assert token not in response.text
    assert stored(engine) == before
    refusals = [r for r in caplog.records if r.name == "service.auth"]
    assert len(refusals) == 3 and all(r.levelno == logging.INFO for r in refusals)
    assert token not in caplog.text


async def test_the_log_says_why_a_token_was_refused(
    client: httpx.AsyncClient, provider: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    reasons = {
        "expired (exp)": provider.token(exp=int(time.time()) - 3600),
        "wrong audience (aud)": provider.token(aud="another-api"),
        "unknown kid": provider.token(headers={"kid": "nobody"}),
        "`scp` is not a list": provider.token(without=("scope",), scp="items:write"),
        "larger than 8192 bytes": provider.token(claims={"padding": "x" * 20 * 1024}),
    }
    for reason, token in reasons.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="service.auth"):
            response = await client.post("/items", json=ITEM, headers=bearer(token))
        assert response.status_code == 401
        assert reason in caplog.text, caplog.text
        assert reason not in response.text  # the client learns only that it was refused


def token_of_length_near(provider: IdentityProvider, low: int, high: int) -> str:
    """A valid token whose length is within [low, high] (base64 skips some lengths)."""
    for padding in range(6000):
        token = provider.token(claims={"padding": "x" * padding})
        if low <= len(token) <= high:
            return token
    raise AssertionError(f"no token of {low}-{high} bytes")


async def test_the_8_kib_bound_is_on_the_token_not_on_the_header(
    client: httpx.AsyncClient, provider: IdentityProvider
) -> None:
    """`Authorization: Bearer <token>`: a token of 8,192 bytes or less is checked (the
    header's "Bearer " prefix does not count), a longer one is refused unread."""
    fits = token_of_length_near(provider, 8186, 8192)
    response = await client.post("/items", json=ITEM, headers=bearer(fits))
    assert response.status_code == 201, response.text
    over = token_of_length_near(provider, 8193, 8200)
    assert_refused(await client.post("/items", json={**ITEM, "name": "Vase"},
                                      headers=bearer(over)))


@pytest.mark.parametrize(
    "subject",
    ["token:ci", "token:1", "cli:seed", "unknown", "Token:ci", "UNKNOWN", "\uff54oken:ci"],
)
async def test_a_jwt_claiming_a_name_the_service_keeps_for_itself_is_refused(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine, subject: str
) -> None:
    """API tokens write as `token:<label>`, the seed command as `cli:seed`, old rows say
    `unknown`: a JWT with such a `sub` would write as them - or as a name that reads the
    same (another case, fullwidth letters)."""
    response = await client.post("/items", json=ITEM, headers=bearer(provider.token(sub=subject)))
    assert_refused(response)
    assert stored(engine) == {}


async def test_a_path_with_a_line_break_cannot_forge_a_line_of_the_auth_log(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.auth"):
        response = await client.delete("/items/1%0a2026-11-30 ERROR service.auth forged")
    assert_refused(response)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "service.auth"]
    assert "\n" not in line and "/items/1\\n2026-11-30" in line


async def test_a_subject_that_only_resembles_a_reserved_name_is_accepted(
    client: httpx.AsyncClient, provider: IdentityProvider
) -> None:
    for subject in ("tokens:1", "unknown-user", "client:seed", "Émile Zola"):
        response = await client.post(
            "/items", json={**ITEM, "name": subject}, headers=bearer(provider.token(sub=subject))
        )
        assert response.status_code == 201, response.text
        assert response.json()["created_by"] == subject


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_token_in_the_query_string_is_refused(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine, method: str
) -> None:
    token = provider.token()
    cases = [(name, headers) for name in ("access_token", "access%5Ftoken", "%61ccess_token")
             for headers in ({}, bearer(token))]  # even beside a valid header
    for name, headers in cases:
        response = await client.request(
            method, f"/items?{name}={token}",
            json=ITEM if method == "POST" else None, headers=headers,
        )
        assert response.status_code == 400, response.text
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_request"'
        assert response.headers["content-type"] == "application/problem+json"
        assert token not in response.text
    assert stored(engine) == {}


@pytest.mark.parametrize("order", ["valid first", "valid last"])
async def test_two_authorization_headers_are_refused(
    client: httpx.AsyncClient, provider: IdentityProvider, engine: Engine, order: str
) -> None:
    # Which of the two counts would depend on who reads the request (a proxy in front may
    # pick the other one): neither does.
    headers = [("Authorization", f"Bearer {provider.token()}"), ("Authorization", "Bearer nope")]
    if order == "valid last":
        headers.reverse()
    response = await client.post("/items", json=ITEM, headers=headers)
    assert response.status_code == 400, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_request"'
    assert response.headers["content-type"] == "application/problem+json"
    assert stored(engine) == {}
    # One header is fine; and a read open to all does not look at them.
    assert (await client.get("/items", headers=headers)).status_code == 200
    response = await client.post("/items", json=ITEM, headers=bearer(provider.token()))
    assert response.status_code == 201, response.text


# -- the JWKS over HTTP ----------------------------------------------------------------------


async def test_the_jwks_is_fetched_at_start_and_cached(
    jwt_settings: Settings, jwks_server: JwksServer, provider: IdentityProvider
) -> None:
    app = create_app(jwt_settings)
    async with app.router.lifespan_context(app), client_of(app) as client:
        assert jwks_server.fetches == 1  # at start, before any request
        for n in range(3):
            response = await client.post(
                "/items", json={**ITEM, "name": f"Lamp {n}"}, headers=bearer(provider.token())
            )
            assert response.status_code == 201, response.text
    assert jwks_server.fetches == 1


async def test_an_unknown_kid_refreshes_the_jwks_once_a_minute_at_most(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider,
    clock: list[float],
) -> None:
    assert (await client.post("/items", json=ITEM, headers=bearer(provider.token()))).is_success
    assert jwks_server.fetches == 1
    provider.add_rsa_key("rsa-2")  # the provider rotates in a new key
    rotated = bearer(provider.token("rsa-2"))

    clock[0] += 59  # within the minute of the last fetch: the new kid is not looked for
    assert_refused(await client.post("/items", json={**ITEM, "name": "Rug"}, headers=rotated))
    assert jwks_server.fetches == 1

    clock[0] += 1
    response = await client.post("/items", json={**ITEM, "name": "Rug"}, headers=rotated)
    assert response.status_code == 201, response.text
    assert jwks_server.fetches == 2

    # Within the next minute, unknown kids - however many, however concurrent - fetch
    # nothing.
    clock[0] += 30
    assert await statuses_of_unknown_kids(client, provider, 20) == {401}
    assert jwks_server.fetches == 2


async def test_requests_with_a_new_kid_wait_for_the_fetch_another_one_started(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider,
    clock: list[float],
) -> None:
    assert (await client.post("/items", json=ITEM, headers=bearer(provider.token()))).is_success
    provider.add_rsa_key("rsa-2")  # the provider rotates in a new key
    clock[0] += 60
    jwks_server.delay = 0.3  # the first request's fetch is still under way when the rest come

    async def create(n: int) -> int:
        token = bearer(provider.token("rsa-2"))
        response = await client.post("/items", json={**ITEM, "name": f"Rug {n}"}, headers=token)
        return response.status_code

    first = asyncio.create_task(create(0))
    await asyncio.sleep(0.1)
    assert await asyncio.gather(first, *(create(n) for n in range(1, 6))) == [201] * 6
    assert jwks_server.fetches == 2  # one fetch, shared


async def test_a_known_kid_does_not_wait_for_a_refresh_of_stale_keys(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider,
    clock: list[float],
) -> None:
    assert (await client.post("/items", json=ITEM, headers=bearer(provider.token()))).is_success
    clock[0] += 15 * 60  # the cached keys are due for a refresh
    jwks_server.delay = 2.0  # and the provider is slow

    async def create(n: int) -> float:
        started = time.monotonic()
        response = await client.post("/items", json={**ITEM, "name": f"Rug {n}"},
                                     headers=bearer(provider.token()))
        assert response.status_code == 201, response.text
        return time.monotonic() - started

    refreshing = asyncio.create_task(create(0))  # this one fetches, and waits for it
    deadline = time.monotonic() + 5
    while jwks_server.fetches < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # until its fetch has reached the provider
    assert jwks_server.fetches == 2
    others = await asyncio.gather(*(create(n) for n in range(1, 4)))
    assert await refreshing >= 1.9
    assert max(others) < 1.0  # served from the cache meanwhile, not after the refresh
    assert jwks_server.fetches == 2


async def test_a_key_the_provider_withdrew_stops_working_within_15_minutes(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider,
    clock: list[float],
) -> None:
    token = bearer(provider.token("ec-1"))
    assert (await client.post("/items", json=ITEM, headers=token)).status_code == 201
    del provider.private_keys["ec-1"]  # withdrawn from the JWKS

    clock[0] += 899
    again = await client.post("/items", json={**ITEM, "name": "Rug"}, headers=token)
    assert again.status_code == 201, again.text
    assert jwks_server.fetches == 1

    clock[0] += 1
    assert_refused(await client.post("/items", json={**ITEM, "name": "Vase"}, headers=token))
    assert jwks_server.fetches == 2


async def statuses_of_unknown_kids(
    client: httpx.AsyncClient, provider: IdentityProvider, count: int
) -> set[int]:
    """The statuses of `count` concurrent writes, each with a token naming another unknown
    kid."""
    tokens = [provider.token(headers={"kid": f"nobody-{n}"}) for n in range(count)]
    responses = await asyncio.gather(
        *(client.post("/items", json=ITEM, headers=bearer(token)) for token in tokens)
    )
    return {response.status_code for response in responses}


async def test_concurrent_unknown_kids_share_one_fetch(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider,
    clock: list[float],
) -> None:
    assert (await client.post("/items", json=ITEM, headers=bearer(provider.token()))).is_success
    clock[0] += 3600
    jwks_server.delay = 0.3  # every request arrives while the first refresh is under way
    assert await statuses_of_unknown_kids(client, provider, 10) == {401}
    assert jwks_server.fetches == 2


async def test_the_provider_being_down_keeps_the_cached_keys_working(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider,
    engine: Engine, clock: list[float],
) -> None:
    first = await client.post("/items", json=ITEM, headers=bearer(provider.token()))
    assert first.status_code == 201, first.text

    jwks_server.down = True
    clock[0] += 3600
    unknown = await client.post(  # tries a refresh, which fails
        "/items", json=ITEM, headers=bearer(provider.token(headers={"kid": "nobody"}))
    )
    still = await client.post(
        "/items", json={**ITEM, "name": "Rug"}, headers=bearer(provider.token("ec-1"))
    )

    assert_refused(unknown)
    assert jwks_server.fetches == 2
    assert still.status_code == 201, still.text
    assert sorted(row["name"] for row in stored(engine).values()) == ["Lamp", "Rug"]


async def test_a_provider_down_at_start_leaves_api_tokens_working(
    jwt_settings: Settings, jwks_server: JwksServer, provider: IdentityProvider
) -> None:
    jwks_server.down = True
    app = create_app(jwt_settings)
    async with app.router.lifespan_context(app), client_of(app) as client:
        by_jwt = await client.post("/items", json=ITEM, headers=bearer(provider.token()))
        by_api_token = await client.post("/items", json=ITEM, headers=AUTH)
    # No key was ever fetched: the service cannot tell a good JWT from a bad one. A 401
    # would tell the client to throw its (good) token away: 503, try again later.
    assert by_jwt.status_code == 503, by_jwt.text
    assert by_jwt.headers["content-type"] == "application/problem+json"
    assert 1 <= int(by_jwt.headers["retry-after"]) <= 60
    assert by_api_token.status_code == 201, by_api_token.text


async def test_fetching_the_jwks_does_not_block_other_requests(
    client: httpx.AsyncClient, jwks_server: JwksServer, provider: IdentityProvider
) -> None:
    jwks_server.delay = 1.0
    waiting = asyncio.create_task(
        client.post("/items", json=ITEM, headers=bearer(provider.token()))
    )
    await asyncio.sleep(0.1)  # the fetch is under way
    started = time.monotonic()
    live = await client.get("/health/live")
    assert live.status_code == 200
    assert time.monotonic() - started < 0.5
    assert not waiting.done()
    assert (await waiting).status_code == 201


async def test_a_provider_trickling_its_answer_is_given_up_after_the_fetch_timeout(
    jwks_server: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeout bounds the whole fetch, not each read: a byte every 0.2 s never lets a
    read time out, and would have held the fetch (and the app's start) for minutes."""
    monkeypatch.setattr("service.jwt_keys.FETCH_TIMEOUT", 1.0)
    jwks_server.trickle = 0.2
    keys = RemoteKeys(jwks_server.url)
    started = time.monotonic()
    with pytest.raises(KeysUnavailable):  # nothing fetched: no keys
        await keys.key("rsa-1")
    assert time.monotonic() - started < 3


async def test_a_jwks_answer_past_the_size_bound_is_given_up_as_it_comes(
    jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that never ends is dropped once it passes 1 MiB, not read (into memory)
    until the fetch times out."""
    jwks_server.endless = True
    keys = RemoteKeys(jwks_server.url)
    with (caplog.at_level(logging.WARNING, logger="service.auth.jwks"),
          pytest.raises(KeysUnavailable)):
        await keys.key("rsa-1")
    assert "larger than 1048576 bytes" in caplog.text
    assert "TimeoutError" not in caplog.text


async def test_a_gzip_jwks_is_read_and_a_gzip_bomb_is_given_up_at_the_bound(
    jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.gzip = True
    assert await RemoteKeys(jwks_server.url).key("rsa-1") is not None
    # 64 MiB of spaces before the keys: ~64 KiB compressed.
    jwks_server.gzipped = gzip.compress(b" " * 64 * 2**20 + b"{}", compresslevel=1)
    keys = RemoteKeys(jwks_server.url)
    tracemalloc.start()
    try:
        with (caplog.at_level(logging.WARNING, logger="service.auth.jwks"),
              pytest.raises(KeysUnavailable)):
            await keys.key("rsa-1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "larger than 1048576 bytes" in caplog.text
    assert peak < 16 * 2**20  # never inflated whole, nor a network read's worth at once


async def test_a_raw_deflate_jwks_is_read_and_a_corrupt_one_keeps_the_cached_keys(
    jwks_server: JwksServer, provider: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    jwks_server.gzipped = raw.compress(json.dumps(provider.jwks()).encode()) + raw.flush()
    jwks_server.encoding = "deflate"  # as some servers send it: no zlib header
    assert await RemoteKeys(jwks_server.url).key("rsa-1") is not None
    jwks_server.gzipped, jwks_server.encoding = b"\x1f\x8b not gzip at all", "gzip"
    with (caplog.at_level(logging.WARNING, logger="service.auth.jwks"),
          pytest.raises(KeysUnavailable)):
        await RemoteKeys(jwks_server.url).key("rsa-1")  # logged, not raised: retried later
    assert "not valid gzip" in caplog.text


async def test_the_rate_limit_lets_a_refresh_through_after_a_minute(
    jwks_server: JwksServer, provider: IdentityProvider
) -> None:
    now = [1000.0]
    keys = RemoteKeys(jwks_server.url, clock=lambda: now[0])
    jwks_server.down = True
    await keys.start()  # fails: no keys yet
    jwks_server.down = False

    with pytest.raises(KeysUnavailable) as unavailable:  # not retried within the minute
        await keys.key("rsa-1")
    assert unavailable.value.retry_after == 60
    now[0] += 59.9
    with pytest.raises(KeysUnavailable):
        await keys.key("rsa-1")
    assert jwks_server.fetches == 1
    now[0] += 0.2
    assert await keys.key("rsa-1") is not None
    assert jwks_server.fetches == 2
    assert await keys.key("ec-1") is not None  # known now: no fetch
    assert jwks_server.fetches == 2


def test_a_malformed_key_in_a_jwks_is_skipped_not_fatal(provider: IdentityProvider) -> None:
    """One broken key (an RSA modulus that is not base64url text) must not take the good
    ones down with it - at start, or when the provider publishes it later."""
    jwks = provider.jwks()
    broken = {**jwks["keys"][0], "kid": "broken", "n": 123}
    keys = signing_keys({"keys": [*jwks["keys"], broken]})
    assert "broken" not in keys and "rsa-1" in keys
    with pytest.raises(InvalidKeySet):
        signing_keys({"keys": [broken]})


def test_a_second_key_with_the_same_kid_is_ignored_with_a_warning(
    provider: IdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # Keys are chosen by kid: the first of a name is kept (its tokens keep working), and the
    # log says why the other one's tokens are refused.
    ec, rsa = provider.public_jwk("ec-1"), provider.public_jwk("rsa-1")
    with caplog.at_level(logging.WARNING, logger="service.auth.jwks"):
        keys = signing_keys({"keys": [ec, {**rsa, "kid": "ec-1"}]})
    assert keys["ec-1"].key_type == "EC"
    assert any("a second key named 'ec-1'" in r.getMessage() for r in caplog.records)


def test_only_public_signing_keys_of_the_three_kinds_are_taken(
    provider: IdentityProvider,
) -> None:
    rsa = provider.public_jwk("rsa-1")
    jwks = {
        "keys": [
            rsa,
            provider.public_jwk("ec-1"),
            provider.public_jwk("ed-1"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {**rsa, "kid": "rs512", "alg": "RS512"},
            {**rsa, "kid": "enc", "use": "enc"},
            {key: value for key, value in rsa.items() if key != "kid"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            "not an object",
        ]
    }
    keys = signing_keys(jwks)
    assert {kid: key.algorithm_name for kid, key in keys.items()} == {
        "rsa-1": "RS256", "ec-1": "ES256", "ed-1": "EdDSA"
    }
    for unusable in ({"keys": []}, {"keys": [{"kty": "oct", "kid": "k", "k": "AA"}]}, [], {}):
        with pytest.raises(InvalidKeySet):
            signing_keys(unusable)


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"jwt_secret": "too-short"}, "at least 32 bytes"),
        ({"jwt_secret": HS256_SECRET, "jwt_jwks_url": "https://id.example.test/jwks"},
         "only one of"),
        ({"jwt_jwks_url": "https://id.example.test/jwks", "jwt_audience": AUDIENCE},
         "JWT_ISSUER must be set"),
        ({"jwt_jwks_url": "https://id.example.test/jwks", "jwt_issuer": ISSUER},
         "JWT_AUDIENCE must be set"),
        ({"jwt_secret": HS256_SECRET}, "JWT_ISSUER and JWT_AUDIENCE must be set"),
        ({"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}, "no key to verify"),
        ({"jwt_jwks_url": "file:///etc/passwd", "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE},
         "http"),
        ({"jwt_leeway": -1}, "greater than or equal to 0"),
    ],
    ids=["short-secret", "two-key-sources", "no-issuer", "no-audience", "neither",
         "issuer-without-key", "not-http", "negative-leeway"],
)
def test_an_incomplete_jwt_configuration_is_refused_at_start(
    env: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(api_tokens="x" * 20, **env)
    assert message in str(refused.value)
    assert "too-short" not in str(refused.value) and HS256_SECRET not in str(refused.value)


def test_jwt_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_JWKS_URL", "https://id.example.test/jwks")
    monkeypatch.setenv("JWT_ISSUER", ISSUER)
    monkeypatch.setenv("JWT_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("JWT_SECRET", "")  # empty is unset
    settings = Settings(api_tokens="x" * 20)  # type: ignore[arg-type]
    assert settings.jwt_enabled() and settings.jwt_leeway == 30
    assert settings.jwt_secret is None


async def test_openapi_offers_only_jwts_when_there_are_no_api_tokens(
    settings: Settings,
) -> None:
    app = create_app(with_jwt(settings, jwt_secret=SecretStr(HS256_SECRET),
                              api_tokens=SecretStr("")))
    async with client_of(app) as client:
        document = (await client.get("/openapi.json")).json()
    assert set(document["components"]["securitySchemes"]) == {"Jwt"}
    assert document["paths"]["/items"]["post"]["security"] == [{"Jwt": ["items:write"]}]


def test_serve_generates_no_development_token_when_jwt_is_on(
    monkeypatch: pytest.MonkeyPatch, migrated_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from service.cli import main

    served: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    for name, value in {"API_TOKENS": "", "DATABASE_URL": migrated_url, "JWT_SECRET": HS256_SECRET,
                        "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE}.items():
        monkeypatch.setenv(name, value)

    assert main(["serve", "--port", "8123"]) == 0

    assert served == ["service.main:app"]
    assert "development token" not in capsys.readouterr().out
    assert os.environ["API_TOKENS"] == ""  # none was generated
