"""Every setting of the service, read from the environment and `.env`."""

import re
import secrets
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from service.db.replicas import poll_url

DEFAULT_DATABASE_URL = "sqlite:///./service.db"
# The driver each mode uses per backend: sync for the CLI, Alembic and scripts (`service.db`),
# async for the requests (`service.db.asyncio`).
SYNC_DRIVERS = {"postgresql": "postgresql+psycopg2", "sqlite": "sqlite+pysqlite"}
ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
MIN_TOKEN_LENGTH = 16
MIN_CURSOR_SECRET_BYTES = 16
MIN_JWT_SECRET_BYTES = 32
# `label=token` in API_TOKENS: a label starts with a letter, so it never looks like the
# `token:<n>` that unlabelled tokens are known by.
_TOKEN_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


# Query parameters of a postgresql+asyncpg URL that asyncpg (or SQLAlchemy's dialect for
# it) takes as they are.
_ASYNCPG_TAKES = frozenset({
    "host", "port", "user", "password", "database", "ssl", "direct_tls",
    "target_session_attrs", "krbsrvname", "gsslib", "passfile",
    "statement_cache_size", "max_cached_statement_lifetime", "max_cacheable_statement_size",
    "command_timeout", "prepared_statement_cache_size", "timeout",
})

# Seconds past DB_STATEMENT_TIMEOUT that the client waits before it gives up on a server
# that does not answer at all (the server's own timeout answers first otherwise).
STATEMENT_TIMEOUT_MARGIN = 2.0
# The same for a replica read, short: a replica that hangs should cost little more than
# REPLICA_READ_TIMEOUT.
REPLICA_TIMEOUT_MARGIN = 0.25

def _not_for_asyncpg(url: URL) -> list[str]:
    """The parameters of a PostgreSQL `url` that asyncpg takes neither as they are nor
    translated (`_async_url`)."""
    return sorted(set(url.query) - _ASYNCPG_TAKES - {"sslmode", "connect_timeout"})


def _async_url(database_url: str) -> str:
    """`database_url` with its backend's async driver; for PostgreSQL, libpq's `sslmode` as
    asyncpg's `ssl`, and no `connect_timeout` (DB_CONNECT_TIMEOUT's business)."""
    url = make_url(database_url)
    url = url.set(drivername=ASYNC_DRIVERS[url.get_backend_name()])
    if url.get_backend_name() == "postgresql":
        query = {name: value for name, value in url.query.items()
                 if name not in ("sslmode", "connect_timeout")}
        if "sslmode" in url.query:
            query["ssl"] = url.query["sslmode"]
        url = url.set(query=query)
    return url.render_as_string(hide_password=False)


