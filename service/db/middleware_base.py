"""The request flow shared by the sync and the async `DBSessionMiddleware`: one unit of work
per HTTP request, committed before the response leaves.

Pure ASGI, in the manner of Starlette's own middleware: it watches the app's `send` and
acts on `http.response.start`, before forwarding it:

- status accepted by the commit policy (default: below 400) -> COMMIT, then send. If the
  commit fails, roll back and send an error response instead (409 for integrity errors,
  503 with Retry-After when the database became unavailable, 500 otherwise: `failures`) -
  the client never sees a 2xx for work that was not stored;
- any other status -> ROLLBACK, then send;
- writes made after the response started are committed in a transaction of their own: a
  streaming body's before its last part is sent (if that COMMIT fails, the last part never
  is: the client sees a cut-off body), BackgroundTasks' when the app returns; a failure is
  logged at ERROR (the status is already on the wire). A body that never completed
  (Starlette stops a streaming body when the client disconnects) rolls them back instead;
- after a failed commit the app's own response is stopped (`ResponseReplaced` raised from
  `send`), so its background tasks do not run;
- an exception from the app rolls back and propagates; whatever happens, the session is
  closed and the current unit reset, including on client disconnect and cancellation.

Requests wait in the event loop for one of the engine's connection slots before they enter
the app (`admission`). Requests to `sessionless_paths` (probes, API docs, metrics) skip all
of it: no session, no slot, so they answer at once however busy the database is. The path
is known before the app runs, which is what lets the decision happen in the event loop:
taking a slot later, at the first `db.session` inside a sync route, would block a worker
thread and bring the deadlock back.

Requests whose method is in `autocommit_methods` (the service names the safe ones: GET,
HEAD, OPTIONS) get a session in autocommit mode on PostgreSQL: each statement commits on
its own, so the request costs no BEGIN and no COMMIT round trip - two of a scroll page's
three. Under READ COMMITTED every statement reads its own snapshot anyway; what changes
is that a write there is committed at once, whatever the status, so such methods must only
read. (SQLite keeps its transactions: no round trips to save, and its BEGIN is ours.)

An `observer` (`service.db.observer.SessionObserver`, default a no-op) is told of each
admission (and its wait) or 503, each transaction's outcome and each request's statements,
so an app can keep metrics without this library knowing about them.

This module decides; the sync and async middlewares only say how a unit of work is
committed, rolled back and ended (`_commit`, `_rollback`, `_end_unit`).
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from time import perf_counter
from typing import Any, Generic, Literal, TypeVar

import anyio
from anyio.lowlevel import checkpoint_if_cancelled
from sqlalchemy import Engine
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.accounting import charge_engine_to
from service.db.admission import NoSlot, pool_capacity, slots_of
from service.db.database import DatabaseBase
from service.db.failures import BUSY, Failure, failure_of_commit
from service.db.observer import NO_OBSERVER, Outcome, SessionObserver
from service.db.unit_of_work import UnitOfWorkBase

logger = logging.getLogger("service.db")

CommitPolicy = Callable[[int], bool]
# Turns a database failure into the response sent instead (any ASGI app, e.g. a Response).
ErrorResponse = Callable[[Failure], ASGIApp]
UnitT = TypeVar("UnitT", bound=UnitOfWorkBase[Any, Any])
JobT = TypeVar("JobT")


class ResponseReplaced(BaseException):
    """Raised into the app by `send` once the middleware has answered in its place (the
    commit failed), or cut a streamed body off (its final commit failed): it stops the
    app's response - and the response's background tasks,
    which were to follow work that was not stored. A BaseException, like a cancellation, so
    that the app's `except Exception` blocks let it through; the middleware catches it."""


def commit_below_400(status: int) -> bool:
    """The default commit policy: success and redirect responses commit, errors roll back."""
    return status < 400


def detail_json(failure: Failure) -> ASGIApp:
    """The default error response: `{"detail": "..."}`, as FastAPI answers an
    HTTPException, with the failure's headers (`Retry-After`)."""
    return JSONResponse({"detail": failure.detail}, failure.status, headers=failure.headers)


