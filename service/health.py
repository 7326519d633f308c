"""Liveness and readiness probes."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.db import db
from service.handlers import problem_response, problem_responses

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="The process is up")
async def live() -> dict[str, str]:
    # On the event loop, not the threadpool: the probe answers while every worker thread is
    # busy, as long as the process itself is responsive.
    return {"status": "ok"}


@router.get("/ready", summary="The database answers", responses=problem_responses(503))
def ready() -> JSONResponse:
    try:
        db.session.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return problem_response(503, "The database is not reachable.")
    return JSONResponse({"status": "ok"})
