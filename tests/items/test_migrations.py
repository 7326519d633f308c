"""The items migrations go down and up cleanly, with rows present, and the models match
them exactly.

The round trip runs on the suite's own database and ends migrated to head again, as
every other test expects.
"""

import re
from typing import Any

import pytest
import sqlalchemy
from alembic import command
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError

from service.db import create_engine
from tests.conftest import alembic_config
from tests.items.helpers import insert_items, stored


def columns(url: str, table: str = "items") -> list[str]:
    engine = create_engine(url)
    try:
        return [column["name"] for column in inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


def schema(url: str) -> dict[str, set[str]]:
    """Tables and their index names, as a new connection sees them (pooled SQLite
    connections may keep an older picture of the schema)."""
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        return {
            table: {index["name"] or "" for index in inspector.get_indexes(table)}
            for table in inspector.get_table_names()
        }
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_to_head_again(engine: Engine, migrated_url: str) -> None:
    config = alembic_config(migrated_url)
    try:
        command.downgrade(config, "base")
        assert "items" not in schema(migrated_url)
    finally:
        command.upgrade(config, "head")

    indexes = schema(migrated_url)["items"]
    assert {"ix_items_name_id", "ix_items_price_id", "ix_items_created_at_id"} <= indexes
    # The case-insensitive unique index is back (SQLite cannot reflect it: try it instead).
    insert_items(engine, {"name": "Lamp", "price": 1})
    with pytest.raises(IntegrityError):
        insert_items(engine, {"name": "LAMP", "price": 1})


def test_created_by_and_updated_by_come_and_go_with_the_rows_kept(
    engine: Engine, migrated_url: str
) -> None:
    config = alembic_config(migrated_url)
    try:
        command.downgrade(config, "0001")
        assert "created_by" not in columns(migrated_url)
        with engine.begin() as connection:  # rows written before who-changed-what
            connection.execute(text(
                "INSERT INTO items (name, price, version) "
                "VALUES ('Lamp', 9.90, 3), ('Rug', 120.00, 1)"
            ))

        command.upgrade(config, "0002")
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT name, version, created_by, updated_by FROM items ORDER BY name"
            )).all()
        assert [tuple(row) for row in rows] == [
            ("Lamp", 3, "unknown", "unknown"), ("Rug", 1, "unknown", "unknown"),
        ]
        with engine.begin() as connection:
            connection.execute(text("UPDATE items SET updated_by = 'alice' WHERE name = 'Rug'"))

        command.downgrade(config, "0001")
        assert {"created_by", "updated_by"}.isdisjoint(columns(migrated_url))
        with engine.connect() as connection:
            kept = connection.execute(text("SELECT name, version FROM items ORDER BY name"))
            assert [tuple(row) for row in kept] == [("Lamp", 3), ("Rug", 1)]
    finally:
        command.upgrade(config, "head")
    # The unique lower(name) index survived both ways (SQLite cannot reflect it: try it).
    with pytest.raises(IntegrityError):
        insert_items(engine, {"name": "LAMP", "price": 1})


def test_revision_0005_keeps_every_row_and_id_and_never_reuses_one_after(
    engine: Engine, migrated_url: str
) -> None:
    config = alembic_config(migrated_url)
    try:
        command.downgrade(config, "0004")
        ids = insert_items(engine, *({"name": f"Lamp {n}", "price": n} for n in range(3)))
        before = stored(engine)
        command.upgrade(config, "0005")
        assert stored(engine) == before
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM items WHERE id = :id"), {"id": ids[-1]})
        [new_id] = insert_items(engine, {"name": "Rug", "price": 5})
        assert new_id > ids[-1]
        command.downgrade(config, "0004")  # and back, rows kept
        assert set(stored(engine)) == {*ids[:-1], new_id}
    finally:
        command.upgrade(config, "head")
    with pytest.raises(IntegrityError):  # the unique name index came back each way
        insert_items(engine, {"name": "RUG", "price": 1})


def test_revision_0006_composes_the_names_stored_before(
    engine: Engine, migrated_url: str) -> None:
    config = alembic_config(migrated_url)
    try:
        command.downgrade(config, "0005")
        insert_items(engine, {"name": "Cafe\u0301 au lait", "price": 1},
                     {"name": "Lamp", "price": 2})
        command.upgrade(config, "0006")
        assert sorted(row["name"] for row in stored(engine).values()) == [
            "Café au lait", "Lamp"
        ]
        with pytest.raises(IntegrityError):  # now one name with its composed twin
            insert_items(engine, {"name": "CAFÉ AU LAIT", "price": 3})
    finally:
        command.upgrade(config, "head")


