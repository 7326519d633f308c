"""`python -m service <command>`: migrate, serve, seed.

Every command turns the usual set-up mistakes (a malformed DATABASE_URL, a database that
does not answer) into one line that says what is wrong and how to fix it.
"""

import argparse
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from service.config import Settings
from service.db import create_engine, db

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


def check_database(settings: Settings) -> None:
    """Connect once and run `SELECT 1`, or explain why that failed."""
    engine = create_engine(settings.sync_database_url(), **settings.engine_args())
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except ModuleNotFoundError as exc:
        raise CommandError(
            f"DATABASE_URL={safe_url(settings.database_url)} needs the driver "
            f"'{exc.name}', which is not installed."
        ) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise CommandError(
            f"Cannot reach the database at {safe_url(settings.database_url)}: {reason}\n"
            "Check that the server is running and that DATABASE_URL (environment or .env) "
            "names the right host, port, database, user and password."
        ) from None
    finally:
        engine.dispose()


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
    from alembic.config import Config

    settings = load_settings()
    check_database(settings)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = settings.sync_database_url()
    command.upgrade(config, "head")
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
    check_database(settings)
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
    check_database(settings)
    db.configure(settings.sync_database_url(), engine_args=settings.engine_args())
    started = time.perf_counter()
    done = 0

    def progress(stored: int) -> None:
        nonlocal done
        done += stored
        _progress(done, args.items, started)

    seed_items(args.items, args.batch, args.writers, progress)
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
