"""Every model of the service, imported so that `metadata` is complete (Alembic reads it)."""

from service.items.models import Item
from service.model_base import Base

metadata = Base.metadata

__all__ = ["Item", "metadata"]
