"""`python -m service seed --items N`: adds N plausible items, again on every run."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from service.cli import main
from service.db import create_engine
from tests.items.helpers import stored


@pytest.fixture
def database_env(monkeypatch: pytest.MonkeyPatch, migrated_url: str) -> None:
    """The CLI reads DATABASE_URL like the app does."""
    monkeypatch.setenv("DATABASE_URL", migrated_url)


@pytest.mark.usefixtures("database_env")
def test_seed_inserts_n_items_and_reports_progress(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["seed", "--items", "250", "--batch", "100"]) == 0

    rows = list(stored(engine).values())
    assert len(rows) == 250
    assert len({row["name"].lower() for row in rows}) == 250
    assert all(Decimal("0.50") <= row["price"] <= Decimal("2000.00") for row in rows)
    assert all(row["price"] == row["price"].quantize(Decimal("0.01")) for row in rows)
    assert len({row["description"] for row in rows}) > 50
    assert 10 <= sum(row["description"] is None for row in rows) <= 60  # one in eight
    # "<style> <material> <thing> <run token>-<number>", numbered 1..N within the run.
    assert sorted(int(row["name"].rsplit("-", 1)[1]) for row in rows) == list(range(1, 251))
    assert len({row["name"].rsplit(" ", 1)[1].split("-")[0] for row in rows}) == 1
    assert all(len(row["name"].split()) >= 4 for row in rows)
    now = datetime.now(UTC)
    assert all(now - timedelta(days=366) <= row["created_at"] <= now for row in rows)
    assert all(row["updated_at"] == row["created_at"] for row in rows)
    assert all(row["version"] == 1 for row in rows)
    assert {(row["created_by"], row["updated_by"]) for row in rows} == {("cli:seed", "cli:seed")}
    output = capsys.readouterr()
    assert "250/250 (100%)" in output.err
    assert "Inserted 250 items" in output.out


@pytest.mark.usefixtures("database_env")
def test_seeding_again_adds_as_many_more_without_name_clashes(engine: Engine) -> None:
    assert main(["seed", "--items", "120", "--batch", "50"]) == 0
    assert main(["seed", "--items", "120", "--batch", "50"]) == 0

    assert len(stored(engine)) == 240
    # Whichever way the rows went in, they say who made them.
    assert {row["created_by"] for row in stored(engine).values()} == {"cli:seed"}


@pytest.mark.usefixtures("database_env")  # a check that let one through seeds the test db
@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["--items", "0"], "argument --items: must be at least 1"),
        (["--items", "ten"], "argument --items"),
        (["--items", "10", "--batch", "0"], "argument --batch: must be at least 1"),
        (["--items", "10", "--writers", "0"], "argument --writers: must be at least 1"),
        (["--batch", "5"], "the following arguments are required: --items"),
    ],
)
def test_seed_refuses_bad_arguments_and_says_which(
    engine: Engine, capsys: pytest.CaptureFixture[str], args: list[str], refused: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["seed", *args])

    assert exit_info.value.code == 2
    assert refused in capsys.readouterr().err
    assert stored(engine) == {}


@pytest.mark.usefixtures("database_env")
def test_seeding_keeps_every_index_and_the_unique_name_rule(engine: Engine) -> None:
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import IntegrityError

    # 200 into an empty table rebuilds the indexes on PostgreSQL; 50 more, into a table
    # that holds more than that, goes in with the indexes in place.
    assert main(["seed", "--items", "200", "--batch", "64"]) == 0
    assert main(["seed", "--items", "50", "--batch", "64"]) == 0

    fresh = create_engine(engine.url)  # pooled connections may cache the old schema
    try:
        # (SQLite does not reflect the expression index; the INSERT below proves it.)
        names = {index["name"] for index in inspect(fresh).get_indexes("items")}
        assert {"ix_items_name_id", "ix_items_price_id", "ix_items_created_at_id"} <= names
        with pytest.raises(IntegrityError), fresh.begin() as connection:
            taken = connection.execute(text("SELECT name FROM items LIMIT 1")).scalar_one()
            connection.execute(
                text("INSERT INTO items (name, price) VALUES (:n, 1)"), {"n": taken.upper()}
            )
    finally:
        fresh.dispose()
    assert len(stored(engine)) == 250


@pytest.mark.usefixtures("database_env")
def test_a_seed_failing_halfway_keeps_only_whole_batches(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.items import seed_dao

    batches = 0

    def third_batch_fails(original: Any) -> Any:
        def insert(*args: Any, **kwargs: Any) -> None:
            nonlocal batches
            batches += 1
            if batches == 3:
                raise RuntimeError("the disk is full")
            original(*args, **kwargs)

        return insert

    monkeypatch.setattr(seed_dao, "insert_made_up", third_batch_fails(seed_dao.insert_made_up))
    monkeypatch.setattr(seed_dao, "insert_many", third_batch_fails(seed_dao.insert_many))

    with pytest.raises(RuntimeError, match="disk is full"):
        main(["seed", "--items", "500", "--batch", "100"])

    if engine.dialect.name == "postgresql":
        # Into an empty table: one transaction, indexes dropped and rebuilt - all or nothing.
        assert stored(engine) == {}
    else:
        assert len(stored(engine)) == 200  # each batch its own transaction


@pytest.mark.usefixtures("database_env")
@pytest.mark.parametrize("online", [False, True])
def test_an_online_seed_leaves_the_table_usable_between_its_batches(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, online: bool
) -> None:
    """A service reading the table while it is seeded: after each batch, a reader that
    waits at most 0.3 s for a lock counts the items."""
    import service.cli

    seen: list[int | str] = []

    def read_after_each_batch(done: int, total: int, started: float) -> None:
        try:
            with engine.connect() as connection:
                if engine.dialect.name == "postgresql":
                    connection.execute(text("SET lock_timeout = '300ms'"))
                seen.append(int(connection.scalar(text("SELECT count(*) FROM items"))))
        except OperationalError:
            seen.append("waited")

    monkeypatch.setattr(service.cli, "_progress", read_after_each_batch)
    assert main(["seed", "--items", "300", "--batch", "100", *(["--online"] * online)]) == 0
    if online or engine.dialect.name != "postgresql":
        # Each batch committed, readable at once (later ones may be in already: writers).
        assert all(isinstance(n, int) and n >= 100 * i for i, n in enumerate(seen, 1)), seen
        assert len(seen) == 3
    else:  # the bulk load: one transaction holding the table
        assert seen == ["waited"] * 3
    assert len(stored(engine)) == 300