class RequestState(Generic[UnitT, JobT]):
    """One request's unit of work and what the middleware has seen of its response."""

    __slots__ = ("commits", "finished", "job", "length_left", "replaced", "scope", "start",
                 "started", "transactional", "unit")

    def __init__(self, unit: UnitT, scope: Scope, transactional: bool = True) -> None:
        self.unit = unit
        self.scope = scope
        # False for an `autocommit_methods` request: its statements commit on their own,
        # so it has no transaction to count as committed or rolled back.
        self.transactional = transactional
        self.started = False  # http.response.start went out
        self.finished = False  # so did the body's last part
        self.commits = False  # its status committed, so later writes commit too
        self.replaced = False  # the commit failed and an error response was sent instead
        # The last COMMIT/ROLLBACK/CLOSE started. The next one waits for it, so the session
        # is never used by two jobs at once (e.g. after a cancellation).
        self.job: JobT | None = None
        self.start: Message | None = None  # the app's http.response.start
        self.length_left: int | None = None  # of its Content-Length; -1: none given

    def completes_length(self, message: Message) -> bool:
        """Whether body part `message` completes the response's Content-Length."""
        if self.length_left is None:
            self.length_left = _content_length(self.start)
        if self.length_left < 0:
            return False
        self.length_left -= len(message.get("body", b""))
        return self.length_left <= 0


async def _deliver_due_cancellation() -> None:
    """Let a cancellation that is due arrive before a COMMIT begins, not during it (when
    the COMMIT, shielded, would store the work of a request its client is told timed out).
    An anyio deadline (`fail_after`) that ran out while a sync route ran in its thread, or
    while the event loop was blocked, is only delivered at a later checkpoint, once its
    timer has run."""
    await checkpoint_if_cancelled()
    if anyio.current_effective_deadline() <= anyio.current_time():
        await anyio.sleep(0.05)  # its timer is due: the cancellation comes here


def _content_length(start: Message | None) -> int:
    for name, value in (start or {}).get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1


