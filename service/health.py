"""Liveness and readiness probes.

The liveness probe is one of the app's `sessionless_paths`: it gets no database session and
never waits for a connection slot, so it answers while the database work is saturated."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.db.asyncio import db
from service.problems import problem_response, problem_responses

router = APIRouter(prefix="/health", tags=["health"])
LIVENESS_PATH = "/health/live"


class Liveness(BaseModel):
    status: str = "ok"


@router.get("/live", name="check_liveness", summary="The process is up")
async def live() -> Liveness:
    # On the event loop, not the threadpool: the probe answers while every worker thread is
    # busy, as long as the process itself is responsive.
    return Liveness()


@router.get(
    "/ready",
    name="check_readiness",
    summary="The database answers",
    responses=problem_responses(503),
)
async def ready() -> JSONResponse:
    try:
        await db.session.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return problem_response(503, "The database is not reachable.")
    return JSONResponse({"status": "ok"})
