"""Units of work outside requests, nesting, and more than one database
(behaviours 8 and 9 of service.db), in both modes."""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi import FastAPI, HTTPException
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from service.db import MissingSessionError, create_engine
from service.items.models import Item
from tests.conftest import alembic_config
from tests.db.conftest import Mode, async_url, client_for, stored_names

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def second_database_url(
    migrated_url: str, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A second, migrated database beside the test database."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('second') / 'second.db'}"
    else:
        main = make_url(migrated_url)
        name = f"{main.database}_second"
        admin = create_engine(main, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = main.set(database=name).render_as_string(hide_password=False)
    command.upgrade(alembic_config(url), "head")
    return url


@pytest.fixture
def second_engine(second_database_url: str) -> Iterator[Engine]:
    engine = create_engine(second_database_url)
    yield engine
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM items"))
    engine.dispose()


@pytest.fixture
async def second_mode_engine(
    mode: Mode, second_database_url: str, second_engine: Engine
) -> AsyncIterator[Any]:
    """The second database for this mode's middleware (its rows are read on `second_engine`)."""
    if mode.name == "sync":
        yield second_engine
        return
    engine = mode.engine_for(second_database_url)
    yield engine
    await mode.dispose(engine)


SCRIPTS = {
    "sync": (
        "import sys\n"
        "from decimal import Decimal\n"
        "from service.db import db\n"
        "from service.items.models import Item\n"
        "db.configure(sys.argv[1])\n"
        "with db():\n"
        "    db.session.add(Item(name='from a script', price=Decimal('2.50')))\n"
    ),
    "async": (
        "import asyncio, sys\n"
        "from decimal import Decimal\n"
        "from service.db.asyncio import db\n"
        "from service.items.models import Item\n"
        "async def main():\n"
        "    db.configure(sys.argv[1])\n"
        "    async with db():\n"
        "        db.session.add(Item(name='from a script', price=Decimal('2.50')))\n"
        "    await db.dispose()\n"
        "asyncio.run(main())\n"
    ),
}


async def test_with_db_works_in_a_script_before_any_app_exists(
    mode: Mode, migrated_url: str, engine: Engine
) -> None:
    url = async_url(migrated_url) if mode.name == "async" else migrated_url
    subprocess.run([sys.executable, "-c", SCRIPTS[mode.name], url], check=True, cwd=ROOT)
    assert stored_names(engine) == {"from a script"}


def scripts_database(mode: Mode) -> Any:
    """A `Database` of this mode of its own, configured with the test engine."""
    return mode.own_database("scripts")


async def test_with_db_commits_on_exit(mode: Mode, engine: Engine) -> None:
    scripts_db = scripts_database(mode)
    async with mode.block(scripts_db) as opened:
        assert opened is scripts_db
        mode.add_item("lamp", scripts_db)
    assert stored_names(engine) == {"lamp"}
    assert mode.checked_out() == 0


async def test_with_db_rolls_back_on_exception(mode: Mode, engine: Engine) -> None:
    scripts_db = scripts_database(mode)
    with pytest.raises(ZeroDivisionError):
        async with mode.block(scripts_db):
            mode.add_item("lamp", scripts_db)
            await mode.flush(scripts_db)
            1 / 0  # noqa: B018
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_with_db_commit_on_exit_false_keeps_only_explicit_commits(
    mode: Mode, engine: Engine
) -> None:
    scripts_db = scripts_database(mode)
    async with mode.block(scripts_db, commit_on_exit=False):
        mode.add_item("committed", scripts_db)
        await mode.commit(scripts_db)
        mode.add_item("forgotten", scripts_db)
    assert stored_names(engine) == {"committed"}


async def test_nested_with_db_reuses_the_outer_session(mode: Mode, engine: Engine) -> None:
    scripts_db = scripts_database(mode)
    async with mode.block(scripts_db):
        outer = scripts_db.session
        async with mode.block(scripts_db):
            assert scripts_db.session is outer
            mode.add_item("inner", scripts_db)
        # The inner block did not end the unit of work: nothing committed yet.
        assert stored_names(engine) == set()
        assert scripts_db.session is outer
    assert stored_names(engine) == {"inner"}


async def test_nested_with_db_cannot_change_session_args(mode: Mode) -> None:
    scripts_db = scripts_database(mode)
    async with mode.block(scripts_db):
        with pytest.raises(ValueError, match="independent=True"):
            async with mode.block(scripts_db, session_args={"expire_on_commit": False}):
                pass


async def test_nested_with_db_cannot_hold_back_the_commit(mode: Mode, engine: Engine) -> None:
    # Joined, the block's work would be committed with the outer unit's: refused, not
    # committed behind the back of code that meant to commit (or not) itself.
    scripts_db = scripts_database(mode)
    async with mode.block(scripts_db):
        mode.add_item("outer", scripts_db)
        with pytest.raises(ValueError, match="independent=True"):
            async with mode.block(scripts_db, commit_on_exit=False):
                pass
    assert stored_names(engine) == {"outer"}
    app = mode.make_app()

    @app.post("/dry-run/{name}")
    async def dry_run(name: str) -> None:
        async with mode.block(commit_on_exit=False):
            mode.add_item(name)

    async with client_for(app, raise_app_exceptions=False) as client:
        assert (await client.post("/dry-run/lamp")).status_code == 500
    assert stored_names(engine) == {"outer"}
    # Where the open unit does not commit either, the two agree: joined, nothing stored.
    async with (mode.block(scripts_db, commit_on_exit=False),
                mode.block(scripts_db, commit_on_exit=False)):
        mode.add_item("neither", scripts_db)
    assert stored_names(engine) == {"outer"}


async def test_nested_with_db_cannot_commit_what_the_open_scope_holds_back(
    mode: Mode, engine: Engine
) -> None:
    """The other way round: `commit_on_exit=True` asked inside a scope that does not commit
    on exit (a script's, or a request under a `commit_on_exit=False` middleware, as
    fastapi-sqlalchemy's users keep it) would lose its writes without a word: refused."""
    scripts_db = scripts_database(mode)
    async with mode.block(scripts_db, commit_on_exit=False):
        with pytest.raises(ValueError, match="independent=True"):
            async with mode.block(scripts_db, commit_on_exit=True):
                pass
        # Not asked for, the block joins: its work is the open scope's to commit.
        async with mode.block(scripts_db):
            mode.add_item("joined", scripts_db)
        await mode.commit(scripts_db)
        async with mode.block(scripts_db, independent=True):
            mode.add_item("own", scripts_db)
    assert stored_names(engine) == {"joined", "own"}
    app = mode.make_app(commit_on_exit=False)

    @app.post("/saved/{name}")
    async def saved(name: str) -> None:
        async with mode.block(commit_on_exit=True):
            mode.add_item(name)

    @app.post("/audited/{name}")
    async def audited(name: str) -> None:
        async with mode.block(independent=True):
            mode.add_item(name)

    async with client_for(app, raise_app_exceptions=False) as client:
        assert (await client.post("/saved/lamp")).status_code == 500
        assert (await client.post("/audited/vase")).status_code == 200
    assert stored_names(engine) == {"joined", "own", "vase"}


async def test_independent_scope_has_its_own_transaction(mode: Mode, engine: Engine) -> None:
    scripts_db = scripts_database(mode)
    with pytest.raises(RuntimeError):
        async with mode.block(scripts_db):
            outer = scripts_db.session
            mode.add_item("main work", scripts_db)
            async with mode.block(scripts_db, independent=True):
                assert scripts_db.session is not outer
                mode.add_item("audit", scripts_db)
            assert scripts_db.session is outer
            raise RuntimeError("main work fails")
    assert stored_names(engine) == {"audit"}


async def test_with_db_inside_a_request_joins_the_request(mode: Mode, engine: Engine) -> None:
    app = mode.make_app()
    sessions: list[bool] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        request_session = mode.database.session
        async with mode.block():
            sessions.append(mode.database.session is request_session)
            mode.add_item(name)
        if name == "refused":
            raise HTTPException(status_code=400)

    async with client_for(app) as client:
        await client.post("/items/kept")
        await client.post("/items/refused")
    assert sessions == [True, True]
    # The inner block's write belongs to the request: committed or rolled back with it.
    assert stored_names(engine) == {"kept"}


async def test_independent_scope_inside_a_request_uses_the_requests_engine_and_survives_its_rollback(  # noqa: E501
    mode: Mode, engine: Engine, second_mode_engine: Any, second_engine: Engine
) -> None:
    """The app serves the second database; `db`'s default (outside requests) is the first.
    The independent block belongs with the request, so it writes to the second."""
    mode.database.configure(mode.engine)
    app = mode.make_app(custom_engine=second_mode_engine)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        async with mode.block(independent=True):
            mode.add_item(f"attempt-{name}")
        raise HTTPException(status_code=400)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 400
    assert stored_names(second_engine) == {"attempt-lamp"}
    assert stored_names(engine) == set()


async def test_a_task_that_outlives_its_request_opens_a_scope_of_its_own(
    mode: Mode, engine: Engine, second_mode_engine: Any, second_engine: Engine
) -> None:
    """`asyncio.create_task` from a route copies the request's context, ended unit and all:
    a block the task opens after the request ended must not join that closed session (as
    fastapi-async-sqlalchemy opens a new one). It opens its own, on the request's engine."""
    mode.database.configure(mode.engine)
    app = mode.make_app(custom_engine=second_mode_engine)
    request_done = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def later(name: str) -> None:
        await request_done.wait()
        async with mode.block():
            mode.add_item(name)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        tasks.append(asyncio.create_task(later(f"later-{name}")))

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    request_done.set()
    await asyncio.gather(*tasks)
    assert stored_names(second_engine) == {"lamp", "later-lamp"}
    assert stored_names(engine) == set()
    assert mode.checked_out() == 0


async def test_a_task_that_outlives_its_request_has_no_session_outside_a_block(
    mode: Mode,
) -> None:
    """Its `db.session` and `db.on_commit` are not the request's (ended, closed): they
    raise as anywhere outside a scope, instead of a closed session or a hook never run."""
    app = mode.make_app()
    request_done = asyncio.Event()
    outcomes: list[str] = []

    async def later() -> None:
        await request_done.wait()
        for use in (lambda: mode.database.session, lambda: mode.database.on_commit(print)):
            try:
                use()
                outcomes.append("used")
            except MissingSessionError:
                outcomes.append("MissingSessionError")

    tasks: list[asyncio.Task[None]] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        tasks.append(asyncio.create_task(later()))

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    request_done.set()
    await asyncio.gather(*tasks)
    assert outcomes == ["MissingSessionError", "MissingSessionError"]


async def test_two_apps_with_two_databases_keep_to_their_own(
    mode: Mode, engine: Engine, second_mode_engine: Any, second_engine: Engine
) -> None:
    def build(bind: Any) -> FastAPI:
        app = mode.make_app(custom_engine=bind)

        @app.post("/items/{name}")
        async def create(name: str) -> None:
            mode.add_item(name)

        return app

    first, second = build(mode.engine), build(second_mode_engine)
    async with client_for(first) as one, client_for(second) as two:
        # Interleaved, and the second app built (lazily) after the first served.
        assert (await one.post("/items/first-1")).status_code == 200
        assert (await two.post("/items/second-1")).status_code == 200
        assert (await one.post("/items/first-2")).status_code == 200
    assert stored_names(engine) == {"first-1", "first-2"}
    assert stored_names(second_engine) == {"second-1"}


async def test_each_databases_server_timing_counts_its_own_statements(
    mode: Mode, second_mode_engine: Any
) -> None:
    """Two databases of one mode in one request (two middlewares): each entry counts the
    statements on its own database - one on `db`, three on `reports`."""
    reports = mode.database_class("reports")
    app = mode.make_app()
    app.add_middleware(mode.middleware, custom_engine=second_mode_engine, database=reports)

    @app.get("/both")
    async def both() -> None:
        await mode.scalar(select(Item.id))
        for _ in range(3):
            await mode.scalar(select(Item.id), database=reports)

    async with client_for(app) as client:
        response = await client.get("/both")
    counts = sorted(entry.split('desc="')[1].split(" ")[0]
                    for entry in response.headers.get_list("server-timing"))
    assert counts == ["1", "3"]


async def test_one_app_reaches_a_second_database_through_a_second_database_object(
    mode: Mode, engine: Engine, second_mode_engine: Any, second_engine: Engine
) -> None:
    reports = mode.database_class("reports")
    app = mode.make_app()
    app.add_middleware(mode.middleware, custom_engine=second_mode_engine, database=reports)

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        mode.add_item(name)
        mode.add_item(f"report-{name}", reports)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp"}
    assert stored_names(second_engine) == {"report-lamp"}
    assert mode.checked_out() == 0 and second_engine.pool.checkedout() == 0


async def test_configure_replaces_the_default_but_a_middleware_never_does(
    mode: Mode, second_mode_engine: Any
) -> None:
    jobs = mode.database_class("jobs")
    jobs.configure(mode.engine)
    mode.middleware(FastAPI(), custom_engine=second_mode_engine, database=jobs)
    assert jobs.engine is mode.engine
    jobs.configure(second_mode_engine)
    assert jobs.engine is second_mode_engine


async def test_first_middleware_becomes_the_default_of_an_unconfigured_database(
    mode: Mode, second_mode_engine: Any
) -> None:
    jobs = mode.database_class("jobs")
    mode.middleware(FastAPI(), custom_engine=mode.engine, database=jobs)
    mode.middleware(FastAPI(), custom_engine=second_mode_engine, database=jobs)
    async with mode.block(jobs):
        assert isinstance(jobs.session, Session if mode.name == "sync" else AsyncSession)
        bind = jobs.session.get_bind()
        assert bind is mode.pool_engine


async def test_a_sync_and_an_async_session_in_one_request_are_two_transactions(
    engine: Engine, async_engine: Any, backend: str
) -> None:
    """Both middlewares on one app: `service.db.db.session` and
    `service.db.asyncio.db.session` are two sessions on two connections, each committed or
    rolled back by its own middleware - two transactions, with no atomicity between them."""
    from service.db import DBSessionMiddleware, db
    from service.db import asyncio as async_mode
    from tests.db.conftest import add_item

    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine)
    app.add_middleware(async_mode.DBSessionMiddleware, custom_engine=async_engine)
    seen: list[set[str]] = []

    @app.post("/items/{name}")
    async def create(name: str) -> None:
        add_item(f"{name}-async", async_mode.db)
        await async_mode.db.session.flush()
        # The sync session is another connection: the async insert is not committed yet.
        seen.append(set(db.session.scalars(select(Item.name))))
        if backend == "postgresql":  # SQLite lets one transaction write at a time
            add_item(f"{name}-sync")
        if name == "refused":
            raise HTTPException(status_code=400)

    async with client_for(app) as client:
        assert (await client.post("/items/kept")).status_code == 200
        assert (await client.post("/items/refused")).status_code == 400
    assert seen == [set(), {"kept-async", "kept-sync"} if backend == "postgresql" else {
        "kept-async"
    }]
    expected = {"kept-async", "kept-sync"} if backend == "postgresql" else {"kept-async"}
    assert stored_names(engine) == expected
    assert engine.pool.checkedout() == 0 and async_engine.sync_engine.pool.checkedout() == 0


async def test_a_db_of_the_other_mode_says_which_middleware_and_block_it_needs(
    engine: Engine, async_engine: Any
) -> None:
    """The two `db` objects share a name: an error must say which package's is missing."""
    from service.db import Database, DBSessionMiddleware, SessionNotInitialisedError
    from service.db import asyncio as async_mode

    sync_db, async_db = Database("mixed"), async_mode.Database("mixed")
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine, database=sync_db)
    errors: list[str] = []

    @app.get("/")
    async def read() -> None:
        try:
            _ = async_db.session
        except SessionNotInitialisedError as exc:
            errors.append(str(exc))

    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
    assert "add service.db.asyncio.DBSessionMiddleware(app" in errors[0]

    async_db.configure(async_engine)
    with pytest.raises(MissingSessionError) as missing:
        _ = async_db.session
    assert "add service.db.asyncio.DBSessionMiddleware to the app" in str(missing.value)
    with pytest.raises(TypeError, match=r"open it with `async with mixed\(\):`"), async_db():
        pass
    with pytest.raises(TypeError, match=r"open it with `with mixed\(\):`"):
        async with sync_db():
            pass
