"""Who is calling: the principal of the current request, for the services that record who
changed what - reached like `db.session`, through a context variable, never passed down.

`service.auth.Authentication` sets it for a request that presented a valid token (a JWT's
`sub`, or `token:<label>` for an API token) and resets it when the request ends. A request
that needed no token (a public read) and code outside requests have none:
`current_principal()` raises `NoPrincipal` there, so a write can never be recorded under a
made-up name. Scripts that write say who they are with `acting_as(...)`.
"""

import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

# Items written outside the service (rows from before who-changed-what was recorded, or
# inserted with SQL by hand) say this.
UNKNOWN = "unknown"
# Names the service gives its own principals: API tokens (`token:<label>`), commands of the
# CLI (`cli:seed`), and UNKNOWN. A JWT may not claim them (`is_reserved`), or its holder
# could write as one of them.
API_TOKEN_PREFIX = "token:"
CLI_PREFIX = "cli:"
RESERVED_PREFIXES = (API_TOKEN_PREFIX, CLI_PREFIX)


def is_reserved(name: str) -> bool:
    """Whether `name` is one the service gives its own principals, never a JWT's `sub` -
    or reads as one: compared case-blind and in NFKC form ("Token:ci", fullwidth letters)."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return folded == UNKNOWN or folded.startswith(RESERVED_PREFIXES)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: `name` is what gets recorded (`created_by`, `updated_by`),
    `scopes` what it may do (`items:read`, `items:write`); None: everything (API tokens)."""

    name: str
    scopes: frozenset[str] | None

    def may(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


class NoPrincipal(RuntimeError):
    """Asked who is calling where nobody authenticated: outside a request, or in a request
    that needed no token."""

    def __init__(self) -> None:
        super().__init__(
            "No principal is set: only requests that presented a valid token have one. "
            "Outside requests, say who is writing with `with acting_as('name'):`."
        )


_current: ContextVar[Principal | None] = ContextVar("principal", default=None)


def current_principal() -> Principal:
    """The principal of the current request (or `acting_as` block); raises `NoPrincipal`
    when there is none."""
    principal = _current.get()
    if principal is None:
        raise NoPrincipal()
    return principal


def current_principal_or_none() -> Principal | None:
    return _current.get()


def set_principal(principal: Principal | None) -> Token[Principal | None]:
    """Make `principal` current; returns what `reset_principal` needs to undo it."""
    return _current.set(principal)


def reset_principal(token: Token[Principal | None]) -> None:
    _current.reset(token)


@contextmanager
def acting_as(name: str, scopes: frozenset[str] | None = None) -> Iterator[Principal]:
    """Run the block as the principal `name` (for scripts and tests that write)."""
    principal = Principal(name, scopes)
    token = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(token)
