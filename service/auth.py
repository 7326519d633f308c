"""Who may call, and as whom: bearer tokens - API tokens from `API_TOKENS`, or JWTs from an
identity provider (`service.jwt_check`) - checked before the request goes any further.

Routes say what they need with a dependency, `Requirement(scope)` (`items:write` for
writes; `Requirement(scope, reads=True)` for reads, needed only when READ_REQUIRES_TOKEN is
true). The check itself runs in `Authentication`, pure ASGI middleware outside the body
limit and the database session: it finds the route a request is for, and refuses before
any byte of the body is read or parsed and before a connection slot is taken, so an
unauthenticated write with a malformed or oversized body gets 401, not 422 or 413.

- No token, or one that is not valid: 401, `WWW-Authenticate: Bearer error="invalid_token"`.
- A valid token without the route's scope: 403, `Bearer error="insufficient_scope"`.
- A token in the query string (`?access_token=`, RFC 6750 §2.3, which ends up in access
  logs): 400, never looked at.
- A credential over 8 KiB: 401 before any parsing.

Each refusal is a problem document saying what to do; why the token was refused goes to
the log (logger `service.auth`, INFO), never the token itself. The caller, once known, is
the current principal (`service.principal`) until the request ends.

API tokens: only their SHA-256 digests are kept, and a presented token's digest is compared
with each of them in constant time (`hmac.compare_digest`, every digest, no early exit).
They carry every scope; their principal is `token:<label>` (`API_TOKENS=ci=...` ->
`token:ci`; an unlabelled token is known by its position, `token:1`, `token:2`, ...).
"""

import hashlib
import hmac
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.jwt_check import InvalidToken, JwtCheck
from service.jwt_keys import FileKeys, KeysUnavailable, RemoteKeys
from service.logs import printable
from service.openapi import extend_openapi
from service.principal import (
    API_TOKEN_PREFIX,
    Principal,
    current_principal_or_none,
    reset_principal,
    set_principal,
)
from service.problems import problem_response, problem_responses
from service.telemetry import request_notes

logger = logging.getLogger("service.auth")

MAX_TOKEN_BYTES = 8 * 1024
API_TOKEN_SCHEME = "ApiToken"
JWT_SCHEME = "Jwt"


class NoApiTokens(RuntimeError):
    """The app was asked to start with no way to authenticate, i.e. with writes open to all."""

    def __init__(self) -> None:
        super().__init__(
            "No API token and no JWT key is configured, so nobody could be told apart from "
            "anybody: set API_TOKENS (comma-separated, each at least 16 characters) or "
            "JWT_JWKS_URL / JWT_JWKS_FILE / JWT_SECRET in the environment or .env. "
            "`make run` / `python -m service serve` generate a development token for you."
        )


class TokenCheck:
    """Tells which configured API token a presented one is, by SHA-256 digest."""

    def __init__(self, tokens: Iterable[str], labels: Iterable[str] | None = None) -> None:
        self._digests = tuple(_digest(token) for token in tokens)
        self._labels = (
            tuple(labels) if labels is not None
            else tuple(str(n) for n in range(1, len(self._digests) + 1))
        )
        assert len(self._labels) == len(self._digests)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TokenCheck":
        return cls(settings.api_token_list(), settings.api_token_labels())

    def __bool__(self) -> bool:
        return bool(self._digests)

    def label_of(self, token: str) -> str | None:
        """The label of the configured token that `token` is, or None if it is none of them."""
        candidate = _digest(token)
        matched = None
        for digest, label in zip(self._digests, self._labels, strict=True):
            # All of them, so the time taken does not say which (or whether one) matched.
            if hmac.compare_digest(digest, candidate):
                matched = label
        return matched

    def accepts(self, token: str) -> bool:
        return self.label_of(token) is not None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Unauthenticated(Exception):
    """No valid token; the message is the reason, for the log."""


