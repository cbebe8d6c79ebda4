"""uvicorn's httptools protocol with the limits it lacks: a bounded request head, in size, a bounded
wait for the head, the body and the client's reading of our answer, and a bounded number of
connections.

httptools buffers a header line of any length, any number of headers, and
waits forever for a head or a body that never ends; one client could exhaust
memory or connections. One timer per request watches both: the head must be
complete within the timeout of its first byte (of the connection, for the
first); the body must not fall silent for the timeout (a slow but moving upload
is not cut off). Every head is counted and timed, also one that arrives while
an earlier request is still being answered (pipelined). Here, not around the
application's receive(): an asyncio.timeout per request cost more than a tenth
of a blackhole delivery's overhead (bench/).

uvicorn has no public hook for any of it, so this relies on its internals (bounded
in pyproject.toml; tests/canaries/test_uvicorn_protocol.py fails naming the one
that changed):

- `uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`, its constructor
  passed through, and the methods overridden here, each calling uvicorn's:
  `connection_made` (sets `transport`, `flow` and `client`), `data_received`
  (feeds the httptools parser, which calls the callbacks below within it),
  `on_message_begin`, `on_headers_complete` and `on_message_complete`
  (httptools callbacks: the protocol is its parser's callback object),
  `on_response_complete` (each cycle's `on_response`: a response was written),
  `pause_writing`/`resume_writing` (the transport's write flow control),
  `connection_lost` (the request under way is marked disconnected: the
  application's receive() then returns http.disconnect);
- its attributes `loop`, `transport`, `flow` (replaced after connection_made:
  every request's cycle takes it from there), `client` (the peer), `logger`
  (replaced after connection_made: cycles take it from there), `pipeline`
  (requests waiting for the one being answered) and `cycle` (None before the
  first request, then the latest request's `RequestResponseCycle`);
- the cycle's `response_started`, `response_complete`, `disconnected`,
  `message_event` and `scope` (the very dict the application gets);
- `uvicorn.protocols.http.flow_control.FlowControl(transport)`: `read_paused`,
  and `pause_reading()`/`resume_reading()`, through which uvicorn stops and
  resumes reading (a pipelined request, a body the application has not read).
"""

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.metrics import CONNECTIONS_SHED

logger = logging.getLogger("mailrelay.http")

#: Room for the request line and ordinary headers, before the envelope headers of the raw form.
BASE_HEAD_LIMIT = 64 * 1024
#: One X-Envelope-Recipient header: base64 of an address of up to 320 characters, plus its name.
HEAD_BYTES_PER_RECIPIENT = 512
#: A client's misbehaviour, or shedding, is logged at most once this many seconds (per kind).
LOG_INTERVAL = 10.0


def head_limit(max_recipients: int) -> int:
    return BASE_HEAD_LIMIT + HEAD_BYTES_PER_RECIPIENT * max_recipients


def connection_cap(max_connections: int | None) -> int:
    """`max_connections`, or half the soft RLIMIT_NOFILE: the other half is left for the relays'
    connections, pipes and files, so that a flood of clients cannot starve them (or /healthz)."""
    if max_connections is not None:
        return max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft // 2)


#: Set in the request's scope when the protocol cut its body off (the 408 is already written):
#: the application then reads a disconnect and answers (and counts) 408, not 400.
BODY_TIMED_OUT = "mailrelay.body_timed_out"


