"""items: on SQLite, the id of a deleted item is never handed out again

A SQLite `INTEGER PRIMARY KEY` without AUTOINCREMENT gives the next row max(id) + 1: delete
the newest item and the next one created gets its id - and, at version 1, its ETag. A
client's stale `If-Match: "<id>-1"` then updated or deleted someone else's item, and a GET
of the deleted item's URL answered another one. With AUTOINCREMENT SQLite never reuses an
id, as PostgreSQL's sequence never does.

SQLite cannot change a column's key in place: the table is built anew with AUTOINCREMENT,
the rows copied (ids and all; SQLite's counter starts after the largest), the old table
dropped and the indexes made again. PostgreSQL: nothing to do. The downgrade rebuilds the
table without AUTOINCREMENT, which forgets the largest id ever handed out: upgraded again,
SQLite starts after the largest id present.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from service.db.engine import register_fold_case
from service.items.models import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = "id, name, description, price, created_at, updated_at, version, created_by, updated_by"
INDEXES = {
    "uq_items_name_lower": ([sa.text("fold_case(name)")], True),
    "ix_items_name_id": (["name", "id"], False),
    "ix_items_price_id": (["price", "id"], False),
    "ix_items_created_at_id": (["created_at", "id"], False),
}


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _rebuild(autoincrement=True)


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _rebuild(autoincrement=False)


def _rebuild(*, autoincrement: bool) -> None:
    if not context.is_offline_mode():
        dbapi_connection = op.get_bind().connection.dbapi_connection
        assert dbapi_connection is not None
        register_fold_case(dbapi_connection)  # the name index is over fold_case(name)
    for name in INDEXES:
        op.drop_index(name, table_name="items")
    op.create_table(
        "items_rebuilt",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("price", sa.Numeric(12, 2), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("created_by", sa.String(255), server_default="unknown", nullable=False),
        sa.Column("updated_by", sa.String(255), server_default="unknown", nullable=False),
        sa.CheckConstraint("price >= 0", name=op.f("ck_items_price_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
        sqlite_autoincrement=autoincrement,
    )
    op.execute(f"INSERT INTO items_rebuilt ({COLUMNS}) SELECT {COLUMNS} FROM items")
    op.drop_table("items")
    op.rename_table("items_rebuilt", "items")
    for name, (columns, unique) in INDEXES.items():
        op.create_index(name, "items", columns, unique=unique)
