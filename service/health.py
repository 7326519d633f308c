"""Liveness and readiness probes.

The liveness probe is one of the app's `sessionless_paths`: it gets no database session and
never waits for a connection slot, so it answers while the database work is saturated.

The readiness probe asks the primary (`SELECT 1`) on a connection of its own, opened for
the probe (a sessionless path too): a pool busy with requests is no reason to answer 503 and
be taken out of the load balancer, and the probe never waits for a slot. With read replicas
it also reports each replica as the background poller last saw it. A replica down or
lagging makes the service `degraded` (reads fall back to the primary), still ready: 200.
The primary down is 503, with Retry-After."""

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.failures import RETRY_AFTER_SECONDS, Failure, driver_reason
from service.db.replicas import Replicas
from service.problems import failure_problem, problem_responses

logger = logging.getLogger("service.health")
router = APIRouter(prefix="/health", tags=["health"])
LIVENESS_PATH = "/health/live"
READINESS_PATH = "/health/ready"
# What the readiness probe answers when the primary does not: retry, as for any outage.
UNREACHABLE = Failure(503, "The database is not reachable.", RETRY_AFTER_SECONDS)


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
    description="200 `{\"status\": \"ok\"}` when the primary answers. With read replicas "
    "also `primary` and `replicas` (each `ok`, `lagging` or `down`, with its lag in "
    "seconds); any replica not `ok` makes the status `degraded` - reads use the primary "
    "meanwhile - but the service stays ready. 503 when the primary does not answer.",
    responses=problem_responses(503),
)
async def ready(request: Request) -> JSONResponse:
    probe: AsyncEngine = request.app.state.probe_engine
    try:
        async with probe.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        logger.warning("readiness: the primary did not answer (%s); answering 503",
                       driver_reason(exc))
        return failure_problem(UNREACHABLE)
    replicas: Replicas | None = request.app.state.replicas
    if replicas is None:
        return JSONResponse({"status": "ok"})
    status = replicas.status()
    body: dict[str, Any] = {
        "status": "ok" if all(r["state"] == "ok" for r in status["replicas"]) else "degraded",
        "primary": "ok",
        "replicas": status["replicas"],
    }
    return JSONResponse(body)
