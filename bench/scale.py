"""The scale section of the benchmark: `python -m bench.scale`, under
`scripts/with-postgres.sh --replica` (`make bench` runs it after bench.run).

Read throughput of the first cursor page (GET /items/scroll, 20 rows of a 10,000-row table)
served by `python -m service serve --workers N`, for one worker vs two, and primary only vs
primary + its streaming replica (DATABASE_REPLICA_URLS). wrk drives 16 connections over
127.0.0.1; every number is the median of interleaved rounds; CPU comes from /proc, summed
over the server's whole process tree (supervisor and workers) and over each PostgreSQL
server's (postmaster and backends), so it shows which database did the reading. Writes
bench/SCALE.md.
"""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine, text

from bench.database import migrate, seed_table, service_env, service_settings
from bench.harness import Run, Series, ServerProcess, free_port, interleaved, log, wrk
from bench.scenarios import SCROLL, THROUGHPUT_ROWS
from service.db import create_engine
from service.db.replicas import lsn_to_int

BENCH = Path(__file__).resolve().parent
CONNECTIONS = 16
SECONDS = int(os.environ.get("SCALE_SECONDS", "5"))
ROUNDS = int(os.environ.get("SCALE_ROUNDS", "3"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and all its descendants (/proc)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return total  # it exited meanwhile
    return total + sum(tree_cpu_seconds(int(child)) for child in children)


def postmaster_pid(datadir: str) -> int:
    return int(Path(datadir, "postmaster.pid").read_text().splitlines()[0])


@dataclass
class Measured:
    run: Run
    primary_cpu_ms: float  # per request, all of the primary's processes
    replica_cpu_ms: float


def measure(server: ServerProcess, primary: int, replica: int) -> Measured:
    before = (tree_cpu_seconds(server.process.pid), tree_cpu_seconds(primary),
              tree_cpu_seconds(replica))
    run = wrk(server, SCROLL, CONNECTIONS, SECONDS)
    after = (tree_cpu_seconds(server.process.pid), tree_cpu_seconds(primary),
             tree_cpu_seconds(replica))
    per_request = [1000 * (a - b) / max(run.requests, 1) for a, b in zip(after, before,
                                                                         strict=True)]
    return Measured(replace(run, cpu_ms_per_request=per_request[0]), *per_request[1:])


VARIANTS = {  # name: (workers, with the replica)
    "1 worker, primary only": (1, False),
    "2 workers, primary only": (2, False),
    "1 worker, primary + replica": (1, True),
    "2 workers, primary + replica": (2, True),
}


def main() -> None:
    url = os.environ.get("DATABASE_URL", "")
    replica_url = os.environ.get("TEST_REPLICA_URL")
    if not replica_url:
        sys.exit("bench/scale.py needs a streaming replica: run it under "
                 "scripts/with-postgres.sh --replica (make bench does)")
    primary_pid = postmaster_pid(os.environ["TEST_PG_DATADIR"])
    replica_pid = postmaster_pid(os.environ["TEST_REPLICA_DATADIR"])
    engine = create_engine(url)
    log("scale: migrating and seeding")
    migrate(url)
    seed_table(engine, service_settings(url), THROUGHPUT_ROWS)
    catch_up(engine, create_engine(replica_url))

    servers: dict[str, ServerProcess] = {}
    for name, (workers, with_replica) in VARIANTS.items():
        port = free_port()
        env = {**service_env(url), "DB_POOL_SIZE": "10", "DB_MAX_OVERFLOW": "0"}
        if with_replica:
            env["DATABASE_REPLICA_URLS"] = replica_url
        servers[name] = ServerProcess(
            [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers",
             str(workers), "--no-access-log"],
            port, cwd=BENCH.parent, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    results: dict[str, list[Measured]] = {name: [] for name in VARIANTS}
    try:
        for server in servers.values():
            server.wait_until_answers("/health/ready")
        for server in servers.values():  # warm-up: every worker's pool and caches
            wrk(server, SCROLL, CONNECTIONS, 2)

        def case(name: str) -> Callable[[], Run]:
            def run() -> Run:
                measured = measure(servers[name], primary_pid, replica_pid)
                results[name].append(measured)
                return measured.run
            return run

        series = interleaved(ROUNDS, {name: case(name) for name in VARIANTS})
    finally:
        for server in servers.values():
            server.stop()
    report = render(series, results)
    (BENCH / "SCALE.md").write_text(report)
    print(report)


def catch_up(primary: Engine, replica: Engine, timeout: float = 60) -> None:
    """Wait until the replica has replayed everything the seed wrote."""
    with primary.connect() as connection:
        target = lsn_to_int(connection.scalar(text("SELECT pg_current_wal_lsn()::text")))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with replica.connect() as connection:
            done = connection.scalar(text("SELECT pg_last_wal_replay_lsn()::text"))
        if lsn_to_int(done) >= target:
            return
        time.sleep(0.1)
    sys.exit("the replica did not catch up with the seed")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def render(series: dict[str, Series], results: dict[str, list[Measured]]) -> str:
    lines = [
        "# Scale: workers and a read replica",
        "",
        f"`make bench FULL=1` (bench/scale.py): GET {SCROLL} (first cursor page of a "
        f"{THROUGHPUT_ROWS:,}-row table), wrk -c{CONNECTIONS}, {SECONDS} s per run, medians "
        f"of {ROUNDS} interleaved rounds, `python -m service serve --workers N` with "
        "DB_POOL_SIZE=10 per worker. CPU per request from /proc: the service's process tree, "
        "and each PostgreSQL server's (postmaster and backends). One 2-core machine runs wrk, "
        "the service and both database servers, so the columns say where the CPU goes more "
        "than what more hardware would give.",
        "",
        "| variant | req/s | p50 ms | p99 ms | service CPU ms/req | primary CPU ms/req "
        "| replica CPU ms/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in series.items():
        measured = results[name]
        lines.append(
            f"| {name} | {runs.median('rps'):,.0f} | {runs.median('p50_ms'):.1f} "
            f"| {runs.median('p99_ms'):.1f} | {runs.median('cpu_ms_per_request'):.2f} "
            f"| {median([m.primary_cpu_ms for m in measured]):.2f} "
            f"| {median([m.replica_cpu_ms for m in measured]):.2f} |"
        )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPUs, load average at the end {load}. Two workers can "
        "only help where a core is idle: here wrk, both PostgreSQL servers and anything else "
        "running share the same cores, so compare the CPU columns, not only req/s. The "
        "replica columns show the reads moving off the primary. See bench/NOTES.md, "
        "\"Capacity model\".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
