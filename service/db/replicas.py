"""`Replicas`: the read replicas of one primary, and how far each has replayed its WAL.

A replica is worth reading from only while it answers and is close behind the primary.
Nobody asks that per request: one daemon thread per server polls it every `poll_interval`
seconds on a connection of its own (psycopg2, whatever the mode of the app) -

- the primary: `pg_current_wal_lsn()`, kept as a history of (time, position) reaching just
  past `max_lag` back;
- each replica: `pg_last_wal_replay_lsn()`, how far it has replayed.

A replica's lag is how long the oldest WAL it has not replayed yet has existed on the
primary (0 when it has replayed everything the primary had written at the last poll), so an
idle primary never makes a caught-up replica look late. A replica is *usable* while its last
poll succeeded, that poll is recent, and its lag is at most `max_lag`; requests that find
one of its connections broken mark it down at once (`mark_down`), and the next successful
poll brings it back. State changes are logged at WARNING, once, never per request.

Positions are PostgreSQL LSNs as integers (`lsn_to_int`); a consistency token carries one
(`service.db.consistency`), and `choose(min_position)` only returns a replica that has
replayed at least that far.
"""

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from service.db.failures import driver_reason

logger = logging.getLogger("service.db")

DEFAULT_MAX_LAG = 5.0
DEFAULT_POLL_INTERVAL = 0.5
# A replica whose last successful poll is older than this many poll intervals is treated as
# not answering (its poll is stuck, e.g. on a half-open connection).
STALE_POLLS = 4
_ASYNC_DRIVERS = ("asyncpg", "psycopg_async")


def lsn_to_int(lsn: str) -> int:
    """`'16/B374D848'` (PostgreSQL's `pg_lsn` text) -> an integer that orders the same."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


# The insert position and the WAL layout it is read in, in one round trip.
_INSERT_POSITION = (
    "SELECT pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int, "
    "pg_size_bytes(current_setting('wal_segment_size'))"
)
# PostgreSQL's WAL page headers on a 64-bit build: the first page of a segment has the long
# one (SizeOfXLogLongPHD), every other page the short one (SizeOfXLogShortPHD).
_LONG_PAGE_HEADER = 40
_SHORT_PAGE_HEADER = 24


def record_end(insert_position: int, block_size: int, segment_size: int) -> int:
    """The end of the last WAL record, given the insert position that follows it.

    Where a record ends exactly at a page boundary, `pg_current_wal_insert_lsn()` points
    past the next page's header, while a standby that replayed that record reports the
    boundary itself (`pg_last_wal_replay_lsn()`), and keeps reporting it until more WAL
    comes: a token holding the insert position would never be served by a replica of a
    quiet primary. No record can end inside a page header, so an insert position just past
    one means the boundary; any other position is a record's end as it is.
    """
    if insert_position % segment_size == _LONG_PAGE_HEADER:
        return insert_position - _LONG_PAGE_HEADER
    if insert_position % block_size == _SHORT_PAGE_HEADER:
        return insert_position - _SHORT_PAGE_HEADER
    return insert_position


def poll_url(url: URL) -> URL:
    """The URL the poller connects with: `url` with psycopg2 when it names an async driver
    (the poller is a thread, not a task on some event loop), asyncpg's parameters in
    libpq's words: `ssl` is `sslmode`, and the ones only asyncpg knows are left out."""
    if url.get_backend_name() != "postgresql" or url.get_driver_name() not in _ASYNC_DRIVERS:
        return url
    query = {name: value for name, value in url.query.items() if name not in _ASYNCPG_ONLY}
    if url.get_driver_name() == "asyncpg" and "ssl" in query:
        ssl = query.pop("ssl")
        query["sslmode"] = _SSLMODE_OF.get(str(ssl).lower(), ssl)
    return url.set(drivername="postgresql+psycopg2", query=query)