class Authenticator:
    """Turns a bearer credential into a `Principal`: API tokens first, then JWTs (if on)."""

    def __init__(self, api_tokens: TokenCheck, jwt_check: JwtCheck | None) -> None:
        if not api_tokens and jwt_check is None:
            raise NoApiTokens()
        self.api_tokens = api_tokens
        self.jwt_check = jwt_check

    async def start(self) -> None:
        """Fetch the provider's keys now, when they come from JWT_JWKS_URL (app start)."""
        keys = self.jwt_check.keys if self.jwt_check is not None else None
        if isinstance(keys, RemoteKeys):
            await keys.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Authenticator":
        """Raises `NoApiTokens` when `settings` configure neither API tokens nor JWT, and
        `InvalidKeySet` when JWT_JWKS_FILE is unusable."""
        return cls(TokenCheck.from_settings(settings), jwt_check_from_settings(settings))

    async def principal(self, credentials: str | None) -> Principal:
        """The caller `credentials` (the token of `Authorization: Bearer <token>`) stand for;
        raises `Unauthenticated`."""
        if not credentials:
            raise Unauthenticated("no bearer token")
        label = self.api_tokens.label_of(credentials)
        if label is not None:
            return Principal(f"{API_TOKEN_PREFIX}{label}", scopes=None)
        if self.jwt_check is None:
            raise Unauthenticated("not one of the API tokens (and JWT is off)")
        try:
            return await self.jwt_check.principal(credentials)
        except InvalidToken as refused:
            raise Unauthenticated(f"JWT refused: {refused}") from None


def jwt_check_from_settings(settings: Settings) -> JwtCheck | None:
    if not settings.jwt_enabled():
        return None
    assert settings.jwt_issuer is not None and settings.jwt_audience is not None
    claims: dict[str, Any] = {
        "issuer": settings.jwt_issuer,
        "audience": settings.jwt_audience,
        "leeway": settings.jwt_leeway,
    }
    if settings.jwt_secret is not None:
        return JwtCheck(secret=settings.jwt_secret.get_secret_value().encode(), **claims)
    if settings.jwt_jwks_file is not None:
        return JwtCheck(keys=FileKeys(settings.jwt_jwks_file), **claims)
    assert settings.jwt_jwks_url is not None
    return JwtCheck(keys=RemoteKeys(settings.jwt_jwks_url), **claims)


# -- what routes need ------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """Route dependency declaring the scope a route needs; `reads=True`: only when
    READ_REQUIRES_TOKEN is true. `Authentication` enforces it before the body is read;
    the dependency checks again (the route refuses if the middleware is missing)."""

    scope: str
    reads: bool = False

    def applies(self, settings: Settings) -> bool:
        return not self.reads or settings.read_requires_token

    async def __call__(self, request: Request) -> None:
        if not self.applies(request.app.state.settings):
            return
        principal = current_principal_or_none()
        if principal is None:
            raise HTTPException(401, _MISSING, headers=_INVALID_TOKEN)
        if not principal.may(self.scope):
            raise HTTPException(403, _insufficient(self.scope), headers=_challenge(self.scope))


def requirement_of(route: Any) -> Requirement | None:
    """The `Requirement` among a route's dependencies (nested ones included), if any."""

    def find(dependant: Dependant) -> Requirement | None:
        for dependency in dependant.dependencies:
            if isinstance(dependency.call, Requirement):
                return dependency.call
            if (found := find(dependency)) is not None:
                return found
        return None

    dependant = getattr(route, "dependant", None)
    return find(dependant) if isinstance(dependant, Dependant) else None


