"""Fixtures of the fault tests: the throwaway PostgreSQL server of scripts/with-postgres.sh,
stopped and started while the app runs, and the app served over real TCP by uvicorn."""

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine


class PostgresServer:
    """The server scripts/with-postgres.sh started for this run, under the tests' control."""

    def __init__(self, bindir: str, datadir: str, log: str, owner: str) -> None:
        self.bindir = Path(bindir)
        self.datadir = datadir
        self.log = log
        self.owner = owner

    def stop(self) -> None:
        """Stop it the way an operator or a crash-restart would: connections are cut."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        self._pg_ctl("-l", self.log, "-w", "start")

    def is_running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def processes(self) -> list[int]:
        """The postmaster and every process under it."""
        postmaster = int(Path(self.datadir, "postmaster.pid").read_text().splitlines()[0])

        def tree(pid: int) -> list[int]:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            return [pid, *(p for child in children for p in tree(int(child)))]

        return tree(postmaster)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server hangs (SIGSTOP), as a frozen VM or a partition would look: connections
        stay open, nothing answers; it goes on (SIGCONT) when the block ends."""
        pids = self.processes()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / "pg_ctl"), "-D", self.datadir, *args]
        if self.owner:  # run as root: pg_ctl refuses root, the data belongs to postgres
            command = ["runuser", "-u", self.owner, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)


@pytest.fixture
def postgres_server(backend: str, engine: Engine) -> Iterator[PostgresServer]:
    """The test PostgreSQL server, to stop and start; running again after the test. Skips
    on SQLite, and on a server this run did not start (make test-postgres TEST_POSTGRES_URL=)."""
    if backend != "postgresql":
        pytest.skip("about a database server going away: PostgreSQL only")
    names = ("TEST_PG_BINDIR", "TEST_PG_DATADIR", "TEST_PG_LOG")
    if not all(os.environ.get(name) for name in names):
        pytest.skip("needs the server started by scripts/with-postgres.sh")
    owner = os.environ.get("TEST_PG_OWNER", "")
    server = PostgresServer(*(os.environ[name] for name in names), owner)
    try:
        yield server
    finally:
        if not server.is_running():
            server.start()
        engine.dispose()  # the session-wide test engine's connections died with the server
