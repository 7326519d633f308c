"""The identity provider's public keys, by `kid`: from a JWKS file, or fetched over HTTP and
cached.

Which algorithm a key verifies follows from the key alone - RSA: RS256, EC on P-256:
ES256, OKP on Ed25519: EdDSA - never from the token. Any other key in the set (a symmetric
`oct` key, another curve, a key whose `alg` or `use` says otherwise, one without `kid`) is
left out, with a warning: a public-key set can never make an HMAC token or `none` pass.

`RemoteKeys` (JWT_JWKS_URL) fetches the set when the app starts (or, if the app was not
started, at the first token) and keeps it. A token with a `kid` it does not know triggers
a new fetch if the last one is a minute old or more - so at most one a minute, however
many such tokens arrive (they would otherwise make the app hammer the provider);
concurrent requests share that fetch. Keys older than 15 minutes are fetched again at the
next token, so a key the provider withdrew stops working soon. A fetch that fails -
provider down, an error status, not a key set, no usable key - changes nothing: the cached
keys keep working. The fetch is async (httpx), so no request ever blocks the event loop.

Why not PyJWT's `PyJWKClient`: it fetches with blocking urllib (the event loop would stall
for a whole fetch), and once its cache lifespan expires a failing fetch raises instead of
serving the keys it had, so a provider outage would lock every JWT out.
"""

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
from jwt import PyJWK
from jwt.exceptions import InvalidKeyError, PyJWKError

logger = logging.getLogger("service.auth.jwks")

# kty (and crv) -> the one algorithm such a key verifies.
ALGORITHMS: dict[tuple[str, str | None], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
}
MIN_REFRESH_INTERVAL = 60.0  # seconds between fetches triggered by unknown kids
MAX_AGE = 900.0  # seconds after which the keys are fetched again at the next token
FETCH_TIMEOUT = 5.0  # seconds
MAX_JWKS_BYTES = 1024 * 1024


def _decompressor(first: bytes) -> Any:
    """For a compressed answer starting with `first`: gzip or zlib, told apart by their
    headers - or raw deflate, which some servers send as HTTP's deflate."""
    zlib_header = len(first) >= 2 and first[0] & 0x0F == 8 and int.from_bytes(first[:2]) % 31 == 0
    if first[:2] == b"\x1f\x8b" or zlib_header:
        return zlib.decompressobj(zlib.MAX_WBITS | 32)
    return zlib.decompressobj(-zlib.MAX_WBITS)


class KeySource(Protocol):
    async def key(self, kid: str) -> PyJWK | None:
        """The key with id `kid`, or None if there is none."""
        ...