def api_routes(routes: Sequence[BaseRoute]) -> Iterator[Any]:
    """The app's API routes as FastAPI serves them, included routers unfolded: each with
    `matches(scope)`, `dependant`, `path_format` and `methods` (FastAPI 0.16x keeps included
    routers as routes of their own; before, they were copied in flat)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI
        yield from (route for route in routes if isinstance(route, APIRoute))
        return
    for context in iter_route_contexts(routes):
        if isinstance(context.original_route, APIRoute):
            yield context


_MISSING = (
    "This operation needs a bearer token: send `Authorization: Bearer <token>` with an API "
    "token or a JWT from the identity provider."
)
_REFUSED = "The bearer token was not accepted (not valid, expired or not issued for this API)."
_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_INVALID_REQUEST = {"WWW-Authenticate": 'Bearer error="invalid_request"'}


def _insufficient(scope: str) -> str:
    return f"This operation needs the scope `{scope}`, which the token does not grant."


def _challenge(scope: str) -> dict[str, str]:
    return {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'}


# -- the middleware --------------------------------------------------------------------


class Authentication:
    """Pure ASGI: authenticate the requests of routes with a `Requirement` before they go
    any further (see the module docstring). `router` is the app's router; routes added to
    it later are seen too."""

    def __init__(
        self, app: ASGIApp, *, router: Router, authenticator: Authenticator, settings: Settings
    ) -> None:
        self.app = app
        self.router = router
        self.authenticator = authenticator
        self.settings = settings
        self._routes_seen: tuple[BaseRoute, ...] = ()
        self._requirements: list[tuple[Any, Requirement | None]] = []
        # (method, root path, path) -> requirement: matching every route costs ~40 us a
        # request. Bounded, so random paths cannot grow it without end.
        self._by_path: dict[tuple[str, str, str], Requirement | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        requirement = self._requirement(scope)
        if requirement is None:  # no such route (404, 405), or one open to all
            await self.app(scope, receive, send)
            return
        if _token_in_query(scope):
            self._log(scope, 400, "token in the query string")
            await problem_response(
                400,
                "Send the token in the `Authorization: Bearer <token>` header, never in the "
                "URL (`access_token`): URLs end up in logs and browser histories.",
                headers=_INVALID_REQUEST,
            )(scope, receive, send)
            return
        if not requirement.applies(self.settings):
            await self.app(scope, receive, send)
            return
        if _authorization_headers(scope) > 1:
            # Authorization is a singleton field (RFC 9110 11.6.2): which one would count
            # depends on who reads the request - a proxy may pick the other one.
            self._log(scope, 400, "more than one Authorization header")
            await problem_response(
                400, "Send one `Authorization` header, not several.", headers=_INVALID_REQUEST
            )(scope, receive, send)
            return
        credentials, oversized = _bearer_credentials(scope)
        try:
            if oversized:
                raise Unauthenticated(f"credential larger than {MAX_TOKEN_BYTES} bytes")
            principal = await self.authenticator.principal(credentials)
        except Unauthenticated as refused:
            self._log(scope, 401, str(refused))
            detail = _MISSING if credentials is None and not oversized else _REFUSED
            await problem_response(401, detail, headers=_INVALID_TOKEN)(scope, receive, send)
            return
        except KeysUnavailable as unavailable:
            # Not the token's fault: a 401 would tell the client to throw a good one away.
            self._log(scope, 503, str(unavailable))
            retry_after = str(max(math.ceil(unavailable.retry_after), 1))
            await problem_response(
                503, "Tokens cannot be checked right now: the identity provider's keys are "
                "not available. Try again later.", headers={"Retry-After": retry_after},
            )(scope, receive, send)
            return
        if (notes := request_notes(scope)) is not None:
            notes.principal = principal.name  # the access line says who made the request
        if not principal.may(requirement.scope):
            self._log(scope, 403, f"{principal.name} lacks scope {requirement.scope}")
            await problem_response(
                403, _insufficient(requirement.scope), headers=_challenge(requirement.scope)
            )(scope, receive, send)
            return
        token = set_principal(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_principal(token)

    def _requirement(self, scope: Scope) -> Requirement | None:
        routes = self._routes()
        key = (scope["method"], scope.get("root_path", ""), scope["path"])
        try:
            return self._by_path[key]
        except KeyError:
            pass
        if len(self._by_path) >= _MAX_PATHS_REMEMBERED:
            self._by_path.clear()
        # The first route that matches fully is the one the router will pick: routes are
        # tried in the same order.
        found = next(
            (requirement for route, requirement in routes
             if route.matches(scope)[0] is Match.FULL),
            None,
        )
        self._by_path[key] = found
        return found

    def _routes(self) -> list[tuple[Any, Requirement | None]]:
        """The API routes with their requirements, worked out once per set of routes (not
        per request: unfolding included routers and walking dependencies costs ~50 us)."""
        routes = tuple(self.router.routes)
        if routes != self._routes_seen:
            self._routes_seen = routes
            self._requirements = [(route, requirement_of(route)) for route in api_routes(routes)]
            self._by_path = {}
        return self._requirements

    @staticmethod
    def _log(scope: Scope, status: int, reason: str) -> None:
        logger.info(
            "%s %s: %d, %s", scope["method"], printable(scope["path"]), status, printable(reason)
        )


_MAX_PATHS_REMEMBERED = 4096


def _authorization_headers(scope: Scope) -> int:
    return sum(1 for name, _ in scope["headers"] if name == b"authorization")


def _bearer_credentials(scope: Scope) -> tuple[str | None, bool]:
    """The token of the `Authorization: Bearer <token>` header (None without one), and
    whether the token was over `MAX_TOKEN_BYTES` (then it is not checked at all)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None, False
            if len(token) > MAX_TOKEN_BYTES:
                return None, True
            return token, False
    return None, False


