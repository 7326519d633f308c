"""Every model of the service, imported so that `metadata` is complete (Alembic reads it)."""

from service.db.model import Base
from service.items.models import Item

metadata = Base.metadata

__all__ = ["Item", "metadata"]
