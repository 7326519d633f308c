"""The report of a benchmark run: bench/RESULTS.md (the targets, a table per scenario, and
bench/NOTES.md below them) and bench/results.png."""

import os
import platform
import re
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from sqlalchemy import Engine, text

from bench.database import SeedRate
from bench.harness import Series
from bench.scenarios import (
    DEPTHS,
    THROUGHPUT_ROWS,
    Budget,
    CountChecks,
    CountModes,
    Depth,
    Floor,
    Latency,
    Memory,
    RawChecks,
    ScrollLoad,
    TelemetryCost,
    Throughput,
)

NOTES = Path(__file__).with_name("NOTES.md")

# Issue #13's targets and reference rows: server CPU ms per request where the issue was
# measured (the same kind of VM), against which its absolute targets were set.
SCROLL_TARGET_MS = 1.2
PAGE_TARGET_MS = 2.0  # GET /items?size=20, count=estimated, 1M rows
ISSUE_REFERENCE_MS = 0.94  # `async def`, AsyncSession on asyncpg, Core rows, orjson body
ISSUE_MEMORY_MS = 0.26  # FastAPI + pydantic serving the same 20 items from memory
ISSUE_RAW_MS = (0.38, 0.52)  # a raw asyncpg pool + orjson, from run to run


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
        "asyncpg",
        "fastapi-async-sqlalchemy",
        "orjson",
    ]
    listed = ", ".join(f"{name} {version(name)}" for name in packages)
    return f"Python {platform.python_version()}, PostgreSQL {server}, {listed}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Report:
    machine: str
    versions: str
    budget: Budget
    throughput: Throughput
    scroll_load: ScrollLoad
    telemetry: TelemetryCost
    raw_checks: RawChecks
    latency: Latency
    floor_page: Floor
    floor_scroll: Floor
    depth: Depth
    size: dict[int, Series]  # by rows in the table
    counting: CountModes
    checks: CountChecks
    memory: Memory
    seeds: list[SeedRate]
    seconds: float

    def targets(self) -> list[tuple[str, str, bool]]:
        t = self.throughput
        ours, peer = t.ours.median("rps"), t.peer.median("rps")
        depends, constant = t.depends.median("rps"), t.constant.median("rps")
        page = t.service_page.median("rps")
        deepest = DEPTHS[-1]
        page1 = self.depth.cursor[1].median("p50_ms")
        deep = self.depth.cursor[deepest].median("p50_ms")
        p50 = self.latency.service_page.median("p50_ms")
        ours_p50 = self.latency.ours.median("p50_ms")
        peer_p50 = self.latency.peer.median("p50_ms")
        overhead = p50 - self.floor_page.page_ms
        rss_1k, rss_100k = self.memory.rss_1k_mib, self.memory.rss_100k_mib
        seed = statistics.median(s.rows_per_second for s in self.seeds) if self.seeds else 0.0
        rows = self.counting.rows
        estimated = self.counting.estimated.median("p50_ms")
        cursor = self.counting.cursor.median("p50_ms")
        checks = self.checks
        return [
            (
                "ours vs Depends(get_db): throughput loss <= 3 %",
                f"{ours / depends:.3f}x ({100 * (1 - ours / depends):+.1f} % loss)",
                ours / depends >= 0.97,
            ),
            (
                "ours vs fastapi-sqlalchemy 0.2.1 >= 1.0x: throughput",
                f"{ours / peer:.3f}x",
                ours >= peer,
            ),
            (
                "ours vs fastapi-sqlalchemy 0.2.1 >= 1.0x: one connection, p50 latency "
                "(the peer's p50 / ours)",
                f"{peer_p50 / ours_p50:.3f}x ({peer_p50:.2f} / {ours_p50:.2f} ms)",
                ours_p50 <= peer_p50,
            ),
            (
                "items page / constant endpoint >= 0.5",
                f"{page / constant:.3f}",
                page / constant >= 0.5,
            ),
            (
                f"cursor page at depth {deepest:,} <= 1.5x page 1",
                f"{deep / page1:.2f}x ({deep:.2f} / {page1:.2f} ms)",
                deep <= 1.5 * page1,
            ),
            (
                "p50 latency - raw SQL time <= 1 ms",
                f"{overhead:.2f} ms ({p50:.2f} - {self.floor_page.page_ms:.2f})",
                overhead <= 1.0,
            ),
            (
                "RSS after 100k / after 1k <= 1.1",
                f"{rss_100k / rss_1k:.3f} ({rss_100k:.1f} / {rss_1k:.1f} MiB)",
                rss_100k / rss_1k <= 1.1,
            ),
            ("seed >= 50,000 rows/s", f"{seed:,.0f} rows/s", seed >= 50_000),
            (
                f"/items (count=estimated) p50 <= 2x cursor page p50, {rows:,} rows"
                + ("" if rows >= 1_000_000 else " (the target names 1M: FULL=1)"),
                f"{estimated / cursor:.2f}x ({estimated:.2f} / {cursor:.2f} ms)",
                estimated <= 2 * cursor,
            ),
            (
                "count=exact returns the exact number",
                f"{checks.exact_total:,} of {checks.rows:,}",
                checks.exact_is_exact,
            ),
            (
                "count=none costs one statement",
                checks.none_server_timing,
                checks.none_is_one_statement,
            ),
            *self.async_targets(),
            self.telemetry_target(),
        ]

    def telemetry_target(self) -> tuple[str, str, bool]:
        """Issue #15: request ids + access line + metrics, server CPU per request."""
        t = self.telemetry
        layers = t.layers.cost_ms if t.layers else float("nan")
        return (
            "logs + metrics (+ request ids): CPU added per request on GET "
            "/items/scroll?size=20 <= 0.15 ms (the layers in-process; end to end, "
            f"{self.budget.connections} connections, in brackets)",
            f"{layers:+.3f} ms (end to end: {t.cost_ms():+.3f} ms, "
            f"{t.observed.median('cpu_ms_per_request'):.3f} vs "
            f"{t.unobserved.median('cpu_ms_per_request'):.3f} ms)",
            layers <= 0.15,
        )

    def async_targets(self) -> list[tuple[str, str, bool]]:
        """Issue #13: the async service against its sync self (measured in this run), the
        session managers and the raw floor. CPU is the server's, per request, from /proc."""
        load = self.scroll_load

        def cpu(series: Series) -> float:
            return series.median("cpu_ms_per_request")

        scroll, scroll_sync = cpu(load.service_async), cpu(load.service_sync)
        ours, peer, depends, raw = cpu(load.ours), cpu(load.peer), cpu(load.depends), cpu(load.raw)
        reference = cpu(load.reference)
        c = self.counting
        page, page_sync = cpu(c.estimated_loaded), cpu(c.sync_estimated)
        page_alone = cpu(c.estimated)
        p50, cursor = c.estimated.median("p50_ms"), c.cursor.median("p50_ms")
        p50_sync, cursor_sync = c.sync_estimated.median("p50_ms"), c.sync_cursor.median("p50_ms")
        under_load = f"{self.budget.connections} connections"
        peer_name = f"fastapi-async-sqlalchemy {version('fastapi-async-sqlalchemy')}"
        return [
            (
                f"async GET /items/scroll?size=20: server CPU <= 1.2 ms/request ({under_load})",
                f"{scroll:.2f} ms (sync: {scroll_sync:.2f} ms)",
                scroll <= SCROLL_TARGET_MS,
            ),
            (
                f"async GET /items?size=20 (count=estimated), {c.rows:,} rows: server CPU <= "
                f"2.0 ms/request ({under_load}) and p50 <= 2x cursor page p50 (one "
                "connection)" + ("" if c.rows >= 1_000_000 else "; the target names 1M: FULL=1"),
                f"{page:.2f} ms (one connection: {page_alone:.2f}), {p50 / cursor:.2f}x "
                f"({p50:.2f} / {cursor:.2f} ms); sync, one connection: {page_sync:.2f} ms, "
                f"{p50_sync / cursor_sync:.2f}x",
                page <= PAGE_TARGET_MS and p50 <= 2 * cursor,
            ),
            (
                f"async GET /items?size=20 (count=estimated), {c.rows:,} rows: server CPU "
                f"<= {PAGE_TARGET_MS / ISSUE_REFERENCE_MS:.2f}x issue #13's reference stack "
                f"({under_load}): the 2.0 ms target against the issue's own reference row",
                f"{page / reference:.2f}x ({page:.2f} / {reference:.2f} ms; 2.0 ms there is "
                f"{PAGE_TARGET_MS / ISSUE_REFERENCE_MS * reference:.2f} ms here)",
                page * ISSUE_REFERENCE_MS <= PAGE_TARGET_MS * reference,
            ),
            (
                f"async rows handler, ours vs {peer_name}: CPU/request <= 1.03x ({under_load})",
                f"{ours / peer:.3f}x ({ours:.2f} / {peer:.2f} ms)",
                ours <= 1.03 * peer,
            ),
            (
                f"async rows handler, ours vs Depends(get_async_db): CPU/request <= 1.03x "
                f"({under_load})",
                f"{ours / depends:.3f}x ({ours:.2f} / {depends:.2f} ms)",
                ours <= 1.03 * depends,
            ),
            (
                "async GET /items/scroll / raw asyncpg + orjson, CPU per request <= 3.0 "
                f"({under_load})",
                f"{scroll / raw:.2f} ({scroll:.2f} / {raw:.2f} ms; sync: {scroll_sync / raw:.2f})",
                scroll <= 3.0 * raw,
            ),
            (
                "async GET /items/scroll / issue #13's reference stack (plain AsyncSession, "
                f"Core rows, orjson; {ISSUE_REFERENCE_MS} ms in the issue), CPU per request <= "
                f"{SCROLL_TARGET_MS / ISSUE_REFERENCE_MS:.2f}: the 1.2 ms target measured "
                f"against the issue's own reference row ({under_load})",
                f"{scroll / reference:.2f} ({scroll:.2f} / {reference:.2f} ms; 1.2 ms there "
                f"is {SCROLL_TARGET_MS / ISSUE_REFERENCE_MS * reference:.2f} ms here)",
                scroll * ISSUE_REFERENCE_MS <= SCROLL_TARGET_MS * reference,
            ),
            (
                "the raw floor runs the service's scroll SQL and answers its JSON; so do "
                "the issue's reference stacks",
                str(self.raw_checks),
                self.raw_checks.same_sql and self.raw_checks.same_json
                and self.raw_checks.references_same_json,
            ),
        ]

    def calibration(self) -> str:
        """Issue #13's reference rows as the issue measured them and as this run did."""
        load = self.scroll_load
        memory, reference = load.memory.median("cpu_ms_per_request"), load.reference.median(
            "cpu_ms_per_request"
        )
        raw = load.raw.median("cpu_ms_per_request")
        return (
            "Issue #13 set its absolute targets (1.2 ms for this page, 2.0 ms for the numbered "
            f"page) where its reference rows measured: FastAPI from memory {ISSUE_MEMORY_MS} "
            f"ms, the plain AsyncSession stack {ISSUE_REFERENCE_MS} ms, the raw asyncpg floor "
            f"{ISSUE_RAW_MS[0]}-{ISSUE_RAW_MS[1]} ms. In this run they measure {memory:.2f}, "
            f"{reference:.2f} and "
            f"{raw:.2f} ms ({memory / ISSUE_MEMORY_MS:.1f}x, "
            f"{reference / ISSUE_REFERENCE_MS:.1f}x and "
            f"{raw / ISSUE_RAW_MS[1]:.1f}x the issue's, the floor against "
            "its upper value): the two targets are read against them in the Targets table."
        )

    def markdown(self) -> str:
        budget = self.budget
        lines = [
            "# Benchmark results",
            "",
            f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by "
            f"`make bench{' FULL=1' if budget.full else ''}` in {self.seconds / 60:.1f} min. "
            f"Machine: {self.machine}.",
            f"Software: {self.versions}.",
            "Each server: uvicorn, 1 worker, no access log; load from wrk over 127.0.0.1. "
            f"Medians of {budget.rounds} interleaved rounds; wrk runs of "
            f"{budget.load_seconds} s under load, {budget.latency_seconds} s for "
            f"the latency table, {budget.scan_seconds} s per scan case.",
            "",
            "## Targets",
            "",
            "| target | measured | |",
            "| --- | --- | --- |",
            *(f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in self.targets()),
            "",
            f"## Throughput: the same list handler (COUNT + 20 rows of {THROUGHPUT_ROWS:,}), "
            f"{budget.connections} connections",
            "",
            "| variant | req/s | server CPU ms/req | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('rps'):,.0f} | {s.median('cpu_ms_per_request'):.2f} | "
                f"{s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} |"
                for name, s in self.throughput.labelled()
            ),
            "",
            f"## Async: the first cursor page (20 rows of {THROUGHPUT_ROWS:,}), "
            f"{budget.connections} connections",
            "",
            "The service's `GET /items/scroll?size=20` async and as it was sync; one async "
            "handler reading the same rows (Core, rendered as the service's `ItemScroll`) "
            "under three session managers, each with its defaults (a transaction per "
            "request: ours commits it, the other two roll it back), and under ours as the "
            "service configures it (GETs read outside a transaction: no BEGIN, no COMMIT); "
            "and the floor: the service's SQL on an asyncpg pool, the same JSON made by "
            "orjson. Same engine settings for all.",
            "",
            "| variant | req/s | server CPU ms/req | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('rps'):,.0f} | {s.median('cpu_ms_per_request'):.2f} | "
                f"{s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} |"
                for name, s in self.scroll_load.labelled()
            ),
            "",
            self.calibration(),
            "",
            "## Operability: request ids, access line, metrics (issue #15), "
            f"GET /items/scroll?size=20, {budget.connections} connections",
            "",
            "The service without them, with request ids and metrics (the access line off "
            "by LOG_LEVEL=WARNING, as every other service row here), and with one JSON "
            "access line per request at INFO written to a file. Medians of "
            f"{len(self.telemetry.observed.runs)} interleaved rounds; the cost is the median "
            "of the per-round differences.",
            "",
            "| variant | req/s | server CPU ms/req | cost ms/req | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('rps'):,.0f} | {s.median('cpu_ms_per_request'):.3f} | "
                f"{self.telemetry.cost_ms(s):+.3f} | "
                f"{s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} |"
                for name, s in self.telemetry.labelled()
            ),
            "",
            *(
                [
                    "The layers alone, in one process (bench/telemetry_layers.py: the same "
                    f"requests through both chains, {self.telemetry.layers.rounds} alternating "
                    f"rounds of {self.telemetry.layers.requests:,}): "
                    f"{self.telemetry.layers.bare_us:.1f} -> "
                    f"{self.telemetry.layers.observed_us:.1f} us of CPU per request, "
                    f"**{self.telemetry.layers.cost_ms:+.3f} ms**.",
                    "",
                ]
                if self.telemetry.layers
                else []
            ),
            "## Latency, one connection",
            "",
            "| request | p50 ms | p90 ms | p99 ms | server CPU ms/req |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('p50_ms'):.2f} | {s.median('p90_ms'):.2f} | "
                f"{s.median('p99_ms'):.2f} | {s.median('cpu_ms_per_request'):.2f} |"
                for name, s in self.latency.labelled()
            ),
            "",
            "## Floor: the same SQL straight through psycopg2 (no HTTP, no ORM)",
            "",
            "| statements of | statements/s | p50 ms per statement | p50 ms per page |",
            "| --- | ---: | --- | ---: |",
            *(
                f"| {name} | {f.statements_per_second:,.0f} | "
                f"{', '.join(f'{ms:.3f}' for ms in f.per_statement_ms)} | {f.page_ms:.3f} |"
                for name, f in (
                    ("GET /items", self.floor_page),
                    ("GET /items/scroll", self.floor_scroll),
                )
            ),
            "",
            f"## Depth: offset pages against cursor pages ({self.depth.rows:,} rows), "
            "one connection",
            "",
            "| page | offset p50 ms | cursor p50 ms |",
            "| ---: | ---: | ---: |",
            *(
                f"| {page:,} | {self.depth.offset[page].median('p50_ms'):.2f} | "
                f"{self.depth.cursor[page].median('p50_ms'):.2f} |"
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
            f"## Totals: GET /items?size=20 by count mode ({self.counting.rows:,} rows), "
            "one connection",
            "",
            "Each row on one connection, but for `count=estimated, under load`: "
            f"{budget.connections} connections, as the CPU targets are measured (a request "
            "costs less CPU under load: the event loop handles several at a time).",
            "",
            "| request | p50 ms | p99 ms | server CPU ms/req |",
            "| --- | ---: | ---: | ---: |",
            *(
                f"| {name} | {s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} | "
                f"{s.median('cpu_ms_per_request'):.2f} |"
                for name, s in self.counting.labelled()
            ),
            "",
            "## Memory and seeding",
            "",
            f"- Worker RSS after 1k requests of `GET {self.memory.path}`: "
            f"{self.memory.rss_1k_mib:.1f} MiB; after 100k: {self.memory.rss_100k_mib:.1f} MiB.",
            "- Seed throughput (python -m service seed into the emptied table): "
            + "; ".join(f"{s.rows:,} items at {s.rows_per_second:,.0f} rows/s" for s in self.seeds)
            + ".",
            "",
            "![results](results.png)",
            "",
        ]
        # What bounds the missed targets: kept by hand in NOTES.md, shown with every result.
        notes = NOTES.read_text().splitlines()
        lines += ["## " + notes[0].removeprefix("# "), *notes[1:], ""]
        return "\n".join(lines)

    def write(self, markdown: Path, plot: Path) -> None:
        markdown.write_text(self.markdown())
        self.plot(plot)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=(16, 10))
        grid = figure.add_gridspec(2, 3)
        left, middle, right = (figure.add_subplot(grid[0, n]) for n in range(3))
        cpu = figure.add_subplot(grid[1, :])
        throughput = self.throughput.labelled()
        left.barh([name for name, _ in throughput], [s.median("rps") for _, s in throughput],
                  color="#4c72b0")
        left.set_xlabel("requests/s (median)")
        left.set_title(f"Throughput, {self.budget.connections} connections")
        left.invert_yaxis()
        scroll = self.scroll_load.labelled()
        cpu.barh(
            [name for name, _ in scroll],
            [s.median("cpu_ms_per_request") for _, s in scroll],
            color="#dd8452",
        )
        cpu.axvline(1.2, color="black", linestyle=":", label="target, service async: 1.2 ms")
        cpu.set_xlabel("server CPU ms/request (median)")
        cpu.set_title(f"First cursor page, {self.budget.connections} connections")
        cpu.invert_yaxis()
        cpu.legend()
        pages = list(DEPTHS)
        middle.plot(
            pages,
            [self.depth.offset[p].median("p50_ms") for p in pages],
            "o-",
            label="offset (/items)",
        )
        middle.plot(
            pages,
            [self.depth.cursor[p].median("p50_ms") for p in pages],
            "s-",
            label="cursor (/items/scroll)",
        )
        middle.set_xscale("log")
        middle.set_xlabel("page number")
        middle.set_ylabel("p50 ms")
        middle.set_title(f"Depth ({self.depth.rows:,} rows)")
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
