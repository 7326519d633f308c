"""The application: `create_app(settings)`, and `app` for `uvicorn service.main:app`."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_pagination import add_pagination
from starlette.middleware.cors import CORSMiddleware

from service.auth import add_authentication
from service.body_limit import BodySizeLimit
from service.config import Settings, get_settings
from service.db import db
from service.db.asyncio import DBSessionMiddleware, create_async_engine
from service.db.asyncio import db as async_db
from service.health import LIVENESS_PATH
from service.health import router as health_router
from service.items.router import router as items_router
from service.problems import failure_problem, install_problem_handlers, problem_responses


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app on `settings` (default: the environment).

    Requests are served async (`service.db.asyncio`, on asyncpg or aiosqlite); the app's
    async engine is `app.state.engine`, disposed of when the app shuts down. Also makes the
    settings' database the default of both `db`s, so `with db():` (sync, psycopg2 or
    pysqlite) and `async with async_db():` in scripts and tests reach the same database as
    the requests. Raises `NoApiTokens` when the settings name no API token and no JWT key:
    the app never serves with writes open to anyone.
    """
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    db.configure(settings.sync_database_url(), engine_args=settings.engine_args())
    engine = create_async_engine(settings.async_database_url(), **settings.async_engine_args())
    async_db.configure(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.authenticator.start()  # the identity provider's keys, if fetched
        yield
        await engine.dispose()

    app = FastAPI(
        title="Items service",
        version="0.1.0",
        responses=problem_responses(413, 500, 503),
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    # The last added runs first: CORS, authentication, the body limit, the database
    # session - so a request is authenticated before its body is read, and takes a
    # connection slot only once its whole body is in (and not too large).
    app.add_middleware(
        DBSessionMiddleware,
        custom_engine=engine,
        server_timing=settings.db_server_timing,
        sessionless_paths=sessionless_paths(app),
        # Safe methods only read: no BEGIN/COMMIT round trips for them (PostgreSQL).
        autocommit_methods=SAFE_METHODS,
        error_response=failure_problem,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.authenticator = add_authentication(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "X-Request-ID"],
            expose_headers=["ETag", "Location", "Retry-After"],
        )
    install_problem_handlers(app)
    app.include_router(health_router)
    app.include_router(items_router)
    add_pagination(app)
    return app


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def sessionless_paths(app: FastAPI) -> set[str]:
    """Paths that never touch the database, so they never wait for a connection slot: the
    liveness probe and the API docs."""
    docs = (app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url)
    return {LIVENESS_PATH, *(path for path in docs if path)}


def __getattr__(name: str) -> FastAPI:
    # `app` is built on first access (uvicorn's `service.main:app`), not at import, so
    # importing this module never reads the environment or touches a database.
    if name == "app":
        app = globals()["app"] = create_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
