"""What the benchmark measures: one function per scenario, each returning its own result.

Every wrk number is a `Series` of interleaved rounds (bench.harness.interleaved); reports
show medians. The servers are the apps of bench/apps.py, by factory name (`VARIANTS`).
"""

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import version

import httpx
import psycopg2
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from bench.apps import RAW_SCROLL_SQL
from bench.database import count_rows, scroll_path, statements_of
from bench.harness import Run, Series, ServerProcess, interleaved, log, wrk
from bench.telemetry_layers import LayerCost
from service.config import Settings

PAGE_SIZE = 20
PAGE = f"/items?size={PAGE_SIZE}"
SCROLL = f"/items/scroll?size={PAGE_SIZE}"
# The bench/apps.py factories, each with a path it answers once it is up.
VARIANTS = {
    "ours": PAGE,
    "peer": PAGE,
    "depends": PAGE,
    "constant": PAGE,
    "service": "/health/live",
    "service_sync": SCROLL,
    "ours_async": SCROLL,
    "ours_async_autocommit": SCROLL,
    "peer_async": SCROLL,
    "depends_async": SCROLL,
    "raw_asyncpg": SCROLL,
    "reference_async": SCROLL,
    "memory_async": SCROLL,
    "service_unobserved": SCROLL,
    "service_observed": SCROLL,
}
THROUGHPUT_ROWS = 10_000  # the table of the throughput and latency scenarios
DEPTHS = (1, 100, 10_000)  # page numbers
DEPTH_ROWS = DEPTHS[-1] * PAGE_SIZE  # the depth scenario's table: its deepest page is the last


@dataclass(frozen=True)
class Budget:
    """How long and how often each scenario measures, and the table sizes of the size scan."""

    rounds: int
    load_seconds: int  # per wrk run under load (`connections` connections)
    latency_seconds: int  # per wrk run of the latency scenario (one connection)
    # Per wrk run of the depth, size and count-mode scans: one connection, where ~150
    # requests a second give a steady p50.
    scan_seconds: int
    connections: int
    sizes: tuple[int, ...]
    # 100k requests with a query take this machine 3.5 (SELECT 1) to 7 (cursor page)
    # minutes, more than the quick run's budget: quick mode drives the liveness probe -
    # the app's whole middleware stack (request ids, telemetry, authentication, the body
    # limit) but no database session, which that path does not take; FULL=1 drives the
    # cursor page, session, query and all.
    memory_path: str
    full: bool


# The quick run keeps within 5 minutes: 3 rounds (the fewest the targets allow) of 2 s.
QUICK = Budget(
    rounds=3,
    load_seconds=2,
    latency_seconds=1,
    scan_seconds=1,
    connections=16,
    sizes=(10_000, 100_000),
    memory_path="/health/live",
    full=False,
)
# FULL=1 has no time budget: more and longer rounds, for steadier medians, and 1M rows.
FULL = replace(
    QUICK,
    rounds=5,
    load_seconds=5,
    latency_seconds=2,
    sizes=(*QUICK.sizes, 1_000_000),
    memory_path=SCROLL,
    full=True,
)

Servers = Mapping[str, ServerProcess]  # by bench/apps.py factory name


@dataclass
class Throughput:
    """The same list handler (COUNT + 20 rows) under load, served five ways."""

    ours: Series
    peer: Series
    depends: Series
    constant: Series
    service_page: Series
    service_scroll: Series

    def labelled(self) -> list[tuple[str, Series]]:
        return [
            ("ours: DBSessionMiddleware", self.ours),
            ("peer: fastapi-sqlalchemy 0.2.1", self.peer),
            ("Depends(get_db)", self.depends),
            ("constant JSON (no database)", self.constant),
            ("service GET /items", self.service_page),
            ("service GET /items/scroll", self.service_scroll),
        ]


def throughput(servers: Servers, budget: Budget) -> Throughput:
    c, seconds = budget.connections, budget.load_seconds
    for name in ("ours", "peer", "depends", "constant", "service"):  # warm-up
        wrk(servers[name], PAGE, c, 1)
    series = interleaved(
        budget.rounds,
        {  # the names of Throughput's fields
            "ours": lambda: wrk(servers["ours"], PAGE, c, seconds),
            "peer": lambda: wrk(servers["peer"], PAGE, c, seconds),
            "depends": lambda: wrk(servers["depends"], PAGE, c, seconds),
            "constant": lambda: wrk(servers["constant"], PAGE, c, seconds),
            "service_page": lambda: wrk(servers["service"], PAGE, c, seconds),
            "service_scroll": lambda: wrk(servers["service"], SCROLL, c, seconds),
        },
    )
    return Throughput(**series)


