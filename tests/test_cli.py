"""`python -m service` explains set-up mistakes in a line, without a traceback."""

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from bench.harness import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, database_url: str, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def test_unparsable_database_url_is_explained() -> None:
    result = run_cli("migrate", database_url="not a url")
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr and "not a valid SQLAlchemy URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_explained_without_the_password() -> None:
    port = free_port()  # nothing there
    for url in (
        f"postgresql+psycopg2://app:s3cret@127.0.0.1:{port}/service",
        f"postgresql+psycopg2://app@127.0.0.1:{port}/service?password=s3cret",
        f"postgresql+psycopg2://app@127.0.0.1:{port}/service?sslmode=disable&password=s3cret",
    ):
        for command in ("migrate", "serve"):
            result = run_cli(command, database_url=url)
            assert result.returncode == 2
            assert "Cannot reach the database" in result.stderr
            assert "s3cret" not in result.stderr
            assert "Traceback" not in result.stderr


def test_an_unencoded_at_sign_in_the_password_is_refused_without_showing_it() -> None:
    url = f"postgresql+psycopg2://app:Right@Pass_77xyz@127.0.0.1:{free_port()}/service"
    for command in ("migrate", "serve"):
        result = run_cli(command, database_url=url)
        assert result.returncode == 2
        assert "%40" in result.stderr
        assert "Right" not in result.stderr and "Pass_77xyz" not in result.stderr


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_a_driver_sqlalchemy_does_not_know_or_that_is_missing_is_explained() -> None:
    port = free_port()
    for command in ("migrate", "serve"):
        unknown = run_cli(command, database_url=f"postgresql+foo://app:s3cret@127.0.0.1:{port}/x")
        assert_one_line(unknown, "knows no driver 'postgresql+foo'", "postgresql://")
        assert "s3cret" not in unknown.stderr
        missing = run_cli(command, database_url=f"postgresql+pg8000://app@127.0.0.1:{port}/x")
        assert_one_line(missing, "needs the driver 'pg8000', which is not installed")


def test_heroku_style_postgres_urls_are_told_the_scheme_sqlalchemy_knows() -> None:
    result = run_cli("migrate", database_url="postgres://app@127.0.0.1:5/x")
    assert_one_line(result, "postgres:// is not a SQLAlchemy URL scheme", "postgresql://")


def test_serve_on_a_port_taken_says_so_before_it_says_it_serves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'served.db'}"
    assert run_cli("migrate", database_url=url).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), database_url=url)
    assert_one_line(result, f"Cannot serve on 127.0.0.1:{port}", "--port")
    assert "Serving on" not in result.stdout


def test_a_database_in_memory_is_refused(tmp_path: Path) -> None:
    for command in ("migrate", "serve"):
        assert_one_line(run_cli(command, database_url="sqlite://"), "in memory",
                        "sqlite:///items.db")


def test_serve_refuses_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    """Every request would answer 503 "not available right now" (no table)."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert_one_line(run_cli("serve", database_url=url), "not migrated",
                    "python -m service migrate")


def test_a_migration_the_database_refuses_is_explained(tmp_path: Path) -> None:
    """A database holding another project's migrations: reached, but refused."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        connection.execute("INSERT INTO alembic_version VALUES ('deadbeef1234')")
    result = run_cli("migrate", database_url=f"sqlite:///{path}")
    assert_one_line(result, "Migrating the database", "failed", "deadbeef1234")


def test_serve_checks_the_url_the_requests_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'served.db'}"
    assert run_cli("migrate", database_url=url).returncode == 0
    cases = {
        f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/x.db": "Cannot reach the database",
        f"sqlite+aiosqlite:///{tmp_path / 'other.db'}": "not migrated",
        "sqlite+aiosqlite://": "in memory",
        url: "names the sync driver 'pysqlite'",
    }
    for async_url, said in cases.items():
        result = run_cli("serve", database_url=url, DATABASE_ASYNC_URL=async_url)
        assert_one_line(result, said, "DATABASE_ASYNC_URL" if said != "not migrated" else "")


