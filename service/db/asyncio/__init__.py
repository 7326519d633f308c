"""The async twin of `service.db`: `db.session` is the request's `AsyncSession`.

    from service.db.asyncio import DBSessionMiddleware, db

    app.add_middleware(DBSessionMiddleware, db_url="postgresql+asyncpg://...")

    async def list_items():                # anywhere below an async router
        return (await db.session.scalars(select(Item))).all()

    async with db():                       # scripts, jobs, tests
        db.session.add(Item(...))          # committed when the block ends

Same parameters, guarantees and errors as `service.db`; the decisions (when to commit, what
a failed COMMIT answers, what is counted) are shared code, only the I/O is awaited.
`SQLAlchemyMiddleware` is the same class under fastapi-async-sqlalchemy's name.
"""

from service.db.accounting import QueryLog, QueryStats, assert_max_queries
from service.db.asyncio.database import Database, db
from service.db.asyncio.engine import create_async_engine, instrument_async
from service.db.asyncio.middleware import DBSessionMiddleware
from service.db.asyncio.unit_of_work import AsyncUnitOfWork
from service.db.failures import Failure
from service.db.middleware_base import CommitPolicy, ErrorResponse, commit_below_400, detail_json
from service.db.observer import NO_OBSERVER, Outcome, SessionObserver
from service.db.session_errors import MissingSessionError, SessionNotInitialisedError

SQLAlchemyMiddleware = DBSessionMiddleware
"""fastapi-async-sqlalchemy's name for the middleware: switching is changing the import."""

__all__ = [
    "NO_OBSERVER",
    "AsyncUnitOfWork",
    "CommitPolicy",
    "DBSessionMiddleware",
    "Database",
    "ErrorResponse",
    "Failure",
    "MissingSessionError",
    "Outcome",
    "QueryLog",
    "QueryStats",
    "SQLAlchemyMiddleware",
    "SessionNotInitialisedError",
    "SessionObserver",
    "assert_max_queries",
    "commit_below_400",
    "create_async_engine",
    "db",
    "detail_json",
    "instrument_async",
]