class KeysUnavailable(Exception):
    """The identity provider's keys were never fetched (it has been down since start):
    `retry_after` seconds until the next fetch may be tried."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the identity provider's keys are not available yet "
                         f"(next fetch in {retry_after:.0f} s)")
        self.retry_after = retry_after


class InvalidKeySet(ValueError):
    """A JWKS that is not a JSON object with a `keys` list holding at least one usable key."""


def signing_keys(jwks: Any) -> dict[str, PyJWK]:
    """The usable signing keys of a JWKS document, by kid; raises `InvalidKeySet` if there
    is none."""
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise InvalidKeySet("not a JSON Web Key Set (an object with a `keys` list)")
    keys: dict[str, PyJWK] = {}
    for jwk in jwks["keys"]:
        kid = jwk.get("kid") if isinstance(jwk, Mapping) else None
        if not isinstance(jwk, Mapping) or not isinstance(kid, str) or not kid:
            logger.warning("JWKS: a key without `kid` is ignored (keys are selected by kid)")
            continue
        kty, crv = str(jwk.get("kty")), jwk.get("crv")
        algorithm = ALGORITHMS.get((kty, None if kty == "RSA" else str(crv)))
        if algorithm is None or jwk.get("alg", algorithm) != algorithm:
            logger.warning(
                "JWKS: key %r is ignored: kty %r, crv %r, alg %r is not an RS256, ES256 or "
                "EdDSA public key", kid, jwk.get("kty"), jwk.get("crv"), jwk.get("alg"),
            )
            continue
        if jwk.get("use", "sig") != "sig" or "d" in jwk:
            logger.warning("JWKS: key %r is ignored: not a public signing key", kid)
            continue
        if kid in keys:
            # Keys are chosen by kid alone: a second one of that name would silently
            # replace the first, and the first one's tokens stop working unexplained.
            logger.warning("JWKS: a second key named %r (%s) is ignored; the first one "
                           "(%s) is used", kid, kty, keys[kid].key_type)
            continue
        try:
            keys[kid] = PyJWK(dict(jwk), algorithm=algorithm)
        except (PyJWKError, InvalidKeyError, ValueError, TypeError) as error:
            logger.warning("JWKS: key %r is ignored: %s", kid, type(error).__name__)
    if not keys:
        raise InvalidKeySet("no usable key (RS256, ES256 or EdDSA public key with a kid)")
    return keys


class FileKeys:
    """The keys of a JWKS file, read once (at start: a missing or unusable file stops the
    app from starting, naming the file)."""

    def __init__(self, path: Path) -> None:
        try:
            self._keys = signing_keys(json.loads(path.read_text()))
        except (OSError, ValueError, RecursionError) as error:
            raise InvalidKeySet(f"JWT_JWKS_FILE {path}: {error}") from None

    async def key(self, kid: str) -> PyJWK | None:
        return self._keys.get(kid)


class RemoteKeys:
    """The keys at a JWKS URL, cached; see the module docstring for when it fetches."""

    def __init__(
        self,
        url: str,
        *,
        min_refresh_interval: float = MIN_REFRESH_INTERVAL,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.min_refresh_interval = min_refresh_interval
        self.max_age = max_age
        self.clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._last_attempt: float | None = None
        self._last_success: float | None = None
        self._lock: asyncio.Lock | None = None

    async def start(self) -> None:
        """Fetch the keys now (at app start); a failure is logged, and retried when a token
        arrives, at most once a minute."""
        await self._refresh_if_due()

    async def key(self, kid: str) -> PyJWK | None:
        """The key named `kid`, or None if the provider has no such key. Raises
        `KeysUnavailable` while no fetch has ever succeeded: then nobody can tell a good
        token from a bad one, and a client must not be told to throw its token away."""
        if kid not in self._keys or self._stale():
            if self._refresh_due():
                await self._refresh_if_due()
            elif kid not in self._keys and self._lock is not None and self._lock.locked():
                # Another request's fetch is under way (it made the refresh no longer due):
                # its keys may hold this one, so wait for them rather than refuse. (A kid
                # already known is served from the cache meanwhile.)
                async with self._lock:
                    pass
        if self._last_success is None:
            raise KeysUnavailable(self.seconds_to_next_fetch())
        return self._keys.get(kid)

    def seconds_to_next_fetch(self) -> float:
        """Seconds until a token may make the app fetch the keys again."""
        if self._last_attempt is None:
            return 0.0
        return max(self._last_attempt + self.min_refresh_interval - self.clock(), 0.0)

    def _stale(self) -> bool:
        return self._last_success is None or self.clock() - self._last_success >= self.max_age

    def _refresh_due(self) -> bool:
        return (
            self._last_attempt is None
            or self.clock() - self._last_attempt >= self.min_refresh_interval
        )

    async def _refresh_if_due(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent requests wait for one fetch, not each their own
            if not self._refresh_due():
                return
            self._last_attempt = self.clock()
            try:
                # FETCH_TIMEOUT bounds the whole fetch: httpx's own bounds each step, and
                # a provider that trickles a byte at a time would hold start-up.
                async with asyncio.timeout(FETCH_TIMEOUT):
                    self._keys = signing_keys(await self._fetch())
                self._last_success = self.clock()
            except (httpx.HTTPError, ValueError, TimeoutError, RecursionError) as error:
                logger.warning(
                    "JWKS %s could not be fetched (%s: %s); keeping the %d keys cached",
                    self.url, type(error).__name__, error, len(self._keys),
                )
            else:
                logger.info("JWKS %s: %d keys (%s)", self.url, len(self._keys),
                            ", ".join(sorted(self._keys)))

    async def _fetch(self) -> Any:
        headers = {"Accept": "application/json", "Accept-Encoding": "gzip, deflate"}
        async with (
            httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", self.url, headers=headers) as response,
        ):
            response.raise_for_status()
            # Read as it comes and given up past the bound, decompressed here no further
            # than the bound: a provider (or what answers in its place) sending a huge or
            # gzip-bombed body is never held in memory whole.
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
                raise InvalidKeySet(f"sent in an encoding not asked for ({encoding!r})")
            inflate: Any = None
            body = bytearray()
            try:
                async for part in response.aiter_raw():
                    if encoding != "identity":
                        inflate = inflate or _decompressor(part)
                        part = inflate.decompress(part, MAX_JWKS_BYTES + 1 - len(body))
                    body += part
                    if len(body) > MAX_JWKS_BYTES:
                        raise InvalidKeySet(f"larger than {MAX_JWKS_BYTES} bytes")
                if inflate is not None:
                    body += inflate.flush()
            except zlib.error as error:
                raise InvalidKeySet(f"not valid {encoding} ({error})") from None
            if len(body) > MAX_JWKS_BYTES:
                raise InvalidKeySet(f"larger than {MAX_JWKS_BYTES} bytes")
            return json.loads(body)
