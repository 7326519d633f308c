"""The apps the benchmark serves (`uvicorn --factory bench.apps:<name>`).

Sync: one list handler - the items page of the service, `SELECT count(*)` plus 20 rows,
rendered as the same `ItemPage` - served with three ways of managing its session, plus the
framework's ceiling; and the service's two lists as they were before they went async
(`service_sync`).

Async: one rows handler - the first keyset page, 20 rows of `items` read as Core rows and
rendered as the service's `ItemScroll` - served with three ways of managing its
`AsyncSession`, and with ours configured as the service configures it; and the floor under
it, the same SQL on a bare asyncpg pool, rendered with orjson (`raw_asyncpg`). Beside them,
the two reference rows of issue #13's table, so that its targets can be read against what
those stacks cost on the machine of the run: SQLAlchemy's `AsyncSession` as its docs show it,
Core rows and an orjson body (`reference_async`), and FastAPI serving the same items from
memory (`memory_async`).

Every app gets the same engine settings (the service's own).
"""

from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, Query, Response
from fastapi_pagination import Page, add_pagination
from fastapi_pagination.customization import CustomizedPage, UseParamsFields
from fastapi_pagination.ext.sqlalchemy import paginate
from sqlalchemy import Engine, Row, Table, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from bench import sync_items
from service.auth import add_authentication
from service.body_limit import BodySizeLimit
from service.config import get_settings
from service.cursors import sign_cursor
from service.db import DBSessionMiddleware, create_engine, db
from service.db import asyncio as async_db
from service.items.models import Item
from service.items.schemas import ItemOut, ItemScroll
from service.problems import failure_problem, install_problem_handlers

# The items page as the service had it before its count modes: Page + size 1-100.
ItemPage = CustomizedPage[Page[ItemOut], UseParamsFields(size=Query(20, ge=1, le=100))]

PAGE_QUERY = select(Item).order_by(Item.id)


def list_page(session: Session) -> Any:
    """The handler under test: one page of items with its total."""
    return paginate(session, PAGE_QUERY)


def _engine() -> Engine:
    settings = get_settings()
    return create_engine(settings.database_url, **settings.engine_args())


def _app() -> FastAPI:
    app = FastAPI()
    add_pagination(app)
    return app


def ours() -> FastAPI:
    """service.db's DBSessionMiddleware and the global db.session."""
    app = _app()
    app.add_middleware(DBSessionMiddleware, custom_engine=_engine())

    @app.get("/items", response_model=ItemPage)
    def items() -> Any:
        return list_page(db.session)

    return app


def peer() -> FastAPI:
    """fastapi-sqlalchemy 0.2.1's DBSessionMiddleware and its db.session."""
    from fastapi_sqlalchemy import DBSessionMiddleware as PeerMiddleware
    from fastapi_sqlalchemy import db as peer_db

    app = _app()
    app.add_middleware(PeerMiddleware, custom_engine=_engine())

    @app.get("/items", response_model=ItemPage)
    def items() -> Any:
        return list_page(peer_db.session)

    return app


def depends() -> FastAPI:
    """The FastAPI documentation's pattern: a `Depends(get_db)` yield dependency."""
    session_factory = sessionmaker(bind=_engine())

    def get_db() -> Iterator[Session]:
        session = session_factory()
        try:
            yield session
        finally:
            session.close()

    app = _app()

    @app.get("/items", response_model=ItemPage)
    def items(session: Annotated[Session, Depends(get_db)]) -> Any:
        return list_page(session)

    return app


CONSTANT_PAGE = {
    "items": [
        {
            "id": n,
            "name": f"Item {n}",
            "description": "A constant item.",
            "price": "9.90",
            "created_at": "2026-11-23T12:00:00Z",
            "updated_at": "2026-11-23T12:00:00Z",
            "version": 1,
            "created_by": "token:1",
            "updated_by": "token:1",
        }
        for n in range(1, 21)
    ],
    "total": 10_000,
    "page": 1,
    "size": 20,
    "pages": 500,
}


def constant() -> FastAPI:
    """The framework's ceiling: the same JSON shape, no database."""
    app = FastAPI()

    @app.get("/items")
    def items() -> dict[str, Any]:
        return CONSTANT_PAGE

    return app


def service() -> FastAPI:
    """The service itself, as `make run` serves it (async)."""
    from service.main import create_app

    return create_app()


