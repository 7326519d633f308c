"""`python -m service seed --items N`: adds N plausible items, again on every run."""

from decimal import Decimal

import pytest
from sqlalchemy import Engine

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
    assert all(row["created_at"].tzinfo is not None for row in rows)
    assert all(row["version"] == 1 for row in rows)
    output = capsys.readouterr()
    assert "250/250 (100%)" in output.err
    assert "Inserted 250 items" in output.out


@pytest.mark.usefixtures("database_env")
def test_seeding_again_adds_as_many_more_without_name_clashes(engine: Engine) -> None:
    assert main(["seed", "--items", "120", "--batch", "50"]) == 0
    assert main(["seed", "--items", "120", "--batch", "50"]) == 0

    assert len(stored(engine)) == 240


@pytest.mark.parametrize("args", [["--items", "0"], ["--items", "ten"], ["--batch", "5"]])
def test_seed_refuses_bad_arguments(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["seed", *args])

    assert exit_info.value.code == 2


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
