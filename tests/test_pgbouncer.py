"""The items API through PgBouncer in transaction pooling mode: the whole items test suite,
run again with DATABASE_URL pointing at PgBouncer and DATABASE_PGBOUNCER=true - the app's
requests on asyncpg, the tests' own fixtures, seeding and Alembic on psycopg2."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_items_suite_passes_through_pgbouncer(pgbouncer_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": pgbouncer_url, "DATABASE_PGBOUNCER": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/items"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1]
