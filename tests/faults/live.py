"""Serving an app over real TCP on a loopback port, for tests that need real sockets:
clients that hang up mid-request, a process that gets SIGTERM."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import ServerProcess, free_port
from tests.conftest import ROOT


class ServedApp:
    """The app in a process of its own (tests/faults/serve.py), on a loopback port."""

    def __init__(self, process: "subprocess.Popen[str]", port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def pool_checked_out(self) -> int:
        """The app's connection pool: connections checked out right now."""
        assert self.process.stdin is not None
        self.process.stdin.write("pool\n")
        self.process.stdin.flush()
        return self._read_pool_line()

    def terminate(self) -> None:
        """SIGTERM: uvicorn stops accepting, finishes what is in flight, then exits."""
        self.process.send_signal(signal.SIGTERM)

    def stopped(self, timeout: float = 60) -> int:
        """Wait for the exit after `terminate` (status 0); the pool's checked-out count then."""
        self.process.wait(timeout=timeout)
        assert self.process.returncode == 0, f"exit status {self.process.returncode}"
        return self._read_pool_line()

    def stop(self) -> int:
        self.terminate()
        return self.stopped()

    def _read_pool_line(self) -> int:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("pool checked out: "), line
        return int(line.rsplit(" ", 1)[1])


@contextmanager
def served_in_process(env: dict[str, str], log: Path) -> Iterator[ServedApp]:
    """The app under uvicorn in a process of its own, configured by `env` on top of this
    process's environment, logging to the file `log`; killed afterwards if still running.
    Raises `bench.harness.ServerNotAnswering` if it does not answer within 30 s."""
    port = free_port()
    with log.open("w") as log_file:
        server = ServerProcess(
            [sys.executable, "-m", "tests.faults.serve", "--port", str(port)], port,
            cwd=ROOT, env={**os.environ, **env}, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
        )
    try:
        server.wait_until_answers("/health/live", timeout=30)
        yield ServedApp(server.process, port)
    finally:
        server.kill()
