"""`python -m service <command>`: migrate, serve, seed.

Every command turns the usual set-up mistakes (a malformed DATABASE_URL, a database that
does not answer) into one line that says what is wrong and how to fix it.
"""

import argparse
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

from service.config import Settings
from service.db import create_engine, db
from service.db.engine import in_memory_sqlite

ROOT = Path(__file__).resolve().parent.parent


class CommandError(Exception):
    """A failure explained to the user; printed without a traceback."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])).upper() or 'settings'}: {e['msg']}"
            for e in exc.errors()
        ]
        raise CommandError(
            "Configuration error (environment or .env):\n" + "\n".join(lines)
        ) from None


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages: the one in its user part, and one
    given as a libpq parameter (`?password=...`, `?sslpassword=...`)."""
    parsed = make_url(url)
    hidden = {
        name: "***" for name in parsed.query if name.lower() in ("password", "sslpassword")
    }
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True)


def check_database(settings: Settings) -> str | None:
    """Connect once and read the database's migration (None: not migrated), or explain
    why that failed."""
    refuse_in_memory_sqlite(settings.database_url)
    with _explained(settings.database_url, "DATABASE_URL"):
        return _revision_of(settings.sync_database_url(), **settings.engine_args())


def check_async_database(settings: Settings) -> None:
    """The same for the URL the requests use (DATABASE_ASYNC_URL, or DATABASE_URL with its
    async driver): reachable, on an async driver, not in memory, and migrated - a wrong one
    made every request a 503 "try again shortly"."""
    import asyncio

    from alembic.runtime.migration import MigrationContext

    from service.db.asyncio import create_async_engine

    if settings.database_async_url is None and (
        make_url(settings.database_url).get_backend_name() == "sqlite"
    ):
        return  # aiosqlite on DATABASE_URL's own file: checked by check_migrated
    url = settings.async_database_url()
    name = "DATABASE_ASYNC_URL" if settings.database_async_url else "DATABASE_URL"
    refuse_in_memory_sqlite(url, name)

    async def revision() -> str | None:
        engine = create_async_engine(url, **settings.async_engine_args())
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    with _explained(url, name):
        dialect = make_url(url).get_dialect()
        if not dialect.is_async:
            raise CommandError(
                f"{name}={safe_url(url)} names the sync driver '{dialect.driver}': the "
                "requests need an async one (postgresql+asyncpg://, sqlite+aiosqlite://)."
            )
        if make_url(url).get_backend_name() == "sqlite":
            # aiosqlite is sqlite3 in a thread, which a failed connect leaves behind to
            # write a traceback once the loop has closed: ask sqlite3 itself.
            current = _revision_of(make_url(url).set(drivername="sqlite"))
        else:
            current = asyncio.run(revision())
    require_newest(settings, url, current)


def _revision_of(url: Any, **engine_args: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url, **engine_args)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