# Parameters of an asyncpg URL that libpq does not take.
_ASYNCPG_ONLY = frozenset({
    "command_timeout", "timeout", "statement_cache_size", "prepared_statement_cache_size",
    "max_cached_statement_lifetime", "max_cacheable_statement_size", "direct_tls",
})
# asyncpg's `ssl` also takes booleans.
_SSLMODE_OF = {"true": "require", "false": "disable"}


@dataclass
class ReplicaState:
    """What the poller last saw of one replica; read without a lock (each field is
    replaced whole, by the one poller thread of that replica)."""

    name: str
    engine: Engine  # what sessions read with (a sync engine, or an async one's sync_engine)
    up: bool = False
    position: int | None = None
    checked_at: float = 0.0  # time.monotonic() of the last successful poll
    error: str | None = None

    def describe(self, lag: float | None, usable: bool) -> dict[str, Any]:
        state = "ok" if usable else ("down" if not self.up else "lagging")
        return {
            "name": self.name,
            "state": state,
            "lag_seconds": None if lag is None else round(lag, 3),
        }


@dataclass
class PrimaryState:
    """The primary's WAL positions over the last moments, for replica lag."""

    name: str
    up: bool = False
    checked_at: float = 0.0
    error: str | None = None
    # (time, position), oldest first; replaced whole by each poll, never changed in place:
    # requests read it from other threads.
    history: tuple[tuple[float, int], ...] = ()


