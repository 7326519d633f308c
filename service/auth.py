"""Who may call: bearer tokens from `API_TOKENS`, checked on every write (and on reads when
`READ_REQUIRES_TOKEN=true`).

The app keeps only the SHA-256 digests of the tokens and compares a presented token's digest
with each of them in constant time (`hmac.compare_digest`, every digest, no early exit), so
neither the tokens nor the timing of a comparison tell a caller anything. A request without
a token, or with one that matches none, gets 401 with `WWW-Authenticate: Bearer` before the
route runs: nothing is read or written. No token ever goes into a log line or a response.
"""

import hashlib
import hmac
from collections.abc import Iterable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from service.config import Settings

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description="One of the API tokens configured in `API_TOKENS`.",
)


class NoApiTokens(RuntimeError):
    """The app was asked to start with no token configured, i.e. with writes open to all."""

    def __init__(self) -> None:
        super().__init__(
            "No API token is configured, so nobody could be told apart from anybody: set "
            "API_TOKENS (comma-separated, each at least 16 characters) in the environment or "
            ".env. `make run` / `python -m service serve` generate a development token for you."
        )


class TokenCheck:
    """Tells whether a presented token is one of the configured ones, by SHA-256 digest."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)
        if not self._digests:
            raise NoApiTokens()

    @classmethod
    def from_settings(cls, settings: Settings) -> "TokenCheck":
        """Raises `NoApiTokens` when `settings` configure none."""
        return cls(settings.api_token_list())

    def accepts(self, token: str) -> bool:
        candidate = _digest(token)
        matched = False
        for digest in self._digests:  # all of them, so the time taken does not say which
            matched |= hmac.compare_digest(digest, candidate)
        return matched


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def require_token(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> None:
    """Dependency: 401 unless the request carries one of the app's bearer tokens."""
    _check(request, credentials)


async def require_token_for_reads(request: Request) -> None:
    """Dependency: `require_token` when the app's settings say `read_requires_token`."""
    settings: Settings = request.app.state.settings
    if settings.read_requires_token:
        # Called directly, not through Depends: reads stay documented as public by default.
        _check(request, await bearer(request))


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    if credentials is None:
        raise _unauthorized(
            "This operation needs an API token: send `Authorization: Bearer <token>`.",
            "Bearer",
        )
    check: TokenCheck = request.app.state.token_check
    if not check.accepts(credentials.credentials):
        raise _unauthorized("The bearer token is not valid.", 'Bearer error="invalid_token"')


def _unauthorized(detail: str, challenge: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})