@dataclass
class ScrollLoad:
    """The first keyset page (20 rows of the throughput table) under load: the service's
    GET /items/scroll sync and async; one async rows handler under three session managers
    with their defaults, and under ours as the service configures it; the floor, the
    service's SQL on a bare asyncpg pool rendered with orjson; and issue #13's two reference
    stacks (`bench.apps.reference_async`, `memory_async`)."""

    service_sync: Series
    service_async: Series
    ours: Series
    peer: Series
    depends: Series
    ours_autocommit: Series
    raw: Series
    reference: Series
    memory: Series

    def labelled(self) -> list[tuple[str, Series]]:
        peer = f"fastapi-async-sqlalchemy {version('fastapi-async-sqlalchemy')}"
        return [
            ("service GET /items/scroll, sync (before: service.db, ORM)", self.service_sync),
            ("service GET /items/scroll, async", self.service_async),
            ("rows handler: ours, service.db.asyncio DBSessionMiddleware", self.ours),
            (f"rows handler: {peer} SQLAlchemyMiddleware", self.peer),
            ("rows handler: Depends(get_async_db)", self.depends),
            ("rows handler: ours, autocommit_methods as the service", self.ours_autocommit),
            ("raw asyncpg pool + orjson (no SQLAlchemy)", self.raw),
            ("issue #13's reference: plain AsyncSession, Core rows, orjson (no middleware)",
             self.reference),
            ("issue #13's reference: FastAPI + pydantic, the same items from memory",
             self.memory),
        ]


def scroll_load(servers: Servers, budget: Budget) -> ScrollLoad:
    c, seconds = budget.connections, budget.load_seconds
    cases = {  # the names of ScrollLoad's fields, and their servers
        "service_sync": servers["service_sync"],
        "service_async": servers["service"],
        "ours": servers["ours_async"],
        "peer": servers["peer_async"],
        "depends": servers["depends_async"],
        "ours_autocommit": servers["ours_async_autocommit"],
        "raw": servers["raw_asyncpg"],
        "reference": servers["reference_async"],
        "memory": servers["memory_async"],
    }
    for server in cases.values():  # warm-up
        wrk(server, SCROLL, c, 1)
    series = interleaved(
        budget.rounds,
        {name: lambda s=server: wrk(s, SCROLL, c, seconds) for name, server in cases.items()},
    )
    return ScrollLoad(**series)


@dataclass
class TelemetryCost:
    """Issue #15: what request ids, the access line and the metrics cost per request, on the
    service's GET /items/scroll?size=20 under load - the service without them, as `make
    bench` serves it (ids and metrics, LOG_LEVEL=WARNING: no access line), and with the
    JSON access line at INFO written to a file."""

    unobserved: Series
    service: Series
    observed: Series
    # The layers alone, in-process (bench/telemetry_layers.py): set by bench/run.py at the
    # end of the run, once the servers are gone.
    layers: LayerCost | None = None

    def labelled(self) -> list[tuple[str, Series]]:
        return [
            ("service without request ids, access line, metrics", self.unobserved),
            ("service: request ids + metrics, no access line (LOG_LEVEL=WARNING)", self.service),
            ("service: request ids + metrics + JSON access line to a file", self.observed),
        ]

    def cost_ms(self, series: Series | None = None) -> float:
        """Server CPU ms per request over the baseline: the median of the per-round
        differences (each round measures both within seconds of each other)."""
        series = series or self.observed
        return float(statistics.median(
            with_.cpu_ms_per_request - without.cpu_ms_per_request
            for with_, without in zip(series.runs, self.unobserved.runs, strict=True)
        ))


def telemetry_cost(servers: Servers, budget: Budget) -> TelemetryCost:
    c, seconds = budget.connections, budget.load_seconds
    cases = {
        "unobserved": servers["service_unobserved"],
        "service": servers["service"],
        "observed": servers["service_observed"],
    }
    for server in cases.values():  # warm-up
        wrk(server, SCROLL, c, 1)
    # A difference of a few percent on a noisy machine: more rounds than the others (the
    # quick run reads its target from the layers alone, in-process).
    series = interleaved(
        max(budget.rounds, 5) if budget.full else budget.rounds,
        {name: lambda s=server: wrk(s, SCROLL, c, seconds) for name, server in cases.items()},
    )
    return TelemetryCost(**series)


