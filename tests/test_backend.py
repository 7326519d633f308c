"""The suite talks to the database it was told to, migrated by Alembic to the newest
revision (that the models match the migrations is tests/items/test_migrations.py)."""

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from tests.conftest import alembic_config


def test_suite_talks_to_the_requested_backend(engine: Engine, backend: str) -> None:
    with engine.connect() as connection:
        if backend == "postgresql":
            version = connection.execute(text("select version()")).scalar_one()
            assert version.startswith("PostgreSQL")
        else:
            assert backend == "sqlite"
            assert connection.execute(text("select sqlite_version()")).scalar_one()


def test_the_suite_database_is_migrated_to_the_newest_revision(
    engine: Engine, migrated_url: str
) -> None:
    newest = ScriptDirectory.from_config(alembic_config(migrated_url)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert current == newest
