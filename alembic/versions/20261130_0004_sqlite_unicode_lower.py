"""items: on SQLite, the unique index on names ignores the case of every letter

SQLite's own lower() folds A-Z only, so "Émile lamp" and "émile LAMP" were two names there
and one on PostgreSQL. The index `uq_items_name_lower` is rebuilt on SQLite over
`fold_case(name)`, a function `service.db.create_engine` registers on every SQLite
connection (`service.db.engine.fold_case`), folding every letter as PostgreSQL's lower()
does in a UTF-8 database. A program opening the file without that function can read the
items but not write them ("no such function: fold_case") - rather than write index
entries that disagree with the app's. Names that the new index finds equal stop the
upgrade, listed, to be renamed first.

PostgreSQL's index is on lower(name) already, which folds every letter: nothing to do
there. The downgrade puts SQLite's index back on lower(name).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

"""
from collections import defaultdict
from collections.abc import Sequence

from alembic import context, op
from sqlalchemy import text

from service.db.engine import fold_case_text, register_fold_case

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_items_name_lower"


def upgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    if not context.is_offline_mode():
        bind = op.get_bind()
        dbapi_connection = bind.connection.dbapi_connection
        assert dbapi_connection is not None
        register_fold_case(dbapi_connection)  # a connection made elsewhere may lack it
        _refuse_clashes([name for name in bind.execute(text("SELECT name FROM items")).scalars()])
    op.drop_index(INDEX, table_name="items")
    op.create_index(INDEX, "items", [text("fold_case(name)")], unique=True)


def downgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    # Names unequal under fold_case() are unequal under lower() (it folds less): no clash.
    op.drop_index(INDEX, table_name="items")
    op.create_index(INDEX, "items", [text("lower(name)")], unique=True)


def _refuse_clashes(names: list[str]) -> None:
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[fold_case_text(name)].append(name)
    clashes = [" | ".join(group) for group in groups.values() if len(group) > 1]
    if clashes:
        raise RuntimeError(
            "These item names are equal once case is ignored, which the unique index on "
            "names refuses; rename all but one of each group and migrate again: "
            + "; ".join(clashes)
        )