def test_names_equal_once_composed_stop_revision_0006_listed(
    engine: Engine, migrated_url: str
) -> None:
    config = alembic_config(migrated_url)
    try:
        command.downgrade(config, "0005")
        insert_items(engine, {"name": "Café", "price": 1}, {"name": "CAFE\u0301", "price": 2})
        with pytest.raises(RuntimeError, match="equal once composed") as refused:
            command.upgrade(config, "0006")
        assert "Caf\\xe9" in str(refused.value) and "CAFE\\u0301" in str(refused.value)
        assert sorted(row["name"] for row in stored(engine).values()) == ["CAFE\u0301", "Café"]
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM items"))
    finally:
        command.upgrade(config, "head")


@pytest.mark.filterwarnings(
    # SQLite cannot reflect the lower(name) index, so it is left out of the comparison
    # there; the PostgreSQL pass compares it.
    "ignore:autogenerate skipping metadata-specified expression-based index"
)
def test_the_models_and_the_migrations_agree(migrated_url: str) -> None:
    # Raises AutogenerateDiffsDetected, listing the differences, if a model changed
    # without a migration.
    command.check(alembic_config(migrated_url))


def insert_as_before_0004(url: str, row: dict[str, Any]) -> None:
    """Insert `row` through an engine with SQLite's own lower(), as before revision 0004."""
    plain = sqlalchemy.create_engine(url)
    try:
        insert_items(plain, row)
    finally:
        plain.dispose()


def test_names_equal_but_for_the_case_of_any_letter_are_one_name(
    engine: Engine, migrated_url: str
) -> None:
    # Before revision 0004 SQLite's lower() folded A-Z only; an index entry written then
    # must now clash with the same name in another case.
    config = alembic_config(migrated_url)
    try:
        command.downgrade(config, "0003")
        insert_as_before_0004(migrated_url, {"name": "Émile lamp", "price": 1})
    finally:
        command.upgrade(config, "head")

    with pytest.raises(IntegrityError):
        insert_items(engine, {"name": "émile LAMP", "price": 1})
    insert_items(engine, {"name": "İstanbul", "price": 1})
    with pytest.raises(IntegrityError):
        insert_items(engine, {"name": "istanbul", "price": 1})


def test_names_equal_once_case_is_ignored_never_both_pass_revision_0004(
    engine: Engine, migrated_url: str
) -> None:
    config = alembic_config(migrated_url)
    command.downgrade(config, "0003")
    try:
        insert_as_before_0004(migrated_url, {"name": "Émile lamp", "price": 1})
        if engine.dialect.name != "sqlite":
            # PostgreSQL's lower() folded every letter already: one name before 0004 too.
            with pytest.raises(IntegrityError):
                insert_as_before_0004(migrated_url, {"name": "émile lamp", "price": 1})
            return
        # SQLite's own lower() did not: two names, which the upgrade names and refuses.
        insert_as_before_0004(migrated_url, {"name": "émile lamp", "price": 1})
        with pytest.raises(RuntimeError, match=re.escape("Émile lamp | émile lamp")):
            command.upgrade(config, "head")
    finally:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM items"))
        command.upgrade(config, "head")


def test_a_program_without_the_services_engine_cannot_store_a_clashing_name(
    engine: Engine, migrated_url: str
) -> None:
    insert_items(engine, {"name": "Émile lamp", "price": 1})
    plain = sqlalchemy.create_engine(migrated_url)  # e.g. the sqlite3 shell, another tool
    try:
        # PostgreSQL's index refuses it; SQLite's needs fold_case(), which such a program
        # lacks: it fails plainly, rather than writing index entries the app disagrees with.
        with pytest.raises((IntegrityError, OperationalError)) as refused:
            insert_items(plain, {"name": "émile LAMP", "price": 1})
        if engine.dialect.name == "sqlite":
            assert "fold_case" in str(refused.value)
    finally:
        plain.dispose()
    assert [row["name"] for row in stored(engine).values()] == ["Émile lamp"]
    with engine.connect() as connection:  # the app's engine finds the file sound
        if engine.dialect.name == "sqlite":
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
