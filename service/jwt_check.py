"""Is this JWT one our identity provider issued for us, and who does it speak for?

PyJWT verifies; this module decides with what:

- the key and its one algorithm: HS256 with JWT_SECRET, or the JWKS key named by the
  token's `kid` with the algorithm that key type verifies (`service.jwt_keys`). The
  token's own `alg` must be that algorithm: `none`, an HMAC token against a public key,
  an RS256 token against an EC key are all refused before any signature is checked;
- the claims: `exp`, `iss`, `aud` and `sub` required; `iss` and `aud` as configured;
  `exp`, `nbf` and `iat` with JWT_LEEWAY seconds of clock skew; `sub` not one of the names
  the service gives its own principals (`token:...`, `cli:...`, `unknown`), which a token
  could otherwise write as;
- the scopes: `scope` (a space-separated string) and `scp` (a list of strings) together;
  either in another shape makes the token invalid, not scope-less.

Every refusal is an `InvalidToken` whose message says why in words safe to log: it
never quotes the token or a claim's value (at most a header's `alg` or `kid`, shortened).
"""

from typing import Any

import jwt
from jwt import InvalidTokenError, PyJWK

from service.jwt_keys import KeySource
from service.principal import Principal, is_reserved
from service.text import INVISIBLE

REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]
MAX_SUBJECT_LENGTH = 255  # what `created_by` / `updated_by` hold


class InvalidToken(Exception):
    """The token was refused; the message is the reason, for the log."""


class JwtCheck:
    """Verifies JWTs against one key source: a JWKS (`keys`) or an HS256 `secret`."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        leeway: float,
        keys: KeySource | None = None,
        secret: bytes | None = None,
    ) -> None:
        if (keys is None) == (secret is None):
            raise ValueError("a JwtCheck verifies with either a JWKS or a secret")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.keys = keys
        self.secret = secret

    async def principal(self, token: str) -> Principal:
        """The principal the token speaks for; raises `InvalidToken` if it is not valid."""
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError:
            raise InvalidToken("not a JWT") from None
        key, algorithm = await self._key_for(header)
        if header.get("alg") != algorithm:
            raise InvalidToken(
                f"algorithm {_shown(header.get('alg'))} is not the {algorithm} of its key"
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except (InvalidTokenError, jwt.InvalidKeyError) as error:
            raise InvalidToken(_reason(error)) from None
        for name in ("exp", "nbf", "iat"):
            # RFC 7519 4.1.4: a NumericDate is a JSON number; PyJWT also takes "1796...".
            value = claims.get(name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise InvalidToken(f"`{name}` is not a number (RFC 7519 NumericDate)")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
            raise InvalidToken(f"`sub` is not a string of 1-{MAX_SUBJECT_LENGTH} characters")
        # What gets recorded as who changed what, and shown: no control or invisible
        # characters (NUL and lone surrogates no database column stores), no blank edges.
        if not subject.isprintable() or INVISIBLE.search(subject) or subject != subject.strip():
            raise InvalidToken("`sub` has unprintable or invisible characters or blank edges")
        if is_reserved(subject):
            raise InvalidToken("`sub` is a name the service keeps for its own principals")
        return Principal(subject, scopes_of(claims))

    async def _key_for(self, header: dict[str, Any]) -> tuple[Any, str]:
        if self.secret is not None:
            return self.secret, "HS256"
        assert self.keys is not None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("no `kid` in the header: keys are selected by kid")
        key: PyJWK | None = await self.keys.key(kid)
        if key is None:
            raise InvalidToken(f"unknown kid {_shown(kid)}")
        return key.key, key.algorithm_name


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """The scopes of `scope` (space-separated string) and `scp` (list of strings)."""
    scopes: set[str] = set()
    if "scope" in claims:
        if not isinstance(claims["scope"], str):
            raise InvalidToken("`scope` is not a space-separated string")
        scopes.update(scope for scope in claims["scope"].split(" ") if scope)  # RFC 6749 3.3
    if "scp" in claims:
        scp = claims["scp"]
        if not isinstance(scp, list) or not all(isinstance(item, str) for item in scp):
            raise InvalidToken("`scp` is not a list of strings")
        scopes.update(scp)
    return frozenset(scopes)


def _reason(error: Exception) -> str:
    """Why PyJWT refused, in fixed words (its messages may quote what it could not parse)."""
    reasons: list[tuple[type[Exception], str]] = [
        (jwt.ExpiredSignatureError, "expired (exp)"),
        (jwt.ImmatureSignatureError, "not yet valid (nbf or iat in the future)"),
        (jwt.InvalidIssuerError, "wrong issuer (iss)"),
        (jwt.InvalidAudienceError, "wrong audience (aud)"),
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.InvalidKeyError, "key unusable for this token"),
        (jwt.DecodeError, "malformed"),
    ]
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"claim `{error.claim}` missing"
    for kind, reason in reasons:
        if isinstance(error, kind):
            return reason
    return f"invalid ({type(error).__name__})"


def _shown(value: Any) -> str:
    """A header value for the log: short, printable, quoted."""
    text = repr(value)
    return text if len(text) <= 40 and text.isprintable() else f"{text[:37]}..."
