"""An SMTP sink that records how many connections it has at once (and the peak), in its own thread.

A connection counts from its accept until the sink reads QUIT (or the connection is lost,
whichever comes first): a client that waits for the 221 before it lets another open a
connection is then never seen twice.
"""

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP

from tests.servers.smtp import serving


@dataclass
class ConnectionCounts:
    """Kept by the sink's thread; a test reads it (`peak`, `messages`) between rounds."""

    current: int = 0
    peak: int = 0
    connections: int = 0
    messages: int = 0
    #: time.monotonic() of each connection's accept.
    opened_at: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def opened(self) -> None:
        with self._lock:
            self.current += 1
            self.connections += 1
            self.peak = max(self.peak, self.current)
            self.opened_at.append(time.monotonic())

    def ended(self) -> None:
        with self._lock:
            self.current -= 1

    def reset_peak(self) -> None:
        """Start a new round: the peak from now on (at least the connections open now)."""
        with self._lock:
            self.peak = self.current


@dataclass
class CountingSink:
    host: str
    port: int
    counts: ConnectionCounts
    #: Seconds the sink holds each message before its reply (connections stay busy meanwhile).
    data_delay: float


class _Recorder:
    def __init__(self, sink: "CountingSink") -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        with self.sink.counts._lock:
            self.sink.counts.messages += 1
        return "250 2.0.0 Ok: queued"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        server.counted_end()
        return "221 2.0.0 Bye"


@contextmanager
def counting_sink(data_delay: float = 0.0) -> Iterator[CountingSink]:
    """aiosmtpd on 127.0.0.1 and a free port (read from the bound socket), accepting every message
    after `data_delay` seconds, counting connections open at once."""
    counts = ConnectionCounts()
    sink = CountingSink("127.0.0.1", 0, counts, data_delay)
    handler = _Recorder(sink)
    transports: list[asyncio.Transport] = []

    class Counting(SMTP):
        _ended = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            counts.opened()
            transports.append(transport)
            super().connection_made(transport)

        def counted_end(self) -> None:
            if not self._ended:
                self._ended = True
                counts.ended()

        def connection_lost(self, error: Exception | None) -> None:
            self.counted_end()
            super().connection_lost(error)

    def protocol() -> Counting:
        return Counting(handler, hostname="sink.example", ident="counting ESMTP")

    with serving(protocol, "127.0.0.1", 0, "counting-sink", transports=transports) as port:
        sink.port = port
        yield sink
