"""The apps the benchmark serves (`uvicorn --factory bench.apps:<name>`).

One list handler - the items page of the service, `SELECT count(*)` plus 20 rows, rendered
as the same `ItemPage` - served with three ways of managing its session, plus the
framework's ceiling. Every app gets the same engine settings (the service's own).
"""

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query
from fastapi_pagination import Page, add_pagination
from fastapi_pagination.customization import CustomizedPage, UseParamsFields
from fastapi_pagination.ext.sqlalchemy import paginate
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings
from service.db import DBSessionMiddleware, create_engine, db
from service.items.models import Item
from service.items.schemas import ItemOut

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
    """The service itself, as `make run` serves it."""
    from service.main import create_app

    return create_app()
