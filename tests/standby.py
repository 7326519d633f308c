"""Fixtures for tests on a primary with a streaming hot standby, and PgBouncer in front of the
primary, as `scripts/with-postgres.sh --replica --pgbouncer` starts them (`make test` does).

On SQLite these tests are skipped quietly (replicas are a PostgreSQL setup). On PostgreSQL
without the standby or PgBouncer (an existing server: `make test-postgres TEST_POSTGRES_URL=`)
they are skipped with a loud reason - and fail instead under REQUIRE_POSTGRES=1 (standby) or
REQUIRE_PGBOUNCER=1 (PgBouncer), as CI sets them.
"""

import os
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from service.db import create_engine
from service.db.replicas import lsn_to_int
from tests.faults.conftest import PostgresServer


def missing(what: str, flag: str) -> None:
    """Skip loudly because `what` is missing - or fail, when `flag`=1 says it must be there."""
    if os.environ.get(flag) == "1":
        pytest.fail(f"{flag}=1 but {what}")
    pytest.skip(f"!!!!! NOT TESTED: {what} (run under scripts/with-postgres.sh --replica "
                "--pgbouncer, as `make test` does)")


class Standby(PostgresServer):
    """The hot standby of the test server: stop, start, pause and resume its replay."""

    def __init__(self, url: str, datadir: str, log: str, bindir: str, owner: str) -> None:
        super().__init__(bindir, datadir, log, owner)
        self.url = url
        self.engine = create_engine(url, isolation_level="AUTOCOMMIT")

    def start(self) -> None:
        super().start()
        self.engine.dispose()  # its pooled connections died with the server

    def pause_replay(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT pg_wal_replay_pause()"))

    def resume_replay(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT pg_wal_replay_resume()"))

    def catch_up(self, primary: Engine, timeout: float = 10.0) -> None:
        """Wait until the standby has replayed everything the primary has written."""
        with primary.connect() as connection:
            target = lsn_to_int(connection.scalar(text("SELECT pg_current_wal_lsn()::text")))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as connection:
                replayed = connection.scalar(text("SELECT pg_last_wal_replay_lsn()::text"))
            if lsn_to_int(replayed) >= target:
                return
            time.sleep(0.02)
        raise AssertionError(f"the standby did not catch up within {timeout} s")


@pytest.fixture(scope="session")
def _standby(backend: str) -> Iterator[Standby]:
    if backend != "postgresql":
        pytest.skip("read replicas: PostgreSQL only")
    names = ("TEST_REPLICA_URL", "TEST_REPLICA_DATADIR", "TEST_REPLICA_LOG", "TEST_PG_BINDIR")
    if not all(os.environ.get(name) for name in names):
        missing("no streaming standby was started for this run", "REQUIRE_POSTGRES")
    standby = Standby(*(os.environ[name] for name in names), os.environ.get("TEST_PG_OWNER", ""))
    yield standby
    standby.engine.dispose()


@pytest.fixture
def standby(_standby: Standby, engine: Engine) -> Iterator[Standby]:
    """The running, caught-up, replaying standby of the test database (left so afterwards)."""
    if not _standby.is_running():
        _standby.start()
    _standby.engine.dispose()
    _standby.resume_replay()
    _standby.catch_up(engine)
    yield _standby
    if not _standby.is_running():
        _standby.start()
    _standby.engine.dispose()
    _standby.resume_replay()


@pytest.fixture(scope="session")
def pgbouncer_url(backend: str) -> str:
    """The URL of PgBouncer (transaction pooling) in front of the test server."""
    if backend != "postgresql":
        pytest.skip("PgBouncer: PostgreSQL only")
    url = os.environ.get("TEST_PGBOUNCER_URL")
    if not url:
        missing("no PgBouncer was started for this run", "REQUIRE_PGBOUNCER")
    return url  # type: ignore[return-value]