class Replicas:
    """The replicas of one primary: which one a read may use, and their health.

    `primary` and `replicas` are engines of the app's mode (sync `Engine`s, or
    `AsyncEngine`s); sessions read from the replica engines as given. Create them with
    `isolation_level="AUTOCOMMIT"` to save each replica read its BEGIN and COMMIT (at
    engine creation, not through `execution_options`: a connection switched per checkout
    is switched back at checkin, which fails - and fails the request - when the replica
    died meanwhile). Polling starts with the first `choose` or `start()`;
    `close()` stops it. Give `session_args()` to the sessionmaker (the middleware's
    `session_args=`) to route.

    `transaction_pooled`: the primary is reached through PgBouncer in transaction pooling
    mode, where a statement outside a transaction may not use a prepared statement
    (asyncpg); the WAL position after a COMMIT is then read inside a transaction of its own.
    """

    def __init__(
        self,
        primary: Engine | AsyncEngine,
        replicas: Sequence[Engine | AsyncEngine],
        *,
        max_lag: float = DEFAULT_MAX_LAG,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        connect_timeout: int = 2,
        transaction_pooled: bool = False,
    ) -> None:
        if not replicas:
            raise ValueError("Replicas needs at least one replica engine")
        self.is_async = isinstance(primary, AsyncEngine)
        self.primary_engine = _sync(primary)
        self.transaction_pooled = transaction_pooled
        self.max_lag = max_lag
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.primary = PrimaryState(_name(self.primary_engine.url))
        self.replicas = [ReplicaState(_name(_sync(e).url), _sync(e)) for e in replicas]
        self.engines = list(replicas)  # as given: the owner disposes of them
        self._round_robin = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- for the routing session ------------------------------------------------------------


    def pools(self) -> dict[str, Pool]:
        """Each replica's connection pool, by the replica's name (host:port/database)."""
        return {replica.name: replica.engine.pool for replica in self.replicas}
    def session_args(self) -> dict[str, Any]:
        """Sessionmaker arguments that make sessions route through these replicas:
        `class_=RoutingSession` for a sync `sessionmaker`, `sync_session_class=` for an
        `async_sessionmaker`."""
        from service.db.routing import RoutingSession

        key = "sync_session_class" if self.is_async else "class_"
        return {key: RoutingSession, "replicas": self}

    def choose(self, min_position: int = 0) -> ReplicaState | None:
        """A usable replica that has replayed at least `min_position` (round robin among
        them), or None: then the primary serves the read."""
        self.start()
        now = time.monotonic()
        usable = [
            replica for replica in self.replicas
            if self._usable(replica, now)
            and (replica.position or 0) >= min_position
        ]
        if not usable:
            return None
        return usable[next(self._round_robin) % len(usable)]

    def position_on(self, connection: Connection) -> int | None:
        """The primary's WAL position, read on `connection` right after its COMMIT (so at
        least the end of that commit's record), or None if that failed (logged).

        `pg_current_wal_insert_lsn()`, not `pg_current_wal_lsn()`: with
        `synchronous_commit = off` the commit record may not be written out yet, and the
        write position could precede it. The connection is switched to autocommit for the
        query, so it costs one round trip, not BEGIN, SELECT and ROLLBACK.
        """
        try:
            if not self.transaction_pooled:
                connection.execution_options(isolation_level="AUTOCOMMIT")
            lsn, block, segment = connection.exec_driver_sql(_INSERT_POSITION).one()
            if self.transaction_pooled:
                connection.rollback()
        except Exception as exc:  # the COMMIT stands; only the token is lost
            logger.warning("could not read the primary's WAL position after a commit (%s); "
                           "the response carries no consistency token", driver_reason(exc))
            return None
        return record_end(lsn_to_int(str(lsn)), int(block), int(segment))

    def mark_down(self, replica: ReplicaState, reason: str) -> None:
        """A request found `replica` broken: skip it until its next successful poll."""
        if replica.up:
            replica.up = False
            replica.error = reason
            logger.warning("replica %s failed a read (%s); reading from the primary until it "
                           "answers again", replica.name, reason)

    def lag(self, replica: ReplicaState, now: float | None = None) -> float | None:
        """Seconds `replica` is behind the primary (None if unknown)."""
        if replica.position is None:
            return None
        now = time.monotonic() if now is None else now
        history = self.primary.history
        if not history:
            return None
        if replica.position >= history[-1][1]:
            return 0.0
        # The oldest sample the replica lacks: WAL it has not replayed existed since then.
        for sampled_at, position in history:
            if position > replica.position:
                return now - sampled_at
        return 0.0  # unreachable: the newest sample is beyond the replica

    def _with_sample(
        self, history: tuple[tuple[float, int], ...], position: int
    ) -> tuple[tuple[float, int], ...]:
        """`history` and a new sample, without what is older than needed: the newest
        sample from before `max_lag` (and two polls) ago stays - a replica lacking it is
        that far behind, however far - and nothing before it."""
        now = time.monotonic()
        horizon = now - (self.max_lag + 2 * self.poll_interval)
        start = 0
        while start + 1 < len(history) and history[start + 1][0] < horizon:
            start += 1
        return (*history[start:], (now, position))

    def _usable(self, replica: ReplicaState, now: float) -> bool:
        if not replica.up:
            return False
        if now - replica.checked_at > self._stale_after:
            # Its poll has not come back (a server that hangs: connected, silent).
            replica.up = False
            replica.error = f"no answer to the poll for {now - replica.checked_at:.1f} s"
            logger.warning("replica %s is not answering (%s); reads use the primary",
                           replica.name, replica.error)
            return False
        lag = self.lag(replica, now)
        return lag is not None and lag <= self.max_lag

    @property
    def _stale_after(self) -> float:
        return max(self.poll_interval * STALE_POLLS, 1.0)

    def status(self) -> dict[str, Any]:
        """The primary and each replica as the poller last saw them (for /health/ready)."""
        self.start()
        now = time.monotonic()
        replicas = [
            replica.describe(self.lag(replica, now), self._usable(replica, now))
            for replica in self.replicas
        ]
        return {"primary": {"name": self.primary.name, "up": self.primary.up},
                "replicas": replicas}

    # -- the poller -------------------------------------------------------------------------

    def start(self) -> None:
        """Start polling (idempotent); the threads are daemons and stop with `close()`
        (and do not start again, but through `reopen()`)."""
        if self._threads or self._stop.is_set():
            return
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            stop = self._stop  # each thread keeps its own: a reopen makes a new one
            self._threads = [
                threading.Thread(target=self._poll_primary, args=(stop,),
                                 name="replicas-poll-primary", daemon=True),
                *(threading.Thread(target=self._poll_replica, args=(replica, stop),
                                   name=f"replicas-poll-{i}", daemon=True)
                  for i, replica in enumerate(self.replicas)),
            ]
            for thread in self._threads:
                thread.start()

    def close(self) -> None:
        """Stop polling and wait for the poller threads to end."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.connect_timeout + 2)

    def reopen(self) -> None:
        """After `close()`, poll afresh from the next `start()` - an app started again in
        the same process (its lifespan, as tests run it) - forgetting what was seen: until
        polled again, every replica is down."""
        with self._lock:
            if not self._stop.is_set():
                return
            self._stop, self._threads = threading.Event(), []
            primary = self.primary
            primary.up, primary.checked_at, primary.error, primary.history = False, 0.0, None, ()
            for replica in self.replicas:
                replica.up, replica.position, replica.checked_at, replica.error = (
                    False, None, 0.0, None
                )

    def wait_until_polled(self, timeout: float = 5.0) -> bool:
        """Block until every server has been polled once (tests, start-up); whether it was."""
        self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.primary.checked_at and all(r.checked_at or r.error for r in self.replicas):
                return True
            time.sleep(0.02)
        return False

    def _poll_primary(self, stop: threading.Event) -> None:
        engine = self._poll_engine(self.primary_engine.url)
        state = self.primary
        try:
            while not stop.is_set():
                try:
                    with engine.connect() as connection:
                        lsn = connection.scalar(text("SELECT pg_current_wal_lsn()::text"))
                    state.history = self._with_sample(state.history, lsn_to_int(lsn))
                    state.checked_at = time.monotonic()
                    if state.error is not None:
                        logger.warning("primary %s answers again", state.name)
                    state.up, state.error = True, None
                except Exception as exc:  # any failure means "not answering"
                    self._note_failure(state, engine, exc, "primary")
                stop.wait(self.poll_interval)
        finally:
            engine.dispose()

    def _poll_replica(self, replica: ReplicaState, stop: threading.Event) -> None:
        engine = self._poll_engine(replica.engine.url)
        try:
            while not stop.is_set():
                try:
                    with engine.connect() as connection:
                        lsn = connection.scalar(text("SELECT pg_last_wal_replay_lsn()::text"))
                    if lsn is None:
                        raise RuntimeError("not a standby (pg_last_wal_replay_lsn() is null)")
                    replica.position = lsn_to_int(lsn)
                    replica.checked_at = time.monotonic()
                    if replica.error is not None:
                        logger.warning("replica %s answers again; reading from it once it is "
                                       "caught up", replica.name)
                    replica.up, replica.error = True, None
                except Exception as exc:  # any failure means "not answering"
                    self._note_failure(replica, engine, exc, "replica")
                stop.wait(self.poll_interval)
        finally:
            engine.dispose()

    def _note_failure(self, state: Any, engine: Engine, exc: Exception, role: str) -> None:
        reason_text = driver_reason(exc)
        if state.up or state.error is None:
            logger.warning("%s %s is not answering (%s); %s", role, state.name, reason_text,
                           "reads use the primary" if role == "replica" else "polling on")
        state.up, state.error = False, reason_text
        engine.dispose()  # a broken pooled connection must not be tried again

    def _poll_engine(self, url: URL) -> Engine:
        return sqlalchemy.create_engine(
            poll_url(url),
            pool_size=1,
            max_overflow=0,
            pool_pre_ping=False,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": self.connect_timeout},
        )


def _sync(engine: Engine | AsyncEngine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def _name(url: URL) -> str:
    """A replica's name in logs and health: host:port/database, no user, no password."""
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
