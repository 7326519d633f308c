"""The `items` table."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    TypeDecorator,
    func,
)
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import Mapped, mapped_column

from service.db.engine import fold_case
from service.model_base import Base
from service.principal import UNKNOWN

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every backend.

    SQLite stores no offset, so values go in converted to UTC and come out tagged as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


def utcnow() -> datetime:
    """Now, in UTC, with microseconds (the database's own clock has only seconds on SQLite)."""
    return datetime.now(UTC)


def _when_created(context: DefaultExecutionContext) -> datetime:
    """A new row's `updated_at`: its `created_at`, to the microsecond (two calls of `utcnow`
    would differ, and a new item would look changed)."""
    parameters = context.get_current_parameters()  # type: ignore[no-untyped-call]
    return cast(datetime, parameters["created_at"])


class Item(Base):
    """A thing for sale. `version` guards concurrent updates (optimistic locking): the ORM
    adds `WHERE version = :read_version` to every UPDATE and bumps it."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=_when_created, server_default=func.now(), onupdate=utcnow
    )
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    # Who created the item and who changed it last (`service.principal`: a JWT's `sub` or
    # `token:<label>`), set by the service; rows written outside it say "unknown".
    created_by: Mapped[str] = mapped_column(String(255), server_default=UNKNOWN)
    updated_by: Mapped[str] = mapped_column(String(255), server_default=UNKNOWN)

    __table_args__ = (
        CheckConstraint("price >= 0", name="price_not_negative"),
        # SQLite: never hand a deleted item's id (and so its ETag) to a new one.
        {"sqlite_autoincrement": True},
    )
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 (read by SQLAlchemy)


# Names are unique regardless of case, of every letter: "Lamp" and "lamp", "Émile" and
# "ÉMILE" are the same item (`fold_case`: lower() on PostgreSQL, a Unicode one on SQLite).
Index("uq_items_name_lower", fold_case(Item.name), unique=True)
# One index per allowed sort, each ending in the id tie-breaker, so keyset pages cost the
# same at any depth.
Index("ix_items_name_id", Item.name, Item.id)
Index("ix_items_price_id", Item.price, Item.id)
Index("ix_items_created_at_id", Item.created_at, Item.id)
