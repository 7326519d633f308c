"""The application: `create_app(settings)`, and `app` for `uvicorn service.main:app`."""

import asyncio
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from service.auth import NoApiTokens, add_authentication
from service.body_limit import BodySizeLimit
from service.config import Settings, get_settings
from service.db import db
from service.db.asyncio import DBSessionMiddleware, create_async_engine
from service.db.asyncio import db as async_db
from service.db.consistency import HEADER as CONSISTENCY_HEADER
from service.db.consistency import ConsistencyMiddleware, ConsistencyTokens
from service.db.replicas import Replicas
from service.health import LIVENESS_PATH, READINESS_PATH
from service.health import router as health_router
from service.http_methods import HeadAsGet
from service.items.router import router as items_router
from service.logs import LoggingConfigError, configure_logging
from service.metrics import (
    IN_PROGRESS,
    METRICS_PATH,
    REQUEST_DURATION,
    DatabaseMetrics,
    metrics_endpoint,
    worker_stopped,
)
from service.openapi import extend_openapi, operations
from service.problems import (
    failure_problem,
    install_problem_handlers,
    problem_response,
    problem_responses,
)
from service.request_ids import HEADER as REQUEST_ID_HEADER
from service.request_ids import add_request_ids
from service.telemetry import METHODS, RequestDatabaseStats, RequestTelemetry


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app on `settings` (default: the environment).

    Requests are served async (`service.db.asyncio`, on asyncpg or aiosqlite); the app's
    async engine is `app.state.engine`, disposed of when the app shuts down. Also makes the
    settings' database the default of both `db`s, so `with db():` (sync, psycopg2 or
    pysqlite) and `async with async_db():` in scripts and tests reach the same database as
    the requests. With DATABASE_REPLICA_URLS, requests route reads to the replicas
    (`app.state.replicas`, `service.db.routing`) and responses carry consistency tokens.
    Raises `NoApiTokens` when the settings name no API token and no JWT key: the app never
    serves with writes open to anyone.
    """
    settings = settings or get_settings()
    configure_logging(settings)
    db.configure(settings.sync_database_url(), engine_args=settings.engine_args())
    engine = create_async_engine(settings.async_database_url(), **settings.async_engine_args())
    replicas = read_replicas(settings, engine)
    async_db.configure(engine, session_args=replicas.session_args() if replicas else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.authenticator.start()  # the identity provider's keys, if fetched
        if app.state.replicas is not None:
            # Poll from the start (not from the first request), and wait for the first
            # answers, so that /health/ready does not call fresh replicas down. Started
            # again in one process (tests), it polls afresh.
            app.state.replicas.reopen()
            await asyncio.to_thread(
                app.state.replicas.wait_until_polled, settings.db_connect_timeout + 1.0
            )
        yield
        await close_engines(app)
        worker_stopped()

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the app itself
    # (assets shipped in the fastapi-offline wheel), not from a CDN.
    app = FastAPIOffline(
        docs_url=DOCS_URL,
        redoc_url=REDOC_URL,
        title="Items service",
        version="0.1.0",
        responses=problem_responses(413, 500, 503),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        swagger_ui_parameters={"persistAuthorization": True},
    )
    app.state.engine = engine
    # The readiness probe's own connection, outside the pool: a busy pool is no reason to
    # take the instance out of the load balancer, and the probe never waits for a slot.
    app.state.probe_engine = create_async_engine(
        settings.async_database_url(),
        poolclass=NullPool,
        connect_args=settings.async_engine_args().get("connect_args", {}),
    )
    app.state.replicas = replicas
    app.state.settings = settings
    app.state.cursor_key = settings.cursor_key()  # once, not per scroll page
    app.state.database_observer = (
        DatabaseMetrics(
            {async_db.name: engine.sync_engine.pool},
            {async_db.name: replicas.pools()} if replicas else {},
        )
        if settings.metrics_enabled
        else RequestDatabaseStats()
    )
    if settings.metrics_enabled:
        app.add_api_route(METRICS_PATH, metrics_endpoint, methods=["GET"], include_in_schema=False)
    # The last added runs first: request ids, telemetry (access line, HTTP metrics), CORS,
    # authentication, the body limit, (with read replicas) the consistency token, the
    # database session - so a request is authenticated before its body is read, and takes a
    # connection slot only once its whole body is in (and not too large) and its token
    # checked.
    app.add_middleware(
        DBSessionMiddleware,
        custom_engine=engine,
        session_args=replicas.session_args() if replicas else None,
        server_timing=settings.db_server_timing,
        sessionless_paths=sessionless_paths(app),
        # Safe methods only read: no BEGIN/COMMIT round trips for them (PostgreSQL). Not
        # through PgBouncer: outside a transaction, asyncpg's prepare and execute could land
        # on two different server connections.
        autocommit_methods=() if settings.database_pgbouncer else SAFE_METHODS,
        error_response=failure_problem,
        observer=app.state.database_observer,
    )
    if replicas is not None:
        # Outside the session middleware: it commits before the response starts, so the
        # commit's WAL position is known when this one adds the token.
        app.add_middleware(
            ConsistencyMiddleware,
            tokens=ConsistencyTokens(app.state.cursor_key),
            read_methods=SAFE_METHODS,
            invalid_token_response=lambda reason: problem_response(400, reason),
            sessionless_paths=sessionless_paths(app),
        )
        document_consistency_token(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.authenticator = add_authentication(app, settings)
    # Authentication and everything after it see a HEAD as the GET it asks about (a HEAD
    # needs the token a GET needs); CORS, the access line and the metrics see a HEAD.
    app.add_middleware(HeadAsGet)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match",
                           "Prefer", REQUEST_ID_HEADER, CONSISTENCY_HEADER],
            expose_headers=["ETag", "Location", "Retry-After", "Preference-Applied",
                            "WWW-Authenticate", REQUEST_ID_HEADER, CONSISTENCY_HEADER],
        )
    app.add_middleware(
        RequestTelemetry,
        templates=lambda: route_templates(app),
        access_log=settings.access_log,
        duration=REQUEST_DURATION if settings.metrics_enabled else None,
        in_progress=IN_PROGRESS if settings.metrics_enabled else None,
    )
    add_request_ids(app)
    app.state.route_templates = lambda: route_templates(app)  # for 405's Allow
    install_problem_handlers(app)
    app.include_router(health_router)
    app.include_router(items_router)
    return app


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DOCS_URL = "/docs"
REDOC_URL = "/redoc"


def operation_id(route: APIRoute) -> str:
    """The OpenAPI operationId of a route: its name (`list_items`, `get_item`, ...), which
    client generators turn into method names as they are."""
    return route.name


def read_replicas(settings: Settings, primary: AsyncEngine) -> Replicas | None:
    """The settings' read replicas of `primary` (None without DATABASE_REPLICA_URLS): an
    async engine each, autocommit (a replica read needs no BEGIN and COMMIT), and their
    poller."""
    if not settings.database_replica_urls:
        return None
    engines = [
        create_async_engine(url, isolation_level="AUTOCOMMIT", **settings.replica_engine_args())
        for url in settings.async_replica_urls()
    ]
    return Replicas(
        primary,
        engines,
        max_lag=settings.replica_max_lag,
        poll_interval=settings.replica_poll_interval,
        connect_timeout=settings.db_connect_timeout,
        transaction_pooled=settings.database_pgbouncer,
    )


def document_consistency_token(app: FastAPI) -> None:
    """OpenAPI for the read-replica setup: every operation takes an optional
    X-Consistency-Token, may answer 400 for a malformed or forged one, and its 2xx responses
    may carry a new one."""
    problem = problem_responses(400)[400]["content"]

    def declare(schema: dict[str, Any]) -> None:
        for operation in operations(schema):
            operation.setdefault("parameters", []).append({
                "name": CONSISTENCY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "A token from an earlier response: read at least as "
                "fresh as the write it was issued for. Malformed or forged: 400.",
            })
            responses = operation.setdefault("responses", {})
            responses.setdefault("400", {"description": "Bad Request", "content": problem})
            for status, response in responses.items():
                if status.startswith("2"):
                    response.setdefault("headers", {})[CONSISTENCY_HEADER] = {
                        "description": "Sent when the request committed a write: send "
                        "it back to read your own write.",
                        "schema": {"type": "string"},
                    }

    extend_openapi(app, declare)


async def close_engines(app: FastAPI) -> None:
    """What the app's lifespan does at shutdown: stop the replica poller, close every pool."""
    replicas: Replicas | None = app.state.replicas
    if replicas is not None:
        replicas.close()
        for replica_engine in replicas.engines:
            assert isinstance(replica_engine, AsyncEngine)
            await replica_engine.dispose()
    await app.state.engine.dispose()
    await app.state.probe_engine.dispose()


