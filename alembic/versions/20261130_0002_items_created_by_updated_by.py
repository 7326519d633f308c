"""items: created_by and updated_by

Who created each item and who changed it last. Rows already there were written before
this was recorded: they say "unknown", which is also the server default for rows inserted
outside the service.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("created_by", "updated_by")


# Plain ALTER TABLE on both databases, no batch mode: rebuilding the table on SQLite would
# lose the unique lower(name) index, which SQLite cannot reflect. SQLite adds a NOT NULL
# column with a constant default, and drops a column (3.35+), in place.


def upgrade() -> None:
    # The server default fills the rows already there as each NOT NULL column is added.
    for name in COLUMNS:
        op.add_column(
            "items", sa.Column(name, sa.String(255), server_default="unknown", nullable=False)
        )


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("items", name)