class Settings(BaseSettings):
    """Configuration; each field is read from the upper-case environment variable of its name."""

    # Errors never echo the value they refuse: it may be a token or a URL with a password.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL, e.g. postgresql+psycopg2://user:pass@host:5432/dbname",
    )
    database_async_url: str | None = Field(
        None,
        description="SQLAlchemy URL the requests use (async driver); default: DATABASE_URL "
        "with its backend's async driver (postgresql+asyncpg, sqlite+aiosqlite).",
    )
    database_replica_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Streaming read replicas of DATABASE_URL's server, comma-separated "
        "SQLAlchemy URLs (any PostgreSQL driver; each mode uses its own); empty = none. "
        "GET, HEAD and OPTIONS requests read from them, other requests use the primary, and "
        "responses to requests that wrote carry X-Consistency-Token (see Scaling out).",
    )
    replica_max_lag: float = Field(
        5.0,
        gt=0,
        description="Seconds a replica may be behind the primary and still serve reads; "
        "one further behind, or not answering, is skipped until it catches up.",
    )
    replica_poll_interval: float = Field(
        0.5,
        gt=0,
        description="Seconds between two polls of each server's WAL position (a background "
        "thread per server, never per request).",
    )
    replica_read_timeout: float = Field(
        2.0,
        gt=0,
        description="Seconds a statement may take on a replica: a slower one is cancelled "
        "by the replica (its statement_timeout) and run on the primary; a replica that does "
        f"not answer at all is given up on {REPLICA_TIMEOUT_MARGIN:g} s later, and skipped "
        "until its next successful poll.",
    )
    database_pgbouncer: bool = Field(
        False,
        description="DATABASE_URL points at PgBouncer in transaction pooling mode: asyncpg "
        "then uses no prepared-statement cache and unique statement names, and reads run in "
        "transactions (statements outside one may land on different server connections).",
    )
    db_pool_size: int = Field(
        20,
        ge=1,
        description="Connections kept open. Size it to the requests you expect at once: "
        "connections beyond it are opened for one request and closed after it.",
    )
    db_max_overflow: int = Field(
        10, ge=0, description="Extra connections opened (and closed again) under peaks."
    )
    db_pool_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a connection.")
    db_pool_pre_ping: bool = Field(True, description="Test a pooled connection before using it.")
    db_echo: bool = Field(False, description="Log every SQL statement.")
    db_server_timing: bool = Field(True, description="Send the Server-Timing header.")
    log_level: str = Field("INFO", description="Python logging level name.")
    # -- operating the service (service.logs, service.telemetry, service.metrics) --
    log_format: Literal["json", "text"] | None = Field(
        None,
        description="`json` (one object per line) or `text`; unset: text when stderr is a "
        "terminal, JSON otherwise.",
    )
    log_config: FilePath | None = Field(
        None,
        description="A logging configuration file used instead of LOG_FORMAT/LOG_LEVEL: "
        "dictConfig as .yaml/.yml/.json, or fileConfig (.ini); see examples/logging.yaml.",
    )
    access_log: bool = Field(True, description="Log one line per request (service.access).")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at GET /metrics.")
    metrics_token: SecretStr = Field(
        SecretStr(""),
        description="If set, GET /metrics needs `Authorization: Bearer <this token>` (at "
        f"least {MIN_TOKEN_LENGTH} characters); empty = open (keep /metrics off the public "
        "network instead).",
    )
    # -- who may call, and what a request may carry (service.auth, service.body_limit) --
    api_tokens: SecretStr = Field(
        SecretStr(""),
        description="Bearer tokens that may write (POST, PATCH, DELETE), comma-separated, "
        f"each at least {MIN_TOKEN_LENGTH} characters, optionally labelled `label=token` "
        "(the items they write say `token:label`; unlabelled ones `token:<position>`). "
        "They carry every scope. Only their SHA-256 hashes are kept by the app. Required "
        "unless JWT is configured: `python -m service serve` generates one for a run without.",
    )
    read_requires_token: bool = Field(
        False, description="Require a token for reads too (scope `items:read` for JWTs)."
    )
    # -- JWTs from an identity provider (service.jwt_check, service.jwt_keys) --
    jwt_jwks_file: Path | None = Field(
        None, description="JSON Web Key Set file with the provider's public keys (RS256, "
        "ES256, EdDSA), selected by the token's `kid`."
    )
    jwt_jwks_url: str | None = Field(
        None, description="URL of the provider's JSON Web Key Set, fetched at start and "
        "cached; an unknown `kid` refreshes it at most once a minute."
    )
    jwt_secret: SecretStr | None = Field(
        None, description=f"Shared secret of HS256 tokens, at least {MIN_JWT_SECRET_BYTES} "
        "bytes. One of JWT_JWKS_FILE, JWT_JWKS_URL, JWT_SECRET turns JWT on."
    )
    jwt_issuer: str | None = Field(
        None, description="The `iss` every JWT must carry; required when JWT is on."
    )
    jwt_audience: str | None = Field(
        None, description="The `aud` every JWT must include; required when JWT is on."
    )
    jwt_leeway: float = Field(
        30.0, ge=0, le=600, description="Seconds of clock skew allowed for exp, nbf, iat."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest request body accepted; larger ones get 413."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins browsers may call from, comma-separated (e.g. "
        "https://shop.example.com); empty = no CORS headers. `*` = any origin, but not "
        "together with CORS_ALLOW_CREDENTIALS.",
    )
    cors_allow_credentials: bool = Field(
        False, description="Let browsers send cookies and Authorization cross-origin."
    )
    db_connect_timeout: int = Field(
        2,
        ge=1,
        description="Seconds to wait for a new PostgreSQL connection (libpq's connect_timeout, "
        "which counts anything below 2 as 2), so an unreachable database fails fast.",
    )
    db_statement_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds a statement of the app may run on PostgreSQL (0: no limit): "
        "the server's statement_timeout for the app's connections, so one that waits "
        "longer - behind a lock held elsewhere - is cancelled and the request answered 503 "
        "with Retry-After; a server that does not answer at all is given up on "
        f"{STATEMENT_TIMEOUT_MARGIN:g} s later, its connection aborted. Not applied behind "
        "PgBouncer (DATABASE_PGBOUNCER), which refuses the setting at connect: set "
        "statement_timeout on the database role there.",
    )
    cursor_secret: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_urlsafe(32)),
        description="Key that signs the scroll cursors handed to clients, so a cursor that "
        "was altered is refused. Unset, each process makes up its own, and cursors stop "
        "working across restarts and between workers: set one in production.",
    )
    count_threshold: int = Field(
        10_000,
        ge=0,
        # The bounded count's LIMIT is threshold + 1, a 32-bit integer parameter.
        le=2**31 - 2,
        description="GET /items with count=estimated counts exactly up to this many "
        "matching items, and estimates above it (at most 2147483646; count=exact always "
        "counts them all).",
    )

    @field_validator("database_url", "database_async_url")
    @classmethod
    def _parsable_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _check_url(value)
        return value

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _replica_urls(cls, value: Any) -> Any:
        urls = _split(value) if isinstance(value, str) else value
        for url in urls if isinstance(urls, list) else ():
            _check_url(url)
            if make_url(url).get_backend_name() != "postgresql":
                raise ValueError("read replicas are PostgreSQL streaming replicas: each URL "
                                 "must be a postgresql:// URL")
        return urls

    @model_validator(mode="after")
    def _replicas_of_postgresql(self) -> "Settings":
        if self.database_replica_urls and make_url(self.database_url).get_backend_name() != (
            "postgresql"
        ):
            raise ValueError("DATABASE_REPLICA_URLS needs a PostgreSQL DATABASE_URL")
        if self.database_replica_urls and "cursor_secret" not in self.model_fields_set:
            # Clients send their consistency token back: signed by a key made up per
            # process, it would be a 400 after every restart, and on every other worker.
            raise ValueError(
                "DATABASE_REPLICA_URLS needs CURSOR_SECRET: it signs the consistency tokens "
                "clients send back, which must stay good across restarts and workers"
            )
        return self

    def async_replica_urls(self) -> list[str]:
        """DATABASE_REPLICA_URLS with the async driver the requests use (asyncpg), their
        parameters translated as DATABASE_URL's are (`async_database_url`)."""
        return [_async_url(url) for url in self.database_replica_urls]

    @model_validator(mode="after")
    def _both_modes_reachable(self) -> "Settings":
        url = make_url(self.database_url)
        backend = url.get_backend_name()
        if self.database_async_url is None and backend not in ASYNC_DRIVERS:
            raise ValueError(
                f"no async driver is known for {backend!r}: set DATABASE_ASYNC_URL "
                "(the requests are served on an async driver)"
            )
        # Parameters only libpq knows would make every request's connect fail (a 503 for
        # ever) while the CLI, on psycopg2, connects fine.
        if (self.database_async_url is None and backend == "postgresql"
                and (unknown := _not_for_asyncpg(url))):
            raise ValueError(
                f"DATABASE_URL has {', '.join(unknown)}, which asyncpg (the requests' "
                "driver) does not take: set DATABASE_ASYNC_URL too, with asyncpg's "
                "parameters (sslmode is translated to asyncpg's ssl by itself)"
            )
        for replica in map(make_url, self.database_replica_urls):
            # A replica whose every connect fails would be passed over for ever, while its
            # health poller (psycopg2) says it is fine.
            if unknown := _not_for_asyncpg(replica):
                raise ValueError(
                    f"DATABASE_REPLICA_URLS: the replica at {replica.host}:{replica.port} has "
                    f"{', '.join(unknown)}, "
                    "which asyncpg (the requests' driver) does not take (sslmode is "
                    "translated to asyncpg's ssl, connect_timeout left to DB_CONNECT_TIMEOUT)"
                )
        return self

    def sync_database_url(self) -> str:
        """DATABASE_URL for the sync parts (CLI, Alembic, scripts): as given, unless it names
        an async driver, which is swapped for its backend's sync one (asyncpg's parameters
        in libpq's words, as the replica poller has them), or no driver: `postgresql://`
        is psycopg2 here (SQLAlchemy 2.1 would pick psycopg 3, which is not installed)."""
        url = make_url(self.database_url)
        if url.drivername == "postgresql":
            url = url.set(drivername=SYNC_DRIVERS["postgresql"])
        elif url.drivername in ASYNC_DRIVERS.values():
            url = poll_url(url).set(drivername=SYNC_DRIVERS[url.get_backend_name()])
        return url.render_as_string(hide_password=False)

    def async_database_url(self) -> str:
        """The URL the requests use: DATABASE_ASYNC_URL, else DATABASE_URL with its
        backend's async driver (and, for PostgreSQL, libpq's `sslmode` as asyncpg's `ssl`;
        `connect_timeout` is DB_CONNECT_TIMEOUT's business)."""
        if self.database_async_url is not None:
            return self.database_async_url
        return _async_url(self.database_url)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError("LOG_LEVEL must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_case_format(cls, value: Any) -> Any:
        return value.strip().lower() or None if isinstance(value, str) else value

    @field_validator("api_tokens")
    @classmethod
    def _long_enough_tokens(cls, value: SecretStr) -> SecretStr:
        tokens = [token for _, token in _labelled(value.get_secret_value())]
        if any(len(token) < MIN_TOKEN_LENGTH for token in tokens):
            # The message names no token: settings errors are printed.
            raise ValueError(
                f"every API token must be at least {MIN_TOKEN_LENGTH} characters; generate one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("metrics_token")
    @classmethod
    def _long_enough_metrics_token(cls, value: SecretStr) -> SecretStr:
        # Blank edges would never match: a presented token is read without them.
        value = SecretStr(value.get_secret_value().strip())
        if 0 < len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"METRICS_TOKEN must be at least {MIN_TOKEN_LENGTH} characters (or empty: "
                "/metrics open); generate one with: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("api_tokens")
    @classmethod
    def _unique_labels(cls, value: SecretStr) -> SecretStr:
        labels = [label for label, _ in _labelled(value.get_secret_value()) if label]
        if len(labels) != len(set(labels)):
            raise ValueError("API_TOKENS labels (`label=token`) must be unique")
        return value

    @field_validator("jwt_jwks_file", "jwt_jwks_url", "jwt_secret", "jwt_issuer",
                     "jwt_audience", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(("https://", "http://")):
            raise ValueError("JWT_JWKS_URL must be an http:// or https:// URL")
        return value

    @field_validator("cursor_secret")
    @classmethod
    def _long_enough_cursor_secret(cls, value: SecretStr) -> SecretStr:
        # Spaces around it (a quoted value in .env, padding) are no secret.
        if len(value.get_secret_value().strip().encode()) < MIN_CURSOR_SECRET_BYTES:
            raise ValueError(
                f"CURSOR_SECRET must be at least {MIN_CURSOR_SECRET_BYTES} bytes besides "
                "surrounding spaces: it signs "
                "cursors and consistency tokens, and a short key can be guessed (unset it "
                "to have one made up per process)"
            )
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _long_enough_secret(cls, value: SecretStr | None) -> SecretStr | None:
        secret = value.get_secret_value().strip() if value is not None else None
        if secret is not None and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(
                f"JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes besides surrounding "
                "spaces (HS256 with a "
                "shorter key can be brute-forced)"
            )
        return value

    @model_validator(mode="after")
    def _jwt_complete(self) -> "Settings":
        sources = [
            name
            for name, value in [("JWT_JWKS_FILE", self.jwt_jwks_file),
                                ("JWT_JWKS_URL", self.jwt_jwks_url),
                                ("JWT_SECRET", self.jwt_secret)]
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"set only one of {', '.join(sources)}: JWTs have one key source")
        missing = [
            name
            for name, value in [("JWT_ISSUER", self.jwt_issuer),
                                ("JWT_AUDIENCE", self.jwt_audience)]
            if value is None
        ]
        if sources and missing:
            raise ValueError(
                f"{' and '.join(missing)} must be set when JWT is on ({sources[0]} is set): "
                "a token is accepted only from the issuer, and for the audience, you name"
            )
        if not sources and len(missing) < 2:
            raise ValueError(
                "JWT_ISSUER / JWT_AUDIENCE are set but no key to verify tokens with: set "
                "JWT_JWKS_URL, JWT_JWKS_FILE or JWT_SECRET"
            )
        return self

    def jwt_enabled(self) -> bool:
        """Whether JWTs are accepted (one of the JWT key settings is set)."""
        return any(
            value is not None for value in (self.jwt_jwks_file, self.jwt_jwks_url, self.jwt_secret)
        )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _no_credentials_for_any_origin(self) -> "Settings":
        if "*" in self.cors_origins and self.cors_allow_credentials:
            raise ValueError(
                "CORS_ORIGINS=* cannot be combined with CORS_ALLOW_CREDENTIALS=true: that would "
                "let every website act with the user's credentials; list the origins instead"
            )
        return self

    def cursor_key(self) -> bytes:
        """CURSOR_SECRET as the key that signs cursors and consistency tokens (HMAC)."""
        return self.cursor_secret.get_secret_value().encode()

    def api_token_list(self) -> list[str]:
        """The configured API tokens, without their labels (empty if none)."""
        return [token for _, token in _labelled(self.api_tokens.get_secret_value())]

    def api_token_labels(self) -> list[str]:
        """The label of each configured API token, in order: its own (`ci=...` -> `ci`), or
        its position from 1 (`"1"`, `"2"`, ...) for an unlabelled one."""
        return [
            label or str(position)
            for position, (label, _) in enumerate(_labelled(self.api_tokens.get_secret_value()), 1)
        ]

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for `service.db.create_engine` (which drops the pool sizes where
        the backend has no pool, as for in-memory SQLite)."""
        return {**self._pool_args(), **self._connect_args(self.sync_database_url())}

    def async_engine_args(self) -> dict[str, Any]:
        """Keyword arguments for `service.db.asyncio.create_async_engine`."""
        return {**self._pool_args(), **self._connect_args(self.async_database_url())}

    def replica_engine_args(self) -> dict[str, Any]:
        """Keyword arguments for each replica's async engine: the primary's pool sizes (a
        request holds at most one replica connection), connected directly (not through
        PgBouncer, which sits in front of the primary)."""
        return {
            **self._pool_args(),
            "connect_args": {
                "timeout": self.db_connect_timeout,
                # The replica cancels a slower read itself and stays in use (the read runs
                # on the primary).
                **_statement_timeouts(self.replica_read_timeout, REPLICA_TIMEOUT_MARGIN),
            },
        }

    def _pool_args(self) -> dict[str, Any]:
        # No `echo`: SQLAlchemy's echo adds a plain-text stdout handler of its own; the
        # statements are logged through `service.logs` instead (`echo_statements`).
        return {
            "pool_pre_ping": self.db_pool_pre_ping,
            "pool_size": self.db_pool_size,
            "max_overflow": self.db_max_overflow,
            "pool_timeout": self.db_pool_timeout,
        }

    def _connect_args(self, url: str) -> dict[str, Any]:
        """The connect timeout, in the words of each PostgreSQL driver; for asyncpg behind
        PgBouncer (transaction pooling, 1.18 has no prepared statements), no statement
        cache and a unique name per prepared statement (SQLAlchemy's asyncpg dialect docs,
        "Prepared Statement Name with PGBouncer")."""
        driver = make_url(url).drivername
        if driver == "postgresql+asyncpg":
            args: dict[str, Any] = {"timeout": self.db_connect_timeout}
            if self.db_statement_timeout and not self.database_pgbouncer:
                # The server ends a statement that waits too long (a lock held elsewhere)
                # and keeps its connection; a client that gave up instead would leave the
                # backend waiting behind the lock, and open another for the next request.
                args.update(_statement_timeouts(self.db_statement_timeout,
                                                STATEMENT_TIMEOUT_MARGIN))
            if self.database_pgbouncer:
                args.update(
                    statement_cache_size=0,
                    prepared_statement_cache_size=0,
                    prepared_statement_name_func=_unique_statement_name,
                )
            return {"connect_args": args}
        if make_url(url).get_backend_name() == "postgresql":
            return {"connect_args": {"connect_timeout": self.db_connect_timeout}}
        return {}


def _statement_timeouts(seconds: float, margin: float) -> dict[str, Any]:
    """asyncpg connect arguments: the server's `statement_timeout` of `seconds` (it cancels
    the statement, and the connection stays usable), and the client's `command_timeout`
    `margin` s later, for a server that does not answer at all (the connection is then
    aborted: service.db.asyncio.create_async_engine)."""
    return {
        "server_settings": {"statement_timeout": str(max(1, round(seconds * 1000)))},
        "command_timeout": seconds + margin,
    }


def _check_url(value: str) -> None:
    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(
            "not a valid SQLAlchemy URL; expected e.g. 'sqlite:///./service.db' or "
            "'postgresql+psycopg2://user:password@localhost:5432/service'"
        ) from None
    if url.drivername.startswith("postgres") and not url.drivername.startswith("postgresql"):
        # Heroku's and libpq's spelling; SQLAlchemy has no dialect by that name.
        raise ValueError(
            f"{url.drivername}:// is not a SQLAlchemy URL scheme: write postgresql:// "
            "(psycopg2) or postgresql+asyncpg://"
        )
    if url.host and "@" in url.host:
        # "user:p@ss@host": the URL ends the password at the first "@", and the rest of it
        # would be shown as a host name in every message about the connection.
        raise ValueError(
            "has an '@' after the user part: write an '@' in the password as %40 "
            "(the URL is not shown here, since it holds the password)"
        )


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


def _split(value: str) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _labelled(value: str) -> list[tuple[str | None, str]]:
    """`"ci=<token>, <token>"` -> `[("ci", "<token>"), (None, "<token>")]`. An entry is
    labelled only if what precedes its first `=` is a label and what follows is long enough
    to be a token, so a base64 token ending in `=` stays one unlabelled token."""
    entries: list[tuple[str | None, str]] = []
    for entry in _split(value):
        label, equals, token = entry.partition("=")
        if equals and _TOKEN_LABEL.fullmatch(label) and len(token) >= MIN_TOKEN_LENGTH:
            entries.append((label, token))
        else:
            entries.append((None, entry))
    return entries


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