def _token_in_query(scope: Scope) -> bool:
    query = scope.get("query_string", b"").decode("latin-1")
    # The name may come percent-encoded (`access%5Ftoken`): parse_qsl decodes it.
    return "access_token" in unquote_plus(query) and any(
        name == "access_token" for name, _ in parse_qsl(query, keep_blank_values=True)
    )


# -- wiring and OpenAPI ------------------------------------------------------------------


def add_authentication(app: FastAPI, settings: Settings) -> Authenticator:
    """Add `Authentication` to `app` (call it after the middleware it must run outside of)
    and declare the security schemes in its OpenAPI. Raises `NoApiTokens` or
    `InvalidKeySet` (see `Authenticator.from_settings`)."""
    authenticator = Authenticator.from_settings(settings)
    app.add_middleware(
        Authentication, router=app.router, authenticator=authenticator, settings=settings
    )
    _declare_security(app, settings)
    return authenticator


def _declare_security(app: FastAPI, settings: Settings) -> None:
    """Per operation: which schemes (and scope) it needs, and its 400/401/403 problems."""

    def declare(schema: dict[str, Any]) -> None:
        schemes = _security_schemes(settings)
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(schemes)
        refusals = problem_responses(400, 401, 403)
        for route in api_routes(app.routes):
            requirement = requirement_of(route)
            if requirement is None:
                continue
            # 400 for a token in the URL, whether the operation needs one or not.
            statuses = [400]
            if requirement.applies(settings):
                statuses += [401, 403] if settings.jwt_enabled() else [401]
            for method in route.methods or ():
                operation = schema["paths"][route.path_format].get(method.lower())
                if operation is None:
                    continue
                if requirement.applies(settings):
                    operation["security"] = [{name: [requirement.scope]} for name in schemes]
                for status in statuses:
                    operation["responses"].setdefault(str(status), {
                        "description": _ERROR_DESCRIPTIONS[status],
                        "content": refusals[status]["content"],
                    })

    extend_openapi(app, declare)


_ERROR_DESCRIPTIONS = {
    400: "Bad Request (e.g. a token sent in the URL)",
    401: "Unauthorized: no bearer token, or not a valid one",
    403: "Forbidden: the token lacks the operation's scope",
}


def _security_schemes(settings: Settings) -> dict[str, dict[str, Any]]:
    """The token kinds this app accepts, as OpenAPI security schemes."""
    schemes: dict[str, dict[str, Any]] = {}
    if settings.api_token_list():
        schemes[API_TOKEN_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "One of the API tokens configured in `API_TOKENS`; it carries "
            "every scope.",
        }
    if settings.jwt_enabled():
        schemes[JWT_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": f"A JWT from the identity provider (`iss` {settings.jwt_issuer}, "
            f"`aud` {settings.jwt_audience}), granting `items:read` / `items:write` in its "
            "`scope` (space-separated) or `scp` (list) claim.",
        }
    return schemes