def test_seed_refuses_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    result = run_cli("seed", "--items", "5", database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    assert_one_line(result, "not migrated", "python -m service migrate")


def test_serve_exits_0_after_sigterm(tmp_path: Path) -> None:
    """SIGTERM: uvicorn shuts down gracefully; the process then exits 0, not 143."""
    url = f"sqlite:///{tmp_path / 'served.db'}"
    assert run_cli("migrate", database_url=url).returncode == 0
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "API_TOKENS": "cli-test-token-0123456789"}
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()


def test_migrate_brings_a_new_sqlite_database_to_the_newest_revision(tmp_path: Path) -> None:
    result = run_cli("migrate", database_url=f"sqlite:///{tmp_path / 'new.db'}")
    assert result.returncode == 0, result.stderr
    assert "newest migration" in result.stdout


def test_uvicorn_run_directly_explains_a_missing_token_without_a_traceback(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "API_TOKENS": ""}
    for name in ("JWT_JWKS_URL", "JWT_JWKS_FILE", "JWT_SECRET"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "error: No API token" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_checks_the_postgresql_url_the_requests_use(
    migrated_url: str, backend: str
) -> None:
    """On asyncpg, with the engine arguments the app gives it (a wrong DATABASE_ASYNC_URL
    served 503s for ever); the right one starts."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL URLs")
    wrong = make_url(migrated_url).set(drivername="postgresql+asyncpg", database="nowhere")
    result = run_cli("serve", database_url=migrated_url,
                     DATABASE_ASYNC_URL=wrong.render_as_string(hide_password=False))
    assert_one_line(result, "Cannot reach the database", "DATABASE_ASYNC_URL", "nowhere")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": migrated_url, "API_TOKENS": "cli-test-token-0123"}
    server = ServerProcess([sys.executable, "-m", "service", "serve", "--port", str(port)],
                           port, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        server.wait_until_answers("/health/ready", timeout=60)
    finally:
        server.stop()


def test_serve_closes_idle_connections_after_timeout_keep_alive(tmp_path: Path) -> None:
    """Behind a load balancer that keeps idle connections for 60 s, the server must keep
    them longer, or the balancer sends a request down one the server is closing."""
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    assert run_cli("migrate", database_url=url).returncode == 0
    env = {**os.environ, "DATABASE_URL": url, "API_TOKENS": "cli-test-token-0123456789"}
    servers = {
        keep: ServerProcess(
            [sys.executable, "-m", "service", "serve", "--port", str(port := free_port()),
             "--timeout-keep-alive", str(keep)],
            port, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for keep in (1, 30)
    }
    try:
        idle: dict[int, http.client.HTTPConnection] = {}
        for keep, server in servers.items():
            server.wait_until_answers("/health/live")
            idle[keep] = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            idle[keep].request("GET", "/health/live")
            response = idle[keep].getresponse()
            assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        time.sleep(3)
        for keep, connection in idle.items():
            assert connection.sock is not None  # kept open after the response
            # An idle connection the server closed reads as the end of the stream.
            connection.sock.setblocking(False)
            try:
                closed = connection.sock.recv(1) == b""
            except BlockingIOError:
                closed = False  # open, nothing to read
            connection.sock.settimeout(10)
            assert closed == (keep == 1), keep
        idle[30].request("GET", "/health/live")  # still open: reused
        assert idle[30].getresponse().status == 200
        for connection in idle.values():
            connection.close()
    finally:
        for server in servers.values():
            server.stop()


def test_timeout_keep_alive_must_be_a_whole_number_of_seconds() -> None:
    result = run_cli("serve", "--timeout-keep-alive", "0", database_url="sqlite:///x.db")
    assert result.returncode == 2
    assert "--timeout-keep-alive: must be at least 1, not 0" in result.stderr
