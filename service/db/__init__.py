"""The request-scoped database session.

    from service.db import DBSessionMiddleware, db

    app.add_middleware(DBSessionMiddleware, custom_engine=engine)   # or db_url=...

    def list_items():                      # anywhere below the router
        return db.session.scalars(select(Item)).all()

    with db():                             # scripts, CLI, jobs, tests
        db.session.add(Item(...))          # committed when the block ends

API-compatible with fastapi-sqlalchemy 0.2.1; see `DBSessionMiddleware` for the differences.
"""

from service.db.accounting import QueryLog, QueryStats, assert_max_queries, instrument
from service.db.database import Database, db
from service.db.engine import create_engine, enable_sqlite_savepoints
from service.db.failures import (
    BUSY,
    Failure,
    database_unavailable,
    failure_of_commit,
    failure_of_statement,
)
from service.db.middleware import DBSessionMiddleware
from service.db.middleware_base import (
    CommitPolicy,
    ErrorResponse,
    commit_below_400,
    detail_json,
)
from service.db.observer import NO_OBSERVER, Outcome, SessionObserver
from service.db.session_errors import MissingSessionError, SessionNotInitialisedError

__all__ = [
    "BUSY",
    "NO_OBSERVER",
    "CommitPolicy",
    "DBSessionMiddleware",
    "Database",
    "ErrorResponse",
    "Failure",
    "MissingSessionError",
    "Outcome",
    "QueryLog",
    "QueryStats",
    "SessionNotInitialisedError",
    "SessionObserver",
    "assert_max_queries",
    "commit_below_400",
    "create_engine",
    "database_unavailable",
    "db",
    "detail_json",
    "enable_sqlite_savepoints",
    "failure_of_commit",
    "failure_of_statement",
    "instrument",
]