class SessionMiddlewareBase(Generic[UnitT, JobT]):
    """What both `DBSessionMiddleware`s do around the app; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        pool_engine: Engine,
        sessionmaker: Callable[..., Any],
        autocommit_sessionmaker: Callable[..., Any] | None,
        autocommit_methods: Collection[str],
        database: DatabaseBase[UnitT, Any, Any],
        commit_on_exit: bool,
        commit_policy: CommitPolicy,
        server_timing: bool,
        max_concurrent_sessions: int | Literal["auto"] | None,
        sessionless_paths: Collection[str],
        error_response: ErrorResponse,
        observer: SessionObserver = NO_OBSERVER,
    ) -> None:
        for name, paths in (("sessionless_paths", sessionless_paths),
                            ("autocommit_methods", autocommit_methods)):
            if isinstance(paths, str | bytes):
                raise TypeError(f"{name} is a collection of strings, e.g. {{{paths!r}}}")
        if not callable(commit_policy):
            raise TypeError("commit_policy must be a function of the status: (int) -> bool")
        if not (
            max_concurrent_sessions is None
            or max_concurrent_sessions == "auto"
            or (
                type(max_concurrent_sessions) is int  # not a bool
                and max_concurrent_sessions >= 1
            )
        ):
            raise ValueError(
                "max_concurrent_sessions must be 'auto', None (no limit) or a positive int, "
                f"not {max_concurrent_sessions!r}"
            )
        self.app = app
        self.observer = observer
        self.sessionmaker = sessionmaker
        # Without a sessionmaker for them (SQLite) the methods get ordinary transactions.
        self.autocommit_methods = frozenset(autocommit_methods if autocommit_sessionmaker else ())
        self.autocommit_sessionmaker = autocommit_sessionmaker
        self.database = database
        self.commit_on_exit = commit_on_exit
        self.commit_policy = commit_policy
        self.server_timing = server_timing
        self.sessionless_paths = frozenset(sessionless_paths)
        self.error_response = error_response
        self.slot_limit = (
            pool_capacity(pool_engine)
            if max_concurrent_sessions == "auto"
            else max_concurrent_sessions
        )
        self.slots = slots_of(pool_engine, self.slot_limit)
        database.adopt_default(sessionmaker)
        # Server-Timing per database: its engines' statements are this database's.
        for factory in (sessionmaker, autocommit_sessionmaker):
            bind = getattr(factory, "kw", {}).get("bind")
            if bind is not None:
                charge_engine_to(getattr(bind, "sync_engine", bind), database.stats_var)
        _warn_of_middleware_inside(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            self.sessionless_paths and route_path(scope) in self.sessionless_paths
        ):
            await self.app(scope, receive, send)
            return
        asked = perf_counter()
        try:
            slot = await self.slots.acquire()
        except NoSlot:
            logger.warning(
                "%s: no database connection came free within %g s; answering 503",
                describe(scope), self.slots.wait,
            )
            self.observer.rejected(self.database.name, scope, perf_counter() - asked)
            await self.error_response(BUSY)(scope, receive, send)
            return
        self.observer.admitted(self.database.name, scope, perf_counter() - asked)
        try:
            reads = scope["method"] in self.autocommit_methods
            unit = self.database.open_unit(
                self.sessionmaker,
                self.commit_on_exit,
                session_factory=self.autocommit_sessionmaker if reads else None,
            )
            request: RequestState[UnitT, JobT] = RequestState(unit, scope, not reads)
        except BaseException:
            self.slots.release(slot)
            raise
        try:
            await self._serve(request, receive, send)
        finally:
            self._release_after_last_job(request, slot)

    def _release_after_last_job(self, request: RequestState[UnitT, JobT], slot: Any) -> None:
        """Give the request's slot back once its last job (the end of its unit) is done: a
        request cancelled meanwhile returns first, but its connection is not back yet."""
        job: Any = request.job
        if job is None or job.done():
            self.slots.release(slot)
            return
        loop = asyncio.get_running_loop()

        def release(_: Any) -> None:  # on the job's thread (sync) or the loop (async)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits
                loop.call_soon_threadsafe(self.slots.release, slot)

        job.add_done_callback(release)

    async def _serve(
        self, request: RequestState[UnitT, JobT], receive: Receive, send: Send
    ) -> None:
        scope = request.scope
        unit = request.unit
        tokens = self.database.activate(unit)

        async def send_after_commit(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
                request.start = message
                start = await self._settle(request, message, receive, send)
                if start is None:
                    raise ResponseReplaced
                await send(start)
            elif request.replaced:
                raise ResponseReplaced
            else:
                # The body's last part: its end, or the part that completes its
                # Content-Length (the client holds the whole body from then on).
                if not message.get("more_body", False) or (
                    request.commits and not request.finished and request.completes_length(message)
                ):
                    if request.commits and (unit.has_work() or unit.has_hooks()):
                        await self._commit_streamed(request)
                    request.finished = True
                await send(message)

        try:
            await self.app(scope, receive, send_after_commit)
        except BaseException as exc:
            if request.replaced and _is_response_replaced(exc):
                # The app's response, and its background tasks, stopped here: nothing it
                # did was stored, and the client has the error response instead.
                await self._end(request, commit=False, abandoned=False)
                return
            if isinstance(exc, ClientDisconnect) and request.started:
                # Starlette's streaming body on an ASGI 2.4 server: the client left.
                _log_cut_off(scope)
            elif request.started and isinstance(exc, Exception):
                logger.error(
                    "%s failed after its response started; %s",
                    describe(scope),
                    # Its body's writes were committed before its last part was sent.
                    "the writes of its body were committed, what came after them was "
                    "rolled back" if request.finished else "its later writes were rolled back",
                    exc_info=exc,
                )
            # Not an Exception (a cancellation): a statement may have been cut off mid-way.
            await self._end(request, commit=False, abandoned=not isinstance(exc, Exception))
            raise
        else:
            if request.started and not request.finished and not request.replaced:
                # The body was cut off: Starlette stops a streaming body when the client
                # disconnects, and the app returns as if done. Its later writes are not
                # committed, and the session may have been cut off mid-statement.
                _log_cut_off(scope)
                await self._end(request, commit=False, abandoned=True)
            else:
                await self._end(request, commit=request.commits, abandoned=False)
        finally:
            self.database.deactivate(tokens)
            self.observer.request_ended(self.database.name, scope, unit.stats)

    async def _settle(
        self, request: RequestState[UnitT, JobT], start: Message, receive: Receive, send: Send
    ) -> Message | None:
        """Commit or roll back for the response `start`; returns the message to forward."""
        unit = request.unit
        had_work = unit.has_work()
        if self.commit_on_exit and self.commit_policy(start["status"]):
            if had_work or unit.has_hooks():
                try:
                    await self._commit_to_the_end(request)
                except Exception as exc:
                    request.replaced = True
                    self._transaction_ended(request, "commit_failed")
                    failure = failure_of_commit(exc)
                    logger.error(
                        "%s: commit failed, answering %d instead of %d",
                        describe(request.scope), failure.status, start["status"], exc_info=exc,
                    )
                    await self.error_response(failure)(request.scope, receive, send)
                    return None
                if had_work:
                    self._transaction_ended(request, "commit")
            request.commits = True
        elif had_work or unit.has_hooks():
            await self._rollback(request)
            if had_work:
                self._transaction_ended(request, "rollback")
        if not self.server_timing:
            return start
        timing = (b"server-timing", unit.stats.server_timing().encode())
        return {**start, "headers": [*start.get("headers", ()), timing]}

    async def _commit_to_the_end(self, request: RequestState[UnitT, JobT]) -> None:
        """COMMIT the request's work. A cancellation that is due is let in first (nothing
        is stored); one that comes during the COMMIT - a timeout around the app, a client
        leaving a streamed body - waits for it under an anyio shield: the COMMIT goes on
        regardless (its job is shielded), and what it did is then known, logged and counted,
        not taken for a rollback with the work stored."""
        await _deliver_due_cancellation()
        with anyio.CancelScope(shield=True):
            await self._commit(request)

    def _transaction_ended(self, request: RequestState[UnitT, JobT], outcome: Outcome) -> None:
        if request.transactional:
            self.observer.transaction_ended(self.database.name, request.scope, outcome)

    async def _commit_streamed(self, request: RequestState[UnitT, JobT]) -> None:
        """Commit what a body wrote while it streamed, before its last part is sent: a
        client holding the whole body finds its writes stored. If the COMMIT fails the last
        part is never sent - the client sees a cut-off body, not a complete one for work
        that was lost - and the response's background tasks do not run."""
        had_work = request.unit.has_work()
        try:
            await self._commit_to_the_end(request)
        except Exception as exc:
            request.replaced = True
            if had_work:
                self._transaction_ended(request, "commit_failed")
            logger.error(
                "%s: commit of the writes made while the body streamed failed; that work "
                "was not stored, and %s",
                describe(request.scope),
                # Writes after the part that completed a Content-Length: the client has it.
                "the client has the whole body" if request.finished
                else "the body was cut off before its end",
                exc_info=exc,
            )
            raise ResponseReplaced from None
        if had_work:
            self._transaction_ended(request, "commit")

    async def _end(self, request: RequestState[UnitT, JobT], commit: bool, abandoned: bool) -> None:
        """End the unit of work; never raises but for cancellation."""
        had_work = request.unit.has_work()
        request.unit.ended = True  # a task the request left running opens its own blocks
        try:
            await self._end_unit(request, commit, abandoned)
        except Exception:
            if had_work:
                outcome: Outcome = "commit_failed" if commit else "rollback"
                self._transaction_ended(request, outcome)
            logger.error(
                "%s: %s of the work done %s failed; that work was not stored",
                describe(request.scope),
                "commit" if commit else "rollback",
                "after the response started" if request.started else "by the request",
                exc_info=True,
            )
        else:
            if had_work:
                outcome = "commit" if commit and not abandoned else "rollback"
                self._transaction_ended(request, outcome)
        finally:
            request.unit.closed = True  # no session or hooks of the request's for its tasks

    # -- how a unit of work is committed, rolled back and ended: sync or async -------------

    async def _commit(self, request: RequestState[UnitT, JobT]) -> None:
        raise NotImplementedError

    async def _rollback(self, request: RequestState[UnitT, JobT]) -> None:
        raise NotImplementedError

    async def _end_unit(
        self, request: RequestState[UnitT, JobT], commit: bool, abandoned: bool
    ) -> None:
        """Commit (if `commit`) or roll back, and close; `abandoned`: the request was
        cancelled and its session may be in the middle of a statement."""
        raise NotImplementedError


