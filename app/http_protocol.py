"""uvicorn's httptools protocol with the limits it lacks: a bounded request head, in size, and
a bounded wait for the head and the body.

httptools buffers a header line of any length, any number of headers, and
waits forever for a head or a body that never ends; one client could exhaust
memory or connections. One timer per request watches both: it is armed when
the request's first bytes come and fires only if no byte came for the
timeout, so a slow but moving upload is not cut off. Here, not around the
application's receive(): an asyncio.timeout per request cost more than a
tenth of a blackhole delivery's overhead (bench/).
"""

import asyncio
import json
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Room for the request line and ordinary headers, before the envelope headers of the raw form.
BASE_HEAD_LIMIT = 64 * 1024
#: One X-Envelope-Recipient header: base64 of an address of up to 320 characters, plus its name.
HEAD_BYTES_PER_RECIPIENT = 512


def head_limit(max_recipients: int) -> int:
    return BASE_HEAD_LIMIT + HEAD_BYTES_PER_RECIPIENT * max_recipients


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Set `head_limit` and `idle_timeout` on a subclass (see `bounded_protocol`)."""

    head_limit = BASE_HEAD_LIMIT
    idle_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_size = 0
        self._waiting: Literal["head", "body"] | None = None  # what the current request still lacks
        self._last_data = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # A head counts only between responses: bytes that come while a request is still
        # being answered (pipelining, a stray CRLF) must not cut that response off.
        in_head = self._in_head and (self.cycle is None or self.cycle.response_complete)
        if in_head and self._waiting is None:
            self._waiting = "head"
            self._watchdog = self.loop.call_later(self.idle_timeout, self._check)
        if self._waiting is not None:
            self._last_data = self.loop.time()
        super().data_received(data)
        if in_head and self._in_head:  # still no end of the head after this data
            self._head_size += len(data)
            if self._head_size > self.head_limit:
                self._refuse(431, f"request headers over {self.head_limit} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        if self._waiting is not None:
            self._waiting = "body"
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._stop_watching()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _stop_watching(self) -> None:
        self._waiting = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check(self) -> None:
        self._watchdog = None
        if self._waiting is None:
            return
        now = self.loop.time()
        if self.flow.read_paused:  # we stopped reading (the application has not caught up): not the client
            self._last_data = now
        due = self._last_data + self.idle_timeout
        if due > now:
            self._watchdog = self.loop.call_at(due, self._check)
        elif self._waiting == "head":
            self._refuse(408, f"the request head did not arrive within {self.idle_timeout:g} s")
        else:
            self._refuse(408, f"the request body stopped arriving for {self.idle_timeout:g} s; nothing was delivered")

    def _refuse(self, status: int, detail: str) -> None:
        self._stop_watching()
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            title = "Request Timeout" if status == 408 else "Request Header Fields Too Large"
            body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
            head = (
                f"HTTP/1.1 {status} {title}\r\ncontent-type: application/problem+json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + body)
        # The application, if it waits for the body, now gets http.disconnect.
        self.transport.close()


def bounded_protocol(max_recipients: int, idle_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this configuration's limits."""
    return type(
        "MailrelayHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {"head_limit": head_limit(max_recipients), "idle_timeout": idle_timeout},
    )
