"""The HTTP protocol `python -m service serve` runs: uvicorn's httptools one, with a bound on
the size of a request's head, and problem documents for what uvicorn refuses itself.

uvicorn reads a request's head - its request line and headers - without a limit: one
header of 60 MiB costs seconds of the event loop's CPU (httptools joins its pieces as they
come), and every request of the worker waits meanwhile, `/health/live` included, with no
token needed. And what its parser refuses (two `Content-Length` headers, a negative one, a
control byte in a header) it answers with a plain-text 400 and no request id. Here a head
over `HEAD_LIMIT` bytes is answered 431 and its connection closed as soon as that much has
come in, and both answers are problem documents (RFC 9457) with an `X-Request-ID`, like
every other error of the service, logged at WARNING with that id.
"""

import json
import logging
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.problems import PROBLEM_MEDIA_TYPE
from service.request_ids import HEADER, new_request_id

# Request line and headers together; browsers send a few KiB, a large JWT 8 (nginx allows
# 32 by default, Node.js 16).
HEAD_LIMIT = 64 * 1024

logger = logging.getLogger(__name__)


class ServiceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `HEAD_LIMIT` and problem documents for its 400s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_done = True  # no request begun yet
        self._head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_done = False
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_done = True
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_done or self.transport.is_closing():
            return
        # The bytes of a request whose head is not complete yet. (A chunk that began with
        # the end of the request before is counted whole: with pipelining the bound is
        # approximate by up to one read.)
        self._head_bytes += len(data)
        if self._head_bytes > HEAD_LIMIT:
            self._refuse(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"The request's head (its request line and headers) is over "
                f"{HEAD_LIMIT // 1024} KiB.",
            )

    def send_400_response(self, msg: str) -> None:
        self._refuse(
            HTTPStatus.BAD_REQUEST,
            "This is not a valid HTTP/1.1 request (its request line, a header, or how its "
            "body's length is given).",
        )

    def _refuse(self, status: HTTPStatus, detail: str) -> None:
        """Answer `status` with a problem document and close the connection: the request
        is not read further, so nothing after it on this connection can be read either."""
        request_id = new_request_id()
        logger.warning(
            "%s: answered %d (request id %s): %s",
            _peer(self.client), status.value, request_id, detail,
        )
        body = json.dumps({
            "type": "about:blank",
            "title": status.phrase,
            "status": status.value,
            "detail": detail,
            "request_id": request_id,
        }).encode()
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            f"content-type: {PROBLEM_MEDIA_TYPE}\r\n".encode(),
            f"content-length: {len(body)}\r\n".encode(),
            f"{HEADER.lower()}: {request_id}\r\n".encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