def autocommit_engine(engine: Any) -> Any | None:
    """`engine` (sync or async) with its statements autocommitted, for `autocommit_methods`;
    None on SQLite, whose transactions cost no round trip."""
    dialect = engine.dialect
    if dialect.name == "sqlite":
        return None
    return engine.execution_options(isolation_level="AUTOCOMMIT")


# Middleware that must not sit between DBSessionMiddleware and the routes: it runs the app
# in a task of its own (BaseHTTPMiddleware), so a streaming body's statements run while the
# middleware commits at the response's start, or holds the start back until the body's
# first part exists (GZipMiddleware), so that part's writes go into the response's COMMIT.
_NOT_INSIDE = (BaseHTTPMiddleware, GZipMiddleware)


def _warn_of_middleware_inside(app: ASGIApp) -> None:
    """Log a WARNING if `app`, the middleware stack inside DBSessionMiddleware, holds one
    of `_NOT_INSIDE` (Starlette builds it before the middleware around it)."""
    inner: Any = app
    for _ in range(100):  # a chain of `.app`, as Starlette's middleware keep it
        if inner is None:
            return
        if isinstance(inner, _NOT_INSIDE):
            logger.warning(
                "%s runs inside DBSessionMiddleware: the request's commit at the response's "
                "start may then race a streaming body's statements, or take in their "
                "writes; add it after DBSessionMiddleware (app.add_middleware runs the last "
                "one added first), so that it wraps it",
                type(inner).__name__,
            )
            return
        inner = getattr(inner, "app", None)


