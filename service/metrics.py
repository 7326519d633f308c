"""Prometheus metrics, served at `GET /metrics` (prometheus-client).

| metric | kind | labels |
| --- | --- | --- |
| `http_request_duration_seconds` | histogram | method, route, status |
| `http_requests_in_progress` | gauge | |
| `db_pool_connections` | gauge | database, state=checked_out/idle/overflow |
| `db_admission_wait_seconds` | histogram | database |
| `db_admission_rejected_total` | counter (the 503s of a busy pool) | database |
| `db_transactions_total` | counter | database, outcome=commit/rollback/commit_failed |
| `db_statements_per_request` | histogram | database |

Every label has few values: `route` is the route template (`/items/{item_id}`), or
`<unmatched>` for a path no route matches; `method` is one of the HTTP methods the world
uses, or `other`. A scan of random paths adds no series.

Several worker processes (`python -m service serve --workers N`): prometheus-client's
multiprocess mode. Each worker writes its numbers to files in `PROMETHEUS_MULTIPROC_DIR`
and `/metrics`, whichever worker answers it, adds up all of them - so a scrape sees the
whole server, not one worker. `prepare_multiprocess_dir` sets the directory up before the
workers start; the variable must be set before prometheus-client is imported.

The database numbers come from `service.db`'s `SessionObserver` calls (`DatabaseMetrics`);
the pool gauges are refreshed when a request ends and when `/metrics` is read.
"""

import hmac
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event
from sqlalchemy.pool import Pool, QueuePool
from starlette.types import Scope

from service.db.accounting import QueryStats
from service.db.observer import Outcome
from service.problems import problem_response
from service.telemetry import RequestDatabaseStats

METRICS_PATH = "/metrics"
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

if directory := os.environ.get(MULTIPROCESS_DIR_VARIABLE):
    # The metrics below write their files there from their first value on.
    os.makedirs(directory, exist_ok=True)

# The `_created` timestamps double the series for little use (and multiprocess mode has none).
disable_created_metrics()  # type: ignore[no-untyped-call]

REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival to the end of its response body.",
    ["method", "route", "status"],
)
IN_PROGRESS = Gauge(
    "http_requests_in_progress",
    "Requests being served now.",
    multiprocess_mode="livesum",
)
POOL_CONNECTIONS = Gauge(
    "db_pool_connections",
    "Connections of the database's pool: checked out (in use), idle (kept open), and "
    "overflow (open beyond DB_POOL_SIZE).",
    ["database", "state"],
    multiprocess_mode="livesum",
)
ADMISSION_WAIT = Histogram(
    "db_admission_wait_seconds",
    "Time a request waited for a database connection slot: admitted, or turned away "
    "with a 503 when none came free.",
    ["database"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ADMISSION_REJECTED = Counter(
    "db_admission_rejected",
    "Requests answered 503 because no database connection slot came free in time.",
    ["database"],
)
TRANSACTIONS = Counter(
    "db_transactions",
    "Request transactions ended, by outcome.",
    ["database", "outcome"],
)
STATEMENTS_PER_REQUEST = Histogram(
    "db_statements_per_request",
    "SQL statements run by one request (what Server-Timing counts, plus later work).",
    ["database"],
    buckets=(0, 1, 2, 3, 5, 10, 20, 50, 100),
)


class DatabaseMetrics(RequestDatabaseStats):
    """The `SessionObserver` that turns `service.db`'s observations into the `db_*`
    metrics; `pools` maps each database name to its engine's pool, and `replica_pools` maps
    it to its read replicas' pools by replica name, for the pool gauges (a replica's
    `database` label is `<database>@<replica>`, e.g. `db@10.0.0.7:5432/app`)."""

    def __init__(
        self,
        pools: Mapping[str, Pool],
        replica_pools: Mapping[str, Mapping[str, Pool]] | None = None,
    ) -> None:
        replica_pools = replica_pools or {}
        # database -> its (label, pool) pairs: the primary's, then each replica's.
        self.pools = {
            database: [(database, pool)] + [
                (f"{database}@{replica}", replica_pool)
                for replica, replica_pool in replica_pools.get(database, {}).items()
            ]
            for database, pool in pools.items()
        }
        # Every series exists from the start, at 0 (a rate over a counter that appears only
        # at its first increment misses that increment); `labels()` is looked up once.
        self._children: dict[tuple[str, ...], Any] = {}
        self._open = {
            pool: OpenConnections(pool)
            for pairs in self.pools.values()
            for _, pool in pairs
            if isinstance(pool, QueuePool)
        }
        for database in self.pools:
            self._child(ADMISSION_WAIT, database)
            self._child(ADMISSION_REJECTED, database)
            self._child(STATEMENTS_PER_REQUEST, database)
            for outcome in ("commit", "rollback", "commit_failed"):
                self._child(TRANSACTIONS, database, outcome)
            self.refresh_pool(database)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def admitted(self, database: str, scope: Scope, waited: float) -> None:
        self._child(ADMISSION_WAIT, database).observe(waited)

    def rejected(self, database: str, scope: Scope, waited: float) -> None:
        # The longest waits are the ones that ended in a 503: they count too.
        self._child(ADMISSION_WAIT, database).observe(waited)
        self._child(ADMISSION_REJECTED, database).inc()

    def transaction_ended(self, database: str, scope: Scope, outcome: Outcome) -> None:
        self._child(TRANSACTIONS, database, outcome).inc()

    def request_ended(self, database: str, scope: Scope, stats: QueryStats) -> None:
        super().request_ended(database, scope, stats)
        self._child(STATEMENTS_PER_REQUEST, database).observe(stats.count)
        self.refresh_pool(database)

    def refresh_pool(self, database: str) -> None:
        """Set `db_pool_connections` of `database`'s pools (its replicas' too) from the
        pools as they are now."""
        for label, pool in self.pools.get(database, ()):
            if not isinstance(pool, QueuePool):
                continue  # no pool to speak of (SQLite's in-memory StaticPool, NullPool)
            checked_out = pool.checkedout()
            self._child(POOL_CONNECTIONS, label, "checked_out").set(checked_out)
            # Not `checkedin()`: it counts the pool's slots, and a slot whose connection was
            # invalidated (a lost connection, a database restart) keeps none open.
            idle = self._open[pool].count - checked_out
            self._child(POOL_CONNECTIONS, label, "idle").set(max(idle, 0))
            self._child(POOL_CONNECTIONS, label, "overflow").set(max(pool.overflow(), 0))

    def refresh_pools(self) -> None:
        for database in self.pools:
            self.refresh_pool(database)


class OpenConnections:
    """How many database connections `pool` holds open right now, from its `connect`,
    `close` and `detach` events."""

    def __init__(self, pool: Pool) -> None:
        self.count = 0
        self._lock = threading.Lock()  # sync mode connects and closes on several threads
        event.listen(pool, "connect", self._opened)
        event.listen(pool, "close", self._closed)
        event.listen(pool, "detach", self._closed)  # no longer the pool's to count

    def _opened(self, *_: Any) -> None:
        with self._lock:
            self.count += 1

    def _closed(self, *_: Any) -> None:
        with self._lock:
            self.count -= 1


def multiprocess_mode() -> bool:
    """Whether the metrics are kept in files shared by several worker processes."""
    return bool(os.environ.get(MULTIPROCESS_DIR_VARIABLE))


def exposition() -> bytes:
    """All metrics in Prometheus text format: this process's, or every worker's."""
    if not multiprocess_mode():
        return generate_latest(REGISTRY)
    forget_dead_workers()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics`: the Prometheus text format; 401 without the METRICS_TOKEN if set."""
    token: str = request.app.state.settings.metrics_token.get_secret_value()
    if token and not _bearer_matches(request, token):
        return problem_response(
            401,
            "The metrics need the metrics token: send `Authorization: Bearer <token>`.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    observer: Any = request.app.state.database_observer
    if isinstance(observer, DatabaseMetrics):
        observer.refresh_pools()
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


def _bearer_matches(request: Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


_METRIC_FILES = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")


def prepare_multiprocess_dir(workers: int) -> Path | None:
    """Before uvicorn starts `workers` processes: make metrics multiprocess-safe.

    With more than one worker (or `PROMETHEUS_MULTIPROC_DIR` already set), uses
    `PROMETHEUS_MULTIPROC_DIR` or a new temporary directory, sets the variable for the
    workers to inherit, and removes metric files a previous run left there (stale numbers
    would be added to the new ones). Returns the directory, or None for a single process,
    which keeps its metrics in memory. The caller removes a temporary directory when done.
    """
    given = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if workers <= 1 and not given:
        return None
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="service-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for pattern in _METRIC_FILES:
        for stale in path.glob(pattern):
            stale.unlink()
    os.environ[MULTIPROCESS_DIR_VARIABLE] = str(path)
    return path


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def forget_dead_workers() -> None:
    """Drop the live gauges of worker processes that are gone without a clean shutdown
    (killed, crashed, or stopped by uvicorn's supervisor): without this their last
    `http_requests_in_progress` and pool numbers would stay in every sum."""
    directory = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if not directory:
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for pid in {int(m[1]) for name in names if (m := _LIVE_GAUGE_FILE.match(name))}:
        if not _is_running(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def worker_stopped() -> None:
    """At a worker's shutdown: drop its live gauges (`http_requests_in_progress`, the
    pool gauges) from the shared files, so they stop counting in the sum."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