class RateLimitedLog:
    """One line at most every LOG_INTERVAL seconds for something that may happen thousands of
    times a second (a client's doing): the first at once, the rest summed up in one line later."""

    def __init__(self, level: int, message: str, event: str = "client") -> None:
        self.level, self.message, self.event = level, message, event  # message: "%d" the count, "%s" the peer
        self._count = 0
        self._peer = ""
        self._next = 0.0
        self._pending: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, peer: str) -> None:
        self._count += 1
        self._peer = peer
        if self._pending is not None:
            return
        now = loop.time()
        if now >= self._next:
            self._emit(loop)
        else:
            self._pending = loop.call_at(self._next, self._emit, loop)

    def _emit(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        fields = {"event": self.event, "count": self._count, "peer": self._peer}
        logger.log(self.level, self.message, self._count, self._peer, extra=fields)
        self._count = 0
        self._next = loop.time() + LOG_INTERVAL


_HEAD_TOO_LARGE = RateLimitedLog(logging.INFO, "request head over the limit: %d connection(s) closed, the latest %s")
_HEAD_TIMEOUT = RateLimitedLog(logging.INFO, "request head too slow: %d connection(s) closed, the latest %s")
_SEND_TIMEOUT = RateLimitedLog(
    logging.INFO, "client stopped reading the response: %d connection(s) dropped, the latest %s"
)


class _Connections:
    """One server's connections: how many are open, which are idle (oldest first), and the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.idle: OrderedDict[BoundedHttpToolsProtocol, None] = OrderedDict()
        self.shed = RateLimitedLog(
            logging.WARNING,
            f"connection limit ({cap}) reached: %d connection(s) shed (idle ones closed to make room, "
            "or new ones refused), the latest for %s",
            "connection_limit",
        )


class _PeerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's protocol logger for one connection. Its warnings are a client's doing (a
    malformed request, an unsupported upgrade): rate-limited, with the peer. Its errors are
    the application's: they pass as they are."""

    def __init__(self, inner: logging.Logger, peer: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(inner, {})
        self.peer, self.loop = peer, loop

    @property
    def level(self) -> int:  # uvicorn reads it to decide on its trace lines
        return int(self.logger.level)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level == logging.WARNING and not args:
            text = str(msg).rstrip(".")
            if (limited := _CLIENT_WARNINGS.get(text)) is None and len(_CLIENT_WARNINGS) < 32:
                limited = _CLIENT_WARNINGS[text] = RateLimitedLog(
                    logging.WARNING, text + ": %d since the last such line, the latest from %s"
                )
            if limited is not None:
                limited.note(self.loop, self.peer)
                return
        super().log(level, msg, *args, **kwargs)


#: uvicorn's warnings by their (constant) text.
_CLIENT_WARNINGS: dict[str, RateLimitedLog] = {}


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
    """Set `head_limit`, `idle_timeout`, `send_timeout` and `open_connections` on a subclass
    (see `bounded_protocol`).

    The head must be complete within `idle_timeout` of its first byte, and the first
    request's within `idle_timeout` of the connection (a connection that never sends
    a byte, or a byte now and then, must not hold a connection: slowloris); the body
    must not fall silent for `idle_timeout` while we are reading it; a client must not
    leave our answer unread (the write buffer above its high-water mark) for
    `send_timeout`. Past `open_connections.cap` open connections, the one idle longest
    (no request being answered) is closed to make room; when none is idle, the new
    one is answered 503 and closed.
    """

    head_limit = BASE_HEAD_LIMIT
    idle_timeout = 30.0
    send_timeout = 30.0
    open_connections: ClassVar[_Connections] = _Connections(1 << 20)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_size = 0
        self._head_tail = b""  # the head's last bytes so far: its end may straddle two reads
        self._ended = False  # in this data_received call: a message ended
        self._late_head = False  # ... and a head began after it, not complete in this data
        self._waiting: Literal["head", "body"] | None = None  # what the current request still lacks
        self._since = 0.0  # head: its first byte; body: the last byte, or when reading resumed
        self._watchdog: asyncio.TimerHandle | None = None
        self._send_watchdog: asyncio.TimerHandle | None = None
        self._counted = False
        self._peer = "-"
        self._unanswered: list[RequestResponseCycle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.flow = _WatchedFlow(self.transport, self._reading_resumed)
        self._peer = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        self.logger = _PeerLog(self.logger, self._peer, self.loop)  # type: ignore[assignment]
        connections = self.open_connections
        connections.open += 1
        self._counted = True
        connections.idle[self] = None
        if connections.open > connections.cap:
            oldest = next(iter(connections.idle))
            if oldest is not self:
                oldest._shed("idle_closed")
            else:
                self._shed("refused")
                return
        self._watch("head")  # a connection that never sends a byte is closed all the same

    def data_received(self, data: bytes) -> None:
        if self._waiting == "body":
            self._since = self.loop.time()
        else:
            # In a head, or between messages (the data begins one): counted before the parser
            # reads it, up to the head's end, so that the piece that completes a head counts too
            # (counted after, it did not: a head one read, up to 256 KiB, over the limit was served).
            tail = self._head_tail
            seen = tail + data if tail else data
            end = seen.find(b"\r\n\r\n")
            bare = seen.find(b"\n\n", 0, end if end >= 0 else len(seen))  # bare LFs, before any CRLF end
            if bare >= 0 or end >= 0:
                self._head_size += max(0, (bare + 2 if bare >= 0 else end + 4) - len(tail))
                self._head_tail = b""
            else:
                self._head_size += len(data)
                self._head_tail = seen[-3:]
            if self._head_size > self.head_limit:
                self._refuse(431, f"request headers over {self.head_limit} bytes", head=True)
                return
        # A head that begins after a message ended in this same data: how much of the data it
        # is, we cannot tell; it is counted from the next data on.
        self._ended = self._late_head = False
        super().data_received(data)
        if self._late_head:
            # Its end may straddle this data and the next: without this tail, the next data
            # (the terminator's rest and a body) was counted whole as head, and a legitimate
            # pipelined request with a body over the head limit got 431.
            self._head_tail = data[-3:]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._late_head = self._ended
        if self._waiting is None:  # for the first request, the connection's own watch goes on
            self._watch("head")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._waiting != "body":
            super().on_header(name, value)
            return
        # A trailer (after a chunked body): uvicorn would append it to the running request's
        # headers without end, and data_received counts only heads. Nothing here reads
        # trailers: they are dropped, and bounded as a head is.
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.head_limit:
            self._refuse(431, f"request trailers over {self.head_limit} bytes", head=False)

    def on_headers_complete(self) -> None:
        self._head_size, self._head_tail, self._late_head = 0, b"", False
        self.open_connections.idle.pop(self, None)
        # Every request's body is watched, also one whose head came while the previous
        # response was still going out (pipelined).
        self._watch("body")
        super().on_headers_complete()
        if self.cycle is not None:
            self._unanswered.append(self.cycle)

    def on_message_complete(self) -> None:
        self._head_size, self._head_tail = 0, b""  # its trailers' count, and the next head's
        self._ended, self._late_head = True, False
        self._stop_watching()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unanswered = [cycle for cycle in self._unanswered if not cycle.response_complete]
        if not self._unanswered and self._counted and not self.transport.is_closing():
            self.open_connections.idle[self] = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_watchdog is None:
            self._send_watchdog = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_watchdog is not None:
            self._send_watchdog.cancel()
            self._send_watchdog = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        if self._send_watchdog is not None:
            self._send_watchdog.cancel()
            self._send_watchdog = None
        self._uncount()
        # uvicorn marks only the latest request disconnected; an earlier one still being
        # answered (pipelining) would write to the closed transport and log a traceback.
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.open_connections.open -= 1
            self.open_connections.idle.pop(self, None)

    def _shed(self, reason: Literal["idle_closed", "refused", "send_timeout"]) -> None:
        """Close this connection to keep the service within its bounds: counted, and logged (rate-limited)."""
        self._uncount()
        self._stop_watching()
        CONNECTIONS_SHED.labels(reason).inc()
        if reason == "send_timeout":
            _SEND_TIMEOUT.note(self.loop, self._peer)
        else:
            self.open_connections.shed.note(self.loop, self._peer)
        if reason == "refused":
            self._write_problem(503, "Service Unavailable", "too many open connections; try again later")
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # an unread answer would hold the descriptor until flushed
        else:
            self.transport.close()

    def _send_timed_out(self) -> None:
        self._send_watchdog = None
        if not self.transport.is_closing():
            self._shed("send_timeout")

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

    def _answering(self) -> bool:
        """A request before the current head is still being answered (or waits to be)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse(self, status: int, detail: str, *, head: bool) -> None:
        self._stop_watching()
        if self.transport.is_closing():
            return
        if head:
            (_HEAD_TIMEOUT if status == 408 else _HEAD_TOO_LARGE).note(self.loop, self._peer)
            if self._answering():
                # An answer is being written: ours cannot go in the middle of it. The head is
                # a hostile one (a well-behaved client sends a head at once), so the answer is cut.
                self.transport.abort()
                return
            if status == 408 and self._head_size == 0 and self.cycle is None:
                self.transport.close()  # not a byte since the connection: nobody to answer
                return
        # For a head, self.cycle is the previous request's (finished) cycle, if any.
        if head or self.cycle is None or not self.cycle.response_started:
            title = "Request Timeout" if status == 408 else "Request Header Fields Too Large"
            self._write_problem(status, title, detail)
        # The application, if it waits for the body, now gets http.disconnect.
        self.transport.close()

    def _write_problem(self, status: int, title: str, detail: str) -> None:
        body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
        head_bytes = (
            f"HTTP/1.1 {status} {title}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head_bytes.encode("ascii") + body)


def body_timeout_detail(seconds: float) -> str:
    return f"the request body stopped arriving for {seconds:g} s; nothing was delivered"


def bounded_protocol(
    max_recipients: int,
    idle_timeout: float,
    send_timeout: float = 30.0,
    max_connections: int | None = None,
) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this configuration's limits; each
    class counts its own connections (one per server)."""
    return type(
        "MailrelayHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "head_limit": head_limit(max_recipients),
            "idle_timeout": idle_timeout,
            "send_timeout": send_timeout,
            "open_connections": _Connections(connection_cap(max_connections)),
        },
    )
