"""`python -m tests.faults.serve --port N`: the app (`create_app()`, configured from the
environment) under uvicorn, as in production, plus what the fault tests need to see inside
it: a line `pool checked out: <n>` on stdout for every line read from stdin, and once more
when uvicorn shuts down (SIGTERM: it stops accepting, finishes in-flight requests), before
the app's lifespan disposes of its engine."""

import argparse
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.cli import exit_cleanly_after_sigterm
from service.main import create_app


def report_pool(app: FastAPI) -> None:
    """The checked-out count of the pool the requests use: the app's own (async) engine."""
    print(f"pool checked out: {app.state.engine.sync_engine.pool.checkedout()}", flush=True)


def answer_questions(app: FastAPI) -> None:
    for _ in sys.stdin:
        report_pool(app)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app()
    threading.Thread(target=answer_questions, args=(app,), daemon=True).start()
    serving = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with serving(app_) as state:
            yield state
            # Every request answered, before the app disposes of its engine (which would
            # start a new pool, with nothing checked out whatever happened).
            report_pool(app)

    app.router.lifespan_context = lifespan
    # As `python -m service serve` does, so that the process exits 0.
    with exit_cleanly_after_sigterm():
        uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                backlog=2048, timeout_keep_alive=30,
            )
        ).run()


if __name__ == "__main__":
    main()
