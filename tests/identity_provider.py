"""A pretend identity provider for the tests: key pairs of each kind the service accepts
(RS256, ES256, EdDSA), tokens signed with them, and its JWKS served over HTTP from
127.0.0.1 (a thread of this process; no internet)."""

import contextlib
import gzip
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://id.example.test/"
AUDIENCE = "items-api"
HS256_SECRET = "a-shared-secret-of-at-least-32-bytes!!"


class IdentityProvider:
    """Keys by kid (`rsa-1`, `ec-1`, `ed-1`), the JWKS of their public halves, tokens."""

    def __init__(self) -> None:
        self.private_keys: dict[str, Any] = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
            "ed-1": ed25519.Ed25519PrivateKey.generate(),
        }
        self.algorithms = {"rsa-1": "RS256", "ec-1": "ES256", "ed-1": "EdDSA"}
        self.extra_jwks: list[dict[str, Any]] = []  # raw entries added to the JWKS as is

    def add_rsa_key(self, kid: str) -> None:
        self.private_keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.algorithms[kid] = "RS256"

    def public_jwk(self, kid: str) -> dict[str, Any]:
        public = self.private_keys[kid].public_key()
        algorithm = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[
            self.algorithms[kid]
        ]
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
        return {**jwk, "kid": kid, "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk(kid) for kid in self.private_keys] + self.extra_jwks}

    def token(
        self,
        kid: str = "rsa-1",
        *,
        claims: dict[str, Any] | None = None,
        without: tuple[str, ...] = (),
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        """A token signed with key `kid`: valid for 5 minutes, for AUDIENCE, from ISSUER,
        `sub` alice, scope items:read items:write - unless `overrides` say otherwise."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "scope": "items:read items:write",
            **(claims or {}),
            **overrides,
        }
        for name in without:
            payload.pop(name, None)
        return jwt.encode(
            payload,
            self.private_keys[kid],
            algorithm=self.algorithms[kid],
            headers={"kid": kid, **(headers or {})},
        )


def hs256_token(secret: str | bytes = HS256_SECRET, **overrides: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "iat": now, "exp": now + 300,
        "scope": "items:read items:write", **overrides,
    }
    return jwt.encode(payload, secret, algorithm="HS256")


class JwksServer:
    """Serves `provider.jwks()` at http://127.0.0.1:<port>/jwks.json. `fetches` counts the
    requests; `down` makes it answer 503; `delay` seconds before answering; `trickle`
    seconds between the bytes of the body (a provider that is slow without ever going
    quiet for long); `endless` answers a body that never ends, as fast as it is read;
    `gzip` compresses the answer; `gzipped` is an answer compressed already, sent as it is
    (a gzip bomb: megabytes of spaces are kilobytes compressed)."""

    def __init__(self, provider: IdentityProvider) -> None:
        self.provider = provider
        self.fetches = 0
        self.down = False
        self.delay = 0.0
        self.trickle = 0.0
        self.endless = False
        self.gzip = False
        self.gzipped: bytes | None = None
        self.encoding = "gzip"  # the Content-Encoding `gzipped` is sent with
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                time.sleep(server.delay)
                if server.down or self.path != "/jwks.json":
                    self.send_error(503 if server.down else 404)
                    return
                if server.endless:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    until = time.monotonic() + 30
                    with contextlib.suppress(OSError):  # the client hung up
                        while time.monotonic() < until:
                            self.wfile.write(b" " * 65536)
                    return
                body = json.dumps(server.provider.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if server.gzip or server.gzipped is not None:
                    body = server.gzipped or gzip.compress(body)
                    self.send_header(
                        "Content-Encoding", "gzip" if server.gzipped is None else server.encoding
                    )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not server.trickle:
                    self.wfile.write(body)
                    return
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(server.trickle)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/jwks.json"

    @contextmanager
    def running(self) -> Iterator["JwksServer"]:
        thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            self._http.shutdown()
            self._http.server_close()
            thread.join()
