"""`python -m tests.faults.serve --port N`: the app (`create_app()`, configured from the
environment) under uvicorn, as in production, plus what the fault tests need to see inside
it: a line `pool checked out: <n>` on stdout for every line read from stdin, and once more
when uvicorn has shut down (SIGTERM: it stops accepting, finishes in-flight requests)."""

import argparse
import signal
import sys
import threading

import uvicorn

from service.db import db
from service.main import create_app


def report_pool() -> None:
    print(f"pool checked out: {db.engine.pool.checkedout()}", flush=True)  # type: ignore[attr-defined]


def answer_questions() -> None:
    for _ in sys.stdin:
        report_pool()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app()
    threading.Thread(target=answer_questions, daemon=True).start()
    # uvicorn handles SIGTERM (graceful shutdown), then re-raises it to the handler it
    # found: this one lets the process report its pool and exit 0.
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
            backlog=2048, timeout_keep_alive=30,
        )
    ).run()
    report_pool()


if __name__ == "__main__":
    main()
