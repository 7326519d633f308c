"""items: items_estimated_count(), the planner's estimate inside a query (PostgreSQL)

`GET /items?count=estimated` counts up to a threshold and, above it, reports the query
planner's estimate of the filtered query. Asking for it with a statement of its own
(`EXPLAIN`) cost a second round trip on every such page; this function runs the EXPLAIN
inside the page's own statement instead, and only when the count reached the threshold.

`query` is the filtered SELECT, written by the service with `$1`..`$5` for the filters'
values, which come as the arguments after it (NULL for a filter not set); the planner sees
the values, as it does for the page's own statement. Only a SELECT is accepted. EXPLAIN
without ANALYZE plans the query and runs nothing. VOLATILE: PostgreSQL refuses EXPLAIN in
a STABLE function, and a volatile one is never evaluated ahead of time (the CASE that
guards it holds).

SQLite has no planner estimate: nothing to create there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

"""
from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CREATE = r"""
CREATE FUNCTION items_estimated_count(
    query text,
    q text,
    min_price numeric,
    max_price numeric,
    created_after timestamptz,
    created_before timestamptz
) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    plan json;
BEGIN
    IF query !~* '^\s*SELECT\s' THEN
        RAISE EXCEPTION 'items_estimated_count estimates a SELECT, not: %', query;
    END IF;
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || query INTO plan
        USING q, min_price, max_price, created_after, created_before;
    RETURN round((plan -> 0 -> 'Plan' ->> 'Plan Rows')::numeric);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION items_estimated_count(text, text, numeric, numeric, timestamptz, "
            "timestamptz)"
        )
