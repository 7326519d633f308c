"""create items

Revision ID: 0001
Revises:
Create Date: 2026-11-23

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from service.items.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("price", sa.Numeric(12, 2), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.CheckConstraint("price >= 0", name=op.f("ck_items_price_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
    )
    op.create_index("uq_items_name_lower", "items", [sa.text("lower(name)")], unique=True)
    op.create_index("ix_items_name_id", "items", ["name", "id"])
    op.create_index("ix_items_price_id", "items", ["price", "id"])
    op.create_index("ix_items_created_at_id", "items", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_items_created_at_id", table_name="items")
    op.drop_index("ix_items_price_id", table_name="items")
    op.drop_index("ix_items_name_id", table_name="items")
    op.drop_index("uq_items_name_lower", table_name="items")
    op.drop_table("items")