@contextmanager
def _explained(url: str, name: str) -> Iterator[None]:
    """Turn a failure to load the driver of `url` or to reach its database into one line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise CommandError(
            f"{name}={safe_url(url)} needs the driver '{exc.name}', which is not installed "
            "(postgresql:// is psycopg2, postgresql+asyncpg:// asyncpg)."
        ) from None
    except NoSuchModuleError:
        raise CommandError(
            f"{name}={safe_url(url)}: SQLAlchemy knows no driver "
            f"'{make_url(url).drivername}'. Use postgresql://, postgresql+psycopg2:// or "
            "postgresql+asyncpg:// for PostgreSQL, sqlite:///<file> for SQLite."
        ) from None
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        advice = (
            f"Check that {name} (environment or .env) names the right file, and that its "
            "directory exists and is writable."
            if make_url(url).get_backend_name() == "sqlite"
            else f"Check that the server is running and that {name} (environment or .env) "
            "names the right host, port, database, user and password."
        )
        raise CommandError(
            f"Cannot reach the database at {safe_url(url)}: {reason}\n{advice}"
        ) from None


def refuse_in_memory_sqlite(url: str, name: str = "DATABASE_URL") -> None:
    """`sqlite://` is a database in memory, a new one on every connection of every
    process: a migration there is gone when `migrate` ends, and `serve` would find no
    tables (a 503 on every request)."""
    if in_memory_sqlite(url):
        raise CommandError(
            f"{name}={url} is a database in memory, which ends with the process: use a "
            "file, e.g. sqlite:///items.db."
        )


def check_migrated(settings: Settings) -> None:
    """`check_database`, and the database is at the newest migration, or `serve` (and
    `seed`) say to run `migrate` (an empty database answered every request 503, "not
    available right now")."""
    require_newest(settings, settings.database_url, check_database(settings))


def require_newest(settings: Settings, url: str, current: str | None) -> None:
    from alembic.script import ScriptDirectory

    newest = ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
    if current != newest:
        raise CommandError(
            f"The database at {safe_url(url)} is "
            + ("not migrated" if current is None else
               f"at migration {current}, not the newest ({newest})")
            + ": run `python -m service migrate` first (`make run` does; with "
            "DATABASE_ASYNC_URL, on the database it names)."
        )


def alembic_config(settings: Settings) -> Any:
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = settings.sync_database_url()
    return config


def check_port_free(host: str, port: int) -> None:
    """Bind the port once, as uvicorn will: one taken (another `make run`) is said before
    "Serving on", not after it in a log line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CommandError(f"Cannot serve on {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            raise CommandError(
                f"Cannot serve on {host}:{port}: {exc.strerror or exc}. Is it serving "
                "already? Choose another port: --port N (make run PORT=N)."
            ) from None


def check_jwks_file(settings: Settings) -> None:
    """Read JWT_JWKS_FILE once before any worker starts, or explain why it is unusable
    (each worker would fail at start, and uvicorn would start it again, for ever)."""
    if settings.jwt_jwks_file is None:
        return
    from service.jwt_keys import FileKeys, InvalidKeySet

    try:
        FileKeys(settings.jwt_jwks_file)
    except InvalidKeySet as error:
        raise CommandError(f"Configuration error: {error}") from None


def migrate(args: argparse.Namespace) -> None:
    """Upgrade the database to the newest migration."""
    from alembic import command
    from alembic.util import CommandError as AlembicError

    settings = load_settings()
    check_database(settings)
    try:
        command.upgrade(alembic_config(settings), "head")
    except (SQLAlchemyError, AlembicError) as exc:
        # Reached, but refused: a user who may not create tables, a database that holds
        # another project's migrations.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise CommandError(
            f"Migrating the database at {safe_url(settings.database_url)} failed: {reason}\n"
            "Check that DATABASE_URL names this service's own database, and that its user "
            "may create tables there."
        ) from None
    print(f"Database {safe_url(settings.database_url)} is at the newest migration.")


@contextmanager
def exit_cleanly_after_sigterm() -> Iterator[None]:
    """uvicorn answers SIGTERM with a graceful shutdown, then raises the signal again for
    the handler it found: the default one ends the process with status 143 after a clean
    shutdown. A handler that does nothing, for the while, lets `serve` return and exit 0."""
    previous = signal.signal(signal.SIGTERM, lambda number, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(args: argparse.Namespace) -> None:
    """Serve the app with uvicorn: --workers N (default WEB_CONCURRENCY, else 1) processes."""
    import uvicorn

    settings = load_settings()
    workers = args.workers if args.workers is not None else web_concurrency()
    if workers > 1 and "cursor_secret" not in settings.model_fields_set:
        raise CommandError(
            f"{workers} workers need one CURSOR_SECRET: without it each worker makes up its "
            "own, and a scroll cursor (or a consistency token) from one worker is refused by "
            "the next. Set it (environment or .env), the same on every instance, e.g.:\n"
            "    CURSOR_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    check_port_free(args.host, args.port)
    check_migrated(settings)
    check_async_database(settings)
    check_jwks_file(settings)
    from service.logs import LoggingConfigError, configure_logging

    try:  # before saying it serves: an unusable LOG_CONFIG stops it
        configure_logging(settings)
    except LoggingConfigError as exc:
        raise CommandError(str(exc)) from None
    if not settings.api_token_list() and not settings.jwt_enabled():
        token = development_token()
        print(
            "No API_TOKENS configured: generated a development token for this run only "
            "(writes need it; it is not shown again):\n"
            f"    Authorization: Bearer {token}\n"
            "Set API_TOKENS (environment or .env) to choose your own.",
            flush=True,
        )
    print(
        f"Serving on http://{args.host}:{args.port} with {workers} worker"
        f"{'s' if workers > 1 else ''} - API docs at http://{args.host}:{args.port}/docs",
        flush=True,
    )
    from service.http_protocol import ServiceHttpProtocol
    from service.metrics import prepare_multiprocess_dir

    if args.no_access_log:
        os.environ["ACCESS_LOG"] = "false"  # the app's access line (service.telemetry)
    # Before the workers start: they inherit PROMETHEUS_MULTIPROC_DIR.
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = prepare_multiprocess_dir(workers)
    try:
        with exit_cleanly_after_sigterm():
            uvicorn.run(
                "service.main:app",
                host=args.host,
                port=args.port,
                workers=workers,
                # A bound on request heads, problem documents for malformed requests.
                http=ServiceHttpProtocol,
                ws="none",  # no WebSocket routes: an upgrade is a plain request
                # The app logs one access line per request itself, and its logging setup
                # (service.logs) formats uvicorn's lines too.
                access_log=False,
                log_config=None,
                log_level=settings.log_level.lower(),
                timeout_keep_alive=args.timeout_keep_alive,
            )
    finally:
        if metrics_dir is not None and own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def web_concurrency() -> int:
    """WEB_CONCURRENCY (the variable Heroku, gunicorn and uvicorn read), else 1."""
    value = os.environ.get("WEB_CONCURRENCY", "").strip()
    if not value:
        return 1
    try:
        return _positive(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise CommandError(
            f"WEB_CONCURRENCY={value!r}: expected a number of worker processes, at least 1"
        ) from None


def development_token() -> str:
    """A random API token, handed to the app (and any uvicorn workers) via the environment:
    the app refuses to start without one, so writes are never open to anyone."""
    token = secrets.token_urlsafe(32)
    os.environ["API_TOKENS"] = token
    return token


def seed(args: argparse.Namespace) -> None:
    """Insert made-up items (see service/items/seed.py for how)."""
    from service.items.seed import seed_items

    settings = load_settings()
    check_migrated(settings)
    db.configure(settings.sync_database_url(), engine_args=settings.engine_args())
    started = time.perf_counter()
    done = 0

    def progress(stored: int) -> None:
        nonlocal done
        done += stored
        _progress(done, args.items, started)

    seed_items(args.items, args.batch, args.writers, progress, online=args.online)
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)  # end the progress line
    print(
        f"Inserted {done:,} items into {safe_url(settings.database_url)} in {elapsed:.1f} s "
        f"({done / max(elapsed, 1e-9):,.0f} rows/s)."
    )


def _progress(done: int, total: int, started: float) -> None:
    """One line on stderr, rewritten in place: how far, how fast."""
    rate = done / max(time.perf_counter() - started, 1e-9)
    print(
        f"\rseeding items: {done:,}/{total:,} ({done / total:.0%}), {rate:,.0f} rows/s",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("migrate", help=migrate.__doc__).set_defaults(handler=migrate)

    serve_parser = commands.add_parser("serve", help=serve.__doc__)
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--workers", type=_positive, default=None, metavar="N",
        help="worker processes (default: WEB_CONCURRENCY, else 1); more than 1 needs "
        "CURSOR_SECRET",
    )
    serve_parser.add_argument("--no-access-log", action="store_true")
    serve_parser.add_argument(
        "--timeout-keep-alive", type=_positive, default=5, metavar="SECONDS",
        help="close a connection idle this long (default 5, uvicorn's); behind a load "
        "balancer or a client pool that keeps connections longer, set it above theirs",
    )
    serve_parser.set_defaults(handler=serve)

    seed_parser = commands.add_parser("seed", help=seed.__doc__)
    seed_parser.add_argument(
        "--items", type=_positive, required=True, metavar="N", help="how many items to add"
    )
    seed_parser.add_argument(
        "--batch", type=_positive, default=5000, metavar="B",
        help="items per transaction (default 5000)",
    )
    seed_parser.add_argument(
        "--writers", type=_positive, default=2, metavar="W",
        help="batches stored at once on PostgreSQL, each on its own connection (default 2)",
    )
    seed_parser.add_argument(
        "--online", action="store_true",
        help="keep the table usable meanwhile (a service is running): each batch commits "
        "on its own. Without it, a PostgreSQL seed at least as big as the table locks the "
        "table for the whole run, to rebuild its indexes once",
    )
    seed_parser.set_defaults(handler=seed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
