"""`DBSessionMiddleware`: one session per HTTP request, committed before the response leaves.

Pure ASGI, in the manner of Starlette's own middleware: it watches the app's `send` and
acts on `http.response.start`, before forwarding it:

- status accepted by the commit policy (default: below 400) -> COMMIT, then send. If the
  commit fails, roll back and send an error response instead (409 for integrity errors,
  503 with Retry-After when the database became unavailable, 500 otherwise: `failures`) -
  the client never sees a 2xx for work that was not stored;
- any other status -> ROLLBACK, then send;
- writes made after the response started (streaming bodies, BackgroundTasks) are committed
  when the app returns, in a transaction of their own; a failure there is logged at ERROR
  (the status is already on the wire);
- an exception from the app rolls back and propagates; whatever happens, the session is
  closed and the current scope reset, including on client disconnect and cancellation.

COMMIT, ROLLBACK and CLOSE run on the middleware's own small thread pool, never on the event
loop and never queued behind request handlers in the shared threadpool. Requests wait in the
event loop for one of the engine's connection slots before they enter the app (see
`admission`), so sync routes cannot deadlock when requests outnumber connections.

Requests to `sessionless_paths` (probes, API docs, metrics) skip all of it: no session, no
slot, so they answer at once however busy the database is. The path is known before the app
runs, which is what lets the decision happen in the event loop: taking a slot later, at the
first `db.session` inside a sync route, would block a worker thread and bring the deadlock
back.
"""

import asyncio
import contextvars
import logging
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Literal, TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.accounting import instrument
from service.db.admission import ConnectionSlots, NoSlot, pool_capacity, pool_wait
from service.db.database import Database
from service.db.database import db as default_database
from service.db.engine import create_engine
from service.db.failures import BUSY, Failure, failure_of_commit
from service.db.unit_of_work import UnitOfWork

logger = logging.getLogger("service.db")

T = TypeVar("T")
CommitPolicy = Callable[[int], bool]
# Turns a database failure into the response sent instead (any ASGI app, e.g. a Response).
ErrorResponse = Callable[[Failure], ASGIApp]


def commit_below_400(status: int) -> bool:
    """The default commit policy: success and redirect responses commit, errors roll back."""
    return status < 400


def detail_json(failure: Failure) -> ASGIApp:
    """The default error response: `{"detail": "..."}`, as FastAPI answers an
    HTTPException, with the failure's headers (`Retry-After`)."""
    return JSONResponse({"detail": failure.detail}, failure.status, headers=failure.headers)


class _Request:
    """One request's unit of work and what the middleware has seen of its response."""

    __slots__ = ("commits", "job", "replaced", "scope", "started", "unit")

    def __init__(self, unit: UnitOfWork, scope: Scope) -> None:
        self.unit = unit
        self.scope = scope
        self.started = False  # http.response.start went out
        self.commits = False  # its status committed, so later writes commit too
        self.replaced = False  # the commit failed and an error response was sent instead
        # The last COMMIT/ROLLBACK/CLOSE handed to a thread. The next one waits for it, so
        # the session is never used by two threads at once (e.g. after a cancellation).
        self.job: Future[Any] | None = None


