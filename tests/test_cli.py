"""`python -m service` explains set-up mistakes in a line, without a traceback."""

import os
import subprocess
import sys
from pathlib import Path

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
    url = f"postgresql+psycopg2://app:s3cret@127.0.0.1:{free_port()}/service"  # nothing there
    for command in ("migrate", "serve"):
        result = run_cli(command, database_url=url)
        assert result.returncode == 2
        assert "Cannot reach the database" in result.stderr
        assert "s3cret" not in result.stderr
        assert "Traceback" not in result.stderr


def test_migrate_brings_a_new_sqlite_database_to_the_newest_revision(tmp_path: Path) -> None:
    result = run_cli("migrate", database_url=f"sqlite:///{tmp_path / 'new.db'}")
    assert result.returncode == 0, result.stderr
    assert "newest migration" in result.stdout
