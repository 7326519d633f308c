"""Opaque, signed cursors for keyset pagination.

A cursor is `<payload>.<signature>`: the payload is compact JSON in URL-safe base64, the
signature an HMAC-SHA256 of it under the server's secret (`Settings.cursor_secret`). Clients
pass cursors back as they got them; anything else - garbage, a truncated copy, an edited
payload, a cursor signed with another secret - raises `InvalidCursor` (400), never a 500.
"""

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from service.domain_errors import BadRequest

# 128 bits of the SHA-256 MAC are plenty to detect tampering and keep cursors short.
_SIGNATURE_BYTES = 16


class InvalidCursor(BadRequest):
    """The cursor was not made by this server, or not for this request."""


def sign_cursor(payload: dict[str, Any], secret: bytes) -> str:
    """Encode `payload` (JSON-serialisable) as a cursor signed with `secret`."""
    # UTF-8, not \uXXXX escapes: a name of 200 emoji costs 800 bytes, not 2,400.
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    encoded = _b64encode(body)
    return f"{encoded}.{_b64encode(_signature(encoded, secret))}"


def read_cursor(cursor: str, secret: bytes, max_length: int | None = None) -> dict[str, Any]:
    """The payload of a cursor made by `sign_cursor` with the same `secret`.

    Raises `InvalidCursor` if the cursor is malformed - longer than `max_length`, the
    longest one the caller ever issues, included - or its signature does not match.
    """
    if max_length is not None and len(cursor) > max_length:
        raise InvalidCursor(_MALFORMED)
    encoded, dot, signature = cursor.partition(".")
    if not dot or not encoded or not signature:
        raise InvalidCursor(_MALFORMED)
    try:
        _b64decode(signature)
        body = _b64decode(encoded)
    except (binascii.Error, ValueError):
        raise InvalidCursor(_MALFORMED) from None
    # The signature's text, not its decoded bytes: the last character of a base64 text
    # carries unused bits, so several texts decode to the same bytes.
    expected = _b64encode(_signature(encoded, secret))
    if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
        raise InvalidCursor(
            "The cursor was altered or was not issued by this server; pass `next_page` back "
            "exactly as it was returned, or start again without a cursor."
        )
    try:
        payload = json.loads(body)
    except ValueError:
        raise InvalidCursor(_MALFORMED) from None
    if not isinstance(payload, dict):
        raise InvalidCursor(_MALFORMED)
    return payload


_MALFORMED = (
    "The cursor is malformed; pass `next_page` back exactly as it was returned, or start "
    "again without a cursor."
)


def _signature(encoded: str, secret: bytes) -> bytes:
    return hmac.new(secret, encoded.encode(), hashlib.sha256).digest()[:_SIGNATURE_BYTES]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    # validate=True: characters outside the URL-safe alphabet are an error, not skipped.
    data = text.encode("ascii")  # non-ASCII input raises UnicodeEncodeError, a ValueError
    return base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_", validate=True)
