"""The benchmark: `make bench` (quick, a few minutes) or `make bench FULL=1` (adds 1M rows).

Runs against the PostgreSQL in DATABASE_URL (`make bench` starts a throwaway one), seeds
it with `python -m service seed`, serves every variant with uvicorn (one worker, no access
log), drives load with wrk over 127.0.0.1 and writes bench/RESULTS.md and bench/results.png.
Every number is the median of interleaved rounds (A B C A B C ...) taken in this one run,
so ratios hold on a noisy machine. Server CPU per request comes from /proc/<pid>/stat.
"""

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psycopg2
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CURSOR_SECRET = "benchmark-only-cursor-secret"
API_TOKEN = "benchmark-only-api-token"

# Seconds per wrk run: load (16 connections), the latency table and the scans (depth, size,
# count modes: one connection, where ~150 requests a second give a steady p50).
QUICK = {
    "rounds": 3,
    "load_seconds": 3,
    "latency_seconds": 2,
    "scan_seconds": 1,
    "connections": 16,
}
# FULL=1 has no time budget: more and longer rounds, for steadier medians.
FULL = {**QUICK, "rounds": 5, "load_seconds": 5}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env() -> dict[str, str]:
    return {
        **os.environ,
        "CURSOR_SECRET": CURSOR_SECRET,
        "API_TOKENS": API_TOKEN,
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }


class Server:
    """One uvicorn process serving `bench.apps:<factory>`."""

    def __init__(self, factory: str) -> None:
        self.factory = factory
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                f"bench.apps:{factory}",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=server_env(),
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url(path), timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.factory} exited")
            time.sleep(0.2)
        raise RuntimeError(f"server {self.factory} did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        return kib / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Run:
    """One wrk run."""

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


def wrk(server: Server, path: str, connections: int, seconds: float) -> Run:
    cpu_before = server.cpu_seconds()
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(BENCH / "report.lua"),
            server.url(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = server.cpu_seconds() - cpu_before
    line = next(line for line in output.splitlines() if line.startswith("{"))
    data = json.loads(line)
    if data["errors"]:
        log(f"  wrk reported {data['errors']} errors for {path}")
    return Run(
        requests=data["requests"],
        seconds=data["seconds"],
        errors=data["errors"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        cpu_ms_per_request=1000 * cpu / max(data["requests"], 1),
    )


@dataclass
class Series:
    """Repeated runs of one measurement; the table shows medians."""

    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)


def interleaved(rounds: int, cases: dict[str, Callable[[], Run]]) -> dict[str, Series]:
    results = {name: Series() for name in cases}
    for number in range(rounds):
        log(f"round {number + 1}/{rounds}: {', '.join(cases)}")
        for name, measure in cases.items():
            results[name].runs.append(measure())
    return results


# -- database -----------------------------------------------------------------------------


def cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"python -m service {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout + result.stderr


def seed_table(engine: Engine, rows: int) -> float | None:
    """Make the table hold exactly `rows` freshly seeded items: empty it and run the seed
    command, as when filling a new database; the command's rows/s. Nothing to do if it
    holds `rows` already."""
    if count_rows(engine) == rows:
        return None
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE items"))
    log(f"seeding {rows:,} items into the empty table")
    output = cli("seed", "--items", str(rows))
    with engine.begin() as connection:
        connection.execute(text("ANALYZE items"))
    rates = re.findall(r"\(([\d,]+) rows/s\)", output)
    return float(rates[-1].replace(",", "")) if rates else None


def count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM items")).scalar_one())


def id_at(engine: Engine, position: int) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT id FROM items ORDER BY id OFFSET :n LIMIT 1"), {"n": position}
            ).scalar_one()
        )


def scroll_path(engine: Engine, page: int, size: int = 20) -> str:
    """/items/scroll at the same depth as `/items?page=page`: a cursor after the last row
    of the page before."""
    from service.cursors import sign_cursor

    if page == 1:
        return f"/items/scroll?size={size}"
    after = id_at(engine, (page - 1) * size - 1)
    cursor = sign_cursor({"sort": "id", "after": [after, after]}, CURSOR_SECRET.encode())
    return f"/items/scroll?size={size}&cursor={cursor}"