def service_unobserved() -> FastAPI:
    """The service without what makes it operable - request ids, the access line, metrics
    and the database observer: the baseline their cost is measured against (issue #15)."""
    from asgi_correlation_id import CorrelationIdMiddleware

    from service.db.asyncio import DBSessionMiddleware as AsyncMiddleware
    from service.db.observer import NO_OBSERVER
    from service.main import create_app
    from service.telemetry import RequestTelemetry

    settings = get_settings().model_copy(update={"metrics_enabled": False, "access_log": False})
    app = create_app(settings)
    # The middleware stack is built at the first request: take them out before.
    app.user_middleware = [
        m for m in app.user_middleware if m.cls not in (CorrelationIdMiddleware, RequestTelemetry)
    ]
    for middleware in app.user_middleware:
        if middleware.cls is AsyncMiddleware:
            middleware.kwargs["observer"] = NO_OBSERVER
    return app


def service_observed() -> FastAPI:
    """The service as operated: request ids, metrics, and one JSON access line per request
    (LOG_LEVEL=INFO) written to a file, as to a log file or a collector's pipe in
    production - not to the terminal."""
    import logging
    import tempfile

    from service.main import create_app

    settings = get_settings().model_copy(update={"log_level": "INFO", "log_format": "json"})
    app = create_app(settings)
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "service" and isinstance(handler, logging.StreamHandler):
            handler.setStream(tempfile.TemporaryFile("w"))  # noqa: SIM115 - until it exits
    return app


def service_sync() -> FastAPI:
    """The service's GET /items and GET /items/scroll as they were before the items API went
    async (bench/sync_items.py), in the service's sync app: `service.db`'s middleware on
    psycopg2, set up as the sync `create_app` did, and the same problem documents."""
    from service.main import sessionless_paths

    settings = get_settings()
    app = FastAPI()
    app.state.settings = settings
    app.add_middleware(
        DBSessionMiddleware,
        custom_engine=create_engine(settings.sync_database_url(), **settings.engine_args()),
        server_timing=settings.db_server_timing,
        sessionless_paths=sessionless_paths(app),
        error_response=failure_problem,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    add_authentication(app, settings)
    install_problem_handlers(app)
    app.include_router(sync_items.router)
    add_pagination(app)
    return app


# -- async: the first keyset page of 20 rows, three session managers and the floor -------

ITEMS = cast(Table, Item.__table__)
FIRST_ROWS = select(ITEMS).order_by(ITEMS.c.id)  # the service's scroll query, no cursor
Size = Annotated[int, Query(ge=1, le=100)]


def cursor_after(item_id: int, secret: bytes) -> str:
    """The cursor the service hands out for the next page after item `item_id` (by id)."""
    return sign_cursor({"sort": "id", "after": [item_id, item_id]}, secret)


async def first_rows(session: AsyncSession, size: int, secret: bytes) -> ItemScroll:
    """The async handler under test: one SELECT of `size + 1` rows (one more: is there a
    next page?), rendered as the service renders a scroll page."""
    rows: list[Row[Any]] = list((await session.execute(FIRST_ROWS.limit(size + 1))).all())
    page = rows[:size]
    next_page = cursor_after(page[-1].id, secret) if len(rows) > size else None
    return ItemScroll(items=[ItemOut.model_validate(row) for row in page], next_page=next_page)


def _async_app() -> tuple[FastAPI, AsyncEngine, bytes]:
    """An app whose engine is made as the service makes its own, and disposed of at
    shutdown; with the cursor secret the service signs with."""
    settings = get_settings()
    engine = async_db.create_async_engine(
        settings.async_database_url(), **settings.async_engine_args()
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    return FastAPI(lifespan=lifespan), engine, settings.cursor_key()


def ours_async(autocommit_methods: Collection[str] = ()) -> FastAPI:
    """service.db.asyncio's DBSessionMiddleware and its db.session (defaults: a transaction
    per request, committed)."""
    app, engine, secret = _async_app()
    app.add_middleware(
        async_db.DBSessionMiddleware, custom_engine=engine, autocommit_methods=autocommit_methods
    )

    @app.get("/items/scroll")
    async def items(size: Size = 20) -> ItemScroll:
        return await first_rows(async_db.db.session, size, secret)

    return app


def ours_async_autocommit() -> FastAPI:
    """`ours_async` configured as the service configures it: GET, HEAD and OPTIONS read
    outside a transaction (`autocommit_methods`), without BEGIN and COMMIT."""
    from service.main import SAFE_METHODS

    return ours_async(autocommit_methods=SAFE_METHODS)


def peer_async() -> FastAPI:
    """fastapi-async-sqlalchemy's SQLAlchemyMiddleware and its db.session (defaults:
    closes without committing)."""
    from fastapi_async_sqlalchemy import SQLAlchemyMiddleware
    from fastapi_async_sqlalchemy import db as peer_db

    app, engine, secret = _async_app()
    app.add_middleware(SQLAlchemyMiddleware, custom_engine=engine)

    @app.get("/items/scroll")
    async def items(size: Size = 20) -> ItemScroll:
        return await first_rows(peer_db.session, size, secret)

    return app


def depends_async() -> FastAPI:
    """The FastAPI documentation's pattern, async: a `Depends(get_async_db)` yield dependency
    on an `async_sessionmaker`."""
    app, engine, secret = _async_app()
    session_factory = async_sessionmaker(engine, expire_on_commit=False)

    async def get_async_db() -> AsyncIterator[AsyncSession]:
        async with session_factory() as session:
            yield session

    @app.get("/items/scroll")
    async def items(
        session: Annotated[AsyncSession, Depends(get_async_db)], size: Size = 20
    ) -> ItemScroll:
        return await first_rows(session, size, secret)

    return app


# The service's scroll query as asyncpg receives it from SQLAlchemy (`scenarios.raw_checks`
# checks that it still is).
RAW_SCROLL_SQL = (
    "SELECT items.id, items.name, items.description, items.price, items.created_at, "
    "items.updated_at, items.version, items.created_by, items.updated_by \nFROM items "
    "ORDER BY items.id ASC \n LIMIT $1::INTEGER"
)


def raw_asyncpg() -> FastAPI:
    """The floor: the service's scroll SQL on an asyncpg pool (no SQLAlchemy, no session,
    no pydantic), the same JSON made by orjson - the cost of the framework, the driver and
    the encoding alone."""
    import asyncpg

    settings = get_settings()
    url = make_url(settings.async_database_url()).set(drivername="postgresql")
    secret = settings.cursor_key()
    pools: list[asyncpg.Pool] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with asyncpg.create_pool(
            url.render_as_string(hide_password=False), min_size=1, max_size=settings.db_pool_size
        ) as pool:
            pools.append(pool)
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/scroll")
    async def items(size: Size = 20) -> Response:
        return orjson_page(await pools[0].fetch(RAW_SCROLL_SQL, size + 1), size, secret)

    return app


def orjson_page(rows: Sequence[Mapping[str, Any]], size: int, secret: bytes) -> Response:
    """The service's scroll page JSON for `size + 1` rows (one more: is there a next
    page?), made by orjson from the rows as they come: no pydantic."""
    body = {
        "items": [
            {
                "id": row["id"],
                "name": row["name"],
                "description": row["description"],
                "price": f"{row['price']:.2f}",
                "created_at": row["created_at"],
                "updated_at": row["updated_at"],
                "version": row["version"],
                "created_by": row["created_by"],
                "updated_by": row["updated_by"],
            }
            for row in rows[:size]
        ],
        "next_page": cursor_after(rows[size - 1]["id"], secret) if len(rows) > size else None,
    }
    import orjson  # the bench extra's: imported where used, so the apps build without it

    return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), media_type="application/json")


