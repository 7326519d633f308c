"""items: on SQLite, the unique index on lower(name) rebuilt with lower() folding every letter

SQLite's own lower() folds A-Z only, so "Émile lamp" and "émile LAMP" were two names there
and one on PostgreSQL. `service.db.create_engine` now replaces lower() on every SQLite
connection by one folding every letter as PostgreSQL does (`unicode_lower`); the index
entries written before were computed with the old one, so they are rebuilt (REINDEX). Names
that become equal refuse the rebuild: the migration stops and lists them, to be renamed.

PostgreSQL's lower() folded every letter already: nothing to do there. The downgrade
rebuilds the index with an A-Z lower() again, as the code before this revision reads it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

"""
import string
from collections import defaultdict
from collections.abc import Callable, Sequence

from alembic import op
from sqlalchemy import text

from service.db.engine import unicode_lower

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ASCII_ONLY = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def upgrade() -> None:
    _reindex_with(unicode_lower)


def downgrade() -> None:
    _reindex_with(lambda value: value.translate(_ASCII_ONLY) if isinstance(value, str) else value)


def _reindex_with(lower: Callable[[object], object]) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    dbapi_connection = bind.connection.dbapi_connection
    assert dbapi_connection is not None
    dbapi_connection.create_function("lower", 1, lower, deterministic=True)
    # Grouped here, not by SQL: SQLite would answer GROUP BY lower(name) from the index
    # being rebuilt, whose entries are the old ones.
    groups: dict[object, list[str]] = defaultdict(list)
    for name in bind.execute(text("SELECT name FROM items")).scalars():
        groups[lower(name)].append(name)
    clashes = [" | ".join(names) for names in groups.values() if len(names) > 1]
    if clashes:
        raise RuntimeError(
            "These item names are equal once case is ignored, which the unique index on "
            "lower(name) refuses; rename all but one of each group and migrate again: "
            + "; ".join(clashes)
        )
    op.execute("REINDEX uq_items_name_lower")
