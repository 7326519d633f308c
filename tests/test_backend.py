"""The suite talks to the database it was told to."""

from sqlalchemy import Engine, text


def test_suite_talks_to_the_requested_backend(engine: Engine, backend: str) -> None:
    with engine.connect() as connection:
        if backend == "postgresql":
            version = connection.execute(text("select version()")).scalar_one()
            assert version.startswith("PostgreSQL")
        else:
            assert backend == "sqlite"
            assert connection.execute(text("select sqlite_version()")).scalar_one()


def test_schema_comes_from_the_migrations(engine: Engine) -> None:
    with engine.connect() as connection:
        revision = connection.execute(text("select version_num from alembic_version")).scalar()
    assert revision is not None