@dataclass
class RawChecks:
    """Whether the raw floor serves what the service serves for GET /items/scroll?size=20,
    and issue #13's two reference stacks too."""

    same_sql: bool  # its one statement is the one the service's driver receives
    same_json: bool  # its response body, parsed, equals the service's
    references_same_json: bool  # so do the bodies of `reference_async` and `memory_async`

    def __str__(self) -> str:
        def yes(ok: bool) -> str:
            return "same" if ok else "DIFFERENT"

        return (
            f"SQL {yes(self.same_sql)}, JSON {yes(self.same_json)}; the references' JSON "
            f"{yes(self.references_same_json)}"
        )


def raw_checks(settings: Settings, servers: Servers) -> RawChecks:
    sql = [statement.sql for statement in statements_of(settings, SCROLL)]
    expected = httpx.get(servers["service"].url(SCROLL)).json()

    def same(name: str) -> bool:
        return bool(httpx.get(servers[name].url(SCROLL)).json() == expected)

    return RawChecks(
        same_sql=sql == [RAW_SCROLL_SQL],
        same_json=same("raw_asyncpg"),
        references_same_json=same("reference_async") and same("memory_async"),
    )


@dataclass
class Latency:
    """One connection: each request waits for the one before."""

    service_page: Series
    service_scroll: Series
    ours: Series
    peer: Series
    depends: Series

    def labelled(self) -> list[tuple[str, Series]]:
        return [
            ("service GET /items", self.service_page),
            ("service GET /items/scroll", self.service_scroll),
            ("ours: DBSessionMiddleware", self.ours),
            ("peer: fastapi-sqlalchemy 0.2.1", self.peer),
            ("Depends(get_db)", self.depends),
        ]


def latency(servers: Servers, budget: Budget) -> Latency:
    seconds = budget.latency_seconds
    series = interleaved(
        budget.rounds,
        {  # the names of Latency's fields
            "service_page": lambda: wrk(servers["service"], PAGE, 1, seconds),
            "service_scroll": lambda: wrk(servers["service"], SCROLL, 1, seconds),
            "ours": lambda: wrk(servers["ours"], PAGE, 1, seconds),
            "peer": lambda: wrk(servers["peer"], PAGE, 1, seconds),
            "depends": lambda: wrk(servers["depends"], PAGE, 1, seconds),
        },
    )
    return Latency(**series)


@dataclass
class Floor:
    """The statements of one request straight through psycopg2, in a loop: no HTTP, no ORM."""

    statements_per_second: float
    per_statement_ms: list[float]  # medians, in the order the service runs them
    page_ms: float  # their sum


def floor(settings: Settings, path: str, seconds: float = 3) -> Floor:
    """What the SQL of GET `path` costs on its own: the floor under its latency."""
    replayed = [statement.for_psycopg2() for statement in statements_of(settings, path)]
    url = make_url(settings.database_url).set(drivername="postgresql")
    connection = psycopg2.connect(url.render_as_string(hide_password=False))
    connection.autocommit = True
    cursor = connection.cursor()
    timings: list[list[float]] = [[] for _ in replayed]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for n, (sql, parameters) in enumerate(replayed):
            started = time.perf_counter()
            cursor.execute(sql, parameters)
            cursor.fetchall()
            timings[n].append(time.perf_counter() - started)
    connection.close()
    per_statement_ms = [1000 * statistics.median(t) for t in timings]
    return Floor(
        statements_per_second=sum(len(t) for t in timings) / seconds,
        per_statement_ms=per_statement_ms,
        page_ms=sum(per_statement_ms),
    )


@dataclass
class Depth:
    """Offset pages (/items?page=N) against cursor pages at the same depth, by page number."""

    rows: int
    offset: dict[int, Series]
    cursor: dict[int, Series]


