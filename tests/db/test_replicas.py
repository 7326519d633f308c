"""Read replicas (service.db.replicas, routing, consistency), in both modes, on a real primary
and a real streaming hot standby: which server answers each statement, read-your-writes with
a consistency token while the standby's replay is paused, and a standby that stops and comes
back under load. Which server answered is asked of the server itself: `pg_is_in_recovery()`
is true only on the standby."""

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, delete, false, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import create_engine
from service.db.asyncio import create_async_engine
from service.db.consistency import HEADER, ConsistencyMiddleware, ConsistencyTokens
from service.db.replicas import Replicas, record_end
from service.items.models import Item
from service.main import SAFE_METHODS
from service.problems import problem_response
from tests.db.conftest import Mode, async_url, client_for
from tests.standby import Standby

pytestmark = pytest.mark.anyio

SECRET = b"test-consistency-secret-0123456789"
ON_STANDBY = text("SELECT pg_is_in_recovery()")


def wal_positions(primary: Engine, standby: Standby) -> dict[str, str]:
    """Where the primary's WAL is inserted, written and flushed, and where the standby has
    received and replayed it (for a failure's message)."""
    with primary.connect() as connection:
        inserted, written, flushed = connection.execute(text(
            "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_lsn()::text, "
            "pg_current_wal_flush_lsn()::text"
        )).one()
    with standby.engine.connect() as connection:
        received, replayed = connection.execute(text(
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
        )).one()
    return {"inserted": inserted, "written": written, "flushed": flushed,
            "received": received, "replayed": replayed}


@dataclass
class Routed:
    app: FastAPI
    client: httpx.AsyncClient
    replicas: Replicas


def routed_app(mode: Mode, replicas: Replicas) -> FastAPI:
    """A test app of `mode` whose sessions route through `replicas`, as the service's."""
    database = mode.database
    app = mode.make_app(
        session_args=replicas.session_args(), autocommit_methods=SAFE_METHODS
    )
    app.add_middleware(
        ConsistencyMiddleware, tokens=ConsistencyTokens(SECRET),
        invalid_token_response=lambda reason: problem_response(400, reason),
    )

    @app.get("/server")
    @app.post("/server")
    async def server() -> dict[str, bool]:
        return {"standby": await mode.scalar(ON_STANDBY)}

    @app.get("/lock-then-read")
    async def lock_then_read() -> dict[str, bool]:
        await mode.scalar(select(Item.id).limit(1).with_for_update())
        return {"standby": await mode.scalar(ON_STANDBY)}

    @app.get("/raw-sql/{kind}")
    async def raw_sql(kind: str) -> dict[str, bool]:
        # Raw SQL the router cannot read as a plain query: on a replica it would fail
        # ("cannot execute UPDATE in a read-only transaction").
        statement: Any = {
            "write": text("UPDATE items SET price = price WHERE false"),
            "lock": text("SELECT id FROM items LIMIT 1 FOR UPDATE"),
            "sequence": text("SELECT nextval('items_id_seq')"),
            "try-advisory-lock": text("SELECT pg_try_advisory_xact_lock(7)"),
            "write-as-columns": text(
                "UPDATE items SET price = price WHERE false RETURNING id"
            ).columns(Item.id),
            "write-from-statement": select(Item).from_statement(
                text("UPDATE items SET price = price WHERE false RETURNING *")
            ),
        }[kind]
        await mode.run(lambda session: session.execute(statement))
        return {"standby": await mode.scalar(ON_STANDBY)}

    @app.get("/cte-write/{kind}")
    async def cte_write(kind: str) -> dict[str, bool]:
        # A SELECT whose CTE writes: the router sees a plain SELECT; the replica refuses it.
        dml: Any = {
            "delete": delete(Item).where(false()),
            "update": update(Item).values(price=Item.price).where(false()),
        }[kind]
        await mode.run(lambda session: session.execute(
            select(dml.returning(Item.id).cte("written"))
        ))
        return {"standby": await mode.scalar(ON_STANDBY)}

    @app.get("/write-in-a-get/{name}")
    async def write_in_a_get(name: str, fail: bool = False, again: bool = False) -> Any:
        item = mode.add_item(name)
        await mode.flush()
        if fail:  # too late to undo: the write committed on its own
            return JSONResponse({"id": item.id}, 409)
        if again:  # the same name twice: the database refuses the second (a 409)
            mode.add_item(name)
            await mode.flush()
        return {"id": item.id, "standby": await mode.scalar(ON_STANDBY)}

    @app.get("/read-explicitly-from-primary")
    async def read_from_primary() -> dict[str, bool]:
        with database.primary():
            first = await mode.scalar(ON_STANDBY)
        return {"standby": first, "after": await mode.scalar(ON_STANDBY)}

    @app.post("/report")
    async def report() -> dict[str, bool]:
        with database.replica():
            return {"standby": await mode.scalar(ON_STANDBY)}

    @app.post("/items/{name}")
    async def create(name: str, fail: bool = False) -> Any:
        item = mode.add_item(name)
        await mode.flush()
        if fail:
            return JSONResponse({"detail": "refused after the write"}, 409)
        # A write moves the rest of the request to the primary, even a replica() block.
        with database.replica():
            after = await mode.scalar(ON_STANDBY)
        return {"id": item.id, "standby_after_write": after}

    @app.post("/items/{name}/and-a-refused-savepoint")
    async def create_then_refused_savepoint(name: str) -> None:
        mode.add_item(name)
        await mode.flush()

        def insert_again(session: Session) -> None:  # the same name again: refused
            with contextlib.suppress(IntegrityError), session.begin_nested():
                session.execute(insert(Item).values(name=name, price=1))

        await mode.run(insert_again)

    @app.get("/items/by-name/{name}")
    async def read_by_name(name: str, response: Response) -> dict[str, Any]:
        found = await mode.scalar(select(Item.name).where(Item.name == name))
        response.status_code = 200 if found else 404
        return {"name": found, "standby": await mode.scalar(ON_STANDBY)}

    @app.get("/items/{item_id}")
    async def read(item_id: int, response: Response) -> dict[str, Any]:
        name = await mode.scalar(select(Item.name).where(Item.id == item_id))
        response.status_code = 200 if name else 404
        return {"name": name, "standby": await mode.scalar(ON_STANDBY)}

    return app


