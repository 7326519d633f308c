"""The async `DBSessionMiddleware`: one `AsyncSession` per HTTP request, committed before the
response leaves - the flow, the policy and the errors of `service.db.middleware_base`,
awaited on the event loop instead of handed to threads.

Cancellation: COMMIT, ROLLBACK and CLOSE run as tasks of their own, shielded, one after the
other per request, so a request cancelled mid-commit (a client gone, a server shutting
down) cannot cut them off half-way and its connection always returns to the pool. A request
cancelled while one of *its own* statements was in flight leaves its connection
mid-protocol; that connection is invalidated (closed), never pooled.
"""

import asyncio
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Literal

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.asyncio.database import ASYNC_SESSION_DEFAULTS, Database
from service.db.asyncio.database import db as default_database
from service.db.asyncio.engine import create_async_engine, instrument_async
from service.db.asyncio.unit_of_work import AsyncUnitOfWork
from service.db.middleware_base import (
    CommitPolicy,
    ErrorResponse,
    RequestState,
    SessionMiddlewareBase,
    autocommit_engine,
    commit_below_400,
    detail_json,
)
from service.db.observer import NO_OBSERVER, SessionObserver
from service.db.session_errors import require_async_driver, require_mode

_Request = RequestState[AsyncUnitOfWork, "asyncio.Task[None]"]


class DBSessionMiddleware(SessionMiddlewareBase[AsyncUnitOfWork, "asyncio.Task[None]"]):
    """Open one `AsyncSession` per HTTP request in `database` (default: `service.db.asyncio.db`).

    The parameters, defaults and errors of the sync `service.db.DBSessionMiddleware`
    (`db_url` or `custom_engine` - an `AsyncEngine` - else `ValueError`; `engine_args`,
    `session_args`, `commit_on_exit=True`; keyword-only `database`, `commit_policy`,
    `server_timing`, `max_concurrent_sessions`, `sessionless_paths`, `autocommit_methods`,
    `error_response`, `observer`).
    A URL names an async driver: `postgresql+asyncpg://...`, `sqlite+aiosqlite:///...`.
    Sessions default to `expire_on_commit=False` (`ASYNC_SESSION_DEFAULTS`): after the
    COMMIT, a background task or an on-commit hook reading an attribute would otherwise
    need a lazy load, which an `AsyncSession` cannot do implicitly.
    """

    def __init__(
        self,
        app: ASGIApp,
        db_url: str | URL | None = None,
        custom_engine: AsyncEngine | None = None,
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
        require_mode("database", database, Database, "service.db")
        if custom_engine is not None:
            require_mode("custom_engine", custom_engine, AsyncEngine, "service.db")
        elif db_url is not None:
            require_async_driver(db_url)
        self.engine = (
            instrument_async(custom_engine)
            if custom_engine is not None
            else create_async_engine(db_url, **(engine_args or {}))  # type: ignore[arg-type]
        )
        self._owns_engine = custom_engine is None
        session_args = {**ASYNC_SESSION_DEFAULTS, **(session_args or {})}
        factory: async_sessionmaker[AsyncSession] = async_sessionmaker(
            bind=self.engine, **session_args
        )
        super().__init__(
            app,
            pool_engine=self.engine.sync_engine,
            sessionmaker=factory,
            autocommit_sessionmaker=(
                async_sessionmaker(bind=autocommit, **session_args)
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self._owns_engine:
            await self.app(scope, receive, self._dispose_at_shutdown(send))
            return
        await super().__call__(scope, receive, send)

    def _dispose_at_shutdown(self, send: Send) -> Send:
        """The engine made from `db_url` is the middleware's: its connections are closed
        when the app shuts down (as fastapi-async-sqlalchemy 0.8 does), on the loop that
        made them. A `custom_engine` is its owner's to dispose of."""

        async def send_after_disposing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.engine.dispose()
            await send(message)

        return send_after_disposing

    async def _commit(self, request: _Request) -> None:
        await self._in_task(request, request.unit.commit)

    async def _rollback(self, request: _Request) -> None:
        await self._in_task(request, request.unit.rollback)

    async def _end_unit(self, request: _Request, commit: bool, abandoned: bool) -> None:
        unit = request.unit
        idle = request.job is None or request.job.done()
        if idle and not abandoned and not unit.has_work() and not unit.has_hooks():
            # No transaction, so no connection: closing is bookkeeping, no I/O to await.
            unit.session.sync_session.close()
            return
        await self._in_task(request, lambda: unit.end(commit, abandoned))

    async def _in_task(
        self, request: _Request, job: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Run `job()` as a task of its own after the request's previous one, shielded: it
        runs to its end even if the request is cancelled meanwhile."""
        previous = request.job

        async def after_previous() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            await job()

        task = asyncio.ensure_future(after_previous())
        task.add_done_callback(_retrieved)
        request.job = task
        await asyncio.shield(task)


def _retrieved(task: "asyncio.Task[None]") -> None:
    # A job whose request was cancelled has nobody awaiting it: take its outcome, so asyncio
    # does not log "exception never retrieved" (the failure was logged where it matters).
    if not task.cancelled():
        task.exception()
