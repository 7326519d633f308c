"""Logs: JSON (one object per line) or text, the request id on every line, one access line
per request with the numbers behind Server-Timing - and never a token or a query string;
LOG_CONFIG files (dictConfig YAML/JSON, fileConfig .ini), the shipped examples included."""

import contextvars
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import free_port
from service.config import Settings
from service.logs import TextFormatter, log_format
from service.main import create_app
from tests.conftest import AUTH, ROOT, TEST_TOKEN

pytestmark = pytest.mark.anyio

ITEM = {"name": "Lamp", "price": "12.50"}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test configures logging its way; put back what was there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("service.access")
    access_state = access.handlers[:], access.level, access.propagate
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for handler in access.handlers[:]:
        access.removeHandler(handler)
        handler.close()
    for handler in access_state[0]:
        access.addHandler(handler)
    access.setLevel(access_state[1])
    access.propagate = access_state[2]


@asynccontextmanager
async def serving(settings: Settings, **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update=changes))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    await app.state.engine.dispose()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` parsed as one JSON object (fails on any other line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "service.access"]


# -- formats ---------------------------------------------------------------------------------


async def test_json_logs_are_one_object_per_line_with_the_request_id(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json") as client:
        response = await client.get("/items/424242", headers={"X-Request-ID": "json-1"})
        logging.getLogger("tests.logging").warning("outside any request")
    assert response.status_code == 404

    lines = json_lines(capsys.readouterr().err)
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= line.keys()
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["time"])
    [access] = access_lines(lines)
    assert access["request_id"] == "json-1"
    assert access["level"] == "INFO"
    [outside] = [line for line in lines if line["message"] == "outside any request"]
    assert outside["level"] == "WARNING" and outside["logger"] == "tests.logging"


async def test_text_logs_show_the_request_id_in_brackets(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="text") as client:
        await client.get("/items", headers={"X-Request-ID": "text-1"})
    [access] = [line for line in capsys.readouterr().err.splitlines() if "service.access" in line]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO service\.access \[text-1\] ",
                    access)
    assert '"GET /items" 200' in access
    # Outside a request there is no id: `[-]`. (A context of its own: the test client runs
    # the app in this task, which keeps the last request's id.)
    contextvars.Context().run(logging.getLogger("service.test").warning, "outside")
    [outside] = [line for line in capsys.readouterr().err.splitlines() if "outside" in line]
    assert outside.endswith(" WARNING service.test [-] outside")


def test_without_log_format_a_terminal_gets_text_and_anything_else_json(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert log_format(settings) == "text"
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert log_format(settings) == "json"
    assert log_format(settings.model_copy(update={"log_format": "text"})) == "text"


def test_log_format_ignores_case_and_empty_means_unset(settings: Settings) -> None:
    def log_format_of(value: str) -> str | None:
        return Settings(database_url=settings.database_url, api_tokens=TEST_TOKEN,
                        log_format=value).log_format

    assert log_format_of("JSON") == "json"
    assert log_format_of(" Text ") == "text"
    assert log_format_of("") is None


def test_an_unknown_log_format_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="log_format"):
        Settings(database_url=settings.database_url, api_tokens=TEST_TOKEN, log_format="xml")


# -- the access line -------------------------------------------------------------------------


async def test_one_access_line_per_request_with_route_status_and_database_numbers(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json") as client:
        created = await client.post("/items", json=ITEM, headers=AUTH)
        item_id = created.json()["id"]
        got = await client.get(f"/items/{item_id}")
    lines = access_lines(json_lines(capsys.readouterr().err))

    assert [(line["method"], line["route"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/items", "/items", 201),
        ("GET", "/items/{item_id}", f"/items/{item_id}", 200),
    ]
    for line, response in zip(lines, [created, got], strict=True):
        # The numbers behind Server-Timing: db;dur=<ms>;desc="<n> queries".
        timing = re.match(r'db;dur=([\d.]+);desc="(\d+) quer', response.headers["server-timing"])
        assert timing is not None
        assert line["db_statements"] == int(timing.group(2)) >= 1
        assert line["db_ms"] == pytest.approx(float(timing.group(1)), abs=0.06)
        assert line["duration_ms"] >= line["db_ms"] > 0
        assert line["client"] == "127.0.0.1:123"  # httpx.ASGITransport's made-up client
        assert line["request_id"] == response.headers["x-request-id"]


async def test_access_lines_name_the_route_of_early_answers_and_bound_unmatched_paths(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json", max_body_bytes=10) as client:
        too_big = await client.post("/items", content=b"x" * 11, headers=AUTH)
        unknown = await client.get("/no/such/path")
        live = await client.get("/health/live")
        # Answered by authentication, before routing: the route the router would have
        # picked for the method - a PATCH of /items/scroll is one of /items/{item_id}.
        no_token = await client.patch("/items/scroll", json={})
        routed = await client.patch("/items/scroll", json={}, headers=AUTH)
    assert (too_big.status_code, unknown.status_code, live.status_code) == (413, 404, 200)
    assert (no_token.status_code, routed.status_code) == (401, 422)
    lines = access_lines(json_lines(capsys.readouterr().err))
    assert [(line["route"], line["status"], line["db_statements"]) for line in lines] == [
        ("/items", 413, 0),  # answered by the body limit, before routing and the database
        ("<unmatched>", 404, 0),
        ("/health/live", 200, 0),
        ("/items/{item_id}", 401, 0),
        ("/items/{item_id}", 422, 0),
    ]
    assert lines[1]["path"] == "/no/such/path"


async def test_the_access_line_says_who_made_the_request(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json") as client:
        created = await client.post("/items", json=ITEM, headers=AUTH)
        item = created.json()
        deleted = await client.delete(f"/items/{item['id']}", headers=AUTH)
        refused = await client.delete(f"/items/{item['id']}", headers={
            "Authorization": "Bearer not-a-token-of-this-app"})
        public = await client.get("/items")
    assert [r.status_code for r in (created, deleted, refused, public)] == [201, 204, 401, 200]
    lines = access_lines(json_lines(capsys.readouterr().err))
    # The name a write records as created_by: a delete, which leaves no row, is attributed
    # in its access line.
    assert [line["principal"] for line in lines] == [
        item["created_by"], item["created_by"], None, None]
    async with serving(settings, log_format="text") as client:
        await client.post("/items", json={**ITEM, "name": "Other"}, headers=AUTH)
    (access,) = [line for line in capsys.readouterr().err.splitlines()
                 if " service.access " in line]
    assert access.endswith(f"1 statement, by {item['created_by']})")


async def test_a_head_request_s_line_has_its_database_numbers(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json") as client:
        response = await client.head("/items/scroll")
    assert response.status_code == 200
    (line,) = access_lines(json_lines(capsys.readouterr().err))
    assert (line["method"], line["route"]) == ("HEAD", "/items/scroll")
    assert line["db_statements"] >= 1


async def test_a_line_break_in_the_path_cannot_forge_a_text_log_line(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = "2026-11-30 17:00:00,000 ERROR service.db [forged] the database is on fire"
    async with serving(settings, log_format="text") as client:
        response = await client.get("/items/%0a" + forged.replace(" ", "%20"))
    assert response.status_code == 422
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if line.startswith(forged[:23])]
    (access,) = [line for line in lines if " service.access " in line]
    assert "/items/\\n2026-11-30" in access


async def test_a_refused_request_id_is_reported_at_info_with_the_id_given_instead(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json") as client:
        response = await client.get("/health/live", headers={"X-Request-ID": "bad\tid"})
    given = response.headers["x-request-id"]
    assert given != "bad\tid"
    (line,) = [line for line in json_lines(capsys.readouterr().err)
               if line["logger"] == "asgi_correlation_id"]
    assert (line["level"], line["request_id"]) == ("INFO", given)
    async with serving(settings, log_format="json", log_level="WARNING") as client:
        await client.get("/health/live", headers={"X-Request-ID": "bad\tid"})
    assert "asgi_correlation_id" not in capsys.readouterr().err


async def test_no_token_password_or_query_string_reaches_the_logs(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json", log_level="DEBUG") as client:
        await client.post("/items", json=ITEM, headers=AUTH)
        await client.get("/items?Authorization=Bearer%20leaked-query-token&token=qs-secret")
        await client.post("/items", json=ITEM, headers={"Authorization": "Bearer wrong-secret"})
    # The service's lines: the test client's own (httpx logs the URLs it calls) aside.
    lines = [line for line in json_lines(capsys.readouterr().err) if line["logger"] != "httpx"]
    logged = json.dumps(lines)
    for secret in (TEST_TOKEN, "leaked-query-token", "qs-secret", "wrong-secret"):
        assert secret not in logged
    lines = access_lines(lines)
    assert [line["status"] for line in lines] == [201, 200, 401]
    assert lines[1]["path"] == "/items"


async def test_access_log_can_be_switched_off(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(settings, log_format="json", access_log=False) as client:
        assert (await client.get("/items")).status_code == 200
    assert access_lines(json_lines(capsys.readouterr().err)) == []


# -- LOG_CONFIG ------------------------------------------------------------------------------


def yaml_config(log_file: Path) -> str:
    return f"""
version: 1
formatters:
  json: {{"()": service.logs.JsonFormatter}}
handlers:
  file:
    class: logging.handlers.RotatingFileHandler
    filename: {log_file}
    maxBytes: 1000000
    backupCount: 2
    formatter: json
root: {{level: INFO, handlers: [file]}}
"""


def json_config(log_file: Path) -> str:
    return json.dumps({
        "version": 1,
        "formatters": {"text": {"format": "%(levelname)s [%(request_id)s] %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file),
                              "formatter": "text"}},
        "root": {"level": "INFO", "handlers": ["file"]},
    })


def ini_config(log_file: Path) -> str:
    return f"""
[loggers]
keys = root
[handlers]
keys = file
[formatters]
keys = json
[logger_root]
level = INFO
handlers = file
[handler_file]
class = logging.handlers.RotatingFileHandler
formatter = json
args = ({str(log_file)!r}, "a", 1000000, 2)
[formatter_json]
class = service.logs.JsonFormatter
"""


@pytest.mark.parametrize(
    ("suffix", "render"), [(".yaml", yaml_config), (".json", json_config), (".ini", ini_config)]
)
async def test_log_config_file_configures_logging(
    settings: Settings, tmp_path: Path, suffix: str, render: Any
) -> None:
    log_file = tmp_path / "service.log"
    config = tmp_path / f"logging{suffix}"
    config.write_text(render(log_file))
    async with serving(settings, log_config=config) as client:
        await client.get("/items", headers={"X-Request-ID": f"conf{suffix}"})
    text = log_file.read_text()
    if suffix == ".json":  # a plain text format using %(request_id)s
        assert f"INFO [conf{suffix}] " in text and '"GET /items" 200' in text
    else:
        [access] = access_lines(json_lines(text))
        assert access["request_id"] == f"conf{suffix}" and access["status"] == 200


def test_a_missing_log_config_file_is_refused(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_config"):
        Settings(database_url=settings.database_url, api_tokens=TEST_TOKEN,
                 log_config=tmp_path / "nowhere.yaml")


@pytest.mark.parametrize(("name", "content"), [
    ("bad.yaml", "version: 1\nhandlers: [unclosed\n"),
    ("nowhere.yaml", "version: 1\nhandlers:\n  file:\n    class: logging.FileHandler\n"
                     "    filename: /no/such/directory/x.log\nroot:\n  handlers: [file]\n"),
    ("bad.ini", "[loggers]\nkeys=root\n"),
], ids=["yaml-syntax", "handler-cannot-open", "ini-incomplete"])
def test_an_unusable_log_config_file_stops_serve_with_one_line(
    migrated_url: str, tmp_path: Path, name: str, content: str
) -> None:
    config = tmp_path / name
    config.write_text(content)
    env = {**os.environ, "DATABASE_URL": migrated_url, "API_TOKENS": TEST_TOKEN,
           "LOG_CONFIG": str(config)}
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"LOG_CONFIG {config} cannot configure logging" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Serving on" not in result.stdout  # it never said it would
    if name == "nowhere.yaml":  # the line says why, not only which handler
        assert "/no/such/directory/x.log" in result.stderr


@pytest.mark.parametrize("example", ["logging.yaml", "logging.ini"])
async def test_the_shipped_examples_write_json_lines_to_rotating_files(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example: str
) -> None:
    shutil.copy(ROOT / "examples" / example, tmp_path / example)
    monkeypatch.chdir(tmp_path)  # the examples name their files relative to the cwd
    async with serving(settings, log_config=tmp_path / example) as client:
        await client.get("/items", headers={"X-Request-ID": "example"})
    written = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    [access] = access_lines(json_lines(written))
    assert access["request_id"] == "example" and access["route"] == "/items"
    for handler in logging.getLogger().handlers + logging.getLogger("service.access").handlers:
        if isinstance(handler, logging.FileHandler):
            assert type(handler).__name__ == "RotatingFileHandler"


def test_serve_turns_uvicorns_access_log_off_and_no_access_log_turns_ours_off(
    migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m service serve`: uvicorn's access log and logging config are off (the app
    logs its own access line, in its own format); `--no-access-log` turns that line off.
    With `--workers 3` the workers get a fresh metrics directory, removed afterwards."""
    import uvicorn

    from service.cli import main

    seen: dict[str, Any] = {}

    def run(app: str, **kwargs: Any) -> None:
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        seen.update(kwargs, access_env=os.environ.get("ACCESS_LOG"), dir=multiproc_dir,
                    dir_existed=bool(multiproc_dir) and Path(multiproc_dir).is_dir())

    for name, value in {"DATABASE_URL": migrated_url, "API_TOKENS": TEST_TOKEN,
                        "CURSOR_SECRET": "several-workers-share-one-cursor-secret",
                        "ACCESS_LOG": "", "PROMETHEUS_MULTIPROC_DIR": ""}.items():
        monkeypatch.setenv(name, value)  # recorded, so the test's changes are undone
    monkeypatch.delenv("ACCESS_LOG")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setattr(uvicorn, "run", run)

    assert main(["serve", "--port", "1"]) == 0
    assert (seen["access_log"], seen["log_config"], seen["access_env"]) == (False, None, None)
    assert seen["dir"] is None  # one worker: metrics in memory

    assert main(["serve", "--port", "1", "--no-access-log", "--workers", "3"]) == 0
    assert seen["access_env"] == "false"
    assert seen["workers"] == 3 and seen["dir_existed"]
    assert not Path(seen["dir"]).exists()  # the temporary directory is gone


def test_uvicorn_run_directly_logs_every_line_in_the_service_format_and_no_query_string(
    migrated_url: str, tmp_path: Path
) -> None:
    """`uvicorn service.main:app` (not `python -m service serve`) configures uvicorn's own
    loggers before it loads the app: the app takes them over - uvicorn's lines in
    LOG_FORMAT, its access line (which carries the query string) off - and `DB_ECHO`
    statements go through the same handler, not SQLAlchemy's own plain-text one."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": migrated_url, "API_TOKENS": TEST_TOKEN,
           "LOG_FORMAT": "json", "DB_ECHO": "true", "PYTHONPATH": str(ROOT)}
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while server.poll() is None and time.monotonic() < deadline:
                try:
                    httpx.get(f"{base}/health/live", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            response = httpx.get(f"{base}/items?size=2&secret=in-the-query-string",
                                 headers={"X-Request-ID": "direct-1"})
            assert response.status_code == 200
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=20)
    lines = json_lines(err.read_text()) + json_lines(out.read_text())  # only JSON lines
    assert "in-the-query-string" not in err.read_text() + out.read_text()
    loggers = {line["logger"] for line in lines}
    assert "uvicorn.error" in loggers and "uvicorn.access" not in loggers
    statements = [line for line in lines if line["logger"].startswith("sqlalchemy.engine")]
    assert any(line["request_id"] == "direct-1" and "FROM items" in line["message"]
               for line in statements)


def test_text_times_are_utc_with_a_datefmt_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        record = logging.makeLogRecord({"msg": "m", "created": 1764565200.0})  # 05:00 UTC
        formatter = TextFormatter(datefmt="%Y-%m-%d %H:%M")
        assert formatter.formatTime(record, formatter.datefmt) == "2025-12-01 05:00"
        assert TextFormatter().formatTime(record) == "2025-12-01T05:00:00.000Z"
    finally:
        monkeypatch.undo()
        time.tzset()