class DBSessionMiddleware:
    """Open one session per HTTP request in `database` (default: the global `db`).

    Takes the parameters of fastapi-sqlalchemy 0.2.1 - `db_url` or `custom_engine` (else
    `ValueError`), `engine_args`, `session_args`, `commit_on_exit` - so switching is one
    import. Differences: `commit_on_exit` defaults to True and commits only responses the
    `commit_policy` accepts (0.2.1 committed 4xx too); with `commit_on_exit=False` nothing is
    committed for you and what the handler left uncommitted is rolled back.

    Keyword-only extras:
    - `database`: the `Database` whose `.session` this middleware serves; a second
      middleware with a second `Database` gives an app a second database.
    - `commit_policy`: `status -> bool`, which responses commit.
    - `server_timing`: add `Server-Timing: db;dur=<ms>;desc="<n> queries"` to responses.
    - `max_concurrent_sessions`: requests admitted at once; "auto" = the pool's capacity
      (pool_size + max_overflow, 1 for a single shared connection), None = no limit. A
      request that finds no slot within the pool's timeout gets 503 with `Retry-After`.
    - `sessionless_paths`: exact paths served without a session and without waiting for a
      slot (health probes, `/docs`, `/openapi.json`, `/metrics`); `db.session` there raises
      `MissingSessionError` (`with db():` still works).
    - `error_response`: `Failure -> ASGI app`, the body of 503/409/500 answers the
      middleware sends itself (default: `detail_json`).

    The first middleware built also becomes the database's default for `with db():`
    outside requests, unless one was configured already (`db.configure`). WebSocket and
    lifespan scopes pass through untouched (use `with db():` in a WebSocket handler).
    """

    def __init__(
        self,
        app: ASGIApp,
        db_url: str | URL | None = None,
        custom_engine: Engine | None = None,
        engine_args: dict[str, Any] | None = None,
        session_args: dict[str, Any] | None = None,
        commit_on_exit: bool = True,
        *,
        database: Database = default_database,
        commit_policy: CommitPolicy = commit_below_400,
        server_timing: bool = True,
        max_concurrent_sessions: int | Literal["auto"] | None = "auto",
        sessionless_paths: Collection[str] = (),
        error_response: ErrorResponse = detail_json,
    ) -> None:
        if custom_engine is None and not db_url:
            raise ValueError("You need to pass a db_url or a custom_engine parameter.")
        self.app = app
        self.engine = (
            instrument(custom_engine)
            if custom_engine is not None
            else create_engine(db_url, **(engine_args or {}))  # type: ignore[arg-type]
        )
        self.sessionmaker: sessionmaker[Session] = sessionmaker(
            bind=self.engine, **(session_args or {})
        )
        self.commit_on_exit = commit_on_exit
        self.commit_policy = commit_policy
        self.server_timing = server_timing
        self.database = database
        self.sessionless_paths = frozenset(sessionless_paths)
        self.error_response = error_response
        limit = (
            pool_capacity(self.engine)
            if max_concurrent_sessions == "auto"
            else max_concurrent_sessions
        )
        self.slots = ConnectionSlots(limit, pool_wait(self.engine))
        # One lifecycle thread per admitted request, so commits never queue behind each other.
        self._executor = ThreadPoolExecutor(
            max_workers=min(limit, 64) if limit else 32,
            thread_name_prefix=f"{database.name}-session",
        )
        database.adopt_default(self.sessionmaker)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.sessionless_paths:
            await self.app(scope, receive, send)
            return
        try:
            slot = await self.slots.acquire()
        except NoSlot:
            logger.warning(
                "%s: no database connection came free within %.0f s; answering 503",
                _describe(scope), self.slots.wait,
            )
            await self.error_response(BUSY)(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send)
        finally:
            self.slots.release(slot)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _Request(self.database.open_unit(self.sessionmaker, self.commit_on_exit), scope)
        tokens = self.database.activate(request.unit)

        async def send_after_commit(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
                start = await self._settle(request, message, receive, send)
                if start is not None:
                    await send(start)
            elif not request.replaced:
                await send(message)

        try:
            await self.app(scope, receive, send_after_commit)
        except BaseException as exc:
            if request.started and isinstance(exc, Exception):
                logger.error(
                    "%s failed after its response started; its later writes were rolled back",
                    _describe(scope),
                    exc_info=exc,
                )
            await self._end(request, commit=False)
            raise
        else:
            await self._end(request, commit=request.commits)
        finally:
            self.database.deactivate(tokens)

    async def _settle(
        self, request: _Request, start: Message, receive: Receive, send: Send
    ) -> Message | None:
        """Commit or roll back for the response `start`; returns the message to forward."""
        unit = request.unit
        if self.commit_on_exit and self.commit_policy(start["status"]):
            if unit.has_work():
                try:
                    await self._in_thread(request, unit.commit)
                except Exception as exc:
                    request.replaced = True
                    failure = failure_of_commit(exc)
                    logger.error(
                        "%s: commit failed, answering %d instead of %d",
                        _describe(request.scope), failure.status, start["status"], exc_info=exc,
                    )
                    await self.error_response(failure)(request.scope, receive, send)
                    return None
            request.commits = True
        elif unit.has_work():
            await self._in_thread(request, unit.rollback)
        if not self.server_timing:
            return start
        timing = (b"server-timing", unit.stats.server_timing().encode())
        return {**start, "headers": [*start.get("headers", ()), timing]}

    async def _end(self, request: _Request, commit: bool) -> None:
        """Finish the unit of work off the event loop; never raises but for cancellation."""
        unit = request.unit
        idle = request.job is None or request.job.done()
        if idle and not unit.has_work():
            unit.session.close()  # nothing open: no I/O, no thread needed
            return
        try:
            await self._in_thread(request, unit.end, commit)
        except Exception:
            logger.error(
                "%s: %s of the work done after the response started failed; "
                "that work was not stored",
                _describe(request.scope),
                "commit" if commit else "rollback",
                exc_info=True,
            )

    async def _in_thread(self, request: _Request, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the lifecycle threads, after the request's previous job.

        The job runs to its end even if the request is cancelled meanwhile (shield), so a
        session is never abandoned half-closed and its connection always returns.
        """
        previous = request.job
        context = contextvars.copy_context()

        def job() -> T:
            if previous is not None:
                wait([previous])
            return context.run(fn, *args)

        request.job = self._executor.submit(job)
        return await asyncio.shield(asyncio.wrap_future(request.job))


def _describe(scope: Scope) -> str:
    """The request in a log line: method, path and request id if the client sent one."""
    headers = dict(scope.get("headers", ()))
    request_id = headers.get(b"x-request-id", b"").decode("latin-1")
    where = f"{scope.get('method', '?')} {scope.get('path', '?')}"
    return f"{where} (request id {request_id})" if request_id else where
