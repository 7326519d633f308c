"""`DBSessionMiddleware`: one session per HTTP request, committed before the response leaves.

Pure ASGI, in the manner of Starlette's own middleware: it watches the app's `send` and
acts on `http.response.start`, before forwarding it:

- status accepted by the commit policy (default: below 400) -> COMMIT, then send. If the
  commit fails, roll back and send a problem response instead (409 for integrity errors,
  500 otherwise) - the client never sees a 2xx for work that was not stored;
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
"""

import asyncio
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.admission import ConnectionSlots, pool_capacity
from service.db.engine import create_engine
from service.db.scope import Database
from service.db.scope import Scope as UnitOfWork
from service.db.scope import db as default_database
from service.problems import PROBLEM_MEDIA_TYPE, problem_bytes

logger = logging.getLogger("service.db")

T = TypeVar("T")
CommitPolicy = Callable[[int], bool]


def commit_below_400(status: int) -> bool:
    """The default commit policy: success and redirect responses commit, errors roll back."""
    return status < 400


class _Response:
    """What the middleware has seen of the response so far."""

    __slots__ = ("commits", "replaced", "started")

    def __init__(self) -> None:
        self.started = False  # http.response.start went out
        self.commits = False  # its status committed, so later writes commit too
        self.replaced = False  # the commit failed and an error response was sent instead


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
      (pool_size + max_overflow, 1 for a single shared connection), None = no limit.

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
    ) -> None:
        if custom_engine is None and not db_url:
            raise ValueError("You need to pass a db_url or a custom_engine parameter.")
        self.app = app
        self.engine = custom_engine or create_engine(db_url, **(engine_args or {}))  # type: ignore[arg-type]
        self.sessionmaker: sessionmaker[Session] = sessionmaker(
            bind=self.engine, **(session_args or {})
        )
        self.commit_on_exit = commit_on_exit
        self.commit_policy = commit_policy
        self.server_timing = server_timing
        self.database = database
        limit = (
            pool_capacity(self.engine)
            if max_concurrent_sessions == "auto"
            else max_concurrent_sessions
        )
        self.slots = ConnectionSlots(limit)
        # One lifecycle thread per admitted request, so commits never queue behind each other.
        self._executor = ThreadPoolExecutor(
            max_workers=min(limit, 64) if limit else 32,
            thread_name_prefix=f"{database.name}-session",
        )
        database.adopt_default(self.sessionmaker)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = await self.slots.acquire()
        try:
            await self._serve(scope, receive, send)
        finally:
            self.slots.release(slot)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        unit = self.database.open_scope(self.sessionmaker, self.commit_on_exit)
        tokens = self.database.activate(unit)
        response = _Response()

        async def send_after_commit(message: Message) -> None:
            if message["type"] == "http.response.start":
                response.started = True
                start = await self._settle(unit, message, response, scope, send)
                if start is not None:
                    await send(start)
            elif not response.replaced:
                await send(message)

        try:
            await self.app(scope, receive, send_after_commit)
        except BaseException as exc:
            if response.started and isinstance(exc, Exception):
                logger.error(
                    "%s failed after its response started; its later writes were rolled back",
                    _describe(scope),
                    exc_info=exc,
                )
            await self._end(unit, commit=False, scope=scope)
            raise
        else:
            await self._end(unit, commit=response.commits, scope=scope)
        finally:
            self.database.deactivate(tokens)

    async def _settle(
        self, unit: UnitOfWork, start: Message, response: _Response, scope: Scope, send: Send
    ) -> Message | None:
        """Commit or roll back for the response `start`; returns the message to forward."""
        if self.commit_on_exit and self.commit_policy(start["status"]):
            if unit.has_work():
                try:
                    await self._in_thread(unit.commit)
                except Exception as exc:
                    response.replaced = True
                    await self._send_commit_failure(exc, start["status"], scope, send)
                    return None
            response.commits = True
        elif unit.has_work():
            await self._in_thread(unit.rollback)
        if not self.server_timing:
            return start
        timing = (b"server-timing", unit.stats.server_timing().encode())
        return {**start, "headers": [*start.get("headers", ()), timing]}

    async def _send_commit_failure(
        self, exc: Exception, status: int, scope: Scope, send: Send
    ) -> None:
        if isinstance(exc, IntegrityError):
            code, detail = 409, "The change conflicts with data already stored; nothing was saved."
        elif isinstance(exc, StaleDataError):
            code, detail = 409, "The record was changed or deleted meanwhile; nothing was saved."
        else:
            code, detail = 500, "The change could not be saved; nothing was stored."
        logger.error(
            "%s: commit failed, answering %d instead of %d", _describe(scope), code, status,
            exc_info=exc,
        )
        body = problem_bytes(code, detail)
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _end(self, unit: UnitOfWork, commit: bool, scope: Scope) -> None:
        """Finish the unit of work off the event loop; never raises but for cancellation."""
        if not unit.has_work():
            unit.session.close()  # nothing open: no I/O, no thread needed
            return
        try:
            await self._in_thread(unit.end, commit)
        except Exception:
            logger.error(
                "%s: %s after the response started failed; those writes were not stored",
                _describe(scope),
                "commit" if commit else "rollback",
                exc_info=True,
            )

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        # The job finishes even if this request is cancelled meanwhile (shield), so the
        # session is never abandoned half-closed and its connection always returns.
        context = contextvars.copy_context()
        future = self._executor.submit(context.run, fn, *args)
        return await asyncio.shield(asyncio.wrap_future(future))


def _describe(scope: Scope) -> str:
    """The request in a log line: method, path and request id if the client sent one."""
    headers = dict(scope.get("headers", ()))
    request_id = headers.get(b"x-request-id", b"").decode("latin-1")
    where = f"{scope.get('method', '?')} {scope.get('path', '?')}"
    return f"{where} (request id {request_id})" if request_id else where
