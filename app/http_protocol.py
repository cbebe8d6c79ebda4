"""uvicorn's httptools protocol with the limits it lacks: a bounded request head, in size and in time.

httptools buffers a header line of any length, any number of headers, and
waits forever for a head that never ends; one client could exhaust memory or
connections. The body has its own idle timeout (app.intake).
"""

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Room for the request line and ordinary headers, before the envelope headers of the raw form.
BASE_HEAD_LIMIT = 64 * 1024
#: One X-Envelope-Recipient header: base64 of an address of up to 320 characters, plus its name.
HEAD_BYTES_PER_RECIPIENT = 512


def head_limit(max_recipients: int) -> int:
    return BASE_HEAD_LIMIT + HEAD_BYTES_PER_RECIPIENT * max_recipients


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Set `head_limit` and `head_timeout` on a subclass (see `bounded_protocol`)."""

    head_limit = BASE_HEAD_LIMIT
    head_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_size = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # A head counts only between responses: bytes that come while a request is still
        # being answered (pipelining, a stray CRLF) must not cut that response off.
        in_head = self._in_head and (self.cycle is None or self.cycle.response_complete)
        if in_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._refuse, 408, "the request head")
        super().data_received(data)
        if in_head and self._in_head:  # still no end of the head after this data
            self._head_size += len(data)
            if self._head_size > self.head_limit:
                self._refuse(431, f"request headers over {self.head_limit} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _refuse(self, status: int, what: str) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if status == 408:
            detail = f"{what} did not arrive within {self.head_timeout:g} s"
            title = "Request Timeout"
        else:
            detail = what
            title = "Request Header Fields Too Large"
        body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
        head = (
            f"HTTP/1.1 {status} {title}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def bounded_protocol(max_recipients: int, head_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this configuration's limits."""
    return type(
        "MailrelayHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {"head_limit": head_limit(max_recipients), "head_timeout": head_timeout},
    )