def depth(engine: Engine, service: ServerProcess, budget: Budget) -> Depth:
    """Pages `DEPTHS` of the table as it is (it needs `DEPTH_ROWS` rows for the last)."""
    seconds = budget.scan_seconds
    cases: dict[str, Callable[[], Run]] = {}
    for page in DEPTHS:
        offset_path = f"/items?size={PAGE_SIZE}&page={page}"
        cursor_path = scroll_path(engine, page, PAGE_SIZE)
        cases[f"offset page {page}"] = lambda p=offset_path: wrk(service, p, 1, seconds)
        cases[f"scroll page {page}"] = lambda p=cursor_path: wrk(service, p, 1, seconds)
    series = interleaved(budget.rounds, cases)
    return Depth(
        rows=count_rows(engine),
        offset={page: series[f"offset page {page}"] for page in DEPTHS},
        cursor={page: series[f"scroll page {page}"] for page in DEPTHS},
    )


def cursor_page_mid_table(engine: Engine, service: ServerProcess, budget: Budget) -> Series:
    """A cursor page in the middle of the table as it is, one connection."""
    rows = count_rows(engine)
    middle = scroll_path(engine, max(1, rows // (2 * PAGE_SIZE)), PAGE_SIZE)
    name = f"scroll, {rows:,} rows"
    cases = {name: lambda: wrk(service, middle, 1, budget.scan_seconds)}
    return interleaved(budget.rounds, cases)[name]


@dataclass
class CountModes:
    """GET /items?size=20 by count mode, with the cursor page to compare, on `rows` rows,
    one connection; count=estimated and the cursor page also as the service served them
    sync, and count=estimated under load (`connections`, as the CPU targets are measured)."""

    rows: int
    estimated: Series
    estimated_loaded: Series
    exact: Series
    none: Series
    cursor: Series
    sync_estimated: Series
    sync_cursor: Series

    def labelled(self) -> list[tuple[str, Series]]:
        return [
            ("count=estimated (default)", self.estimated),
            ("count=estimated, under load (see the heading)", self.estimated_loaded),
            ("count=exact", self.exact),
            ("count=none", self.none),
            ("cursor page (/items/scroll)", self.cursor),
            ("sync (before): count=estimated", self.sync_estimated),
            ("sync (before): cursor page", self.sync_cursor),
        ]


def count_modes(
    engine: Engine, service: ServerProcess, service_sync: ServerProcess, budget: Budget
) -> CountModes:
    seconds = budget.scan_seconds
    series = interleaved(
        budget.rounds,
        {  # the names of CountModes' fields
            "estimated": lambda: wrk(service, PAGE, 1, seconds),
            "estimated_loaded": lambda: wrk(
                service, PAGE, budget.connections, budget.load_seconds
            ),
            "exact": lambda: wrk(service, f"{PAGE}&count=exact", 1, seconds),
            "none": lambda: wrk(service, f"{PAGE}&count=none", 1, seconds),
            "cursor": lambda: wrk(service, SCROLL, 1, seconds),
            "sync_estimated": lambda: wrk(service_sync, PAGE, 1, seconds),
            "sync_cursor": lambda: wrk(service_sync, SCROLL, 1, seconds),
        },
    )
    return CountModes(rows=count_rows(engine), **series)


@dataclass
class CountChecks:
    """What count=exact answers, and the Server-Timing header of count=none."""

    rows: int
    exact_total: int
    none_server_timing: str

    @property
    def exact_is_exact(self) -> bool:
        return self.exact_total == self.rows

    @property
    def none_is_one_statement(self) -> bool:
        return '"1 query"' in self.none_server_timing


def count_checks(engine: Engine, service: ServerProcess) -> CountChecks:
    total = httpx.get(service.url("/items?size=1&count=exact")).json()["total"]
    timing = httpx.get(service.url(f"{PAGE}&count=none")).headers["server-timing"]
    return CountChecks(rows=count_rows(engine), exact_total=total, none_server_timing=timing)


@dataclass
class Memory:
    """The worker's resident memory after 1k and after 100k requests of `path`."""

    path: str
    rss_1k_mib: float
    rss_100k_mib: float


def memory(service: ServerProcess, path: str) -> Memory:
    log(f"memory: RSS after 1k and after 100k requests of {path}")
    with httpx.Client() as client:
        for _ in range(1_000):
            client.get(service.url(path)).raise_for_status()
    rss_1k = service.rss_mib()
    served = 1_000
    while served < 100_000:
        served += wrk(service, path, 16, 5).requests
    return Memory(path, rss_1k_mib=rss_1k, rss_100k_mib=service.rss_mib())