def reference_async() -> FastAPI:
    """Issue #13's reference row "`async def`, `AsyncSession` on asyncpg, Core rows
    (`select(table)`), orjson body" (0.94 ms of CPU where the issue was measured):
    SQLAlchemy as its documentation shows it - a plain `create_async_engine` (the service's
    pool sizes, no pre-ping, none of our events) and `async_sessionmaker`, one session per
    request in `async with` (a transaction, rolled back when it closes) - no middleware,
    and the floor's orjson body."""
    settings = get_settings()
    engine = create_async_engine(
        settings.async_database_url(),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    secret = settings.cursor_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/scroll")
    async def items(size: Size = 20) -> Response:
        async with sessions() as session:
            rows = (await session.execute(FIRST_ROWS.limit(size + 1))).mappings().all()
        return orjson_page(rows, size, secret)

    return app


def memory_async() -> FastAPI:
    """Issue #13's "FastAPI + pydantic serving the same 20 items from memory" (0.26 ms
    where the issue was measured): the first page's items, read once at start-up, returned
    as the service's `ItemScroll` (validated and serialised by FastAPI)."""
    settings = get_settings()
    secret = settings.cursor_key()
    page: list[ItemScroll] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_engine(settings.async_database_url())
        async with engine.connect() as connection:
            rows = (await connection.execute(FIRST_ROWS.limit(21))).all()
        await engine.dispose()
        page.append(ItemScroll(
            items=[ItemOut.model_validate(row) for row in rows[:20]],
            next_page=cursor_after(rows[19].id, secret),
        ))
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/scroll")
    async def items(size: Size = 20) -> ItemScroll:
        return page[0]

    return app