def statements_of(path: str) -> list[tuple[str, Any]]:
    """The SQL statements (with parameters) the service runs for `path`."""
    os.environ.update(CURSOR_SECRET=CURSOR_SECRET, API_TOKENS=API_TOKEN, LOG_LEVEL="WARNING")
    from service.config import Settings
    from service.main import create_app

    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        captured.append((statement, parameters))

    app = create_app(Settings())
    event.listen(Engine, "before_cursor_execute", capture)
    try:
        import anyio

        async def call() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                response = await client.get(path)
                response.raise_for_status()

        anyio.run(call)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    return captured


def raw_sql(url: str, statements: list[tuple[str, Any]], seconds: float) -> dict[str, float]:
    """The floor: the same statements straight through psycopg2, in a loop, no HTTP."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    cursor = connection.cursor()
    timings: list[list[float]] = [[] for _ in statements]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for n, (statement, parameters) in enumerate(statements):
            started = time.perf_counter()
            cursor.execute(statement, parameters)
            cursor.fetchall()
            timings[n].append(time.perf_counter() - started)
    connection.close()
    executed = sum(len(t) for t in timings)
    return {
        "statements_per_second": executed / seconds,
        "per_statement_ms": [1000 * statistics.median(t) for t in timings],  # type: ignore[dict-item]
        "page_ms": sum(1000 * statistics.median(t) for t in timings),
    }


COUNT_MODES = {
    "count=estimated (default)": "/items?size=20",
    "count=exact": "/items?size=20&count=exact",
    "count=none": "/items?size=20&count=none",
    "cursor page (/items/scroll)": "/items/scroll?size=20",
}


def count_modes(service: Server, cfg: dict[str, Any]) -> dict[str, Series]:
    lat = cfg["scan_seconds"]
    return interleaved(
        cfg["rounds"],
        {name: lambda p=path: wrk(service, p, 1, lat) for name, path in COUNT_MODES.items()},
    )


def count_checks(engine: Engine, service: Server) -> dict[str, tuple[str, bool]]:
    """count=exact is exact; count=none is one statement (the Server-Timing header)."""
    total = httpx.get(service.url("/items?size=1&count=exact")).json()["total"]
    rows = count_rows(engine)
    timing = httpx.get(service.url("/items?size=20&count=none")).headers["server-timing"]
    return {
        "count=exact returns the exact number": (f"{total:,} of {rows:,}", total == rows),
        "count=none costs one statement": (timing, '"1 query"' in timing),
    }


# -- report -------------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    return f"{os.cpu_count()} cores ({model}), {mem / 2**20:.0f} GiB"


def versions(engine: Engine) -> str:
    with engine.connect() as connection:
        server = connection.execute(text("SHOW server_version")).scalar_one()
    packages = [
        "fastapi",
        "starlette",
        "sqlalchemy",
        "fastapi-pagination",
        "psycopg2-binary",
        "uvicorn",
        "fastapi-sqlalchemy",
    ]
    listed = ", ".join(f"{name} {version(name)}" for name in packages)
    return f"Python {platform.python_version()}, PostgreSQL {server}, {listed}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="also measure 1M rows")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if make_url(url).get_backend_name() != "postgresql":
        sys.exit("bench/run.py needs DATABASE_URL of a PostgreSQL database (make bench starts one)")
    cfg = FULL if args.full else QUICK
    started = time.monotonic()

    from service.db import create_engine

    engine = create_engine(url)
    log("migrating")
    cli("migrate")
    seed_rates: list[tuple[int, float]] = []
    rate = seed_table(engine, 10_000)
    if rate:
        seed_rates.append((10_000, rate))

    # -- variants: same list handler, same database ---------------------------------------
    names = ["ours", "peer", "depends", "constant", "service"]
    servers = {name: Server(name) for name in names}
    try:
        for name, server in servers.items():
            server.wait_ready("/health/live" if name == "service" else "/items")
        c, secs = cfg["connections"], cfg["load_seconds"]
        page, scroll = "/items?size=20", "/items/scroll?size=20"
        for name in names:  # warm-up
            wrk(servers[name], page, c, 1)
        throughput = interleaved(
            cfg["rounds"],
            {
                "ours: DBSessionMiddleware": lambda: wrk(servers["ours"], page, c, secs),
                "peer: fastapi-sqlalchemy 0.2.1": lambda: wrk(servers["peer"], page, c, secs),
                "Depends(get_db)": lambda: wrk(servers["depends"], page, c, secs),
                "constant JSON (no database)": lambda: wrk(servers["constant"], page, c, secs),
                "service GET /items": lambda: wrk(servers["service"], page, c, secs),
                "service GET /items/scroll": lambda: wrk(servers["service"], scroll, c, secs),
            },
        )
        lat = cfg["latency_seconds"]
        latency = interleaved(
            cfg["rounds"],
            {
                "service GET /items": lambda: wrk(servers["service"], page, 1, lat),
                "service GET /items/scroll": lambda: wrk(servers["service"], scroll, 1, lat),
                "ours: DBSessionMiddleware": lambda: wrk(servers["ours"], page, 1, lat),
                "Depends(get_db)": lambda: wrk(servers["depends"], page, 1, lat),
            },
        )
        for name in ("ours", "peer", "depends", "constant"):
            servers.pop(name).stop()
        service = servers["service"]

        log("floor: the same SQL through psycopg2")
        floor_page = raw_sql(url, statements_of(page), 3)
        floor_scroll = raw_sql(url, statements_of(scroll), 3)

        # -- size: a cursor page in the middle of 10k, 100k (, 1M) rows --------------------
        sizes = [10_000, 100_000] + ([1_000_000] if args.full else [])
        size_scan: dict[int, Series] = {}
        depth_rows = 200_000
        scan = cfg["scan_seconds"]
        for rows in sizes:
            rate = seed_table(engine, rows)
            if rate:
                seed_rates.append((rows, rate))
            middle = scroll_path(engine, rows // 40)
            size_scan[rows] = interleaved(
                cfg["rounds"], {f"scroll, {rows:,} rows": lambda p=middle: wrk(service, p, 1, scan)}
            )[f"scroll, {rows:,} rows"]
            if rows == 100_000:
                rate = seed_table(engine, depth_rows)
                if rate:
                    seed_rates.append((depth_rows, rate))
                depth_scan = depth(engine, service, cfg)

        # -- totals: count modes on the largest table -----------------------------------
        final_rows = count_rows(engine)
        counting = count_modes(service, cfg)
        checks = count_checks(engine, service)

        # -- memory ------------------------------------------------------------------------
        # 100k requests with a query take this machine 3.5 (SELECT 1) to 7 (cursor page)
        # minutes, more than the quick run's budget: quick mode drives the middleware's
        # per-request path (admission, scope, session, close) without I/O; FULL=1 uses the
        # cursor page.
        memory_path = scroll if args.full else "/health/live"
        log(f"memory: RSS after 1k and after 100k requests of {memory_path}")
        with httpx.Client() as client:
            for _ in range(1_000):
                client.get(service.url(memory_path)).raise_for_status()
        rss_1k = service.rss_mib()
        served = 1_000
        while served < 100_000:
            served += wrk(service, memory_path, 16, 5).requests
        rss_100k = service.rss_mib()
    finally:
        for server in servers.values():
            server.stop()

    report = Report(
        machine=machine(),
        versions=versions(engine),
        full=args.full,
        throughput=throughput,
        latency=latency,
        floor_page=floor_page,
        floor_scroll=floor_scroll,
        depth=depth_scan,
        depth_rows=depth_rows,
        size=size_scan,
        final_rows=final_rows,
        counting=counting,
        checks=checks,
        rss=(rss_1k, rss_100k),
        memory_path=memory_path,
        seed=seed_rates,
        config=cfg,
        seconds=time.monotonic() - started,
    )
    report.write(BENCH / "RESULTS.md", BENCH / "results.png")
    print((BENCH / "RESULTS.md").read_text())


DEPTHS = (1, 100, 10_000)


def depth(engine: Engine, service: Server, cfg: dict[str, Any]) -> dict[str, Series]:
    cases: dict[str, Callable[[], Run]] = {}
    for page in DEPTHS:
        offset_path = f"/items?size=20&page={page}"
        scroll_at = scroll_path(engine, page)
        cases[f"offset page {page}"] = lambda p=offset_path: wrk(
            service, p, 1, cfg["scan_seconds"]
        )
        cases[f"scroll page {page}"] = lambda p=scroll_at: wrk(
            service, p, 1, cfg["scan_seconds"]
        )
    return interleaved(cfg["rounds"], cases)


@dataclass
class Report:
    machine: str
    versions: str
    full: bool
    throughput: dict[str, Series]
    latency: dict[str, Series]
    floor_page: dict[str, float]
    floor_scroll: dict[str, float]
    depth: dict[str, Series]
    depth_rows: int
    size: dict[int, Series]
    final_rows: int
    counting: dict[str, Series]
    checks: dict[str, tuple[str, bool]]
    rss: tuple[float, float]
    memory_path: str
    seed: list[tuple[int, float]]  # (rows seeded, rows/s)
    config: dict[str, Any]
    seconds: float

    def targets(self) -> list[tuple[str, str, bool]]:
        t = {name: s.median("rps") for name, s in self.throughput.items()}
        ours, peer = t["ours: DBSessionMiddleware"], t["peer: fastapi-sqlalchemy 0.2.1"]
        depends, constant = t["Depends(get_db)"], t["constant JSON (no database)"]
        page1 = self.depth["scroll page 1"].median("p50_ms")
        deep = self.depth["scroll page 10000"].median("p50_ms")
        p50 = self.latency["service GET /items"].median("p50_ms")
        overhead = p50 - self.floor_page["page_ms"]
        rss_1k, rss_100k = self.rss
        seed = statistics.median(rate for _, rate in self.seed) if self.seed else 0.0
        estimated = self.counting["count=estimated (default)"].median("p50_ms")
        cursor = self.counting["cursor page (/items/scroll)"].median("p50_ms")
        return [
            (
                "ours vs Depends(get_db): throughput loss <= 3 %",
                f"{ours / depends:.3f}x ({100 * (1 - ours / depends):+.1f} % loss)",
                ours / depends >= 0.97,
            ),
            ("ours vs fastapi-sqlalchemy 0.2.1 >= 1.0x", f"{ours / peer:.3f}x", ours >= peer),
            (
                "items page / constant endpoint >= 0.5",
                f"{t['service GET /items'] / constant:.3f}",
                t["service GET /items"] / constant >= 0.5,
            ),
            (
                "cursor page at depth 10,000 <= 1.5x page 1",
                f"{deep / page1:.2f}x ({deep:.2f} / {page1:.2f} ms)",
                deep <= 1.5 * page1,
            ),
            (
                "p50 latency - raw SQL time <= 1 ms",
                f"{overhead:.2f} ms ({p50:.2f} - {self.floor_page['page_ms']:.2f})",
                overhead <= 1.0,
            ),
            (
                "RSS after 100k / after 1k <= 1.1",
                f"{rss_100k / rss_1k:.3f} ({rss_100k:.1f} / {rss_1k:.1f} MiB)",
                rss_100k / rss_1k <= 1.1,
            ),
            ("seed >= 50,000 rows/s", f"{seed:,.0f} rows/s", seed >= 50_000),
            (
                f"/items (count=estimated) p50 <= 2x cursor page p50, {self.final_rows:,} rows"
                + ("" if self.final_rows >= 1_000_000 else " (the target names 1M: FULL=1)"),
                f"{estimated / cursor:.2f}x ({estimated:.2f} / {cursor:.2f} ms)",
                estimated <= 2 * cursor,
            ),
            *((name, value, ok) for name, (value, ok) in self.checks.items()),
        ]

    def write(self, markdown: Path, plot: Path) -> None:
        lines = [
            "# Benchmark results",
            "",
            f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by "
            f"`make bench{' FULL=1' if self.full else ''}` in {self.seconds / 60:.1f} min. "
            f"Machine: {self.machine}.",
            f"Software: {self.versions}.",
            "Each server: uvicorn, 1 worker, no access log; load from wrk over 127.0.0.1. "
            f"Medians of {self.config['rounds']} interleaved rounds; wrk runs of "
            f"{self.config['load_seconds']} s under load, {self.config['latency_seconds']} s for "
            f"the latency table, {self.config['scan_seconds']} s per scan case.",
            "",
            "## Targets",
            "",
            "| target | measured | |",
            "| --- | --- | --- |",
            *(f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in self.targets()),
            "",
            "## Throughput: the same list handler (COUNT + 20 rows of 10,000), 16 connections",
            "",
            "| variant | req/s | server CPU ms/req | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('rps'):,.0f} | {s.median('cpu_ms_per_request'):.2f} | "
                f"{s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} |"
                for name, s in self.throughput.items()
            ),
            "",
            "## Latency, one connection",
            "",
            "| request | p50 ms | p90 ms | p99 ms | server CPU ms/req |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('p50_ms'):.2f} | {s.median('p90_ms'):.2f} | "
                f"{s.median('p99_ms'):.2f} | {s.median('cpu_ms_per_request'):.2f} |"
                for name, s in self.latency.items()
            ),
            "",
            "## Floor: the same SQL straight through psycopg2 (no HTTP, no ORM)",
            "",
            "| statements of | statements/s | p50 ms per statement | p50 ms per page |",
            "| --- | ---: | --- | ---: |",
            *(
                f"| {name} | {f['statements_per_second']:,.0f} | "
                f"{', '.join(f'{ms:.3f}' for ms in f['per_statement_ms'])} | {f['page_ms']:.3f} |"  # type: ignore[attr-defined]
                for name, f in (
                    ("GET /items", self.floor_page),
                    ("GET /items/scroll", self.floor_scroll),
                )
            ),
            "",
            f"## Depth: offset pages against cursor pages ({self.depth_rows:,} rows), "
            "one connection",
            "",
            "| page | offset p50 ms | cursor p50 ms |",
            "| ---: | ---: | ---: |",
            *(
                f"| {page:,} | {self.depth[f'offset page {page}'].median('p50_ms'):.2f} | "
                f"{self.depth[f'scroll page {page}'].median('p50_ms'):.2f} |"
                for page in DEPTHS
            ),
            "",
            "## Size: a cursor page in the middle of the table, one connection",
            "",
            "| rows | p50 ms | p99 ms |",
            "| ---: | ---: | ---: |",
            *(
                f"| {rows:,} | {s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} |"
                for rows, s in self.size.items()
            ),
            "",
            f"## Totals: GET /items?size=20 by count mode ({self.final_rows:,} rows), "
            "one connection",
            "",
            "| request | p50 ms | p99 ms | server CPU ms/req |",
            "| --- | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} | "
                f"{s.median('cpu_ms_per_request'):.2f} |"
                for name, s in self.counting.items()
            ),
            "",
            "## Memory and seeding",
            "",
            f"- Worker RSS after 1k requests of `GET {self.memory_path}`: {self.rss[0]:.1f} MiB; "
            f"after 100k: {self.rss[1]:.1f} MiB.",
            "- Seed throughput (python -m service seed into the emptied table): "
            + "; ".join(f"{rows:,} items at {rate:,.0f} rows/s" for rows, rate in self.seed)
            + ".",
            "",
            "![results](results.png)",
            "",
        ]
        # What bounds the missed targets: kept by hand in NOTES.md, shown with every result.
        notes = (BENCH / "NOTES.md").read_text().splitlines()
        lines += ["## " + notes[0].removeprefix("# "), *notes[1:], ""]
        markdown.write_text("\n".join(lines))
        self.plot(plot)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 5))
        names = list(self.throughput)
        left.barh(names, [self.throughput[n].median("rps") for n in names], color="#4c72b0")
        left.set_xlabel("requests/s (median)")
        left.set_title("Throughput, 16 connections")
        left.invert_yaxis()
        pages = list(DEPTHS)
        middle.plot(
            pages,
            [self.depth[f"offset page {p}"].median("p50_ms") for p in pages],
            "o-",
            label="offset (/items)",
        )
        middle.plot(
            pages,
            [self.depth[f"scroll page {p}"].median("p50_ms") for p in pages],
            "s-",
            label="cursor (/items/scroll)",
        )
        middle.set_xscale("log")
        middle.set_xlabel("page number")
        middle.set_ylabel("p50 ms")
        middle.set_title(f"Depth ({self.depth_rows:,} rows)")
        middle.legend()
        rows = list(self.size)
        right.plot(rows, [self.size[r].median("p50_ms") for r in rows], "s-")
        right.set_xscale("log")
        right.set_xlabel("rows in table")
        right.set_ylabel("p50 ms")
        right.set_title("Cursor page vs table size")
        right.set_ylim(bottom=0)
        figure.tight_layout()
        figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
