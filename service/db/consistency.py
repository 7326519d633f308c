"""Read-your-writes across requests: `X-Consistency-Token`, and the middleware that routes
each request (`routing.Route`).

A response to a request that committed a write on the primary carries
`X-Consistency-Token: <token>`: the primary's WAL position right after that COMMIT, signed.
A client that sends the token back on a later request (to any worker, any instance that
shares the secret) reads from a replica that has replayed at least that position, else from
the primary. The token is opaque: `<position in hex>.<HMAC-SHA256 of it, 128 bits>`, signed
under the app's secret, so a client cannot ask for a position it never got (which would
send all its reads to the primary) and a malformed one is refused with 400, never a 500.

Pure ASGI, like the other middlewares of `service.db`; it must sit *outside*
`DBSessionMiddleware` (add it after), which commits before it forwards the response start -
so the position is known when this middleware sees the start and adds the header.
"""

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Collection

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.middleware_base import route_path
from service.db.routing import Route, routed

HEADER = "X-Consistency-Token"
_HEADER_KEY = HEADER.lower().encode("latin-1")
# Domain separation: the same secret may sign other things (the service's scroll cursors).
_PURPOSE = b"x-consistency-token:"
_SIGNATURE_BYTES = 16
_TOKEN = re.compile(r"([0-9a-f]{1,16})\.([A-Za-z0-9_-]{22})")

# Turns the reason a token was refused into the 400 response sent instead.
InvalidTokenResponse = Callable[[str], ASGIApp]


class InvalidConsistencyToken(ValueError):
    """The token was not issued by this service (malformed, altered, or another secret)."""


class ConsistencyTokens:
    """Signs WAL positions into tokens and reads them back."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("ConsistencyTokens needs a non-empty secret")
        self._secret = secret

    def issue(self, position: int) -> str:
        """The token for WAL position `position`."""
        body = f"{position:x}"
        return f"{body}.{self._sign(body)}"

    def read(self, token: str) -> int:
        """The position in `token`; `InvalidConsistencyToken` unless this secret signed it."""
        match = _TOKEN.fullmatch(token.strip())
        if match is None:
            raise InvalidConsistencyToken(
                f"The {HEADER} header is malformed; send it back exactly as a response gave it."
            )
        body, signature = match.groups()
        if not hmac.compare_digest(signature, self._sign(body)):
            raise InvalidConsistencyToken(
                f"The {HEADER} header was altered or not issued by this service; send it "
                "back exactly as a response gave it, or leave it out."
            )
        return int(body, 16)

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._secret, _PURPOSE + body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:_SIGNATURE_BYTES]).rstrip(b"=").decode()


def bad_token_json(reason: str) -> ASGIApp:
    """The default answer to a refused token: 400 `{"detail": reason}`."""
    return JSONResponse({"detail": reason}, 400)


class ConsistencyMiddleware:
    """Give each HTTP request its `Route` (replica reads for `read_methods`, at least as
    fresh as the client's token) and each response that committed a write its token.

    `tokens`: signs and reads tokens (`ConsistencyTokens(secret)`; every worker and instance
    behind one address needs the same secret). `invalid_token_response`: what a request
    with a refused token gets instead of being served (default: `bad_token_json`).
    `sessionless_paths`: paths that never read the database (probes, metrics, docs; as the
    session middleware's): their token is not read, so a bad one never fails them.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: ConsistencyTokens,
        read_methods: Collection[str] = ("GET", "HEAD", "OPTIONS"),
        invalid_token_response: InvalidTokenResponse = bad_token_json,
        sessionless_paths: Collection[str] = (),
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.read_methods = frozenset(read_methods)
        self.invalid_token_response = invalid_token_response
        self.sessionless_paths = frozenset(sessionless_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in self.sessionless_paths:
            await self.app(scope, receive, send)
            return
        try:
            min_position = self._min_position(scope)
        except InvalidConsistencyToken as exc:
            await self.invalid_token_response(str(exc))(scope, receive, send)
            return
        route = Route(scope["method"] in self.read_methods, min_position)

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start" and route.commit_position is not None:
                token = self.tokens.issue(route.commit_position).encode("latin-1")
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (_HEADER_KEY, token)]}
            await send(message)

        with routed(route):
            await self.app(scope, receive, send_with_token)

    def _min_position(self, scope: Scope) -> int:
        # An empty header is no token (a client that has none yet may send its template).
        values = [value for key, value in scope.get("headers", ())
                  if key == _HEADER_KEY and value.strip()]
        if not values:
            return 0
        if len(values) > 1:
            raise InvalidConsistencyToken(f"Send one {HEADER} header, the latest you got.")
        try:
            text = values[0].decode("ascii")
        except UnicodeDecodeError:
            raise InvalidConsistencyToken(f"The {HEADER} header is malformed.") from None
        return self.tokens.read(text)


__all__ = [
    "HEADER",
    "ConsistencyMiddleware",
    "ConsistencyTokens",
    "InvalidConsistencyToken",
    "bad_token_json",
]
