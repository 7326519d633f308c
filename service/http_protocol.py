"""The HTTP protocol `python -m service serve` runs: uvicorn's httptools one, with bounds on
what is not a request's body, and problem documents for what uvicorn refuses itself.

uvicorn reads a request's head without a limit, and httptools joins the pieces of a header,
a chunked body's trailer or a chunk extension as they come: one 60 MiB header cost seconds
of the event loop's CPU, every request of the worker waiting meanwhile, `/health/live`
included, with no token needed. And what its parser refuses (two `Content-Length`, a
negative one, a control byte in a header) it answered with a plain-text 400 and no request
id. Here:

- a request's head - request line and headers, counted as parsed - and its trailers over
  `HEAD_LIMIT` bytes are a 431;
- so is anything the parser keeps reading for `HEAD_LIMIT` bytes without finishing a
  piece (a header, a trailer, a chunk extension): it is refused once that much is in, not
  after reading it all. A body's bytes are pieces of their own: bodies are bounded by the
  app (`MAX_BODY_BYTES`);
- both answers, and the 400 of malformed HTTP, are problem documents (RFC 9457) with an
  `X-Request-ID`, logged at WARNING with that id and the parser's reason. A refused request
  pipelined behind others is answered after them, in order; then the connection is closed
  - after a short wait that drains what the client still sends, so that a reset does not
  take the answer with it.
"""

import logging
import sys
from http import HTTPStatus
from typing import Any

from asgi_correlation_id import correlation_id
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.problems import PROBLEM_MEDIA_TYPE, problem_response
from service.request_ids import HEADER, is_sane, new_request_id

# Request line and headers together; browsers send a few KiB, a large JWT 8 (nginx allows
# 32 by default, Node.js 16).
HEAD_LIMIT = 64 * 1024
# Seconds a refused connection is still read (and what comes discarded) before it closes.
LINGER = 2.0
_MALFORMED = (
    "This is not a valid HTTP/1.1 request (its request line, a header, or how its body's "
    "length is given)."
)

logger = logging.getLogger(__name__)
_REQUEST_ID_HEADER = HEADER.lower().encode()


class _Refused(Exception):
    """Raised from a parser callback: httptools stops there, and uvicorn answers 400
    (`send_400_response`), which sends the refusal set before instead."""


class ServiceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `HEAD_LIMIT` and problem documents for its 400s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # of the current request: head and trailers, as parsed
        self._unfinished = 0  # bytes read since the parser last finished a piece
        self._finished_a_piece = False
        self._in_message = False  # between a request's first byte and its end
        self._refusal: tuple[HTTPStatus, str, str] | None = None
        self._answered = False
        self._request_id: str | None = None  # the client's, of the request being parsed

    # -- the parser's pieces: each one finished is progress --------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._request_id = None
        self._finished_a_piece = self._in_message = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # "name: value\r\n"
        if len(name) == 12 and self._request_id is None and name.lower() == _REQUEST_ID_HEADER:
            # Kept for a refusal of this request, as the app would keep it: the first line,
            # if sane; else a new id ("" here: no later line counts).
            text = value.decode("latin-1")
            self._request_id = text if is_sane(text) else ""
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._finished_a_piece = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._finished_a_piece = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._finished_a_piece = True
        self._in_message = False
        self._request_id = None  # a refusal from now on is of the next request
        super().on_message_complete()

    def _count_head(self, size: int) -> None:
        self._finished_a_piece = True
        self._head_bytes += size
        if self._head_bytes > HEAD_LIMIT:
            self._refusal = _too_large("The request's head (its request line and headers) "
                                       "or its trailers are")
            raise _Refused

    # -- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: what still comes is discarded
        self._finished_a_piece = False
        super().data_received(data)
        if self._refusal is not None or self.transport.is_closing():
            return
        # Only inside a request: between two, the parser skips blank lines, and after one
        # that closes the connection it ignores the rest - neither costs anything.
        if self._finished_a_piece or not self._in_message:
            self._unfinished = 0
        else:
            self._unfinished += len(data)
        if self._unfinished > HEAD_LIMIT:
            self._refuse(*_too_large("A header, a trailer or a chunk extension is"))

    def send_400_response(self, msg: str) -> None:
        # Called by uvicorn inside its `except` for the parser's error: its reason is here.
        if self._refusal is None:
            error = sys.exc_info()[1]
            self._refusal = (HTTPStatus.BAD_REQUEST, _MALFORMED, str(error or msg))
        self._refuse(*self._refusal)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None and not self._answered:
            self._refuse(*self._refusal)  # the requests before it are answered now

    # -- refusing -------------------------------------------------------------------------

    def _refuse(self, status: HTTPStatus, detail: str, reason: str) -> None:
        """Answer `status` with a problem document once the requests before this one on
        the connection are answered, then close it (after `LINGER`)."""
        self._refusal = (status, detail, reason)
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            # The refused request is being served (its trailers, a chunk extension).
            if cycle.response_started:  # it has its answer (e.g. a 401): none to add
                self._answered = True
                self.transport.close()
                return
            cycle.disconnected = True  # its app sees the client gone; its work undone
            cycle.waiting_for_100_continue = False  # nothing more is written for it
            cycle.message_event.set()
        elif cycle is not None and not cycle.response_complete:
            self.flow.pause_reading()  # a request before it: answered first, then
            return  # `on_response_complete` comes back here
        if self.pipeline:
            return  # `on_response_complete` comes back once they are answered
        self._answered = True
        if self.transport.is_closing():
            return  # the client or a response before it closed the connection
        request_id = self._request_id or new_request_id()
        token = correlation_id.set(request_id)
        try:
            logger.warning(
                "%s: answered %d: %s (%s)", _peer(self.client), status.value, detail, reason
            )
            body = problem_response(status, detail).body  # the service's one error shape
        finally:
            correlation_id.reset(token)
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            f"content-type: {PROBLEM_MEDIA_TYPE}\r\n".encode(),
            f"content-length: {len(body)}\r\n".encode(),
            f"{HEADER.lower()}: {request_id}\r\n".encode(),
            b"connection: close\r\n\r\n",
        ]
        self._unset_keepalive_if_required()
        self.flow.resume_reading()  # drain what the client still sends, until the close
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)


def _too_large(what: str) -> tuple[HTTPStatus, str, str]:
    return (
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        f"{what} over {HEAD_LIMIT // 1024} KiB.",
        f"over {HEAD_LIMIT} bytes",
    )


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


class _UvicornsOwnLine(logging.Filter):
    """uvicorn's "Invalid HTTP request received." says less than this module's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


logging.getLogger("uvicorn.error").addFilter(_UvicornsOwnLine())
