"""The benchmark's database and the service's configuration for it.

Every process the benchmark runs the service in - the uvicorn servers, `python -m service
migrate`, the app this process builds to record a request's SQL - gets the same settings,
passed explicitly: `service_env` for a child process, `service_settings` in this one. This
process's own environment is never changed.
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from pydantic import SecretStr
from sqlalchemy import Engine, event, text

from bench.harness import log
from service.cli import build_parser
from service.config import Settings
from service.cursors import sign_cursor
from service.db import db
from service.items.seed import seed_items
from service.main import create_app

ROOT = Path(__file__).resolve().parent.parent
# On top of DATABASE_URL and whatever else this process's environment sets.
CURSOR_SECRET = "benchmark-only-cursor-secret"  # scroll_path signs cursors with it too
API_TOKEN = "benchmark-only-api-token"
LOG_LEVEL = "WARNING"


def service_env(url: str) -> dict[str, str]:
    """The environment of a child process that runs the service (or bench.apps) on `url`."""
    return {
        **os.environ,
        "DATABASE_URL": url,
        "CURSOR_SECRET": CURSOR_SECRET,
        "API_TOKENS": API_TOKEN,
        "LOG_LEVEL": LOG_LEVEL,
        "PYTHONPATH": str(ROOT),
    }


def service_settings(url: str) -> Settings:
    """The same configuration as `service_env`, for the service run inside this process."""
    return Settings(
        database_url=url,
        cursor_secret=SecretStr(CURSOR_SECRET),
        api_tokens=SecretStr(API_TOKEN),
        log_level=LOG_LEVEL,
    )


def migrate(url: str) -> None:
    """`python -m service migrate`, as `make run` does; exits with its errors if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT, env=service_env(url), capture_output=True, text=True,
    )
    if result.returncode:
        sys.exit(f"python -m service migrate failed:\n{result.stderr}")


@dataclass(frozen=True)
class SeedRate:
    rows: int
    rows_per_second: float


def seed_table(engine: Engine, settings: Settings, rows: int) -> SeedRate | None:
    """Make the items table hold exactly `rows` freshly seeded items; None if it does already.

    Empties the table and seeds it the way `python -m service seed --items <rows>` does (the
    same function, with the command's default batch size and writers, on an engine made from
    the same settings), as when filling a new database. The rate is timed like the command
    times it: the seeding alone, without start-up or the ANALYZE that follows.
    """
    if count_rows(engine) == rows:
        return None
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE items"))
    log(f"seeding {rows:,} items into the empty table")
    command = build_parser().parse_args(["seed", "--items", str(rows)])
    seeding_engine = db.configure(settings.sync_database_url(), engine_args=settings.engine_args())
    try:
        started = time.perf_counter()
        seed_items(command.items, command.batch, command.writers, progress=lambda stored: None)
        elapsed = time.perf_counter() - started
    finally:
        seeding_engine.dispose()  # as when the command exits: no idle connections left
    with engine.begin() as connection:
        connection.execute(text("ANALYZE items"))
    if (seeded := count_rows(engine)) != rows:
        raise RuntimeError(f"seeding {rows:,} items left {seeded:,} in the table")
    return SeedRate(rows, rows / elapsed)


def count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM items")).scalar_one())


def id_at(engine: Engine, position: int) -> int:
    """The id of the item at `position` (0-based) in id order."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT id FROM items ORDER BY id OFFSET :n LIMIT 1"), {"n": position}
            ).scalar_one()
        )


def scroll_path(engine: Engine, page: int, size: int = 20) -> str:
    """/items/scroll at the same depth as `/items?page=page`: a cursor after the last row
    of the page before."""
    if page == 1:
        return f"/items/scroll?size={size}"
    after = id_at(engine, (page - 1) * size - 1)
    cursor = sign_cursor({"sort": "id", "after": [after, after]}, CURSOR_SECRET.encode())
    return f"/items/scroll?size={size}&cursor={cursor}"


@dataclass(frozen=True)
class Statement:
    """One SQL statement as the service's driver received it."""

    sql: str
    parameters: Any
    paramstyle: str  # the driver's: "pyformat" (psycopg2), "numeric_dollar" (asyncpg), ...

    def for_psycopg2(self) -> tuple[str, Any]:
        """The statement and parameters in psycopg2's terms: asyncpg's `$1` placeholders
        become `%s` (and a literal `%` becomes `%%`); psycopg2's own pass unchanged."""
        if self.paramstyle != "numeric_dollar":
            return self.sql, self.parameters
        order: list[int] = []

        def placeholder(match: re.Match[str]) -> str:
            order.append(int(match.group(1)) - 1)
            return "%s"

        sql = re.sub(r"\$(\d+)", placeholder, self.sql.replace("%", "%%"))
        return sql, tuple(self.parameters[n] for n in order)


def statements_of(settings: Settings, path: str) -> list[Statement]:
    """The SQL statements the service, built on `settings`, runs for GET `path` (nothing of
    its start-up or shutdown). Raises `httpx.HTTPStatusError` if the request fails."""
    captured: list[Statement] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        captured.append(Statement(statement, parameters, conn.dialect.paramstyle))

    app = create_app(settings)

    async def call() -> None:
        # As a server runs it: inside the app's lifespan (which disposes of its engine).
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                event.listen(Engine, "before_cursor_execute", capture)
                try:
                    (await client.get(path)).raise_for_status()
                finally:
                    event.remove(Engine, "before_cursor_execute", capture)

    anyio.run(call)
    return captured
