"""CORS: off unless CORS_ORIGINS names origins; only those origins are answered; a wildcard
never goes together with credentials."""

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from service.config import Settings
from service.main import create_app

pytestmark = pytest.mark.anyio

SHOP = "https://shop.example.com"
EVIL = "https://evil.example.net"


def app_with(settings: Settings, **changes: object) -> FastAPI:
    return create_app(settings.model_copy(update=changes))


async def preflight(app: FastAPI, origin: str) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        return await client.options(
            "/items",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )


async def get_from(app: FastAPI, origin: str) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        return await client.get("/items", headers={"Origin": origin})


async def test_no_cors_headers_unless_origins_are_configured(settings: Settings) -> None:
    app = app_with(settings)
    response = await get_from(app, SHOP)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in (await preflight(app, SHOP)).headers


async def test_a_listed_origin_may_call_with_credentials(settings: Settings) -> None:
    app = app_with(settings, cors_origins=[SHOP], cors_allow_credentials=True)

    allowed = await preflight(app, SHOP)
    simple = await get_from(app, SHOP)

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == SHOP
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert simple.headers["access-control-allow-origin"] == SHOP
    assert "etag" in simple.headers["access-control-expose-headers"].lower()
    # A browser app reads why it was refused: error="insufficient_scope", scope="...".
    assert "www-authenticate" in simple.headers["access-control-expose-headers"].lower()


async def test_an_unlisted_origin_gets_no_cors_headers(settings: Settings) -> None:
    app = app_with(settings, cors_origins=[SHOP], cors_allow_credentials=True)

    refused = await preflight(app, EVIL)
    simple = await get_from(app, EVIL)

    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in simple.headers


async def test_any_origin_without_credentials_is_allowed(settings: Settings) -> None:
    app = app_with(settings, cors_origins=["*"])
    response = await get_from(app, EVIL)
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


def test_wildcard_with_credentials_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", f"{SHOP},*")
    monkeypatch.setenv("CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(ValidationError, match="cannot be combined"):
        Settings()


def test_origins_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", f" {SHOP} , https://admin.example.com,")
    assert Settings().cors_origins == [SHOP, "https://admin.example.com"]


async def test_a_browser_may_send_prefer_and_head_and_read_preference_applied(
    settings: Settings,
) -> None:
    app = app_with(settings, cors_origins=[SHOP])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        for method in ("GET", "HEAD"):
            allowed = await client.options("/items", headers={
                "Origin": SHOP, "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "prefer",
            })
            assert allowed.status_code == 200, (method, allowed.text)
        listed = await client.get("/items", headers={"Origin": SHOP, "Prefer": "count=none"})
    assert listed.headers["preference-applied"] == "count=none"
    exposed = listed.headers["access-control-expose-headers"].lower()
    assert "preference-applied" in exposed
