"""HTTP routes of items (filled in by the items API)."""

from fastapi import APIRouter

router = APIRouter(prefix="/items", tags=["items"])
