"""Measuring HTTP servers from the outside: a free loopback port, a server in a child
process (started, awaited until it answers, its CPU time and memory read from /proc,
stopped), wrk runs, and interleaved rounds (A B C A B C ...) summed up as medians.

Nothing here knows the service: a server is a command line and the port it listens on.
bench/run.py measures with it; tests that need a server on a real socket start it with it.
"""

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WRK_SCRIPT = Path(__file__).with_name("report.lua")  # makes wrk print its run as JSON


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerNotAnswering(RuntimeError):
    """A server process exited, or gave no answer in time, after it was started."""


class ServerProcess:
    """A server in a child process, listening on 127.0.0.1:`port`.

    `command` must make it listen on that port; `popen` goes to `subprocess.Popen` as is
    (`cwd`, `env`, pipes, `text`).
    """

    def __init__(self, command: Sequence[str], port: int, **popen: Any) -> None:
        self.port = port
        self.process: subprocess.Popen[Any] = subprocess.Popen(command, **popen)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_until_answers(self, path: str, timeout: float = 60) -> None:
        """Poll GET `path` until it answers with a 2xx status. Raises `ServerNotAnswering`
        as soon as the process exits, or after `timeout` seconds without such an answer."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerNotAnswering(
                    f"{self.url(path)}: the server exited with status {self.process.returncode}"
                )
            try:
                if httpx.get(self.url(path), timeout=5).is_success:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerNotAnswering(f"{self.url(path)}: no answer within {timeout:g} s")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far (/proc/<pid>/stat)."""
        # The command name, in parentheses, may hold spaces: count the fields after it.
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def rss_mib(self) -> float:
        """The process's resident memory (/proc/<pid>/status, VmRSS)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        return kib / 1024

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, and SIGKILL if it has not exited `grace` seconds later."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL if it is still running; then wait for the exit."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout)


def start_uvicorn(app: str, *, factory: bool = False, **popen: Any) -> ServerProcess:
    """`python -m uvicorn <app>` on a free loopback port: one worker, no access log, log
    level warning. `popen` as for `ServerProcess` (`cwd`, `env`)."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else []),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--no-access-log", "--log-level", "warning",
    ]
    return ServerProcess(command, port, **popen)


@dataclass
class Run:
    """One wrk run: what it counted and measured, and the server's CPU time per request."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_ms_per_request: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(server: ServerProcess, path: str, connections: int, seconds: int) -> Run:
    """GET `path` from `server` with wrk (one thread, `connections` connections) for
    `seconds`; the server's CPU time over the run comes from /proc."""
    cpu_before = server.cpu_seconds()
    output = subprocess.run(
        [
            "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(WRK_SCRIPT),
            server.url(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    run = parse_wrk(output, server_cpu_seconds=server.cpu_seconds() - cpu_before)
    if run.errors:
        log(f"  wrk reported {run.errors} errors for {path}")
    return run


def parse_wrk(output: str, server_cpu_seconds: float) -> Run:
    """The run in wrk's output: the one JSON line report.lua prints."""
    data = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    return Run(
        requests=data["requests"],
        seconds=data["seconds"],
        errors=data["errors"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        cpu_ms_per_request=1000 * server_cpu_seconds / max(data["requests"], 1),
    )


Measure = Literal["rps", "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_request"]


@dataclass
class Series:
    """Repeated runs of one measurement; reports show their medians."""

    runs: list[Run] = field(default_factory=list)

    def median(self, measure: Measure) -> float:
        return float(statistics.median(getattr(run, measure) for run in self.runs))


def interleaved(rounds: int, cases: Mapping[str, Callable[[], Run]]) -> dict[str, Series]:
    """Run every case once per round, in order, `rounds` times (A B C A B C ...): a slow
    drift of a noisy machine then hits every case alike, so their medians stay comparable.
    The series come back under the names of their cases."""
    results = {name: Series() for name in cases}
    for number in range(rounds):
        log(f"round {number + 1}/{rounds}: {', '.join(cases)}")
        for name, measure in cases.items():
            results[name].runs.append(measure())
    return results
