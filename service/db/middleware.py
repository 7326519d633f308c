"""`DBSessionMiddleware`: one sync `Session` per HTTP request, committed before the response
leaves (the flow is `middleware_base`'s).

COMMIT, ROLLBACK and CLOSE run on the middleware's own small thread pool, never on the event
loop and never queued behind request handlers in the shared threadpool. Requests wait in the
event loop for one of the engine's connection slots before they enter the app (see
`admission`), so sync routes cannot deadlock when requests outnumber connections.
"""

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Literal, TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Scope

from service.db.accounting import instrument
from service.db.database import Database
from service.db.database import db as default_database
from service.db.engine import create_engine
from service.db.middleware_base import (
    CommitPolicy,
    ErrorResponse,
    RequestState,
    SessionMiddlewareBase,
    autocommit_engine,
    commit_below_400,
    describe,
    detail_json,
)
from service.db.observer import NO_OBSERVER, SessionObserver
from service.db.session_errors import require_mode, require_sync_driver
from service.db.statement_gate import guard_statements
from service.db.unit_of_work import UnitOfWork

logger = logging.getLogger("service.db")
# Seconds a cancelled request waits for its unit to end before it lets the cancellation
# through (the unit still ends, later).
ABANDONED_WAIT = 1.0

T = TypeVar("T")
_Request = RequestState[UnitOfWork, Future[Any]]


class DBSessionMiddleware(SessionMiddlewareBase[UnitOfWork, Future[Any]]):
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
    - `autocommit_methods`: methods (e.g. GET, HEAD, OPTIONS) whose statements autocommit
      on PostgreSQL - no BEGIN/COMMIT round trips; they must only read (see
      `middleware_base`).
    - `error_response`: `Failure -> ASGI app`, the body of 503/409/500 answers the
      middleware sends itself (default: `detail_json`).
    - `observer`: a `SessionObserver` told of admission waits and 503s, transaction
      outcomes and each request's statements (for metrics; default: none).

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
        autocommit_methods: Collection[str] = (),
        error_response: ErrorResponse = detail_json,
        observer: SessionObserver = NO_OBSERVER,
    ) -> None:
        if custom_engine is None and not db_url:
            raise ValueError("You need to pass a db_url or a custom_engine parameter.")
        require_mode("database", database, Database, "service.db.asyncio")
        if custom_engine is not None:
            require_mode("custom_engine", custom_engine, Engine, "service.db.asyncio")
            require_sync_driver(custom_engine.url)
        elif db_url is not None:
            require_sync_driver(db_url)
        self.engine = (
            instrument(custom_engine)
            if custom_engine is not None
            else create_engine(db_url, **(engine_args or {}))  # type: ignore[arg-type]
        )
        guard_statements(self.engine)  # see UnitOfWork.end_abandoned
        factory: sessionmaker[Session] = sessionmaker(bind=self.engine, **(session_args or {}))
        super().__init__(
            app,
            pool_engine=self.engine,
            sessionmaker=factory,
            autocommit_sessionmaker=(
                sessionmaker(bind=autocommit, **(session_args or {}))
                if autocommit_methods and (autocommit := autocommit_engine(self.engine))
                else None
            ),
            autocommit_methods=autocommit_methods,
            database=database,
            commit_on_exit=commit_on_exit,
            commit_policy=commit_policy,
            server_timing=server_timing,
            max_concurrent_sessions=max_concurrent_sessions,
            sessionless_paths=sessionless_paths,
            error_response=error_response,
            observer=observer,
        )
        # One lifecycle thread per admitted request, so commits never queue behind each other.
        limit = self.slot_limit
        self._executor = ThreadPoolExecutor(
            max_workers=min(limit, 64) if limit else 32,
            thread_name_prefix=f"{database.name}-session",
        )

    async def _commit(self, request: _Request) -> None:
        await self._in_thread(request, request.unit.commit)

    async def _rollback(self, request: _Request) -> None:
        await self._in_thread(request, request.unit.rollback)

    async def _end_unit(self, request: _Request, commit: bool, abandoned: bool) -> None:
        # A sync statement cannot be cut off by a cancellation: it runs to its end in its
        # thread. But the route's thread may still be running, and using the session.
        unit = request.unit
        if abandoned:
            # The route's thread may be inside a statement: `end_abandoned` interrupts it,
            # which takes a round trip, and that is waited for. One that will not stop does
            # not hold the cancellation up any longer: the unit ends when it does, and the
            # slot comes free then (`_release_after_last_job`).
            ended = asyncio.wrap_future(self._submit(request, _end_abandoned, unit, request.scope))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), ABANDONED_WAIT)
            return
        idle = request.job is None or request.job.done()
        if idle and not unit.has_work() and not unit.has_hooks():
            unit.session.close()  # nothing open: no I/O, no thread needed
            return
        await self._in_thread(request, unit.end, commit)

    async def _in_thread(self, request: _Request, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the lifecycle threads, after the request's previous job.

        The job runs to its end even if the request is cancelled meanwhile (shield), so a
        session is never abandoned half-closed and its connection always returns.
        """
        return await asyncio.shield(asyncio.wrap_future(self._submit(request, fn, *args)))

    def _submit(self, request: _Request, fn: Callable[..., T], *args: Any) -> "Future[T]":
        """Start `fn(*args)` on the lifecycle threads, after the request's previous job."""
        previous = request.job
        context = contextvars.copy_context()

        def job() -> T:
            if previous is not None:
                wait([previous])
            return context.run(fn, *args)

        future = self._executor.submit(job)
        request.job = future
        return future


def _end_abandoned(unit: UnitOfWork, scope: Scope) -> None:
    """`unit.end_abandoned()`, on a lifecycle thread nobody awaits: a failure is logged."""
    try:
        unit.end_abandoned()
    except Exception:
        logger.error(
            "%s: rolling back the work of the cancelled request failed; that work was not "
            "stored", describe(scope), exc_info=True,
        )
