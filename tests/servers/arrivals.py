"""An SMTP sink that records when each message arrived (the end of its data), in its own thread."""

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass
class ArrivalSink:
    host: str
    port: int
    #: time.monotonic() of each message's final ".", in arrival order (appended by the sink's thread).
    arrivals: list[float] = field(default_factory=list)

    def rate(self, start: float, seconds: float) -> float:
        """Messages per second that arrived in [start, start + seconds)."""
        return sum(1 for t in list(self.arrivals) if start <= t < start + seconds) / seconds


class _Recorder:
    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = arrivals

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrivals.append(time.monotonic())
        return "250 2.0.0 Ok: queued"


@contextmanager
def arrival_sink() -> Iterator[ArrivalSink]:
    """aiosmtpd on 127.0.0.1 and a free port (read from the bound socket: no race), accepting everything."""
    arrivals: list[float] = []
    handler = _Recorder(arrivals)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.example", ident="arrivals ESMTP"), "127.0.0.1", 0
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

    thread = threading.Thread(target=run, name="arrival-sink", daemon=True)
    thread.start()
    if not ready.wait(10) or "error" in state:
        raise RuntimeError(f"the arrival sink did not start: {state.get('error')}")
    try:
        yield ArrivalSink("127.0.0.1", state["port"], arrivals)
    finally:

        async def shutdown() -> None:
            state["server"].close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
