"""What `python -m service serve` answers before the app sees a request
(`service.http_protocol`): a head over 64 KiB is a 431 and malformed HTTP a 400, both
problem documents with a request id, over real sockets to the real command."""

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, insert

from bench.harness import ServerProcess, free_port
from service.http_protocol import HEAD_LIMIT
from service.items.models import Item
from tests.conftest import ROOT

TOKEN = "protocol-test-token-0123"


@pytest.fixture(scope="module")
def served_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("served") / "serve.log"


@pytest.fixture(scope="module")
def served(migrated_url: str, served_log: Path) -> Iterator[int]:
    """The port of `python -m service serve` on the test database, logging to
    `served_log`."""
    port = free_port()
    log = served_log
    env = {**os.environ, "DATABASE_URL": migrated_url, "API_TOKENS": TOKEN}
    with log.open("w") as log_file:
        server = ServerProcess(
            [sys.executable, "-m", "service", "serve", "--port", str(port)], port,
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        server.wait_until_answers("/health/live", timeout=30)
        yield port
    finally:
        server.stop()


def exchange(port: int, head: bytes, body_size: int = 0) -> tuple[int, bytes]:
    """Send `head`, then `body_size` more bytes of header, stopping once an answer has
    come; read the answer until the server closes. Returns how many bytes went out and
    what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        sent = 0
        try:
            connection.sendall(head)
            sent = len(head)
            while sent < len(head) + body_size:
                readable, writable, _ = select.select([connection], [connection], [], 10)
                if readable:
                    break  # answered before the rest was sent
                if writable:
                    sent += connection.send(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed while we were still sending
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return sent, answer


def problem_of(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), headers, json.loads(body)


def test_a_head_over_the_limit_is_a_431_problem_before_the_rest_is_read(served: int) -> None:
    sent, answer = exchange(
        served, b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Big: ", body_size=64 * 2**20
    )

    status, headers, problem = problem_of(answer)
    assert status == 431
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert problem["status"] == 431 and problem["title"] == "Request Header Fields Too Large"
    assert problem["request_id"] == headers["x-request-id"]
    # Refused once the limit was passed, not after reading the 64 MiB.
    assert sent < 16 * 2**20
    assert httpx.get(f"http://127.0.0.1:{served}/health/live").status_code == 200


@pytest.mark.parametrize("size", [HEAD_LIMIT + 100, 2 * HEAD_LIMIT])
def test_a_head_over_the_limit_in_one_write_is_a_431(served: int, size: int) -> None:
    # All of it in one read: the head is measured as parsed, not only while it comes.
    _, answer = exchange(served, b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Big: "
                         + b"a" * size + b"\r\n\r\n")
    assert problem_of(answer)[0] == 431


def test_many_small_headers_over_the_limit_are_a_431(served: int) -> None:
    headers = b"".join(b"X-H-%d: %s\r\n" % (n, b"v" * 80) for n in range(1000))
    _, answer = exchange(served, b"GET /health/live HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n")
    assert problem_of(answer)[0] == 431


@pytest.mark.parametrize("where", ["trailer", "chunk extension"])
def test_a_chunked_bodys_trailer_or_extension_over_the_limit_is_a_431(
    served: int, where: str
) -> None:
    # With a token, so that the route waits for the whole body (without, its 401 is the
    # answer, and the connection is closed at the trailer).
    head = (b"POST /items HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\n\r\n")
    start = b"2\r\n{}\r\n0\r\nX-Trailer: " if where == "trailer" else b"2;e="

    sent, answer = exchange(served, head + start, body_size=16 * 2**20)

    assert problem_of(answer)[0] == 431
    assert sent < 8 * 2**20  # refused while it came, not once it was all read


def test_pipelined_requests_are_answered_in_order_before_a_refused_one(served: int) -> None:
    """Requests sent back to back on one connection get their answers in order; one over
    the limit behind them is refused after them - never instead of them."""
    ok = b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n"
    refused = b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 2 * HEAD_LIMIT
    _, answer = exchange(served, ok * 2000 + refused + b"\r\n\r\n")

    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200] * 2000 + [431]


def test_pipelined_requests_whose_reads_straddle_a_head_are_all_served(served: int) -> None:
    # 2,000 requests, then the start of one more, then its end: no read holds a whole head.
    ok = b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served), timeout=10) as connection:
        connection.sendall(ok * 2000 + ok[:20])
        time.sleep(0.2)
        connection.sendall(ok[20:])
        answer = b""
        while answer.count(b"HTTP/1.1 200") < 2001:
            chunk = connection.recv(65536)
            assert chunk, answer[-300:]
            answer += chunk
    assert b" 431 " not in answer


@pytest.mark.parametrize(
    ("head", "after"),
    [
        # After a request that closes the connection the parser reads nothing more, and
        # between requests it skips blank lines: neither is an unfinished head.
        (b"Connection: close\r\n", b"x" * 2 * HEAD_LIMIT),
        (b"", b"\r\n" * HEAD_LIMIT),
    ],
    ids=["after-connection-close", "blank-lines-after"],
)
def test_what_follows_a_request_never_takes_its_answer(
    served: int, head: bytes, after: bytes
) -> None:
    request = b"GET /health/live HTTP/1.1\r\nHost: test\r\n" + head + b"\r\n"
    with socket.create_connection(("127.0.0.1", served), timeout=10) as connection:
        connection.sendall(request + after)
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_what_follows_a_slow_request_never_takes_its_answer(served: int, engine: Engine) -> None:
    """A write held up (by another transaction holding the name it inserts) while its
    client sends on: what comes after a `Connection: close` request is never read, and is
    no unfinished head. The answer is the write's own - it was stored."""
    body = b'{"name": "Slow", "price": "1"}'
    request = (b"POST /items HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
               b"Content-Type: application/json\r\nAuthorization: Bearer " + TOKEN.encode()
               + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    with engine.connect() as holder, socket.create_connection(
        ("127.0.0.1", served), timeout=10
    ) as connection:
        held = holder.begin()
        holder.execute(insert(Item).values(name="Slow", price=Decimal(1), version=1))
        connection.sendall(request)
        time.sleep(0.3)
        for _ in range(4):
            connection.sendall(b"x" * (HEAD_LIMIT // 2))
            time.sleep(0.05)
        time.sleep(0.3)
        held.rollback()
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]


def test_a_refused_body_that_expected_100_continue_logs_no_error(
    served: int, served_log: Path
) -> None:
    """The refused request's app is told its client left; nothing more is written for it
    (its 100 Continue was a traceback and a 500 in the metrics)."""
    head = (b"POST /items HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    body = b"2\r\n{}\r\n0\r\nX-Trailer: " + b"a" * 2 * HEAD_LIMIT + b"\r\n\r\n"
    _, answer = exchange(served, head + body)

    # The route may have asked for the body (100 Continue) before the trailers came.
    assert problem_of(answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))[0] == 431
    time.sleep(0.5)  # the app's side ends after the answer
    assert "Traceback" not in served_log.read_text()


def test_a_head_within_the_limit_is_served(served: int) -> None:
    # Large cookies, a large JWT: 48 KiB of headers in all.
    headers = {f"X-Large-{n}": "v" * 8000 for n in range(6)}
    assert sum(len(value) for value in headers.values()) < HEAD_LIMIT

    response = httpx.get(f"http://127.0.0.1:{served}/health/live", headers=headers)

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("sent_ids", "echoed"),
    [
        ([b"mal-cl-1"], "mal-cl-1"),
        ([b"x" * 129, b"second-1"], None),  # the first line only, as the app takes it
        ([b"first-1", b"second-1"], "first-1"),
        ([b"x" * 129], None),  # none sane: a new one
    ],
)
@pytest.mark.parametrize(
    "refused",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"X-Big: " + b"a" * (HEAD_LIMIT + 10) + b"\r\n\r\n",
    ],
    ids=["malformed", "too-large"],
)
def test_a_refused_request_keeps_the_request_id_it_sent(
    served: int, sent_ids: list[bytes], echoed: str | None, refused: bytes
) -> None:
    ids = b"".join(b"X-Request-ID: " + value + b"\r\n" for value in sent_ids)
    _, answer = exchange(served, b"POST /items HTTP/1.1\r\nHost: test\r\n" + ids + refused)

    status, headers, problem = problem_of(answer)
    assert status in (400, 431)
    assert problem["request_id"] == headers["x-request-id"]
    if echoed is None:
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    else:
        assert headers["x-request-id"] == echoed


def test_a_refusal_after_a_request_does_not_take_that_requests_id(served: int) -> None:
    served_first = b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Request-ID: served-1\r\n\r\n"
    _, answer = exchange(served, served_first + b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")

    first, _, refusal = answer.partition(b"HTTP/1.1 400")
    assert b"x-request-id: served-1" in first
    assert b"served-1" not in refusal


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["two-lengths", "negative-length", "length-and-chunked"],
)
def test_malformed_http_is_a_400_problem_with_a_request_id(served: int, framing: bytes) -> None:
    _, answer = exchange(served, b"POST /items HTTP/1.1\r\nHost: test\r\n" + framing + b"\r\nhello")

    status, headers, problem = problem_of(answer)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert problem["status"] == 400
    assert problem["request_id"] == headers["x-request-id"]

