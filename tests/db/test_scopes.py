"""Units of work outside requests, nesting, and more than one database
(behaviours 8 and 9 of service.db)."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from fastapi import FastAPI, HTTPException
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.db import Database, DBSessionMiddleware, create_engine, db
from tests.conftest import alembic_config
from tests.db.conftest import MakeApp, add_item, client_for, stored_names

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


def test_with_db_works_in_a_script_before_any_app_exists(
    migrated_url: str, engine: Engine
) -> None:
    script = (
        "import sys\n"
        "from decimal import Decimal\n"
        "from service.db import db\n"
        "from service.items.models import Item\n"
        "db.configure(sys.argv[1])\n"
        "with db():\n"
        "    db.session.add(Item(name='from a script', price=Decimal('2.50')))\n"
    )
    subprocess.run([sys.executable, "-c", script, migrated_url], check=True, cwd=ROOT)
    assert stored_names(engine) == {"from a script"}


def test_with_db_commits_on_exit(engine: Engine) -> None:
    scripts_db = Database("scripts")
    scripts_db.configure(engine)
    with scripts_db() as opened:
        assert opened is scripts_db
        add_item("lamp", scripts_db)
    assert stored_names(engine) == {"lamp"}
    assert engine.pool.checkedout() == 0


def test_with_db_rolls_back_on_exception(engine: Engine) -> None:
    scripts_db = Database("scripts")
    scripts_db.configure(engine)
    with pytest.raises(ZeroDivisionError), scripts_db():
        add_item("lamp", scripts_db)
        scripts_db.session.flush()
        1 / 0  # noqa: B018
    assert stored_names(engine) == set()
    assert engine.pool.checkedout() == 0


def test_with_db_commit_on_exit_false_keeps_only_explicit_commits(engine: Engine) -> None:
    scripts_db = Database("scripts")
    scripts_db.configure(engine)
    with scripts_db(commit_on_exit=False):
        add_item("committed", scripts_db)
        scripts_db.session.commit()
        add_item("forgotten", scripts_db)
    assert stored_names(engine) == {"committed"}


def test_nested_with_db_reuses_the_outer_session(engine: Engine) -> None:
    scripts_db = Database("scripts")
    scripts_db.configure(engine)
    with scripts_db():
        outer = scripts_db.session
        with scripts_db():
            assert scripts_db.session is outer
            add_item("inner", scripts_db)
        # The inner block did not end the unit of work: nothing committed yet.
        assert stored_names(engine) == set()
        assert scripts_db.session is outer
    assert stored_names(engine) == {"inner"}


def test_nested_with_db_cannot_change_session_args(engine: Engine) -> None:
    scripts_db = Database("scripts")
    scripts_db.configure(engine)
    with (
        scripts_db(),
        pytest.raises(ValueError, match="independent=True"),
        scripts_db(session_args={"expire_on_commit": False}),
    ):
        pass


def test_independent_scope_has_its_own_transaction(engine: Engine) -> None:
    scripts_db = Database("scripts")
    scripts_db.configure(engine)
    with pytest.raises(RuntimeError), scripts_db():
        outer = scripts_db.session
        add_item("main work", scripts_db)
        with scripts_db(independent=True):
            assert scripts_db.session is not outer
            add_item("audit", scripts_db)
        assert scripts_db.session is outer
        raise RuntimeError("main work fails")
    assert stored_names(engine) == {"audit"}


async def test_with_db_inside_a_request_joins_the_request(
    make_app: MakeApp, engine: Engine
) -> None:
    app = make_app()
    sessions: list[bool] = []

    @app.post("/items/{name}")
    def create(name: str) -> None:
        request_session = db.session
        with db():
            sessions.append(db.session is request_session)
            add_item(name)
        if name == "refused":
            raise HTTPException(status_code=400)

    async with client_for(app) as client:
        await client.post("/items/kept")
        await client.post("/items/refused")
    assert sessions == [True, True]
    # The inner block's write belongs to the request: committed or rolled back with it.
    assert stored_names(engine) == {"kept"}


async def test_independent_scope_inside_a_request_survives_its_rollback(
    make_app: MakeApp, engine: Engine
) -> None:
    app = make_app()

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        with db(independent=True):
            add_item(f"attempt-{name}")
        raise HTTPException(status_code=400)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 400
    assert stored_names(engine) == {"attempt-lamp"}


async def test_two_apps_with_two_databases_keep_to_their_own(
    engine: Engine, second_engine: Engine
) -> None:
    def build(bind: Engine) -> FastAPI:
        app = FastAPI()
        app.add_middleware(DBSessionMiddleware, custom_engine=bind)

        @app.post("/items/{name}")
        def create(name: str) -> str:
            add_item(name)
            return str(db.session.get_bind().url)

        return app

    first, second = build(engine), build(second_engine)
    async with client_for(first) as one, client_for(second) as two:
        # Interleaved, and the second app built (lazily) after the first served.
        assert (await one.post("/items/first-1")).status_code == 200
        assert (await two.post("/items/second-1")).status_code == 200
        assert (await one.post("/items/first-2")).status_code == 200
    assert stored_names(engine) == {"first-1", "first-2"}
    assert stored_names(second_engine) == {"second-1"}


async def test_one_app_reaches_a_second_database_through_a_second_database_object(
    engine: Engine, second_engine: Engine
) -> None:
    reports = Database("reports")
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, custom_engine=engine)
    app.add_middleware(DBSessionMiddleware, custom_engine=second_engine, database=reports)

    @app.post("/items/{name}")
    def create(name: str) -> None:
        add_item(name)
        add_item(f"report-{name}", reports)

    async with client_for(app) as client:
        assert (await client.post("/items/lamp")).status_code == 200
    assert stored_names(engine) == {"lamp"}
    assert stored_names(second_engine) == {"report-lamp"}
    assert engine.pool.checkedout() == 0 and second_engine.pool.checkedout() == 0


def test_configure_replaces_the_default_but_a_middleware_never_does(
    engine: Engine, second_engine: Engine
) -> None:
    jobs = Database("jobs")
    jobs.configure(engine)
    DBSessionMiddleware(FastAPI(), custom_engine=second_engine, database=jobs)
    assert jobs.engine is engine
    jobs.configure(second_engine)
    assert jobs.engine is second_engine


def test_first_middleware_becomes_the_default_of_an_unconfigured_database(
    engine: Engine, second_engine: Engine
) -> None:
    jobs = Database("jobs")
    DBSessionMiddleware(FastAPI(), custom_engine=engine, database=jobs)
    DBSessionMiddleware(FastAPI(), custom_engine=second_engine, database=jobs)
    with jobs():
        assert isinstance(jobs.session, Session)
        assert jobs.session.get_bind() is engine