@pytest.fixture
async def routed(mode: Mode, standby: Standby) -> AsyncIterator[Routed]:
    # Autocommit from the start (not execution_options): nothing to reset when a connection
    # of a replica that died comes back to the pool.
    if mode.name == "sync":
        replica_engine: Any = create_engine(standby.url, isolation_level="AUTOCOMMIT")
    else:
        replica_engine = create_async_engine(async_url(standby.url), isolation_level="AUTOCOMMIT")
    replicas = Replicas(
        mode.engine,
        [replica_engine],
        max_lag=300,  # a paused standby stays usable: the token must do the work
        poll_interval=0.1,
    )
    assert replicas.wait_until_polled()
    app = routed_app(mode, replicas)
    async with client_for(app) as client:
        yield Routed(app, client, replicas)
    replicas.close()
    await mode.dispose(replica_engine)


async def test_safe_methods_read_from_the_replica_and_writes_go_to_the_primary(
    routed: Routed,
) -> None:
    assert (await routed.client.get("/server")).json() == {"standby": True}
    assert (await routed.client.post("/server")).json() == {"standby": False}
    created = await routed.client.post("/items/first")
    assert created.status_code == 200
    assert created.json()["standby_after_write"] is False


async def test_a_lock_moves_the_rest_of_the_request_to_the_primary(routed: Routed) -> None:
    assert (await routed.client.get("/lock-then-read")).json() == {"standby": False}


@pytest.mark.parametrize(
    "kind",
    ["write", "lock", "sequence", "try-advisory-lock", "write-as-columns",
     "write-from-statement"],
)
async def test_raw_sql_that_writes_or_locks_in_a_read_request_runs_on_the_primary(
    routed: Routed, kind: str
) -> None:
    """`text()` may hold anything: only SQL that reads as a plain query goes to a replica
    (the `/server` route's raw SELECT does); the rest of the request stays on the primary."""
    response = await routed.client.get(f"/raw-sql/{kind}")
    assert (response.status_code, response.json()) == (200, {"standby": False})


@pytest.mark.parametrize("kind", ["delete", "update"])
async def test_a_select_whose_cte_writes_runs_on_the_primary(
    routed: Routed, kind: str
) -> None:
    """The router reads a SELECT; the replica refuses its data-modifying CTE (25006): the
    statement runs on the primary instead, and the rest of the request stays there."""
    response = await routed.client.get(f"/cte-write/{kind}")
    assert (response.status_code, response.json()) == (200, {"standby": False})
    assert response.headers[HEADER]  # it wrote (nothing, here): a token all the same


