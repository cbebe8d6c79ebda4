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
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}
    sink = CountingSink("127.0.0.1", 0, counts, data_delay)
    handler = _Recorder(sink)
    transports: list[asyncio.BaseTransport] = []

    class Counting(SMTP):
        _ended = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
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

    async def start() -> None:
        server = await loop.create_server(
            lambda: Counting(handler, hostname="sink.example", ident="counting ESMTP"), "127.0.0.1", 0
        )
        state["server"] = server
        state["port"] = server.sockets[0].getsockname()[1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # reported below
            state["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="counting-sink", daemon=True)
    thread.start()
    if not ready.wait(10) or "error" in state:
        raise RuntimeError(f"the counting sink did not start: {state.get('error')}")
    sink.port = state["port"]
    try:
        yield sink
    finally:

        async def shutdown() -> None:
            state["server"].close()
            for transport in transports:
                transport.abort()  # type: ignore[attr-defined]
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
