"""The request-scoped database session.

    from service.db import DBSessionMiddleware, db

    app.add_middleware(DBSessionMiddleware, custom_engine=engine)   # or db_url=...

    def list_items():                      # anywhere below the router
        return db.session.scalars(select(Item)).all()

    with db():                             # scripts, CLI, jobs, tests
        db.session.add(Item(...))          # committed when the block ends

API-compatible with fastapi-sqlalchemy 0.2.1; see `DBSessionMiddleware` for the differences.
"""

from service.db.accounting import QueryLog, QueryStats, assert_max_queries
from service.db.engine import create_engine, enable_sqlite_savepoints
from service.db.errors import (
    MissingSessionError,
    SessionNotInitialisedError,
    database_unavailable,
)
from service.db.middleware import CommitPolicy, DBSessionMiddleware, commit_below_400
from service.db.scope import Database, db

__all__ = [
    "CommitPolicy",
    "DBSessionMiddleware",
    "Database",
    "MissingSessionError",
    "QueryLog",
    "QueryStats",
    "SessionNotInitialisedError",
    "assert_max_queries",
    "commit_below_400",
    "create_engine",
    "database_unavailable",
    "db",
    "enable_sqlite_savepoints",
]
