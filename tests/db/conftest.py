"""Helpers for the tests of service.db: small apps wired with DBSessionMiddleware on the
migrated test database, and a look at what was really committed."""

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, select

from service.db import DBSessionMiddleware, db
from service.items.models import Item
from service.problems import failure_problem, install_problem_handlers

MakeApp = Callable[..., FastAPI]


def add_item(name: str, database: Any = db) -> Item:
    """What a DAO does: add a row through the current scope's session."""
    item = Item(name=name, price=Decimal("1.00"))
    database.session.add(item)
    return item


def stored_names(engine: Engine) -> set[str]:
    """Names committed in the database, read on a connection of its own."""
    with engine.connect() as connection:
        return set(connection.scalars(select(Item.name)))


@pytest.fixture
def make_app(engine: Engine) -> MakeApp:
    """`make_app(**middleware_args)`: a FastAPI app with the service's error handlers and
    DBSessionMiddleware on the test engine, answering failures with problem documents as
    the service does (unless the args say otherwise)."""

    def make(**middleware_args: Any) -> FastAPI:
        app = FastAPI()
        install_problem_handlers(app)
        if "db_url" not in middleware_args:
            middleware_args.setdefault("custom_engine", engine)
        middleware_args.setdefault("error_response", failure_problem)
        app.add_middleware(DBSessionMiddleware, **middleware_args)
        return app

    return make


def client_for(app: FastAPI, **transport_args: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **transport_args), base_url="http://test"
    )


@pytest.fixture
async def app_client(make_app: MakeApp) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app with the default middleware, and a client for it."""
    app = make_app()
    async with client_for(app) as client:
        yield app, client
