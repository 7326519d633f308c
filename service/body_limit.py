"""`BodySizeLimit`: read each request body whole - at most `max_bytes` of it - before the
request goes any further.

Pure ASGI, in the manner of Starlette's middleware, and added outside the database session
middleware, for two reasons:

- a body over the limit gets a 413 problem response and never reaches a route: at once if
  its `Content-Length` says so, else as soon as the bytes received cross the limit (a body
  sent chunked, without a length);
- a request holds a database connection slot only once its body is all there. A client
  that sends its body slowly, or hangs up halfway, waits here, not inside the app - so slow
  uploads cannot take every connection (on SQLite, the only one), and an abandoned upload
  never opens a session at all.

Bodies are at most `max_bytes` (default 1 MiB), so holding one in memory is bounded.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import problem_response


class BodySizeLimit:
    """Buffer request bodies up to `max_bytes`; longer ones get a 413 problem response."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its request was complete: nothing to do
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        whole: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()  # after the body: only http.disconnect is left to come

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"The request body is larger than {self.max_bytes:,} bytes."
        # Close the connection: the rest of the body is not worth reading.
        response = problem_response(413, detail, headers={"Connection": "close"})
        await response(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    """The request's Content-Length, or 0 if it has none (or none that parses)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