async def test_a_get_that_writes_gets_a_token_its_client_reads_with(
    routed: Routed, standby: Standby
) -> None:
    """A GET's statements commit one by one (autocommit): its write earns a token too, and
    with it the client reads the write while the standby's replay is paused."""
    standby.pause_replay()
    for n in range(5):
        written = await routed.client.get(f"/write-in-a-get/get-{n}")
        assert written.json()["standby"] is False
        token = written.headers[HEADER]
        with_token = await routed.client.get(
            f"/items/{written.json()['id']}", headers={HEADER: token}
        )
        assert with_token.json()["name"] == f"get-{n}"


async def test_a_get_that_writes_and_then_fails_still_gets_a_token(
    routed: Routed, standby: Standby
) -> None:
    """Its failure rolls back nothing that autocommit already stored: the write stands, so
    its client needs the token to read it as much as after a success."""
    standby.pause_replay()
    written = await routed.client.get("/write-in-a-get/get-then-409?fail=1")
    assert written.status_code == 409
    with_token = await routed.client.get(
        f"/items/{written.json()['id']}", headers={HEADER: written.headers[HEADER]}
    )
    assert with_token.json() == {"name": "get-then-409", "standby": False}


async def test_a_get_whose_second_write_is_refused_still_gets_a_token_for_its_first(
    routed: Routed, standby: Standby
) -> None:
    """The refused INSERT rolls back (a failed flush, then the request's rollback); the
    first one, committed on its own, stands - and the 409 carries its token."""
    standby.pause_replay()
    refused = await routed.client.get("/write-in-a-get/twice?again=1")
    assert refused.status_code == 409
    token = refused.headers[HEADER]
    with_token = await routed.client.get("/items/by-name/twice", headers={HEADER: token})
    assert with_token.json() == {"name": "twice", "standby": False}


async def test_a_savepoint_rolled_back_keeps_the_token_of_the_writes_before_it(
    routed: Routed, standby: Standby
) -> None:
    """Only the savepoint's work is undone: the request commits its first INSERT, and its
    client needs the token to read it."""
    standby.pause_replay()
    created = await routed.client.post("/items/kept/and-a-refused-savepoint")
    assert created.status_code == 200
    with_token = await routed.client.get(
        "/items/by-name/kept", headers={HEADER: created.headers[HEADER]}
    )
    assert with_token.json() == {"name": "kept", "standby": False}


async def test_primary_and_replica_can_be_chosen_explicitly(routed: Routed) -> None:
    explicit = (await routed.client.get("/read-explicitly-from-primary")).json()
    assert explicit == {"standby": False, "after": True}
    assert (await routed.client.post("/report")).json() == {"standby": True}


async def test_only_a_request_that_committed_gets_a_token(
    routed: Routed, engine: Engine
) -> None:
    assert HEADER not in (await routed.client.get("/server")).headers
    created = await routed.client.post("/items/with-token")
    assert created.status_code == 200
    assert created.headers[HEADER]
    rolled_back = await routed.client.post("/items/rolled-back?fail=1")
    assert rolled_back.status_code == 409
    assert HEADER not in rolled_back.headers
    with engine.connect() as connection:
        assert connection.scalar(select(Item.id).where(Item.name == "rolled-back")) is None


async def test_with_its_token_a_writer_reads_its_write_while_replay_is_paused(
    routed: Routed, standby: Standby
) -> None:
    standby.pause_replay()
    stale_with_token = 0
    from_standby_without_token = 0
    for n in range(200):
        created = await routed.client.post(f"/items/paused-{n}")
        token = created.headers[HEADER]
        item_id = created.json()["id"]
        with_token = await routed.client.get(f"/items/{item_id}", headers={HEADER: token})
        stale_with_token += with_token.status_code == 404
        if n % 20 == 0:
            without = await routed.client.get(f"/items/{item_id}")
            from_standby_without_token += without.json()["standby"]
            assert without.status_code == (404 if without.json()["standby"] else 200)
    assert stale_with_token == 0
    assert from_standby_without_token > 0  # without the token, the (stale) replica answered


