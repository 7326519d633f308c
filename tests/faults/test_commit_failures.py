"""Failures injected at COMMIT - after the route has run and chosen its 2xx - must never
reach the client as success: 0 of N responses are 2xx, and 0 rows are stored.

Two honest ways to make a COMMIT itself fail, not an earlier statement:
- a deferred foreign key (both databases): a trigger on `items` records each written row
  in a side table whose foreign key points at nothing, checked only at COMMIT (SQLite
  checks DEFERRABLE INITIALLY DEFERRED keys at COMMIT too) -> IntegrityError -> 409;
- a deferred constraint trigger that raises (PostgreSQL only; SQLite has no deferred
  triggers - its RAISE() fires at statement time, which is no commit failure) -> 500.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, text

from tests.items.helpers import insert_items, stored

pytestmark = pytest.mark.anyio

N = 15  # requests of each kind

DEFERRED_FOREIGN_KEY = {
    "sqlite": {
        "setup": [
            "CREATE TABLE commit_guard_parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE commit_guard (item_id INTEGER REFERENCES commit_guard_parent (id) "
            "DEFERRABLE INITIALLY DEFERRED)",
            *(
                f"CREATE TRIGGER commit_guard_{event.lower()} AFTER {event} ON items "
                f"BEGIN INSERT INTO commit_guard (item_id) VALUES ({row}.id); END"
                for event, row in [("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")]
            ),
        ],
        "teardown": [
            "DROP TRIGGER commit_guard_insert",
            "DROP TRIGGER commit_guard_update",
            "DROP TRIGGER commit_guard_delete",
            "DROP TABLE commit_guard",
            "DROP TABLE commit_guard_parent",
        ],
    },
    "postgresql": {
        "setup": [
            "CREATE TABLE commit_guard_parent (id bigint PRIMARY KEY)",
            "CREATE TABLE commit_guard (item_id bigint REFERENCES commit_guard_parent (id) "
            "DEFERRABLE INITIALLY DEFERRED)",
            "CREATE FUNCTION commit_guard_record() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN INSERT INTO commit_guard (item_id) VALUES (-1); RETURN NULL; END $$",
            "CREATE TRIGGER commit_guard AFTER INSERT OR UPDATE OR DELETE ON items "
            "FOR EACH ROW EXECUTE FUNCTION commit_guard_record()",
        ],
        "teardown": [
            "DROP TRIGGER commit_guard ON items",
            "DROP FUNCTION commit_guard_record()",
            "DROP TABLE commit_guard",
            "DROP TABLE commit_guard_parent",
        ],
    },
}

RAISING_CONSTRAINT_TRIGGER = {
    "setup": [
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'refused at commit by the test'; END $$",
        "CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT OR UPDATE OR DELETE ON items "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()",
    ],
    "teardown": ["DROP TRIGGER refuse_commit ON items", "DROP FUNCTION refuse_commit()"],
}


@pytest.fixture
def items(engine: Engine) -> list[int]:
    """N items, stored before any failure is injected."""
    return insert_items(
        engine, *({"name": f"Item {n}", "price": Decimal("1.00")} for n in range(N))
    )


@contextmanager
def injected(engine: Engine, statements: dict[str, list[str]]) -> Iterator[None]:
    with engine.begin() as connection:
        for statement in statements["setup"]:
            connection.execute(text(statement))
    try:
        yield
    finally:
        with engine.begin() as connection:
            for statement in statements["teardown"]:
                connection.execute(text(statement))


@pytest.fixture(params=["deferred foreign key", "raising constraint trigger"])
def commit_failure(
    request: pytest.FixtureRequest, engine: Engine, backend: str, items: list[int]
) -> Iterator[int]:
    """Makes every COMMIT that wrote to `items` fail; gives the status it should map to."""
    if request.param == "deferred foreign key":
        with injected(engine, DEFERRED_FOREIGN_KEY[backend]):
            yield 409
    elif backend != "postgresql":
        pytest.skip("SQLite has no deferred triggers")
    else:
        with injected(engine, RAISING_CONSTRAINT_TRIGGER):
            yield 500


async def test_no_write_is_acknowledged_or_stored_when_its_commit_fails(
    app: FastAPI, client: httpx.AsyncClient, engine: Engine, items: list[int],
    commit_failure: int,
) -> None:
    before = stored(engine)
    requests: list[tuple[str, str, dict[str, Any]]] = [
        *(("POST", "/items", {"json": {"name": f"New {n}", "price": "2"}}) for n in range(N)),
        *(
            ("PATCH", f"/items/{item_id}", {"json": {"price": "3"}, "headers": {"If-Match": "*"}})
            for item_id in items
        ),
        *(("DELETE", f"/items/{item_id}", {}) for item_id in items),
    ]

    responses = [
        await client.request(method, path, **kwargs) for method, path, kwargs in requests
    ]

    assert [r.status_code for r in responses] == [commit_failure] * len(requests)
    for response in responses:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == commit_failure
    assert stored(engine) == before
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM items")).scalar_one() == N
    assert app.state.engine.sync_engine.pool.checkedout() == 0
