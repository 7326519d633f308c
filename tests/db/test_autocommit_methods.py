"""`autocommit_methods`: requests with those methods (the service names GET, HEAD and
OPTIONS) run each statement in a transaction of its own on PostgreSQL - no BEGIN and no
COMMIT round trip - while every other method keeps one transaction per request."""

import pytest
from fastapi import HTTPException
from sqlalchemy import Engine, text

from tests.db.conftest import Mode, client_for, stored_names
from tests.db.test_observer import Recorder

pytestmark = pytest.mark.anyio

# The transaction's id: the same for every statement of one transaction.
TRANSACTION_ID = text("SELECT txid_current()")


def app_with_probe(mode: Mode) -> object:
    app = mode.make_app(autocommit_methods=("GET",))

    @app.api_route("/probe", methods=["GET", "POST"])
    async def probe() -> dict[str, bool]:
        first = await mode.scalar(TRANSACTION_ID)
        second = await mode.scalar(TRANSACTION_ID)
        return {"one_transaction": first == second}

    @app.api_route("/write-then-refuse", methods=["GET", "POST"])
    async def write_then_refuse(name: str) -> None:
        mode.add_item(name)
        await mode.flush()
        raise HTTPException(status_code=400)

    return app


@pytest.fixture
def postgres_only(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite keeps its transactions: they cost no round trip")


async def test_a_get_runs_each_statement_in_its_own_transaction(
    mode: Mode, postgres_only: None
) -> None:
    async with client_for(app_with_probe(mode)) as client:
        get = await client.get("/probe")
        post = await client.post("/probe")
    assert get.json() == {"one_transaction": False}
    assert post.json() == {"one_transaction": True}
    assert mode.checked_out() == 0


async def test_a_write_in_an_autocommit_method_stands_whatever_the_status(
    mode: Mode, engine: Engine, postgres_only: None
) -> None:
    """The sharp edge, on purpose: such methods must only read."""
    async with client_for(app_with_probe(mode)) as client:
        assert (await client.get("/write-then-refuse?name=kept")).status_code == 400
        assert (await client.post("/write-then-refuse?name=rolled-back")).status_code == 400
    assert stored_names(engine) == {"kept"}


async def test_an_autocommit_request_is_counted_as_no_transaction(
    mode: Mode, postgres_only: None
) -> None:
    """db_transactions_total: a GET that read (200) or missed (404) opened no transaction,
    so it is neither a commit nor a rollback; the POST is."""
    recorder = Recorder()
    app = mode.make_app(autocommit_methods=("GET",), observer=recorder)

    @app.api_route("/read", methods=["GET", "POST"])
    async def read(missing: bool = False) -> None:
        await mode.scalar(TRANSACTION_ID)
        if missing:
            raise HTTPException(status_code=404)

    async with client_for(app) as client:
        assert (await client.get("/read")).status_code == 200
        assert (await client.get("/read?missing=true")).status_code == 404
        assert (await client.post("/read")).status_code == 200
        assert (await client.post("/read?missing=true")).status_code == 404
    assert recorder.of("transaction") == [("/read", "commit"), ("/read", "rollback")]
    assert [path for path, _ in recorder.of("ended")] == ["/read"] * 4


async def test_sqlite_keeps_one_transaction_per_request(
    mode: Mode, engine: Engine, backend: str
) -> None:
    if backend != "sqlite":
        pytest.skip("about SQLite")
    app = mode.make_app(autocommit_methods=("GET",))

    @app.get("/write-then-refuse")
    async def write_then_refuse() -> None:
        mode.add_item("rolled-back")
        await mode.flush()
        raise HTTPException(status_code=400)

    async with client_for(app) as client:
        assert (await client.get("/write-then-refuse")).status_code == 400
    assert stored_names(engine) == set()


async def test_an_independent_block_in_an_autocommit_method_is_one_transaction(
    mode: Mode, engine: Engine, backend: str
) -> None:
    """An audit row written from a GET: its block commits as a whole, or not at all -
    the autocommit belongs to the request's own session, not to blocks opened inside it."""
    app = mode.make_app(autocommit_methods=("GET",))

    @app.get("/audit")
    async def audit(name: str, fail: bool = False) -> dict[str, bool]:
        async with mode.block(independent=True):
            mode.add_item(name)
            await mode.flush()
            first = await mode.scalar(TRANSACTION_ID) if backend == "postgresql" else 0
            second = await mode.scalar(TRANSACTION_ID) if backend == "postgresql" else 0
            if fail:
                raise HTTPException(status_code=400)
        return {"one_transaction": first == second}

    async with client_for(app) as client:
        assert (await client.get("/audit?name=kept")).json() == {"one_transaction": True}
        assert (await client.get("/audit?name=undone&fail=true")).status_code == 400
    assert stored_names(engine) == {"kept"}
    assert mode.checked_out() == 0
