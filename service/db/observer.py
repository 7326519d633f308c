"""`SessionObserver`: what `DBSessionMiddleware` tells about each request, for metrics.

`service.db` knows nothing of Prometheus or logging formats; an app that wants numbers
subclasses `SessionObserver`, overrides the calls it cares about and hands an instance to
`DBSessionMiddleware(observer=...)`. The sync and the async middleware make the same calls
at the same points, from the event loop, in the request's context. The default observer does
nothing, at no cost beyond a method call.

Calls, in the order a request makes them (`database` is the middleware's `Database.name`):

- `admitted(database, scope, waited)`: the request got a connection slot after `waited`
  seconds (0.0 when one was free at once); or
- `rejected(database, scope)`: no slot came free in time; the request is answered 503
  (`failures.BUSY`) and nothing else is called;
- `transaction_ended(database, scope, outcome)`: a transaction of the request ended, with
  `outcome` "commit", "rollback" or "commit_failed" - once for the response's own work,
  once more for work done after the response started (streaming bodies, background tasks).
  A request that opened no transaction (no statement, or an autocommit read) makes no call;
- `request_ended(database, scope, stats)`: the request's unit of work is over, after its
  background tasks; `stats` holds its statements and database seconds (what
  `Server-Timing` shows, plus any later work).

An observer must not raise: an exception from it propagates into the request.
"""

from typing import Literal

from starlette.types import Scope

from service.db.accounting import QueryStats

Outcome = Literal["commit", "rollback", "commit_failed"]


class SessionObserver:
    """Receives the middleware's observations; every method is a no-op here."""

    def admitted(self, database: str, scope: Scope, waited: float) -> None:
        """The request got a connection slot after waiting `waited` seconds."""

    def rejected(self, database: str, scope: Scope, waited: float) -> None:
        """No connection slot came free within the wait (`waited` seconds): the request
        gets a 503."""

    def transaction_ended(self, database: str, scope: Scope, outcome: Outcome) -> None:
        """A transaction of the request was committed, rolled back, or failed to commit."""

    def request_ended(self, database: str, scope: Scope, stats: QueryStats) -> None:
        """The request's unit of work ended; `stats` counts all its statements."""


NO_OBSERVER = SessionObserver()
"""The default: observes nothing."""