def sessionless_paths(app: FastAPI) -> set[str]:
    """Paths that never use the request's session, so they never wait for a connection
    slot: the liveness probe, the readiness probe (it has a connection of its own), the
    metrics, the API docs and the static files they load."""
    docs = (app.openapi_url, DOCS_URL, app.swagger_ui_oauth2_redirect_url, REDOC_URL)
    return {LIVENESS_PATH, READINESS_PATH, METRICS_PATH, *(path for path in docs if path),
            *static_file_paths(app)}


def static_file_paths(app: FastAPI) -> set[str]:
    """The URL path of every file served by a `StaticFiles` mount of `app`."""
    paths = set()
    for route in app.routes:
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            for directory in route.app.all_directories:
                root = Path(directory)
                paths |= {
                    f"{route.path}/{file.relative_to(root).as_posix()}"
                    for file in root.rglob("*")
                    if file.is_file()
                }
    return paths


def route_templates(app: FastAPI) -> list[tuple[str, Collection[str]]]:
    """Every route's path template and methods, in the router's order: the documented
    operations' and the others' (docs, metrics), for naming the route of requests answered
    before routing."""
    documented = [
        (path, [method for method in operations if method.upper() in METHODS])
        for path, operations in app.openapi().get("paths", {}).items()
    ]
    others = [
        (path, getattr(route, "methods", None) or METHODS)
        for route in app.router.routes
        if isinstance(path := getattr(route, "path", None), str) and not isinstance(route, Mount)
    ]
    # A mount serves the paths under it: static files answer GET and HEAD only.
    mounted = [
        (f"{route.path}/{{path:path}}",
         ("GET", "HEAD") if isinstance(route.app, StaticFiles) else METHODS)
        for route in app.router.routes
        if isinstance(route, Mount)
    ]
    return [*documented, *others, *mounted]


def __getattr__(name: str) -> FastAPI:
    # `app` is built on first access (uvicorn's `service.main:app`), not at import, so
    # importing this module never reads the environment or touches a database.
    if name == "app":
        # Run as `uvicorn service.main:app`: a configuration mistake is one line, as from
        # `python -m service serve`, not a traceback through uvicorn's importer.
        from service.cli import CommandError, load_settings

        try:
            app = globals()["app"] = create_app(load_settings())
        except (CommandError, NoApiTokens, LoggingConfigError) as exc:
            raise SystemExit(f"error: {exc}") from None
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
