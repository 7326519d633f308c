"""Logging: one format for every line the process writes, each with its request id.

- `LOG_FORMAT=json`: one JSON object per line - `time` (ISO 8601, UTC), `level`, `logger`,
  `message`, `request_id` (null outside requests), plus the fields a line adds (`extra=`:
  the access line's `method`, `route`, `status`, ...) and `exc_info` for a traceback.
  python-json-logger renders it.
- `LOG_FORMAT=text`: `time level logger [request id] message`, for a person at a terminal.
- unset: text when stderr is a terminal, JSON otherwise (a container, a service manager,
  a file): machines read the logs that nobody watches.
- `LOG_CONFIG=<file>`: the file configures logging instead - dictConfig as YAML (`.yaml`,
  `.yml`) or JSON (`.json`), or fileConfig (`.ini`, `.cfg`, anything else); see
  examples/logging.yaml. Its formatters may use `%(request_id)s` and
  `service.logs.JsonFormatter`.

Every log record gets a `request_id` attribute (a `logging` record factory), whichever
logger made it - the app's, SQLAlchemy's, uvicorn's - and whatever the handlers are. The
id comes from `service.request_ids`, which keeps it in a `ContextVar`: it follows the
request into sync routes, streaming bodies and background tasks.
"""

import json
import logging
import logging.config
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from service.config import Settings
from service.db.middleware_base import printable as printable  # one escaping for all
from service.request_ids import current_request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"


class JsonFormatter(_JsonFormatter):
    """One JSON object per record: `time`, `level`, `logger`, `message`, `request_id`, then
    the record's extra fields."""

    def __init__(
        self, fmt: str | None = None, datefmt: str | None = None, style: str = "%",
        *args: Any, **kwargs: Any,
    ) -> None:
        # fmt names the fields; None (as fileConfig passes it) means the five above.
        kwargs.setdefault(
            "rename_fields", {"asctime": "time", "levelname": "level", "name": "logger"}
        )
        # uvicorn adds the message again with terminal colour codes: not for a log file.
        kwargs.setdefault("reserved_attrs", [*RESERVED_ATTRS, "color_message"])
        super().__init__(fmt or JSON_FIELDS, datefmt, style, *args, **kwargs)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)


def _utc_time(record: logging.LogRecord) -> str:
    """`2026-11-30T04:58:01.123Z`: ISO 8601, UTC, milliseconds."""
    return (
        datetime.fromtimestamp(record.created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class TextFormatter(logging.Formatter):
    """`2026-11-30T04:58:01.123Z INFO service.access [3f2a...] GET /items 200 ...`: the time
    in UTC as in JSON lines (a `datefmt` given chooses the format, still in UTC), `[-]`
    outside requests."""

    def __init__(self, fmt: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(fmt or TEXT_FORMAT, *args, **kwargs)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return time.strftime(datefmt, time.gmtime(record.created))
        return _utc_time(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:  # outside requests: `[-]`, not `[None]`
            # A copy: other handlers (JSON: null) see the record as it is.
            record = logging.makeLogRecord({**record.__dict__, "request_id": "-"})
        return super().formatMessage(record)


def configure_logging(settings: Settings) -> None:
    """Set up logging as `settings` say (`LOG_CONFIG`, else `LOG_FORMAT` and `LOG_LEVEL`).

    Safe to call again (each app built calls it): it replaces only the handler it added
    itself, so handlers of others (pytest's, a host application's) stay.
    """
    add_request_id_to_records()
    take_over_uvicorn_loggers()
    echo_statements(settings.db_echo)
    if settings.log_config is not None:
        load_config_file(settings.log_config)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format(settings) == "json" else TextFormatter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level)


_HANDLER_NAME = "service"



def echo_statements(echo: bool) -> None:
    """`DB_ECHO`: SQLAlchemy's statements logged at INFO (`sqlalchemy.engine`) through the
    service's handlers - one format, with the request id - whatever `LOG_LEVEL` says.
    Without it, the level set here for an earlier app is taken back."""
    global _echoing
    if echo or _echoing:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO if echo else logging.NOTSET)
        _echoing = echo


_echoing = False


def take_over_uvicorn_loggers() -> None:
    """Route uvicorn's lines through the root logger's handlers, and drop its access line.

    `uvicorn service.main:app` configures uvicorn's loggers (handlers of their own, plain
    text, not propagated) before it loads the app. Their lines would bypass `LOG_FORMAT`,
    and uvicorn's access line carries the raw query string - which may hold a token - where
    the app's own access line (`service.access`) logs the path alone. An access logger
    without handlers is one uvicorn skips. A `LOG_CONFIG` file, loaded after this, may
    configure these loggers again.
    """
    for name, propagate in (("uvicorn", True), ("uvicorn.error", True),
                            ("uvicorn.access", False)):
        uvicorn_logger = logging.getLogger(name)
        for handler in list(uvicorn_logger.handlers):
            uvicorn_logger.removeHandler(handler)
        uvicorn_logger.propagate = propagate
        uvicorn_logger.setLevel(logging.NOTSET)


def log_format(settings: Settings) -> str:
    """"json" or "text": `LOG_FORMAT`, else text on a terminal and JSON otherwise."""
    if settings.log_format is not None:
        return settings.log_format
    return "text" if sys.stderr.isatty() else "json"


class LoggingConfigError(RuntimeError):
    """`LOG_CONFIG` names a file logging cannot be configured from; says why in one line."""


def load_config_file(path: Path) -> None:
    """Configure logging from `path`: dictConfig from YAML or JSON, else fileConfig.
    Raises `LoggingConfigError` if the file cannot be read or used."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml", ".json"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".json":
                config = json.loads(text)
            else:
                import yaml

                config = yaml.safe_load(text)
            if not isinstance(config, dict):
                raise ValueError("not a dictConfig mapping")
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except Exception as exc:  # syntax, a handler that cannot be made (a missing directory)
        reasons: list[BaseException] = [exc]
        if exc.__cause__ is not None:  # dictConfig's "Unable to configure handler 'f'"
            reasons.append(exc.__cause__)  # names the handler; its cause says why
        said = [f"{type(error).__name__}" + (
            f": {str(error).strip().splitlines()[0]}" if str(error).strip() else ""
        ) for error in reasons]
        raise LoggingConfigError(
            f"LOG_CONFIG {path} cannot configure logging: {' - '.join(said)}"
        ) from None


def add_request_id_to_records() -> None:
    """Make every `LogRecord` carry `request_id` (None outside requests); idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_request_id", False):
        return

    def record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = current_request_id()
        return record

    record_with_request_id.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record_with_request_id)