async def test_a_token_is_served_by_the_replica_once_it_has_replayed_it(
    routed: Routed, standby: Standby, engine: Engine
) -> None:
    created = await routed.client.post("/items/caught-up")
    position = int(created.headers[HEADER].split(".")[0], 16)
    # Until the poller has seen the standby replay the commit (with synchronous_commit off
    # the commit record may reach the standby a WAL-writer round later). WAL another session
    # (autovacuum) inserted between the COMMIT and the position's read waits for the next
    # flush: on a quiet server, the background writer's snapshot record, within 15 s.
    deadline = time.monotonic() + 20
    while (routed.replicas.replicas[0].position or 0) < position:
        assert time.monotonic() < deadline, (
            f"the standby did not replay the commit: token {position:X}, "
            f"replicas {routed.replicas.status()}, {wal_positions(engine, standby)}"
        )
        await anyio.sleep(0.05)
    read = await routed.client.get(
        f"/items/{created.json()['id']}", headers={HEADER: created.headers[HEADER]}
    )
    assert read.status_code == 200
    assert read.json()["standby"] is True


async def test_a_position_read_at_a_wal_page_boundary_is_one_the_standby_reaches(
    standby: Standby, engine: Engine
) -> None:
    """Right after a WAL segment switch the primary's insert position points past the new
    page's header, and a standby that replayed everything reports the boundary: a token
    holding the insert position would wait for WAL a quiet primary never writes."""
    replicas = Replicas(engine, [standby.engine], poll_interval=0.1)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_switch_wal()"))
            connection.commit()
            position = replicas.position_on(connection)
            segment = connection.scalar(
                text("SELECT pg_size_bytes(current_setting('wal_segment_size'))")
            )
        assert position is not None and position % segment == 0
        deadline = time.monotonic() + 10
        while replicas.choose(position) is None:
            assert time.monotonic() < deadline, "the standby never reached the position"
            await anyio.sleep(0.05)
    finally:
        replicas.close()


def test_an_insert_position_just_past_a_page_header_is_the_boundary() -> None:
    block, segment = 8192, 16 * 1024 * 1024
    assert record_end(3 * segment + 40, block, segment) == 3 * segment
    assert record_end(3 * segment + 5 * block + 24, block, segment) == 3 * segment + 5 * block
    # Anywhere else the insert position is the last record's end as it is.
    assert record_end(3 * segment + 5 * block + 40, block, segment) == 3 * segment + 5 * block + 40
    assert record_end(3 * segment + 64, block, segment) == 3 * segment + 64


@pytest.mark.parametrize(
    "token",
    [
        "garbage", "0/16B3D48", "1a2b.AAAAAAAAAAAAAAAAAAAAAA", "ff" * 20 + ".x",
        "1.ä".encode("latin-1"),
    ],
)
async def test_a_malformed_or_forged_token_is_a_400_problem(
    routed: Routed, token: str | bytes
) -> None:
    response = await routed.client.get("/server", headers={HEADER: token})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert HEADER in response.json()["detail"]


async def test_an_empty_token_header_is_no_token(routed: Routed) -> None:
    # A client that has no token yet may still send its header template.
    for empty in ("", "  "):
        assert (await routed.client.get("/server", headers={HEADER: empty})).status_code == 200


async def test_a_token_signed_with_another_secret_is_refused(routed: Routed) -> None:
    forged = ConsistencyTokens(b"another-secret-0123456789abcdef").issue(1)
    response = await routed.client.get("/server", headers={HEADER: forged})
    assert response.status_code == 400


async def test_reads_move_to_the_primary_when_the_replica_stops_and_back_when_it_returns(
    routed: Routed, standby: Standby, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    statuses: list[int] = []
    served_by: list[tuple[float, bool]] = []
    stop_load = anyio.Event()

    async def reader() -> None:
        while not stop_load.is_set():
            response = await routed.client.get("/server")
            statuses.append(response.status_code)
            if response.status_code == 200:
                served_by.append((time.monotonic(), response.json()["standby"]))
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tasks:
        for _ in range(4):
            tasks.start_soon(reader)
        await anyio.sleep(0.5)
        stopped_at = time.monotonic()
        await anyio.to_thread.run_sync(standby.stop)
        await anyio.sleep(2.5)
        await anyio.to_thread.run_sync(standby.start)
        started_at = time.monotonic()
        deadline = started_at + 15
        while time.monotonic() < deadline:
            await anyio.sleep(0.2)
            if any(t > started_at and on_standby for t, on_standby in served_by):
                break
        stop_load.set()

    assert set(statuses) == {200}, f"not all 200: {sorted(set(statuses))}"
    before = [on for t, on in served_by if t < stopped_at]
    assert before and all(before)
    # Within 2 s of the stop, and until the restart, every read came from the primary.
    fallback = [on for t, on in served_by if stopped_at + 2 <= t < started_at - 0.1]
    assert fallback and not any(fallback)
    assert any(on for t, on in served_by if t > started_at), "the replica was not used again"
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) < 10, "warnings per state change, not per request"


