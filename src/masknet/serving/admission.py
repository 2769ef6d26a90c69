"""Admission in front of the app: a request is let in, or refused, before its body is read.

    app.add_middleware(Gate, admission=Admission(max_pending=16, max_body_bytes=8 << 20,
                                                 max_buffered_bytes=32 << 20, body_timeout_s=10))

Every request that can carry a body (anything but GET, HEAD and OPTIONS) passes the gate:

1. a Content-Length over `max_body_bytes` is a 413 at once;
2. beyond `max_pending` requests in the server (from their headers until their answer is sent)
   it is a 503 with Retry-After, before a byte of its body is read;
3. the bytes of all bodies held in memory (being received, or received and not yet answered)
   stay within `max_buffered_bytes`: a request whose Content-Length (or, without one, whose next
   chunk) would take them beyond is a 503 with Retry-After, unless it is the only one holding
   any (a single body within the size limit is always taken);
4. the whole body must arrive within `body_timeout_s` of the request's admission, or the answer
   is 408: a client that sends a body slowly, or stops, cannot hold a slot or memory for long.

A 408 or 413 closes the connection (`Connection: close`). After a 503 uvicorn reads the rest of
the body and drops it as it comes (it holds none of it), and the client reads the answer on a
connection it can reuse. uvicorn has no limit of its own on the time a body takes
(`--timeout-keep-alive` applies between requests only; measured in docs/serving.md), and while
the app does not read, it pauses reading the socket after 64 kB: so a body waiting for
admission costs at most that much of the server's memory.

The gate runs on the event loop only; its counters are read by /health.
"""

from __future__ import annotations

from typing import Any, Callable

import anyio

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


class Admission:
    """The limits and the counters the gate keeps (all changed on the event loop)."""

    def __init__(self, max_pending: int, max_body_bytes: int, max_buffered_bytes: int, body_timeout_s: float):
        self.max_pending = max_pending
        self.max_body_bytes = max_body_bytes
        self.max_buffered_bytes = max(max_buffered_bytes, max_body_bytes)
        self.body_timeout_s = body_timeout_s
        self.stats = {"requests": 0, "errors": 0, "pending": 0, "rejected_pending": 0, "body_bytes_held": 0,
                      "rejected_body_bytes": 0, "body_timeouts": 0}

    def count(self, error: bool) -> None:
        self.stats["requests"] += 1
        self.stats["errors"] += int(error)

    def hold(self, held: int, more: int) -> bool:
        """Take `more` bytes of body memory for a request that holds `held` already: refused when
        the total would pass the limit and other requests hold some."""
        total = self.stats["body_bytes_held"]
        if total + more > self.max_buffered_bytes and total > held:
            return False
        self.stats["body_bytes_held"] = total + more
        return True


class Gate:
    """ASGI middleware applying an Admission. `error(message, status, headers)` builds the
    response of a refusal (the service's JSON error body)."""

    def __init__(self, app: Any, admission: Admission, error: Callable[..., Any]):
        self.app = app
        self.admission = admission
        self.error = error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            return await self.app(scope, receive, send)
        a, stats = self.admission, self.admission.stats
        length = _content_length(scope)
        if length is not None and length > a.max_body_bytes:
            return await self._refuse(scope, receive, send, f"{self._too_big()} ({length:,} bytes)", 413)
        if stats["pending"] >= a.max_pending:
            stats["rejected_pending"] += 1
            return await self._refuse(scope, receive, send, f"the server is overloaded ({a.max_pending} requests in "
                                      f"progress); retry in 1 s", 503)
        held = length or 0
        if not a.hold(0, held):
            stats["rejected_body_bytes"] += 1
            return await self._refuse(scope, receive, send, self._no_room(), 503)
        stats["pending"] += 1
        try:
            body, refusal, held = await self._read(receive, held)
            if refusal is not None:
                return await self._refuse(scope, receive, send, *refusal)
            if body is None:  # the client went away: nobody to answer
                return
            await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)
        finally:
            stats["pending"] -= 1
            stats["body_bytes_held"] -= held

    async def _read(self, receive, held: int) -> tuple[bytes | None, tuple[str, int] | None, int]:
        """(body, None, bytes held), (None, None, held) if the client disconnected, or (None,
        (message, status), held) for a refusal: too big, no room, or too slow."""
        a, stats = self.admission, self.admission.stats
        parts: list[bytes] = []
        seen, more = 0, True
        with anyio.move_on_after(a.body_timeout_s) as deadline:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return None, None, held
                parts.append(message.get("body", b""))
                seen += len(parts[-1])
                more = message.get("more_body", False)
                if seen > a.max_body_bytes:
                    return None, (self._too_big(), 413), held
                if seen > held:  # no Content-Length (chunked)
                    if not a.hold(held, seen - held):
                        stats["rejected_body_bytes"] += 1
                        return None, (self._no_room(), 503), held
                    held = seen
        if deadline.cancelled_caught:
            stats["body_timeouts"] += 1
            return None, (f"the request body did not arrive within {a.body_timeout_s:g} s "
                          f"(masknet serve --body-timeout)", 408), held
        return (parts[0] if len(parts) == 1 else b"".join(parts)), None, held

    async def _refuse(self, scope, receive, send, message: str, status: int) -> None:
        self.admission.count(True)
        # a 503 leaves the connection open: uvicorn drops the unread rest of the body as it comes
        # (holding none of it) and the client reads the answer; 408 and 413 close it
        headers = {"Retry-After": "1"} if status == 503 else {"Connection": "close"}
        await self.error(message, status, headers)(scope, receive, send)

    def _too_big(self) -> str:
        return f"request body exceeds the limit of {self.admission.max_body_bytes:,} bytes"

    def _no_room(self) -> str:
        return (f"the server is overloaded (request bodies already hold {self.admission.stats['body_bytes_held']:,} of "
                f"{self.admission.max_buffered_bytes:,} bytes); retry in 1 s")


def _content_length(scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                n = int(v)
            except ValueError:
                return None
            return n if n >= 0 else None
    return None


def _replay(messages: list, then: Any = None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
