"""uvicorn's httptools protocol with the limits it lacks: a bounded request head, in size, and
a bounded wait for the head and the body.

httptools buffers a header line of any length, any number of headers, and
waits forever for a head or a body that never ends; one client could exhaust
memory or connections. One timer per request watches both: the head must be
complete within the timeout of its first byte; the body must not fall silent
for the timeout (a slow but moving upload is not cut off). Here, not around
the application's receive(): an asyncio.timeout per request cost more than a
tenth of a blackhole delivery's overhead (bench/).

uvicorn has no public hook for either, so this relies on its internals (bounded
in pyproject.toml; tests/canaries/test_uvicorn_protocol.py fails naming the one
that changed):

- `uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`, its constructor
  passed through, and the methods overridden here, each calling uvicorn's:
  `connection_made` (sets `transport` and `flow`), `data_received` (feeds the
  httptools parser, which calls the callbacks below within it),
  `on_headers_complete` and `on_message_complete` (httptools callbacks: the
  protocol is its parser's callback object), `connection_lost` (the request
  under way is marked disconnected: the application's receive() then returns
  http.disconnect);
- its attributes `loop`, `transport`, `flow` (replaced after connection_made:
  every request's cycle takes it from there) and `cycle` (None before the first
  request, then the latest request's `RequestResponseCycle`);
- the cycle's `response_started`, `response_complete` and `scope` (the very
  dict the application gets);
- `uvicorn.protocols.http.flow_control.FlowControl(transport)`: `read_paused`,
  and `pause_reading()`/`resume_reading()`, through which uvicorn stops and
  resumes reading (a pipelined request, a body the application has not read).
"""

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Room for the request line and ordinary headers, before the envelope headers of the raw form.
BASE_HEAD_LIMIT = 64 * 1024
#: One X-Envelope-Recipient header: base64 of an address of up to 320 characters, plus its name.
HEAD_BYTES_PER_RECIPIENT = 512


def head_limit(max_recipients: int) -> int:
    return BASE_HEAD_LIMIT + HEAD_BYTES_PER_RECIPIENT * max_recipients


#: Set in the request's scope when the protocol cut its body off (the 408 is already written):
#: the application then reads a disconnect and answers (and counts) 408, not 400.
BODY_TIMED_OUT = "mailrelay.body_timed_out"


class _WatchedFlow(FlowControl):
    """uvicorn's read flow control, telling the protocol when it starts reading again."""

    def __init__(self, transport: asyncio.Transport, on_resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        if self.read_paused:
            self._on_resume()
        super().resume_reading()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Set `head_limit` and `idle_timeout` on a subclass (see `bounded_protocol`).

    The head must be complete within `idle_timeout` of its first byte (a byte now
    and then must not hold a connection: slowloris); the body must not fall silent
    for `idle_timeout` while we are reading it.
    """

    head_limit = BASE_HEAD_LIMIT
    idle_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_size = 0
        self._waiting: Literal["head", "body"] | None = None  # what the current request still lacks
        self._since = 0.0  # head: its first byte; body: the last byte, or when reading resumed
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.flow = _WatchedFlow(self.transport, self._reading_resumed)

    def data_received(self, data: bytes) -> None:
        # A head counts only between responses: bytes that come while a request is still
        # being answered (pipelining, a stray CRLF) must not cut that response off.
        in_head = self._in_head and (self.cycle is None or self.cycle.response_complete)
        if in_head and self._waiting is None:
            self._watch("head")
        elif self._waiting == "body":
            self._since = self.loop.time()
        super().data_received(data)
        if in_head and self._in_head:  # still no end of the head after this data
            self._head_size += len(data)
            if self._head_size > self.head_limit:
                self._refuse(431, f"request headers over {self.head_limit} bytes", head=True)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        # Every request's body is watched, also one whose head came while the previous
        # response was still going out (pipelined), when no head was being watched.
        self._watch("body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._stop_watching()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch(self, what: Literal["head", "body"]) -> None:
        self._waiting = what
        self._since = self.loop.time()
        if self._watchdog is None:
            self._watchdog = self.loop.call_at(self._since + self.idle_timeout, self._check)

    def _reading_resumed(self) -> None:
        # While reading was paused (the application had not caught up, or a pipelined
        # request waited for the one before) the client could not send: not its silence.
        if self._waiting == "body":
            self._since = self.loop.time()

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
        if self._waiting == "body" and self.flow.read_paused:
            self._since = now
        due = self._since + self.idle_timeout
        if due > now:
            self._watchdog = self.loop.call_at(due, self._check)
        elif self._waiting == "head":
            self._refuse(408, f"the request head did not arrive within {self.idle_timeout:g} s", head=True)
        else:
            if self.cycle is not None:
                self.cycle.scope[BODY_TIMED_OUT] = True  # type: ignore[literal-required]  # our own key
            self._refuse(408, body_timeout_detail(self.idle_timeout), head=False)

    def _refuse(self, status: int, detail: str, *, head: bool) -> None:
        self._stop_watching()
        if self.transport.is_closing():
            return
        # For a head, self.cycle is the previous request's (finished) cycle, if any.
        if head or self.cycle is None or not self.cycle.response_started:
            title = "Request Timeout" if status == 408 else "Request Header Fields Too Large"
            body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
            head_bytes = (
                f"HTTP/1.1 {status} {title}\r\ncontent-type: application/problem+json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head_bytes.encode("ascii") + body)
        # The application, if it waits for the body, now gets http.disconnect.
        self.transport.close()


def body_timeout_detail(seconds: float) -> str:
    return f"the request body stopped arriving for {seconds:g} s; nothing was delivered"


def bounded_protocol(max_recipients: int, idle_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this configuration's limits."""
    return type(
        "MailrelayHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {"head_limit": head_limit(max_recipients), "idle_timeout": idle_timeout},
    )