async def test_health_of_replicas_is_reported(routed: Routed, standby: Standby) -> None:
    assert routed.replicas.status()["replicas"][0]["state"] == "ok"
    await anyio.to_thread.run_sync(standby.stop)
    deadline = time.monotonic() + 2
    while routed.replicas.status()["replicas"][0]["state"] == "ok":
        assert time.monotonic() < deadline, "the stopped replica was still reported ok"
        await anyio.sleep(0.05)
    assert routed.replicas.status()["replicas"][0]["state"] == "down"


async def test_sqlite_and_a_single_server_get_no_token(mode: Mode) -> None:
    app = mode.make_app(autocommit_methods=SAFE_METHODS)

    @app.post("/items/{name}")
    async def create(name: str) -> dict[str, str]:
        mode.add_item(name)
        await mode.flush()
        return {}

    async with client_for(app) as client:
        response = await client.post("/items/plain")
    assert response.status_code == 200
    assert HEADER not in response.headers


# A fast poll: hundreds of samples within max_lag (a history capped by count once made
# a replica look at most 512 polls behind, however far back it was).
@pytest.mark.parametrize(("max_lag", "poll_interval"), [(1.0, 0.1), (2.0, 0.001)])
async def test_a_replica_further_behind_than_max_lag_is_skipped_until_it_catches_up(
    mode: Mode, standby: Standby, engine: Engine, max_lag: float, poll_interval: float
) -> None:
    if mode.name == "sync":
        replica_engine: Any = create_engine(standby.url, isolation_level="AUTOCOMMIT")
    else:
        replica_engine = create_async_engine(async_url(standby.url), isolation_level="AUTOCOMMIT")
    replicas = Replicas(mode.engine, [replica_engine], max_lag=max_lag,
                        poll_interval=poll_interval)
    assert replicas.wait_until_polled()
    try:
        async with client_for(routed_app(mode, replicas)) as client:
            assert (await client.get("/server")).json() == {"standby": True}
            standby.pause_replay()
            await client.post("/items/makes-wal")  # WAL the paused standby will lack
            deadline = time.monotonic() + max_lag + 2
            while (await client.get("/server")).json()["standby"]:
                assert time.monotonic() < deadline, f"a replica {max_lag} s behind was read from"
                await anyio.sleep(0.05)
            assert replicas.status()["replicas"][0]["state"] == "lagging"
            standby.resume_replay()
            deadline = time.monotonic() + 5
            while not (await client.get("/server")).json()["standby"]:
                assert time.monotonic() < deadline, "the caught-up replica was not used again"
                await anyio.sleep(0.05)
    finally:
        replicas.close()
        await mode.dispose(replica_engine)


async def test_requests_spread_over_replicas_and_each_keeps_its_own(
    mode: Mode, standby: Standby
) -> None:
    # Two replica engines (both on the one standby here): each request reads all its
    # statements on one of them - the same connection - and requests alternate.
    if mode.name == "sync":
        engines: list[Any] = [create_engine(standby.url, isolation_level="AUTOCOMMIT")
                              for _ in range(2)]
    else:
        engines = [create_async_engine(async_url(standby.url), isolation_level="AUTOCOMMIT")
                   for _ in range(2)]
    replicas = Replicas(mode.engine, engines, poll_interval=0.1)
    assert replicas.wait_until_polled()
    app = routed_app(mode, replicas)
    backend = text("SELECT pg_backend_pid()")

    @app.get("/backends")
    async def backends() -> list[int]:
        return [await mode.scalar(backend), await mode.scalar(backend)]

    try:
        async with client_for(app) as client:
            pairs = [(await client.get("/backends")).json() for _ in range(6)]
    finally:
        replicas.close()
        for replica_engine in engines:
            await mode.dispose(replica_engine)
    assert all(first == second for first, second in pairs)
    assert len({first for first, _ in pairs}) == 2