def _is_response_replaced(exc: BaseException) -> bool:
    """Whether `exc` is `ResponseReplaced`, or a group of nothing else (a response sent from
    a task group that does not unwrap its errors)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(ResponseReplaced)[1] is None
    return isinstance(exc, ResponseReplaced)


def _log_cut_off(scope: Scope) -> None:
    logger.warning(
        "%s: the response body was not completed (client gone?); the work done after the "
        "response started was rolled back",
        describe(scope),
    )


def route_path(scope: Scope) -> str:
    """The request's path within the app: without the `root_path` a proxy prefix
    (`uvicorn --root-path`) or a `Mount` put before it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def describe(scope: Scope) -> str:
    """The request in a log line: method, path and request id if the client sent one -
    escaped (`printable`), since the client chose them."""
    request_id = next(  # the first, as request-id middleware takes it
        (value for name, value in scope.get("headers", ()) if name == b"x-request-id"), b""
    ).decode("latin-1")
    where = f"{scope.get('method', '?')} {scope.get('path', '?')}"
    return printable(f"{where} (request id {request_id})" if request_id else where)


def printable(text: str) -> str:
    """`text` for a log message: each unprintable character (a line break, an escape
    sequence) as its Python escape (`\\n`, `\\x1b`), so that what a client sent cannot
    forge a line of a text log. (JSON logs escape every field themselves.)"""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
