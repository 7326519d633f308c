"""`python -m service` explains set-up mistakes in a line, without a traceback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
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
